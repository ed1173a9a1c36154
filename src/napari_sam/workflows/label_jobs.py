"""Batch jobs that start from existing labels (``napari-sam refine``): resumable, local or
on dask, written by the one labels writer with provenance, like the other jobs of
:mod:`napari_sam.workflows.batch`.

:func:`refine_labels_job`     every label replaced by SAM's mask (its box and mask as the
                              prompt), one task per slice;
:func:`propagate_labels_job`  the labels of one slice followed through Z, added to the
                              input labels where they are free.

The rules are those of :mod:`napari_sam.workflows.from_labels`; the input labels (a labels
file of any tool: OME-Zarr, TIFF) must have the image's label shape.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass

import numpy as np

from .._errors import InvalidInputError
from ..io.labels_out import Output
from ..io.prompt_files import ObjectPrompt
from ._tasks import (
    Job,
    Progress,
    job_output,
    job_signature,
    make_job,
    mark_done,
    open_array,
    open_inputs,
    read_labels,
    run_units,
    segmenter_of,
    slot,
)
from .batch import JobResult, run_propagation
from .from_labels import check_labels_shape, label_masks, refine_slice
from .tiling import DEFAULT_TILE_ABOVE
from .volume import mask_box

__all__ = ["LabelsScan", "refine_labels_job", "propagate_labels_job", "scan_labels"]


@dataclass
class LabelsScan:
    """One read of a labels array: a digest of its content (job signatures), its largest
    id, and the ids present on each slice position (slices without labels left out)."""

    digest: str
    top: int
    ids: dict[tuple, set[int]]


def scan_labels(labels) -> LabelsScan:
    """Read a labels array once, one slice at a time (see :class:`LabelsScan`)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(labels.shape)}|{np.dtype(labels.dtype).str}".encode())
    top, ids = 0, {}
    for pos in np.ndindex(*labels.shape[:-2]):
        page = np.ascontiguousarray(np.asarray(labels[pos]))
        h.update(page.tobytes())
        present = np.unique(page[page != 0])
        if present.size:
            top = max(top, int(present.max()))
            ids[tuple(int(p) for p in pos)] = {int(v) for v in present}
    return LabelsScan(h.hexdigest(), top, ids)


def _input(labels, stack) -> tuple[str, object, LabelsScan]:
    """The labels file's path, its (lazy) array and its scan; checked against the image."""
    path = os.fspath(labels)
    if not os.path.exists(path):
        raise InvalidInputError(f"labels file {path!r} does not exist")
    data = read_labels(path)
    check_labels_shape(data, stack)
    scan = scan_labels(data)
    if scan.top >= 2**32:
        raise InvalidInputError(f"labels {path!r} hold ids up to {scan.top}; outputs take ids "
                                "below 2**32")
    return path, data, scan


def task_refine(job: Job, index: int) -> int:
    """Refine the labels of slice ``index``; write the slice and its done flag."""
    seg = segmenter_of(job)
    before = seg.cache.stats["encoder_calls"]
    pos = slot(seg.stack, index)
    lab = np.asarray(read_labels(job.params["labels"])[pos]).astype(np.uint32)
    new, _ = refine_slice(seg, index, lab, ids=job.params.get("ids"))
    open_array(job.labels)[pos] = new
    mark_done(job, "done", index)
    return seg.cache.stats["encoder_calls"] - before


def _records(job: Job, output: Output, stack, *, source: str, ids, position, params) -> None:
    from ..io.provenance import append_records
    from .records import record

    seg = segmenter_of(job)
    image = str(stack.path) if getattr(stack, "path", None) else None
    append_records(output.path, [record(seg, label_ids=[k], source=source, parent=k,
                                        position=position, params=params, image_path=image)
                                 for k in ids], replace=True)


