"""Loading models: the registry, verified downloads, checkpoint files, devices, one model cache.

Heavy imports (torch, segment_anything) happen inside the functions that need them, so
importing this module is cheap.

Examples
--------
>>> from napari_sam.models import load_model
>>> model = load_model("vit_b")                     # doctest: +SKIP
>>> model = load_model(checkpoint="my_sam.pth")     # doctest: +SKIP
>>> model.architecture.name, model.device           # doctest: +SKIP
('vit_b', device(type='cpu'))
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from .._errors import CheckpointError, InvalidInputError
from . import download
from .architecture import OFFICIAL_ARCHITECTURES, build_sam, infer_architecture
from .checkpoint import check_keys, load_checkpoint, state_dict_sha256
from .registry import REGISTRY, ModelSpec
from .sam import SamModel

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from segment_anything.modeling import Sam

__all__ = [
    "ENV_MODEL",
    "cache_dir",
    "choose_device",
    "default_model_name",
    "list_models",
    "load_model",
    "load_model_cached",
    "resolve_checkpoint",
]

ENV_MODEL = "NAPARI_SAM_MODEL"
ENV_CHECKPOINTS = "NAPARI_SAM_CHECKPOINTS"
ENV_CACHE_DIR = "NAPARI_SAM_CACHE_DIR"


def list_models() -> list[str]:
    """Names of the registry models, in registry order."""
    return list(REGISTRY)


def default_model_name() -> str:
    """``$NAPARI_SAM_MODEL`` when set (a registry name or a checkpoint path), else ``"vit_b"``."""
    return os.environ.get(ENV_MODEL, "").strip() or "vit_b"


def cache_dir() -> Path:
    """Folder of downloaded checkpoints: ``$NAPARI_SAM_CACHE_DIR`` or the user cache folder."""
    env = os.environ.get(ENV_CACHE_DIR, "").strip()
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("napari-sam")) / "checkpoints"


def choose_device(device: str | torch.device | None = None) -> torch.device:
    """Return ``device`` as a ``torch.device``, or the best available: cuda, mps, cpu.

    Raises
    ------
    InvalidInputError
        ``device`` is not a valid device string, or names a backend that is not available.
    """
    import torch

    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(
            f"device={device!r} is not a torch device; use 'cpu', 'cuda', 'cuda:N', 'mps' or None"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device={device!r} but CUDA is not available; use 'cpu' or None")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InvalidInputError(f"device={device!r} but MPS is not available; use 'cpu' or None")
    return dev


# --------------------------------------------------------------------- resolution


def _unknown_name(name: str) -> InvalidInputError:
    return InvalidInputError(
        f"model={name!r} is neither a known model nor an existing checkpoint file; "
        f"known models: {', '.join(REGISTRY)}; a path to a SAM checkpoint (.pth/.pt) is "
        "accepted too"
    )


def _verify_local(path: Path, spec: ModelSpec) -> str:
    algorithm, expected = spec.checksum
    digests = download.verify_file(
        path, algorithm=algorithm, expected=expected, what=f"model {spec.name!r}", index_dir=cache_dir()
    )
    return digests["sha256"]


def _resolve_registry(spec: ModelSpec, *, progress: bool) -> tuple[Path, str]:
    """Find or download a registry checkpoint; return (path, sha256)."""
    folder = os.environ.get(ENV_CHECKPOINTS, "").strip()
    candidates = [Path(folder).expanduser() / spec.filename] if folder else []
    candidates.append(cache_dir() / spec.filename)
    for path in candidates:
        if path.is_file():
            return path, _verify_local(path, spec)
    dest = cache_dir() / spec.filename
    algorithm, expected = spec.checksum
    digests = download.download(
        spec.url,
        dest,
        algorithm=algorithm,
        expected=expected,
        what=f"model {spec.name!r}",
        progress=progress,
        index_dir=cache_dir(),
        hint=f"or into the folder named by ${ENV_CHECKPOINTS}",
    )
    return dest, digests["sha256"]


def resolve_checkpoint(name: str, *, progress: bool = True) -> Path:
    """Return the local path of a checkpoint, downloading a registry model if needed.

    Parameters
    ----------
    name : str
        A registry name (see :func:`list_models`) or the path of an existing file.
    progress : bool, optional
        Show a tqdm progress bar while downloading.

    Notes
    -----
    For a registry name the file is looked up as ``spec.filename`` in the folder named
    by ``$NAPARI_SAM_CHECKPOINTS``, then in :func:`cache_dir`, and otherwise downloaded
    into the cache. Every file found or downloaded is checked against the published hash.

    Raises
    ------
    InvalidInputError
        Unknown name and no such file.
    ChecksumError
        A file does not match the published hash.
    DownloadError
        The download failed; the message names the URL and where to put the file.
    """
    return _resolve(name, progress=progress)[0]


def _resolve(name: str | os.PathLike, *, progress: bool) -> tuple[Path, str | None, ModelSpec | None]:
    """(path, sha256 if already known, spec or None) for a registry name or a path."""
    if isinstance(name, str) and name in REGISTRY:
        spec = REGISTRY[name]
        path, sha = _resolve_registry(spec, progress=progress)
        return path, sha, spec
    path = Path(name).expanduser()
    if path.is_file():
        return path, None, None
    if isinstance(name, os.PathLike) or os.sep in str(name) or path.suffix in (".pth", ".pt", ".ckpt"):
        raise InvalidInputError(f"checkpoint file {str(path)!r} does not exist; give the path of a SAM checkpoint")
    raise _unknown_name(str(name))


def _finish(sam: Sam, device: torch.device) -> Sam:
    sam.to(device)
    sam.eval()
    sam.requires_grad_(False)
    return sam


def load_model(
    model: str | os.PathLike | Sam | SamModel | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> SamModel:
    """Load a SAM model from the registry, a checkpoint file or an in-memory Sam.

    Parameters
    ----------
    model : str, os.PathLike, Sam, SamModel or None, optional
        A registry name (``"vit_b"``, ``"vit_b_lm"`` ... see :func:`list_models`), a
        checkpoint path, a built ``segment_anything.modeling.Sam`` (architecture inferred
        from its state dict; it is moved to ``device`` and frozen in place), or a
        :class:`SamModel` (returned, moved to ``device`` if given). ``None``: the
        checkpoint when given, else :func:`default_model_name` (``$NAPARI_SAM_MODEL``).
    checkpoint : str or os.PathLike, optional
        A SAM checkpoint file; the architecture is inferred from its shapes. With a
        registry name in ``model``, the file must have that model's architecture.
    device : str or torch.device, optional
        Default: cuda, then mps, then cpu.
    progress : bool, optional
        Show a progress bar while downloading.

    Returns
    -------
    SamModel
        The model in eval mode on ``device`` with gradients disabled.

    Raises
    ------
    InvalidInputError
        Unknown model name, missing file, or conflicting arguments.
    CheckpointError
        The file is not a SAM checkpoint, carries code, or contradicts ``model``.
    ChecksumError, DownloadError
        See :func:`resolve_checkpoint`.
    """
    from segment_anything.modeling import Sam

    if isinstance(model, SamModel):
        if checkpoint is not None:
            raise InvalidInputError("checkpoint= cannot be combined with a loaded SamModel")
        if device is not None:
            model.device = choose_device(device)
            _finish(model.sam, model.device)
        return model
    if isinstance(model, Sam):
        if checkpoint is not None:
            raise InvalidInputError("checkpoint= cannot be combined with an in-memory Sam")
        dev = choose_device(device)
        state = model.state_dict()
        arch = infer_architecture(state)
        return SamModel(_finish(model, dev), arch, state_dict_sha256(state), "custom", dev, None)
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise InvalidInputError(
            f"model must be a registry name, a checkpoint path, a segment_anything Sam or a "
            f"SamModel, got {type(model).__name__}"
        )

    spec: ModelSpec | None = None
    if model is None and checkpoint is None:
        model = default_model_name()
    if isinstance(model, str) and model in REGISTRY:
        spec = REGISTRY[model]
    elif model is not None:
        if checkpoint is not None:
            raise InvalidInputError(
                f"model={model!r} is not a registry name, and checkpoint= is given too; "
                f"give a registry name ({', '.join(REGISTRY)}) with checkpoint=, or only a path"
            )
        checkpoint = model

    dev = choose_device(device)
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            if isinstance(checkpoint, str) and os.sep not in checkpoint and not path.suffix:
                raise _unknown_name(checkpoint)
            raise InvalidInputError(f"checkpoint file {str(path)!r} does not exist; give the path of a SAM checkpoint")
        sha = download.file_digests(path, index_dir=cache_dir())["sha256"]
    else:
        assert spec is not None
        path, sha, _ = _resolve(spec.name, progress=progress)
    state, record = load_checkpoint(path)
    arch = infer_architecture(state)
    if spec is not None:
        expected = OFFICIAL_ARCHITECTURES[spec.architecture]
        if arch != expected:
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds a ViT with {arch.describe()} ({arch.name}), "
                f"but model {spec.name!r} expects {expected.describe()}; pass the matching "
                "model name, or only checkpoint= to infer the architecture"
            )
    if spec is not None and (checkpoint is None or sha == spec.sha256):
        name = spec.name
    else:
        name = path.name
    sam = build_sam(arch)
    check_keys(sam.state_dict(), state, f"checkpoint {str(path)!r}", arch.describe())
    sam.load_state_dict(state, strict=True)
    return SamModel(_finish(sam, dev), arch, str(sha), name, dev, path, adaptation=record)


# one loaded model per process for the front ends (the widget, batch workers): reopening
# the widget, switching images or running the next task does not reload the weights
_CACHED: dict[tuple, SamModel] = {}
_CACHED_LOCK = threading.Lock()


def load_model_cached(model: str | os.PathLike | None = None, *,
                      checkpoint: str | os.PathLike | None = None,
                      device: str | torch.device | None = None,
                      progress: bool = True) -> SamModel:
    """:func:`load_model` of a registry name and / or checkpoint path, kept for the next call.

    Only the last model is kept (vit_h weighs 2.5 GB). A checkpoint file is keyed by its
    modification time too, so a rewritten file (an adapted model) is read again.
    """
    if model is None and checkpoint is None:
        model = default_model_name()
    key = _cache_key(model, checkpoint, device)
    with _CACHED_LOCK:
        hit = _CACHED.get(key)
        if hit is None:
            hit = load_model(model, checkpoint=checkpoint, device=device, progress=progress)
            _CACHED.clear()
            _CACHED[key] = hit
        return hit


def _cache_key(model, checkpoint, device) -> tuple:
    def stamp(p):
        path = None if p is None else Path(p).expanduser()
        return path.stat().st_mtime_ns if path is not None and path.is_file() else None

    return (None if model is None else os.fspath(model), stamp(model),
            None if checkpoint is None else os.fspath(checkpoint), stamp(checkpoint),
            None if device is None else str(device))


def keep_loaded(loaded: SamModel, path: str | os.PathLike, *,
                device: str | torch.device | None = None) -> None:
    """Make ``loaded`` what ``load_model_cached(path, device=device)`` returns: a model
    already in memory that was just saved to ``path`` (an adapted decoder, which shares
    its base's image encoder) is not read back from the file."""
    with _CACHED_LOCK:
        _CACHED.clear()
        _CACHED[_cache_key(path, None, device)] = loaded
