"""Provenance records of the objects the engine makes (see :mod:`napari_sam.io.provenance`).

The widget, batch jobs and replay build their records here, so that every front end
describes an object the same way and :mod:`.replay` can run it again.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from ..engine.prompt import Prompt
from ..io.provenance import now

__all__ = ["context", "record", "step", "speed_of"]


def step(prompt: Prompt, *, refine: bool = False, mask: int | None = None) -> dict:
    """One prompt step: its points, labels and box, whether it started from the previous
    step's logits, and the candidate mask kept (None: the best)."""
    d = prompt.to_dict()
    d["refine"], d["mask"] = bool(refine), mask
    return d


def speed_of(seg: Any) -> dict:
    """The speed path of a segmenter, as a dict :class:`~napari_sam.models.speed.SpeedConfig` takes."""
    return dataclasses.asdict(seg.cache.speed)


def context(seg: Any, *, image_path: str | None = None) -> dict:
    """What every record of objects made by ``seg`` shares: model, image, version."""
    import napari_sam

    stack = seg.stack
    channel = stack.channel
    return {
        "model": {"name": seg.model.name, "checkpoint_sha256": seg.model.signature().get(
            "checkpoint_sha256"), "speed": speed_of(seg),
                  "tiled": getattr(seg, "tiles", None) is not None},
        "image": {"path": image_path or getattr(stack, "path", None), "axes": stack.axes,
                  "channel": list(channel) if isinstance(channel, tuple) else channel,
                  "normalisation": stack.normalisation()},
        "version": napari_sam.__version__,
    }


def record(seg: Any, *, label_ids: Sequence[int], source: str, position: Sequence[int],
           steps: Sequence[dict] = (), parent: int | None = None, params: dict | None = None,
           image_path: str | None = None) -> dict:
    """A provenance record for objects ``label_ids`` made by ``seg``."""
    return {"label_ids": [int(i) for i in label_ids], "source": source,
            "parent": None if parent is None else int(parent),
            "position": [int(p) for p in position], "steps": list(steps),
            "params": dict(params or {}), **context(seg, image_path=image_path), "time": now()}