def refine_labels_job(labels, stack, out, *, ids=None, model=None, checkpoint=None, device=None,
                      cache=None, client=None, overwrite: bool = False,
                      progress: Progress | None = None,
                      tile_above: int = DEFAULT_TILE_ABOVE) -> JobResult:
    """Refine every label of a labels file with SAM and write the result to ``out``.

    Parameters
    ----------
    labels : path
        Existing labels (OME-Zarr or TIFF, any tool) of the image's label shape.
    stack : path, array or Stack
        The image.
    out : path
        ``.ome.zarr`` / ``.zarr`` or ``.tif`` / ``.tiff``; slices without labels stay empty.
    ids : sequence of int, optional
        Only these labels (the others are copied as they are).
    model, checkpoint, device, cache, client, overwrite, progress, tile_above
        As :func:`napari_sam.workflows.batch.segment_prompts`.
    """
    t0 = time.perf_counter()
    stack, ref, sam_model = open_inputs(stack, model, checkpoint, device)
    path, data, scan = _input(labels, stack)
    params = {"labels": path, "labels_digest": scan.digest,
              "ids": None if ids is None else sorted(int(i) for i in ids)}
    sig = job_signature("refine", stack, sam_model, [], params, tile_above)
    output = job_output(out, sig, stack, overwrite)
    result = JobResult(output.path, "refine", len(stack))
    if not output.complete:
        job = make_job("refine", sig, stack, ref, cache, output, [], params, tile_above)
        done = output.done()
        slices = [i for i in range(len(stack)) if slot(stack, i) in scan.ids]
        todo = [i for i in slices if not done[i]]
        result.resumed, result.computed = len(slices) - len(todo), len(todo)
        result.encoder_calls = run_units(job, task_refine, todo, client=client, progress=progress,
                                         offset=result.resumed, total=len(slices))
        found = set().union(*scan.ids.values())
        if ids is not None:
            found &= {int(i) for i in ids}
        result.n_objects = len(found)
        _records(job, output, stack, source="refinement", ids=sorted(found), position=(),
                 params=params)
        output.finish()
    result.seconds = time.perf_counter() - t0
    return result


def propagate_labels_job(labels, stack, out, *, index: int, ids=None, strategy: str | None = None,
                         min_score: float = 0.5, min_iou: float = 0.3,
                         max_slices: int | None = None, group_size: int = 8, model=None,
                         checkpoint=None, device=None, cache=None, client=None,
                         overwrite: bool = False, progress: Progress | None = None,
                         tile_above: int = DEFAULT_TILE_ABOVE) -> JobResult:
    """Follow every label of slice ``index`` through Z; ``out`` holds the input labels with
    the propagated ones added where the input is 0 (lower ids first).

    Parameters
    ----------
    labels : path
        Existing labels of the image's label shape.
    index : int
        The seed slice (:meth:`napari_sam.Stack.index`; the Z position for a ZYX stack).
    strategy, min_score, min_iou, max_slices, group_size
        As :func:`napari_sam.workflows.batch.propagate_prompts`.
    """
    from .volume import DEFAULT_STRATEGY

    t0 = time.perf_counter()
    stack, ref, sam_model = open_inputs(stack, model, checkpoint, device)
    path, data, scan = _input(labels, stack)
    if not 0 <= int(index) < len(stack):
        raise InvalidInputError(f"slice index {index} is out of range (0..{len(stack) - 1})")
    found = label_masks(np.asarray(data[slot(stack, int(index))]), ids=ids)
    if not found:
        raise InvalidInputError(f"slice {index} of {path!r} holds no label to propagate")
    if group_size < 1:
        raise InvalidInputError(f"group_size must be >= 1, got {group_size}")
    objects = [ObjectPrompt(index=int(index), points=np.zeros((0, 2)), point_labels=np.zeros(0, int),
                            box=mask_box(m), name=f"label {k}") for k, m in found]
    params = {"seed_labels": path, "labels_digest": scan.digest, "index": int(index),
              "ids": [k for k, _ in found], "strategy": strategy or DEFAULT_STRATEGY,
              "min_score": float(min_score), "min_iou": float(min_iou),
              "max_slices": max_slices, "group_size": int(group_size)}
    sig = job_signature("propagate_labels", stack, sam_model, objects, params, tile_above)
    output = job_output(out, sig, stack, overwrite)
    result = JobResult(output.path, "propagate_labels", len(stack), n_objects=len(objects))
    if not output.complete:
        job = make_job("propagate", sig, stack, ref, cache, output, objects, params, tile_above)
        run_propagation(job, output, stack, result, client=client, progress=progress)
        _records(job, output, stack, source="propagation", ids=params["ids"],
                 position=slot(stack, int(index)), params=params)
        output.finish()
    result.seconds = time.perf_counter() - t0
    return result
