"""Reading checkpoint files and finding the SAM weights in them (no Sam is built here).

Private helpers of :mod:`napari_sam.models`; torch is imported inside the functions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "EXPECTED", "PATCH_KEY", "check_keys", "describe_keys", "load_checkpoint", "load_state_dict_file", "sam_state_dict",
    "state_dict_sha256",
]

PATCH_KEY = "image_encoder.patch_embed.proj.weight"
EXPECTED = (
    "a SAM (segment-anything ViT) state dict with keys such as "
    f"'{PATCH_KEY}', 'image_encoder.blocks.0.attn.rel_pos_h', 'prompt_encoder.*', "
    "'mask_decoder.*' (MobileSAM, SAM 2 and other models are not supported)"
)


def _flatten(obj: Mapping, prefix: str, out: dict[str, Any], depth: int = 0) -> None:
    import torch

    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, Mapping) and depth < 4:
            _flatten(value, f"{name}.", out, depth + 1)


def describe_keys(obj: Any) -> str:
    if not isinstance(obj, Mapping):
        return f"a {type(obj).__name__}"
    keys = [str(k) for k in obj]
    shown = ", ".join(repr(k) for k in keys[:6]) + (", ..." if len(keys) > 6 else "")
    return f"a mapping with {len(keys)} keys ({shown})"


def sam_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Find the SAM state dict in a loaded checkpoint and strip wrapper prefixes.

    Handles plain state dicts, trainer checkpoints (``model_state``, ``state_dict``,
    ``model`` ...), ``module.`` (DataParallel), ``sam.`` (micro-sam/torch_em) and
    ``_orig_mod.`` (torch.compile) prefixes: the SAM weights are the keys under the one
    prefix that precedes ``image_encoder.patch_embed.proj.weight``.
    """
    flat: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        _flatten(obj, "", flat)
    prefixes = [k[: -len(PATCH_KEY)] for k in flat if k.endswith(PATCH_KEY)]
    prefixes = [p for p in prefixes if p == "" or p.endswith(".")]
    if not prefixes:
        tensors = list(flat)[:5]
        raise CheckpointError(
            f"{source} is not a SAM checkpoint: found {describe_keys(obj)}"
            + (f" with tensors such as {tensors}" if tensors else "")
            + f"; expected {EXPECTED}"
        )
    if len(prefixes) > 1:
        raise CheckpointError(
            f"{source} holds several SAM models (under prefixes {prefixes}); save the one "
            "you want with torch.save(sam.state_dict(), path)"
        )
    prefix = prefixes[0]
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}



def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()



def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """The SAM state dict of a checkpoint file (see :func:`load_checkpoint`)."""
    return load_checkpoint(path)[0]


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """``torch.load(path, map_location="cpu", weights_only=True)``, then :func:`sam_state_dict`;
    also the ``"napari_sam"`` record of an adapted checkpoint (else None).

    Raises
    ------
    CheckpointError
        The file is refused by the weights-only unpickler (it may carry code, which is
        never run), is not a PyTorch file, or holds no SAM state dict.
    """
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol ..."
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files
        text = str(exc)
        if "Weights only load failed" in text:
            lines = [ln.strip() for ln in text.splitlines()]
            detail = next((ln for ln in lines if "Unsupported" in ln or "GLOBAL" in ln), "")
            raise CheckpointError(
                f"checkpoint {str(path)!r} was refused: the safe loader "
                "torch.load(..., weights_only=True) found more than plain weights in it"
                + (f" ({detail.split(' Please')[0][:200]})" if detail else "")
                + ". It may be a pickle that carries code (napari-sam never runs it) or "
                "objects other than tensors, or not a PyTorch checkpoint at all. If you "
                "trust the file, load it yourself and re-save the weights with "
                "torch.save(sam.state_dict(), new_path)"
            ) from exc
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be read as a PyTorch file "
            f"({type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}); "
            "expected a file written by torch.save(sam.state_dict(), path)"
        ) from exc
    record = obj.get("napari_sam") if isinstance(obj, Mapping) else None
    state = sam_state_dict({k: v for k, v in obj.items() if k != "napari_sam"}
                           if isinstance(record, Mapping) else obj, f"checkpoint {str(path)!r}")
    return state, dict(record) if isinstance(record, Mapping) else None


def check_keys(expected: Mapping[str, Any], state: Mapping[str, Any], source: str, arch: str) -> None:
    """Refuse a state dict that would not load strictly into ``expected``, briefly."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [
        f"{len(items)} {label}: {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", wrong))
        if items
    ]
    if problems:
        raise CheckpointError(
            f"{source} does not fit a SAM with {arch}: " + "; ".join(problems) + f"; expected {EXPECTED}"
        )
