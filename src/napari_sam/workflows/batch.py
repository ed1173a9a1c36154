"""Batch jobs over stacks and folders: resumable, with progress callbacks, local or on dask.

Jobs
----
:func:`embed_stack`        fill an embedding store for every slice.
:func:`segment_prompts`    one mask per object on its prompted slice.
:func:`propagate_prompts`  each object followed through Z from its prompted slice.
:func:`auto_segment`       SAM's grid-of-points segmentation on every slice, merged in 3D.
:func:`run_folder`         one of the above for every image of a folder.

Outputs (``out``) are OME-Zarr labels or a TIFF, chosen by the extension; see
:mod:`napari_sam.io.labels_out` for the layout, resumption and the overwrite rule. Object ids
are the prompts' order (object k of the prompt list gets id k + 1); where masks overlap,
the lower id keeps the pixel. The work is cut into units that do not depend on where they
run (a slice; a fixed group of objects for propagation), each writing its own chunks, so a
run on a dask cluster (``client=``) gives exactly the result of a local run. A worker
loads the model once and keeps it (see :mod:`napari_sam.workflows._tasks`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .._errors import InvalidInputError
from .._hashing import json_digest
from ..io.labels_out import Output, OutputExistsError, output_format
from ..io.places import embedding_store_for, image_stem
from ..io.prompt_files import ObjectPrompt, read_prompts
from ._tasks import (
    Job,
    compose,
    job_output,
    job_signature,
    make_job,
    open_array,
    open_inputs,
    run_units,
    slot,
    task_auto,
    task_embed,
    task_propagate,
    task_segment,
)
from .tiling import DEFAULT_TILE_ABOVE, segmenter_for

__all__ = ["embed_stack", "segment_prompts", "propagate_prompts", "auto_segment", "run_folder",
           "JobResult", "OutputExistsError", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".tif", ".tiff", ".zarr")
Progress = Callable[[int, int], None]



@dataclass
class JobResult:
    """What a job did. ``resumed``: units found done; ``computed``: units run now."""

    out: Path | None
    kind: str
    n_slices: int
    n_objects: int = 0
    resumed: int = 0
    computed: int = 0
    encoder_calls: int = 0
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def summary(self) -> str:
        text = (f"{self.kind}: {self.out} - {self.n_slices} slices, {self.n_objects} objects, "
                f"{self.computed} units computed, {self.resumed} already done, "
                f"{self.encoder_calls} slices encoded, {self.seconds:.1f} s")
        if self.kind != "embed" and not self.computed and not self.resumed:
            text += " (the output was already complete)"
        return text


# ---------------------------------------------------------------------- setup
def _objects(prompts, stack, scale_prompts) -> list[ObjectPrompt]:
    if isinstance(prompts, (str, os.PathLike)) or (
            isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], (str, os.PathLike))):
        objects = read_prompts(prompts, stack, scale=scale_prompts)
    else:
        objects = list(prompts)
    if not objects:
        raise InvalidInputError("no prompts: the prompts file(s) hold no object")
    return objects


# ---------------------------------------------------------------------- public jobs
def embed_stack(stack, cache, *, model=None, checkpoint=None, device=None,
                progress: Progress | None = None, client=None,
                tile_above: int = DEFAULT_TILE_ABOVE) -> JobResult:
    """Compute and store the embedding of every slice of ``stack`` in ``cache`` (resumable).

    Parameters
    ----------
    stack : path, array or Stack
    cache : path
        The zarr embedding store (see :class:`napari_sam.EmbeddingCache`).
    model, checkpoint, device
        As :func:`napari_sam.load_model`.
    progress : callable(done, total), optional
    client : dask.distributed.Client, optional
        Run one task per slice on the cluster; the store takes concurrent writers.
    tile_above : int
        Slices whose longest side exceeds this are embedded tile by tile, as the widget
        and the other jobs segment them (0: whole slices).
    """
    from ..models.speed import reproducible

    t0 = time.perf_counter()
    stack, ref, sam_model = open_inputs(stack, model, checkpoint, device)
    seg = segmenter_for(sam_model, stack, cache=cache, tile_above=tile_above,
                        speed=reproducible(sam_model.speed_config()))
    todo = [i for i in range(len(stack)) if not seg.is_stored(i)]
    resumed = len(stack) - len(todo)
    if client is None:
        encoded = seg.embed(todo, progress=None if progress is None else
                            (lambda d, t: progress(resumed + d, len(stack))))
    else:
        sig = {"kind": "embed", "cache": str(cache), "model": sam_model.signature()}
        job = Job("embed", json_digest(sig), stack, ref, str(cache), "", "", [], {},
                  tile_above=tile_above)
        encoded = run_units(job, task_embed, todo, client=client, progress=progress,
                       offset=resumed, total=len(stack))
    return JobResult(Path(cache), "embed", len(stack), resumed=resumed, computed=len(todo),
                     encoder_calls=encoded, seconds=time.perf_counter() - t0)


def segment_prompts(stack, prompts, out, *, model=None, checkpoint=None, device=None, cache=None,
                    client=None, overwrite: bool = False, progress: Progress | None = None,
                    scale_prompts: bool = False, tile_above: int = DEFAULT_TILE_ABOVE) -> JobResult:
    """Segment every prompted object on its slice and write the labels to ``out``.

    Parameters
    ----------
    stack : path, array or Stack
    prompts : path, list of paths (napari CSV exports) or list of ObjectPrompt
        See :mod:`napari_sam.io.prompt_files`; object k gets label id k + 1.
    out : path
        ``.ome.zarr`` / ``.zarr`` (OME-Zarr labels) or ``.tif`` / ``.tiff``.
    cache : path, optional
        Embedding store to read and fill (default: none, embeddings in memory).
    client : dask.distributed.Client, optional
        One task per prompted slice.
    overwrite : bool
        Replace an output that this job did not write.
    progress : callable(done, total), optional
    scale_prompts : bool
        Prompt coordinates are world coordinates (divided by the stack's scale).
    tile_above : int
        Slices whose longest side exceeds this are segmented on 1024 px tiles at full
        resolution (:class:`napari_sam.TiledSegmenter`); 0: whole slices.
    """
    t0 = time.perf_counter()
    stack, ref, sam_model = open_inputs(stack, model, checkpoint, device)
    objects = _objects(prompts, stack, scale_prompts)
    sig = job_signature("segment", stack, sam_model, objects, {}, tile_above)
    output = job_output(out, sig, stack, overwrite)
    result = JobResult(output.path, "segment", len(stack), n_objects=len(objects))
    if not output.complete:
        job = make_job("segment", sig, stack, ref, cache, output, objects, {}, tile_above)
        slices = sorted({o.index for o in objects})
        done = output.done()
        todo = [i for i in slices if not done[i]]
        result.resumed = len(slices) - len(todo)
        result.computed = len(todo)
        result.encoder_calls = run_units(job, task_segment, todo, client=client, progress=progress,
                                    offset=result.resumed, total=len(slices))
        _write_provenance(job, output, stack, "segment")
        output.finish()
    result.seconds = time.perf_counter() - t0
    return result


def propagate_prompts(stack, prompts, out, *, strategy: str | None = None, min_score: float = 0.5,
                      min_iou: float = 0.3, max_slices: int | None = None, group_size: int = 8,
                      model=None, checkpoint=None, device=None, cache=None, client=None,
                      overwrite: bool = False, progress: Progress | None = None,
                      scale_prompts: bool = False, tile_above: int = DEFAULT_TILE_ABOVE) -> JobResult:
    """Follow every prompted object through Z (see :func:`napari_sam.workflows.volume.propagate_many`)
    and write the 3D labels to ``out``; arguments as :func:`segment_prompts`.

    Objects are propagated in fixed groups of ``group_size`` (one task each, batched
    decoder calls inside), then painted slice by slice in id order (lower ids win).
    """
    from .volume import DEFAULT_STRATEGY

    t0 = time.perf_counter()
    stack, ref, sam_model = open_inputs(stack, model, checkpoint, device)
    objects = _objects(prompts, stack, scale_prompts)
    if group_size < 1:
        raise InvalidInputError(f"group_size must be >= 1, got {group_size}")
    params = {"strategy": strategy or DEFAULT_STRATEGY, "min_score": float(min_score),
              "min_iou": float(min_iou), "max_slices": max_slices, "group_size": int(group_size)}
    sig = job_signature("propagate", stack, sam_model, objects, params, tile_above)
    output = job_output(out, sig, stack, overwrite)
    result = JobResult(output.path, "propagate", len(stack), n_objects=len(objects))
    if not output.complete:
        job = make_job("propagate", sig, stack, ref, cache, output, objects, params, tile_above)
        run_propagation(job, output, stack, result, client=client, progress=progress)
        _write_provenance(job, output, stack, "propagate")
        output.finish()
    result.seconds = time.perf_counter() - t0
    return result


def run_propagation(job: Job, output: Output, stack, result: JobResult, *, client,
                    progress: Progress | None) -> None:
    """Propagate the job's objects in fixed groups (one task each, resumable), then paint
    them slice by slice; fills ``result`` (units, encoder calls, per-object info)."""
    from .volume import z_line

    size = job.params["group_size"]
    n_groups = -(-len(job.objects) // size)
    work = output.work_group
    line_len = len(z_line(stack, job.objects[0].index)[0])
    Output.require(work, "objects", (len(job.objects), line_len, *stack.slice_shape),
                   (1, 1, *stack.slice_shape), "bool")
    gdone = np.asarray(Output.require(work, "groups_done", (n_groups,), (1,), "uint8")[:]).astype(bool)
    todo = [g for g in range(n_groups) if not gdone[g]]
    result.resumed, result.computed = n_groups - len(todo), len(todo)
    result.encoder_calls = run_units(job, task_propagate, todo, client=client, progress=progress,
                                     offset=result.resumed, total=n_groups)
    result.info = compose(job, output, stack)


def _write_provenance(job: Job, output: Output, stack, kind: str, *, n_auto: int = 0) -> None:
    """How every object of the output was made (:mod:`napari_sam.io.provenance`), written
    whole before the output is marked complete (a resumed job writes it again)."""
    from ..io.provenance import append_records
    from ._tasks import as_prompt, segmenter_of
    from .records import record, step

    seg = segmenter_of(job)
    image = str(stack.path) if getattr(stack, "path", None) else None
    if kind == "auto":
        records = [record(seg, label_ids=range(1, n_auto + 1), source="automatic", position=(),
                          params=job.params, image_path=image)]
    else:
        source = "prompts" if kind == "segment" else "propagation"
        records = [record(seg, label_ids=[k + 1], source=source, position=slot(stack, o.index),
                          steps=[step(as_prompt(o))], params=job.params, image_path=image)
                   for k, o in enumerate(job.objects)]
    append_records(output.path, records, replace=True)


def auto_segment(stack, out, *, points_per_side: int = 16, pred_iou_thresh: float = 0.88,
                 stability_score_thresh: float = 0.95, box_nms_thresh: float = 0.7,
                 min_area: int = 16, max_area_fraction: float = 0.5, merge_iou: float = 0.3,
                 min_region_area: int = 0,
                 model=None, checkpoint=None, device=None, cache=None, client=None,
                 overwrite: bool = False, progress: Progress | None = None,
                 tile_above: int = DEFAULT_TILE_ABOVE) -> JobResult:
    """Automatic segmentation of every slice (one task each), then the 3D merge.

    See :func:`napari_sam.workflows.auto.auto_segment_slice` and :func:`napari_sam.workflows.auto.merge_slices`;
    ``merge_iou`` is the merge's ``min_iou``. Per-slice results are kept in the work folder
    until the merge has written ``out``.
    """
    from .auto import SliceLinker
    from .volume import z_line

    t0 = time.perf_counter()
    stack, ref, sam_model = open_inputs(stack, model, checkpoint, device)
    params = {"points_per_side": int(points_per_side), "pred_iou_thresh": float(pred_iou_thresh),
              "stability_score_thresh": float(stability_score_thresh),
              "box_nms_thresh": float(box_nms_thresh), "min_area": int(min_area),
              "max_area_fraction": float(max_area_fraction), "merge_iou": float(merge_iou)}
    if min_region_area:  # absent at 0: signatures of earlier jobs stay as they were
        params["min_region_area"] = int(min_region_area)
    sig = job_signature("auto", stack, sam_model, [], params, tile_above)
    output = job_output(out, sig, stack, overwrite)
    result = JobResult(output.path, "auto", len(stack))
    if not output.complete:
        job = make_job("auto", sig, stack, ref, cache, output, [], params, tile_above)
        work = output.work_group
        Output.require(work, "slices", (len(stack), *stack.slice_shape), (1, *stack.slice_shape), "uint32")
        sdone = np.asarray(Output.require(work, "slices_done", (len(stack),), (1,), "uint8")[:]).astype(bool)
        todo = [i for i in range(len(stack)) if not sdone[i]]
        result.resumed, result.computed = len(stack) - len(todo), len(todo)
        result.encoder_calls = run_units(job, task_auto, todo, client=client, progress=progress,
                                    offset=result.resumed, total=len(stack))
        slices, labels = open_array(f"{job.work}/slices"), open_array(job.labels)
        linker = SliceLinker(min_iou=merge_iou)
        seen: set[int] = set()
        for i in range(len(stack)):  # Z lines in order of their first slice
            if i in seen:
                continue
            line = z_line(stack, i)[0]
            seen.update(line)
            linker.reset()
            for index in line:
                labels[slot(stack, index)] = linker.link(np.asarray(slices[index]))
        result.n_objects = linker.next_id - 1
        _write_provenance(job, output, stack, "auto", n_auto=result.n_objects)
        output.finish()
    result.seconds = time.perf_counter() - t0
    return result


def run_folder(kind: str, src: str | os.PathLike, out_dir: str | os.PathLike, *,
               prompts_dir: str | os.PathLike | None = None, suffix: str = ".ome.zarr",
               progress: Callable[[str, int, int], None] | None = None,
               open_options: dict | None = None, **options) -> list[JobResult]:
    """Run a job on every image of folder ``src`` (.tif, .tiff, .zarr; sorted by name).

    Outputs go to ``out_dir/<name><suffix>``. For ``"segment"`` and ``"propagate"`` the
    prompts of image ``<name>.tif`` are ``prompts_dir/<name>.csv``; images without one are
    skipped. For ``"embed"`` the stores are ``out_dir/<name>.embeddings.zarr``.
    ``progress(name, done, total)``; ``open_options`` (``axes``, ``channel``) go to
    :func:`napari_sam.open_stack` for every image; other options go to the job function.
    """
    from ..io.stacks import open_stack

    open_options = {k: v for k, v in (open_options or {}).items() if v is not None}
    src, out_dir = Path(src), Path(out_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"input folder {str(src)!r} does not exist")
    images = sorted(p for p in src.iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES)
                    and not p.name.endswith((".partial.zarr", ".embeddings.zarr")))
    if not images:
        raise InvalidInputError(f"folder {str(src)!r} holds no .tif, .tiff or .zarr image")
    if kind != "embed":
        output_format(f"x{suffix}")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for img in images:
        name, store = image_stem(img), embedding_store_for(img, folder=out_dir)
        img = open_stack(img, **open_options) if open_options else img
        cb = None if progress is None else (lambda d, t, n=name: progress(n, d, t))
        if kind == "embed":
            results.append(embed_stack(img, store, progress=cb, **options))
            continue
        out = out_dir / f"{name}{suffix}"
        if kind in ("segment", "propagate"):
            if prompts_dir is None:
                raise InvalidInputError(f"{kind} on a folder needs a prompts folder with <name>.csv per image")
            csv = Path(prompts_dir) / f"{name}.csv"
            if not csv.is_file():
                continue
            fn = segment_prompts if kind == "segment" else propagate_prompts
            results.append(fn(img, csv, out, progress=cb, **options))
        elif kind == "auto":
            results.append(auto_segment(img, out, progress=cb, **options))
        else:
            raise InvalidInputError(f"kind must be embed, segment, propagate or auto, got {kind!r}")
    return results
