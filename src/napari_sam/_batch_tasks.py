"""The units of work of batch jobs, run locally or as dask tasks.

Each task is a plain module-level function ``fn(job, unit) -> encoder calls`` that opens
the job's zarr arrays by path, writes its own chunks, and then its done flag. A process
keeps one loaded model per (model, checkpoint, device) in :data:`_MODELS` and one
:class:`~napari_sam.Segmenter` (with its memory cache) per stack in :data:`_SEGMENTERS`,
so a dask worker loads the model once however many tasks it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ._errors import InvalidInputError
from ._prompts_io import ObjectPrompt

Progress = Callable[[int, int], None]

_MODELS: dict[tuple, Any] = {}  # per process: (model, checkpoint, device) -> SamModel
_SEGMENTERS: dict[str, Any] = {}  # per process: stack/model/cache key -> Segmenter


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
        if self.key not in _MODELS:
            from .models import load_model

            _MODELS[self.key] = load_model(self.model, checkpoint=self.checkpoint,
                                           device=self.device, progress=False)
        return _MODELS[self.key]


def _model_ref(model, checkpoint, device) -> ModelRef:
    from .models import SamModel

    if isinstance(model, SamModel):
        ref = (ModelRef(checkpoint=str(model.checkpoint_path), device=str(model.device))
               if model.checkpoint_path is not None else ModelRef(model="<in-memory>", device=str(model.device)))
        _MODELS.setdefault(ref.key, model)
        return ref
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise InvalidInputError(f"model must be a name, a checkpoint path or a SamModel, got {type(model).__name__}")
    if model is None and checkpoint is None:
        from .models import default_model_name

        model = default_model_name()  # resolved here, so workers need not share our env
    return ModelRef(None if model is None else str(model),
                    None if checkpoint is None else str(checkpoint),
                    None if device is None else str(device))


# ---------------------------------------------------------------------- jobs
@dataclass
class _Job:
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


def _segmenter(job: _Job):
    seg = _SEGMENTERS.get(job.seg_key or job.key)
    if seg is None:
        from .fast import reproducible, speed_config
        from .segment import Segmenter

        model = job.model.load()
        seg = Segmenter(model, job.stack, cache=job.cache, speed=reproducible(speed_config(model.device)))
        _SEGMENTERS.clear()  # one stack's segmenter per process at a time
        _SEGMENTERS[job.seg_key or job.key] = seg
    return seg


def _slot(stack, index: int) -> tuple:
    """Where slice ``index`` goes in a (slice axes..., Y, X) label array."""
    return tuple(stack.position(index))


def _open(path: str):
    import zarr

    return zarr.open_array(path, mode="r+")


def _mark(job: _Job, name: str, i: int) -> None:
    _open(f"{job.work}/{name}")[i] = 1


def _encoded(seg, before: int) -> int:
    return seg.cache.stats["encoder_calls"] - before


def _prompt_dict(o: ObjectPrompt) -> dict:
    p: dict[str, Any] = {}
    if len(o.points):
        p["points"], p["point_labels"] = np.asarray(o.points, float), np.asarray(o.point_labels)
    if o.box is not None:
        p["box"] = np.asarray(o.box, float)
    return p


def _task_segment(job: _Job, index: int) -> int:
    from .volume import _predict

    seg = _segmenter(job)
    before = seg.cache.stats["encoder_calls"]
    ids = [k + 1 for k, o in enumerate(job.objects) if o.index == index]
    lab = np.zeros(seg.stack.slice_shape, np.uint32)
    if ids:
        outs = _predict(seg, index, [_prompt_dict(job.objects[k - 1]) for k in ids], batch=True)
        for k, (mask, _, _) in zip(ids, outs):
            lab[mask & (lab == 0)] = k  # lower ids keep overlapping pixels
    _open(job.labels)[_slot(seg.stack, index)] = lab
    _mark(job, "done", index)
    return _encoded(seg, before)


def _task_propagate(job: _Job, group: int) -> int:
    from .volume import Seed, propagate_many

    seg = _segmenter(job)
    before = seg.cache.stats["encoder_calls"]
    size = job.params["group_size"]
    first = group * size
    objs = job.objects[first:first + size]
    seeds = [Seed(o.index, **_prompt_dict(o)) for o in objs]
    opts = {k: job.params[k] for k in ("strategy", "min_score", "min_iou", "max_slices")}
    results = propagate_many(seg, seeds, batch=True, **opts)
    masks = _open(f"{job.work}/objects")
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
    _mark(job, "groups_done", group)
    return _encoded(seg, before)


def _task_auto(job: _Job, index: int) -> int:
    from .volume import auto_segment_slice

    seg = _segmenter(job)
    before = seg.cache.stats["encoder_calls"]
    p = {k: v for k, v in job.params.items() if k != "merge_iou"}
    _open(f"{job.work}/slices")[index] = auto_segment_slice(seg, index, **p)
    _mark(job, "slices_done", index)
    return _encoded(seg, before)


def _task_embed(job: _Job, index: int) -> int:
    return _segmenter(job).cache.embed([index])


def _run(job: _Job, fn, units: Sequence[int], *, client, progress: Progress | None,
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


