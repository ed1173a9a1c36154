"""``napari-sam info STACK``: what napari-sam sees in an image, and what it has already
computed for it (no model is loaded, nothing is written)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["describe"]


def _model_name(sig: dict) -> str:
    """A registry name for a store signature's model, else its architecture in brief."""
    from ..models.registry import REGISTRY

    model = sig.get("model") or {}
    sha = model.get("checkpoint_sha256") or ""
    for name, spec in REGISTRY.items():
        if sha and getattr(spec, "sha256", None) == sha:
            return name
    arch = model.get("architecture") or {}
    what = f"embed dim {arch.get('encoder_embed_dim')}, depth {arch.get('encoder_depth')}"
    return f"a checkpoint ({what}; SHA-256 {sha[:12]})" if sha else f"a model ({what})"


def describe(stack: Any, *, store: str | Path | None, tile_above: int) -> str:
    """A few lines on ``stack``: axes, shape, slices, channel, contrast limits, the
    embedding store it would use and how many of its slices that store holds."""
    from ..engine.store import store_contents
    from ..io.places import embedding_store_for, labels_file_for
    from ..workflows.tiling import TiledStack, tiling_of

    path = getattr(stack, "path", None)
    axes, shape = stack.axes, stack.shape
    n_channels = shape[axes.index("C")] if "C" in axes else 1
    if stack.rgb_input:
        channel = "RGB (samples used as they are)"
    elif isinstance(stack.channel, tuple):
        channel = f"{list(stack.channel)} of {n_channels} as RGB"
    elif "C" in axes:
        channel = f"{stack.channel} of {n_channels} (--channel K for another)"
    else:
        channel = "single channel"
    limits = stack.contrast_limits
    norm = stack.normalisation()
    sized = ", ".join(f"{a} {s:g}{'' if u is None else ' ' + str(u)}"
                      for a, s, u in zip(axes, stack.scale, stack.units) if a in "ZYX")
    lines = [f"image:          {path or stack.source}",
             f"axes:           {axes}   shape {tuple(shape)}   dtype {stack.dtype}",
             f"slices:         {len(stack)}"
             + (f" (slice axes {stack.slice_axes})" if stack.slice_axes else " (a single 2D image)")
             + f", each {stack.slice_shape[0]} x {stack.slice_shape[1]} px",
             f"pixel size:     {sized}",
             f"channel:        {channel}",
             "contrast:       " + ("none (uint8 data used as it is)" if limits is None else
                                   f"{limits[0]:g} .. {limits[1]:g} ({norm['method']})")]
    tiling = tiling_of(stack.slice_shape, tile_above)
    fingerprints = {stack.fingerprint()}
    if tiling is not None:
        tiled = TiledStack(stack, tile=tiling["tile"], overlap=tiling["overlap"])
        fingerprints.add(tiled.fingerprint())
        lines.append(f"tiling:         on ({len(tiled) // max(len(stack), 1)} tiles of "
                     f"{tiling['tile']} px per slice; --tile-above {tile_above})")
    if store is None and path:
        store = embedding_store_for(path)
    if store is None:
        lines.append("embeddings:     no store (an in-memory image; pass --cache)")
    else:
        groups = store_contents(store)
        lines.append(f"embeddings:     {store}" + ("" if Path(store).exists() else
                                                   " (not there yet: 'napari-sam embed' fills it)"))
        for g in groups:
            sig = g["signature"]
            mine = (sig.get("stack") or {}).get("fingerprint") in fingerprints and \
                sig.get("normalisation", {}).get("contrast_limits") == norm["contrast_limits"]
            lines.append(f"  {_model_name(sig)}: {g['stored']} of {g['n_slices']} slices stored"
                         + ("" if mine else " (for other data or contrast limits: not used)"))
    if path:
        labels = labels_file_for(path)
        if labels.exists():
            lines.append(f"labels:         {labels} (saved by the widget as you go)")
    return "\n".join(lines)
