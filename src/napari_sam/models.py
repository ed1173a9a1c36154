"""SAM model registry, checkpoint resolution, architecture inference and loading.

This is the only module that builds a :class:`segment_anything.modeling.Sam`. Heavy
imports (torch, segment_anything) happen inside the functions that need them, so importing
this module is cheap.

Examples
--------
>>> from napari_sam.models import load_model
>>> model = load_model("vit_b")                     # doctest: +SKIP
>>> model = load_model(checkpoint="my_sam.pth")     # doctest: +SKIP
>>> model.architecture.name, model.device           # doctest: +SKIP
('vit_b', device(type='cpu'))
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _download
from ._checkpoint import EXPECTED, PATCH_KEY, check_keys, describe_keys, load_state_dict_file, state_dict_sha256
from ._errors import CheckpointError, InvalidInputError
from ._registry import REGISTRY, ModelSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from segment_anything.modeling import Sam

__all__ = [
    "Architecture",
    "ModelSpec",
    "REGISTRY",
    "SamModel",
    "default_model_name",
    "list_models",
    "cache_dir",
    "choose_device",
    "infer_architecture",
    "build_sam",
    "resolve_checkpoint",
    "load_model",
]

ENV_MODEL = "NAPARI_SAM_MODEL"
ENV_CHECKPOINTS = "NAPARI_SAM_CHECKPOINTS"
ENV_CACHE_DIR = "NAPARI_SAM_CACHE_DIR"


@dataclass(frozen=True)
class Architecture:
    """Shape parameters of a SAM ViT model (everything ``build_sam`` needs).

    The mask decoder and prompt encoder are those of the official SAM (two-way transformer
    of depth 2, MLP 2048, 8 heads); only ``prompt_embed_dim`` varies.
    """

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    window_size: int = 14
    prompt_embed_dim: int = 256
    patch_size: int = 16

    @property
    def embedding_size(self) -> int:
        """Side of the square image embedding grid, ``image_size // patch_size``."""
        return self.image_size // self.patch_size

    @property
    def name(self) -> str:
        """``"vit_b"``, ``"vit_l"`` or ``"vit_h"`` for an official architecture, else ``"custom"``."""
        for name, arch in OFFICIAL_ARCHITECTURES.items():
            if arch == self:
                return name
        return "custom"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fields (global attention indexes as a list)."""
        d = dataclasses.asdict(self)
        d["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return d

    def describe(self) -> str:
        """One-line human description, used in error messages."""
        return (
            f"embed dim {self.encoder_embed_dim}, depth {self.encoder_depth}, "
            f"{self.encoder_num_heads} heads, global attention blocks "
            f"{list(self.encoder_global_attn_indexes)}, window {self.window_size}, "
            f"image size {self.image_size}, prompt dim {self.prompt_embed_dim}"
        )


OFFICIAL_ARCHITECTURES: dict[str, Architecture] = {
    "vit_b": Architecture(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": Architecture(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": Architecture(1280, 32, 16, (7, 15, 23, 31)),
}


@dataclass(eq=False)
class SamModel:
    """A loaded SAM model and what identifies it.

    Attributes
    ----------
    sam : segment_anything.modeling.Sam
        In eval mode, on ``device``, with ``requires_grad`` False.
    architecture : Architecture
    checkpoint_sha256 : str
        SHA-256 of the checkpoint file; for an in-memory Sam, SHA-256 over its state dict
        (names, shapes, dtypes, bytes, in sorted order).
    name : str
        Registry name, checkpoint file name, or ``"custom"``.
    device : torch.device
    checkpoint_path : Path or None
    """

    sam: Sam
    architecture: Architecture
    checkpoint_sha256: str
    name: str
    device: torch.device
    checkpoint_path: Path | None = field(default=None)

    @property
    def image_size(self) -> int:
        """Side of the square input SAM expects (1024 for the official models)."""
        return self.architecture.image_size

    def signature(self) -> dict[str, Any]:
        """What an embedding cache must match: architecture and checkpoint hash."""
        return {"architecture": self.architecture.to_dict(), "checkpoint_sha256": self.checkpoint_sha256}


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


# --------------------------------------------------------------------- state dicts

def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> Architecture:
    """Infer a SAM architecture from the shapes in its state dict.

    Embed dim and patch size come from the patch embedding, image size from the absolute
    position embedding ``(1, H/16, W/16, C)``, depth from the block count, heads from the
    relative position tables ``(2*size-1, head_dim)`` (whose length also tells global from
    windowed blocks and gives the window size), prompt dim from the neck.

    Raises
    ------
    CheckpointError
        The state dict is not a SAM ViT state dict, or its shapes are inconsistent.
    """
    sd = state_dict

    def need(key: str) -> Any:
        if key not in sd:
            raise CheckpointError(f"state dict has no {key!r}; expected {EXPECTED}")
        return sd[key]

    if PATCH_KEY not in sd:
        raise CheckpointError(f"not a SAM state dict: found {describe_keys(sd)}; expected {EXPECTED}")
    patch = need(PATCH_KEY)
    if patch.ndim != 4 or patch.shape[2] != patch.shape[3]:
        raise CheckpointError(f"{PATCH_KEY} has shape {tuple(patch.shape)}; expected (C, 3, P, P)")
    embed_dim, patch_size = int(patch.shape[0]), int(patch.shape[2])
    pos = need("image_encoder.pos_embed")
    if pos.ndim != 4 or pos.shape[1] != pos.shape[2]:
        raise CheckpointError(
            f"image_encoder.pos_embed has shape {tuple(pos.shape)}; expected (1, N, N, {embed_dim})"
        )
    grid = int(pos.shape[1])
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise CheckpointError(f"image encoder blocks are {blocks}; expected 0..depth-1")
    head_dims, global_idx, windows = set(), [], set()
    for i in blocks:
        rel = need(f"image_encoder.blocks.{i}.attn.rel_pos_h")
        head_dims.add(int(rel.shape[1]))
        if rel.shape[0] == 2 * grid - 1:
            global_idx.append(i)
        else:
            windows.add((int(rel.shape[0]) + 1) // 2)
    if len(head_dims) != 1 or len(windows) > 1 or embed_dim % next(iter(head_dims)):
        raise CheckpointError(
            f"inconsistent attention shapes: head dims {sorted(head_dims)}, windows "
            f"{sorted(windows)} for embed dim {embed_dim}"
        )
    neck = need("image_encoder.neck.0.weight")
    prompt_dim = int(neck.shape[0])
    point = sd.get("prompt_encoder.point_embeddings.0.weight")
    if point is not None and int(point.shape[-1]) != prompt_dim:
        raise CheckpointError(
            f"neck output {prompt_dim} differs from prompt encoder dim {int(point.shape[-1])}"
        )
    return Architecture(
        encoder_embed_dim=embed_dim,
        encoder_depth=len(blocks),
        encoder_num_heads=embed_dim // next(iter(head_dims)),
        encoder_global_attn_indexes=tuple(global_idx),
        image_size=grid * patch_size,
        window_size=windows.pop() if windows else 14,
        prompt_embed_dim=prompt_dim,
        patch_size=patch_size,
    )


def build_sam(architecture: Architecture) -> Sam:
    """Build an untrained SAM with the given architecture (``segment_anything._build_sam``).

    The result is in eval mode, on the CPU, with freshly initialised weights.
    """
    from functools import partial

    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    a = architecture
    grid = a.embedding_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=a.encoder_depth,
            embed_dim=a.encoder_embed_dim,
            img_size=a.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=a.encoder_num_heads,
            patch_size=a.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(a.encoder_global_attn_indexes),
            window_size=a.window_size,
            out_chans=a.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=a.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(a.image_size, a.image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=a.prompt_embed_dim, mlp_dim=2048, num_heads=8),
            transformer_dim=a.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.eval()
    return sam


# --------------------------------------------------------------------- resolution


def _unknown_name(name: str) -> InvalidInputError:
    return InvalidInputError(
        f"model={name!r} is neither a known model nor an existing checkpoint file; "
        f"known models: {', '.join(REGISTRY)}; a path to a SAM checkpoint (.pth/.pt) is "
        "accepted too"
    )


def _verify_local(path: Path, spec: ModelSpec) -> str:
    algorithm, expected = spec.checksum
    digests = _download.verify_file(
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
    digests = _download.download(
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
        sha = _download.file_digests(path, index_dir=cache_dir())["sha256"]
    else:
        assert spec is not None
        path, sha, _ = _resolve(spec.name, progress=progress)
    state = load_state_dict_file(path)
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
    return SamModel(_finish(sam, dev), arch, str(sha), name, dev, path)
