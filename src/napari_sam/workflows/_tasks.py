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
from .._hashing import json_digest
from ..engine.prompt import Prompt
from ..io.labels_out import Output
from ..io.prompt_files import ObjectPrompt, prompts_digest
from .tiling import tiling_of

__all__ = ["Job", "ModelRef", "Progress", "as_prompt", "compose", "job_output", "job_signature",
           "make_job", "mark_done", "model_ref", "open_array", "open_inputs", "read_labels",
           "run_units", "segmenter_of", "slot", "task_auto", "task_embed", "task_propagate",
           "task_segment"]

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


_LABELS: dict[str, Any] = {}  # per process: input labels by path (a TIFF is read once)


def read_labels(path: str):
    """Input labels of a job (:func:`napari_sam.io.labels_files.open_labels`), opened once
    per process: lazily for OME-Zarr, whole for a TIFF."""
    if path not in _LABELS:
        from ..io.labels_files import open_labels

        _LABELS.clear()
        _LABELS[path] = open_labels(path)[0]
    return _LABELS[path]


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
    ids = job.params.get("ids") or list(range(1, len(job.objects) + 1))
    if job.params.get("seed_labels"):  # seeds are the masks of existing labels
        seed = np.asarray(read_labels(job.params["seed_labels"])[slot(seg.stack, objs[0].index)])
        seeds = [Seed(o.index, mask=seed == ids[first + j]) for j, o in enumerate(objs)]
    else:
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
        info.append({"k": first + j, "id": int(ids[first + j]), "line": r.indices, "accepted": r.accepted, "stop": r.stop,
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


# ---------------------------------------------------------------------- job setup
def open_inputs(stack, model, checkpoint, device):
    from ..io.stacks import Stack, open_stack

    stack = stack if isinstance(stack, Stack) else open_stack(stack)
    ref = model_ref(model, checkpoint, device)
    sam_model = ref.load()
    _ = stack.contrast_limits  # computed once here, shipped to workers with the stack
    return stack, ref, sam_model


def job_signature(kind: str, stack, sam_model, objects, params, tile_above: int) -> dict:
    sig = {"kind": kind, "version": 1,
           "stack": {"source": str(stack.source), "shape": list(stack.shape), "axes": stack.axes,
                     "fingerprint": stack.fingerprint(), "normalisation": stack.normalisation()},
           "model": sam_model.signature(), "prompts": prompts_digest(objects) if objects else None,
           "params": params}
    tiling = tiling_of(stack.slice_shape, tile_above)
    if tiling is not None:  # absent for whole slices: their signatures are as before
        sig["tiling"] = tiling
    return sig


def job_output(out, sig, stack, overwrite) -> Output:
    from ..io.labels_files import LabelsGeometry

    geo = LabelsGeometry.of_stack(stack)
    return Output(out, sig, shape=geo.shape, axes=geo.axes, scale=geo.scale, units=geo.units,
                  translate=geo.translate, overwrite=overwrite)


def make_job(kind, sig, stack, ref, cache, output: Output, objects, params, tile_above: int) -> Job:
    key = json_digest(sig)
    cache = None if cache is None else str(cache)
    seg_key = json_digest([sig["stack"], sig["model"], ref.key, cache, sig.get("tiling")])
    return Job(kind, key, stack, ref, cache, str(output.labels_path), str(output.work),
               list(objects), params, seg_key, tile_above)


def compose(job: Job, output: Output, stack) -> dict:
    """Paint the per-object masks slice by slice, ids in order; resumable per slice."""
    info = []
    for path in sorted((Path(job.work) / "info").glob("*.json")):
        info += json.loads(path.read_text())
    on_slice: dict[int, list[tuple[int, int, int]]] = {}
    for obj in info:
        for z in obj["accepted"]:
            on_slice.setdefault(obj["line"][z], []).append((obj["id"], obj.get("k", obj["id"] - 1), z))
    masks, labels = open_array(f"{job.work}/objects"), open_array(job.labels)
    base = job.params.get("seed_labels")  # labels to add to (never overwritten), or none
    done = output.done()
    for index in range(len(stack)):
        if done[index]:
            continue
        if index in on_slice or base:
            lab = (np.zeros(stack.slice_shape, np.uint32) if not base else
                   np.asarray(read_labels(base)[slot(stack, index)]).astype(np.uint32))
            free = lab == 0
            for oid, k, z in sorted(on_slice.get(index, [])):
                take = np.asarray(masks[k, z]) & free
                lab[take] = oid
                free &= ~take
            labels[slot(stack, index)] = lab
        mark_done(job, "done", index)
    return {"objects": info}



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


