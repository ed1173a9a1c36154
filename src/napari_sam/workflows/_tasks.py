"""The units of work of batch jobs, run locally or as dask tasks.

Each task is a plain module-level function ``fn(job, unit) -> encoder calls`` that opens
the job's zarr arrays by path, writes its own chunks, and then its done flag. A process
keeps its loaded model (:func:`napari_sam.models.load_model_cached`) and one
:class:`~napari_sam.Segmenter` (with its memory cache) per stack in :data:`_SEGMENTERS`,
so a dask worker loads the model once however many tasks it runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .._errors import InvalidInputError
from ..engine.prompt import Prompt
from ..io.prompt_files import ObjectPrompt

__all__ = ["Job", "ModelRef", "Progress", "as_prompt", "mark_done", "model_ref", "open_array", "run_units",
           "segmenter_of", "slot", "task_auto", "task_embed", "task_propagate", "task_segment"]

Progress = Callable[[int, int], None]

_IN_MEMORY: dict[tuple, Any] = {}  # models given as objects (no file to load them from)
_SEGMENTERS: dict[str, Any] = {}  # per process: stack/model/cache key -> Segmenter


# ---------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelRef:
    """How a worker finds the model: a registry name or checkpoint path, and a device."""

    model: str | None = None
    checkpoint: str | None = None
    device: str | None = None

    @property
    def key(self) -> tuple:
        return (self.model, self.checkpoint, self.device)

    def load(self):
        hit = _IN_MEMORY.get(self.key)
        if hit is not None:
            return hit
        from ..models.loading import load_model_cached

        return load_model_cached(self.model, checkpoint=self.checkpoint, device=self.device,
                                 progress=False)


def model_ref(model, checkpoint, device) -> ModelRef:
    """A :class:`ModelRef` for what a job was given (a loaded model, a name, a path)."""
    from ..models.sam import SamModel

    if isinstance(model, SamModel):
        if model.checkpoint_path is not None:
            return ModelRef(checkpoint=str(model.checkpoint_path), device=str(model.device))
        ref = ModelRef(model="<in-memory>", device=str(model.device))
        _IN_MEMORY[ref.key] = model
        return ref
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise InvalidInputError(f"model must be a name, a checkpoint path or a SamModel, got {type(model).__name__}")
    if model is None and checkpoint is None:
        from ..models.loading import default_model_name

        model = default_model_name()  # resolved here, so workers need not share our env
    return ModelRef(None if model is None else str(model),
                    None if checkpoint is None else str(checkpoint),
                    None if device is None else str(device))


# ---------------------------------------------------------------------- jobs
@dataclass
class Job:
    kind: str
    key: str
    stack: Any
    model: ModelRef
    cache: str | None
    labels: str
    work: str
    objects: list[ObjectPrompt]
    params: dict
    seg_key: str = ""  # same stack, model and cache: same Segmenter (and memory cache)
    tile_above: int = 0  # tile slices larger than this (see napari_sam.workflows.tiling)


def segmenter_of(job: Job):
    """The process's segmenter for the job's stack, model and cache (made once)."""
    return _segmenter(job)


def _segmenter(job: Job):
    seg = _SEGMENTERS.get(job.seg_key or job.key)
    if seg is None:
        from ..models.speed import reproducible
        from .tiling import segmenter_for

        model = job.model.load()
        seg = segmenter_for(model, job.stack, cache=job.cache, tile_above=job.tile_above,
                            speed=reproducible(model.speed_config()))
        _SEGMENTERS.clear()  # one stack's segmenter per process at a time
        _SEGMENTERS[job.seg_key or job.key] = seg
    return seg


def slot(stack, index: int) -> tuple:
    """Where slice ``index`` goes in a (slice axes..., Y, X) label array."""
    return tuple(stack.position(index))


def open_array(path: str):
    import zarr

    return zarr.open_array(path, mode="r+")


def mark_done(job: Job, name: str, i: int) -> None:
    open_array(f"{job.work}/{name}")[i] = 1


def as_prompt(o: ObjectPrompt) -> Prompt:
    """An object read from a prompts file as the engine's prompt type."""
    has_points = len(o.points) > 0
    return Prompt.of(points=o.points if has_points else None,
                     point_labels=o.point_labels if has_points else None, box=o.box)


def _encoded(seg, before: int) -> int:
    return seg.cache.stats["encoder_calls"] - before


def task_segment(job: Job, index: int) -> int:
    """Segment the objects prompted on slice ``index`` (one batched call); write its labels."""
    seg = _segmenter(job)
    before = seg.cache.stats["encoder_calls"]
    ids = [k + 1 for k, o in enumerate(job.objects) if o.index == index]
    lab = np.zeros(seg.stack.slice_shape, np.uint32)
    if ids:
        preds = seg.predict_many(index, [as_prompt(job.objects[k - 1]) for k in ids])
        for k, p in zip(ids, preds):
            lab[p.mask & (lab == 0)] = k  # lower ids keep overlapping pixels
    open_array(job.labels)[slot(seg.stack, index)] = lab
    mark_done(job, "done", index)
    return _encoded(seg, before)


def task_propagate(job: Job, group: int) -> int:
    """Propagate one fixed group of objects; write their masks and stop reasons."""
    from .volume import Seed, propagate_many

    seg = _segmenter(job)
    before = seg.cache.stats["encoder_calls"]
    size = job.params["group_size"]
    first = group * size
    objs = job.objects[first:first + size]
    prompts = [as_prompt(o) for o in objs]
    seeds = [Seed(o.index, points=p.points if p.n_points else None,
                  point_labels=p.labels if p.n_points else None, box=p.box)
             for o, p in zip(objs, prompts)]
    opts = {k: job.params[k] for k in ("strategy", "min_score", "min_iou", "max_slices")}
    results = propagate_many(seg, seeds, batch=True, **opts)
    masks = open_array(f"{job.work}/objects")
    info = []
    for j, r in enumerate(results):
        for z in r.accepted:
            masks[first + j, z] = r.mask[z]
        info.append({"id": first + j + 1, "line": r.indices, "accepted": r.accepted, "stop": r.stop,
                     "scores": {str(s.z): round(s.score, 4) for s in r.steps}})
    path = Path(job.work) / "info" / f"{group:06d}.json"
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)
    mark_done(job, "groups_done", group)
    return _encoded(seg, before)


def task_auto(job: Job, index: int) -> int:
    """Segment everything on slice ``index`` (merged in 3D later)."""
    from .auto import auto_segment_slice

    seg = _segmenter(job)
    before = seg.cache.stats["encoder_calls"]
    p = {k: v for k, v in job.params.items() if k != "merge_iou"}
    open_array(f"{job.work}/slices")[index] = auto_segment_slice(seg, index, **p)
    mark_done(job, "slices_done", index)
    return _encoded(seg, before)


def task_embed(job: Job, index: int) -> int:
    """Embed slice ``index`` (every tile of it, when tiled) into the job's store."""
    return _segmenter(job).embed([index])


def run_units(job: Job, fn, units: Sequence[int], *, client, progress: Progress | None,
         offset: int = 0, total: int | None = None) -> int:
    """Run ``fn(job, unit)`` for every unit, locally or on ``client``; sum of results."""
    total = len(units) + offset if total is None else total
    encoded = 0
    if client is None:
        for done, u in enumerate(units, start=1):
            encoded += fn(job, int(u))
            if progress is not None:
                progress(offset + done, total)
        return encoded
    from distributed import as_completed

    futures = client.map(fn, [job] * len(units), [int(u) for u in units], pure=False)
    for done, fut in enumerate(as_completed(futures), start=1):
        encoded += fut.result()
        if progress is not None:
            progress(offset + done, total)
    return encoded


