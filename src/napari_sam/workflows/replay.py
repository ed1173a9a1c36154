"""Replay: run every object's recorded prompts again, with the same model or another one.

With the model and speed path that made a labels file, replay reproduces it (tested);
with another model it writes new labels and a per-object report (IoU of the old object
against the new one): the way to move an annotated dataset to a better model.

Objects made by a batch job are replayed by running the job again (its composition of
objects is the job's). Objects made in the widget are replayed in the order they were
made, with the widget's own rules (:mod:`napari_sam.labels`: an object never overwrites
existing labels unless its commit did; a propagation, a refinement and a segment-everything
run start from the replayed labels). Objects whose id is no longer in the labels (undone
in napari) are skipped; edits made with napari's brush are not recorded and not replayed.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .._errors import InvalidInputError
from ..engine.prompt import Prompt
from ..io.labels_files import (
    LabelsGeometry,
    create_zarr_labels,
    labels_format,
    open_labels,
    read_record,
    update_record,
    write_ome_tiff,
)
from ..io.provenance import append_records, load_records
from ..labels import apply_changes, object_changes, volume_changes

__all__ = ["ReplayResult", "replay"]


@dataclasses.dataclass
class ReplayResult:
    """What a replay did: the new labels, and per object the IoU of old and new."""

    out: Path
    report: list[dict]
    identical: bool

    def summary(self) -> str:
        ious = [r["iou"] for r in self.report if r["iou"] is not None]
        mean = f", mean IoU old vs new {np.mean(ious):.3f}" if ious else ""
        same = "identical to the original" if self.identical else "differs from the original"
        return f"replay: {self.out} - {len(self.report)} objects{mean}; the labels are {same}"


def _open_image(rec: dict, image: str | os.PathLike | None):
    from ..io.stacks import open_stack

    info = rec.get("image") or {}
    path = image or info.get("path")
    if not path or not Path(path).exists():
        raise InvalidInputError(
            f"the image these labels were made on ({path!r}) is not there: pass image= (--image)")
    norm = info.get("normalisation") or {}
    limits = norm.get("contrast_limits") if norm.get("method") != "passthrough" else None
    channel = info.get("channel")
    return open_stack(str(path), axes=info.get("axes"), contrast_limits=limits,
                      channel=tuple(channel) if isinstance(channel, list) else channel)


def _segmenter(rec: dict, stack, model, checkpoint, device):
    from ..models.loading import load_model_cached
    from ..models.speed import SpeedConfig
    from .tiling import segmenter_for

    info = rec.get("model") or {}
    if model is None and checkpoint is None:
        model = info.get("name")
    loaded = load_model_cached(model, checkpoint=checkpoint, device=device, progress=False)
    speed = SpeedConfig(**info["speed"]) if info.get("speed") else "auto"
    tiled = info.get("tiled", False)
    return segmenter_for(loaded, stack, tile_above=1 if tiled else 0, speed=speed)


def _step_prompt(st: dict) -> Prompt:
    pts = st.get("points") or None
    return Prompt.of(points=pts, point_labels=st.get("point_labels") if pts else None,
                     box=st.get("box"))


def _chain_mask(seg, index: int, steps: list[dict]) -> np.ndarray:
    """The mask of the last step, each step refining from the one before as it did."""
    prev, k = None, 0
    for st in steps:
        p = _step_prompt(st)
        if st.get("refine") and prev is not None:
            p = p.with_mask_input(prev.logits[k])
        prev = seg.predict_many(index, [p])[0]
        k = prev.best if st.get("mask") is None else int(st["mask"])
    return prev.mask_at(k)


def _replay_widget(records: list[dict], seg, labels: np.ndarray, present: set[int],
                   progress: Callable[[int, int], None] | None) -> np.ndarray:
    from .auto import SliceLinker, auto_segment_slice
    from .from_labels import follow_slice_labels, refine_slice
    from .volume import Seed, propagate_many

    new = np.zeros_like(labels)
    stack = seg.stack
    i = 0
    while i < len(records):
        rec = records[i]
        ids = [int(v) for v in rec["label_ids"]]
        if not set(ids) & present:  # undone in napari
            i += 1
            continue
        pos = tuple(rec["position"])
        params = rec.get("params") or {}
        source = rec["source"]
        if source in ("click", "box"):
            group = [rec]  # the objects of one commit are painted together
            while (i + len(group) < len(records) and params.get("commit") is not None
                   and (records[i + len(group)].get("params") or {}).get("commit") == params["commit"]):
                group.append(records[i + len(group)])
            group.sort(key=lambda r: r["params"].get("order", 0))
            index = stack.index(pos)
            masks = [_chain_mask(seg, index, r["steps"]) for r in group]
            changes, _ = object_changes(new[pos], masks, [r["label_ids"][0] for r in group],
                                        overwrite=bool(params.get("overwrite")))
            apply_changes(new, pos, changes)
            i += len(group)
        elif source == "refinement" and params.get("every"):  # every label of the slice
            new[pos] = refine_slice(seg, stack.index(pos), new[pos])[0]
            i += 1
        elif source == "propagation" and params.get("every"):
            slices = follow_slice_labels(seg, new[pos], index=stack.index(pos), position=pos,
                                         axis=params.get("axis") or 0, limits=params.get("limits"),
                                         min_score=params.get("min_score", 0.5),
                                         min_iou=params.get("min_iou", 0.3))
            for p, values in slices.items():
                apply_changes(new, p, [volume_changes(new[p], values,
                                                      overwrite=bool(params.get("overwrite")))])
            i += 1
        elif source == "refinement":
            mask = new[pos] == ids[0]
            if mask.any():
                index = stack.index(pos)
                refined = seg.predict_many(index, [seg.prompt_from_mask(index, mask)])[0].mask
                changes, _ = object_changes(new[pos], [refined], ids,
                                            overwrite=bool(params.get("overwrite")), replace=ids[0])
                apply_changes(new, pos, changes)
            i += 1
        elif source == "propagation":
            seed = new[pos] == int(rec["parent"])
            if seed.any():
                [res] = propagate_many(seg, [Seed(stack.index(pos), mask=seed)],
                                       axis=params.get("axis"), limits=params.get("limits"),
                                       min_score=params.get("min_score", 0.5),
                                       min_iou=params.get("min_iou", 0.3))
                axis = params.get("axis") or 0
                for z in res.accepted:
                    p = list(pos)
                    p[axis] = z
                    if tuple(p) != pos:
                        values = np.where(res.mask[z], ids[0], 0)
                        apply_changes(new, p, [volume_changes(
                            new[tuple(p)], values, overwrite=bool(params.get("overwrite")))])
            i += 1
        elif source == "automatic":
            linker = SliceLinker()
            start = int(params.get("start", 0))
            for p in params.get("positions", [pos]):
                lab = linker.link(auto_segment_slice(seg, stack.index(tuple(p)),
                                                     **params.get("options", {})))
                values = np.where(lab > 0, lab.astype(np.int64) + start, 0)
                apply_changes(new, p, [volume_changes(new[tuple(p)], values, overwrite=False)])
            i += 1
        else:
            raise InvalidInputError(f"cannot replay objects made by {source!r}")
        if progress is not None:
            progress(i, len(records))
    return new


def _replay_batch(records: list[dict], stack, model, checkpoint, device, out: Path) -> None:
    from ..io.prompt_files import ObjectPrompt
    from . import batch, label_jobs

    first = records[0]
    source, params = first["source"], dict(first.get("params") or {})
    info = first.get("model") or {}
    opts: dict[str, Any] = {"model": model if model or checkpoint else info.get("name"),
                            "checkpoint": checkpoint, "device": device, "overwrite": True,
                            "tile_above": 1 if info.get("tiled") else 0}
    if source == "automatic":
        batch.auto_segment(stack, out, **params, **opts)
        return
    if source == "refinement":  # napari-sam refine: the input labels are the prompts
        label_jobs.refine_labels_job(params["labels"], stack, out, ids=params.get("ids"), **opts)
        return
    if params.get("seed_labels"):  # napari-sam refine --propagate-from
        label_jobs.propagate_labels_job(
            params["seed_labels"], stack, out, index=params["index"], ids=params["ids"],
            strategy=params["strategy"], min_score=params["min_score"], min_iou=params["min_iou"],
            max_slices=params["max_slices"], group_size=params["group_size"], **opts)
        return
    objects = []
    for r in records:
        st = r["steps"][0]
        index = stack.index(tuple(r["position"]))
        objects.append(ObjectPrompt(index=index, points=np.asarray(st.get("points") or [], float),
                                    point_labels=np.asarray(st.get("point_labels") or [], int),
                                    box=None if st.get("box") is None else np.asarray(st["box"])))
    if source == "prompts":
        batch.segment_prompts(stack, objects, out, **opts)
    else:
        batch.propagate_prompts(stack, objects, out, **{k: v for k, v in params.items()
                                                        if k != "group_size"},
                                group_size=params.get("group_size", 8), **opts)


def replay(labels: str | os.PathLike, *, model: Any = None, checkpoint: Any = None,
           device: str | None = None, out: str | os.PathLike | None = None,
           image: str | os.PathLike | None = None,
           progress: Callable[[int, int], None] | None = None) -> ReplayResult:
    """Run every object's recorded prompts again and write the labels to ``out``.

    Parameters
    ----------
    labels : path
        Labels written by napari-sam (with their provenance).
    model, checkpoint, device
        As :func:`napari_sam.load_model`; default the recorded model (by name).
    out : path, optional
        Where the new labels go (default ``<labels>.replay`` with the same extension).
    image : path, optional
        The image, when it is no longer where the provenance says.

    Returns
    -------
    ReplayResult
        ``report``: per object ``label_id``, ``source``, ``iou`` (old vs new), pixel counts.
    """
    labels = Path(labels)
    records = load_records(labels)
    if not records:
        raise InvalidInputError(f"{str(labels)!r} has no provenance to replay (labels made by "
                                "napari-sam record how each object was made)")
    if out is None:
        name = labels.name
        stem, ext = (name[: -len(".ome.zarr")], ".ome.zarr") if name.endswith(".ome.zarr") \
            else (labels.stem, labels.suffix)
        out = labels.with_name(f"{stem}.replay{ext}")
    out = Path(out)
    stack = _open_image(records[0], image)
    old_data, meta = open_labels(labels)
    old = np.asarray(old_data[...])
    job = (read_record(labels) or {}).get("job")
    if job is not None:
        _replay_batch(records, stack, model, checkpoint, device, out)
        new = np.asarray(open_labels(out)[0][...]).reshape(old.shape)
    else:
        seg = _segmenter(records[0], stack, model, checkpoint, device)
        present = set(np.unique(old).tolist()) - {0}
        new = _replay_widget(records, seg, old, present, progress)
        geo = LabelsGeometry(old.shape, stack.slice_axes + "YX", list(meta.get("scale", [])),
                             list(meta.get("translate", [])))
        rec = {"replay_of": str(labels)}
        if labels_format(out) == "zarr":
            arr = create_zarr_labels(out, geo, record=rec, dtype=old.dtype.name)
            arr[...] = new
            update_record(out, max_id=int(new.max()) if new.size else 0)
        else:
            write_ome_tiff(out, new, geo, record=rec, dtype=old.dtype)
        from .records import context

        again = [{**r, **context(seg)} for r in records]
        append_records(out, again, replace=True)
    report = []
    for label_id in sorted(set(np.unique(old).tolist()) - {0}):
        a, b = old == label_id, new == label_id
        union = int(np.count_nonzero(a | b))
        report.append({"label_id": int(label_id), "pixels_old": int(a.sum()),
                       "pixels_new": int(b.sum()),
                       "iou": float(np.count_nonzero(a & b) / union) if union else None})
    _write_report(out, report)
    return ReplayResult(out, report, bool(np.array_equal(old, new)))


def _write_report(out: Path, report: list[dict]) -> Path:
    path = Path(str(out).rstrip("/\\") + ".report.csv")
    lines = ["label_id,pixels_old,pixels_new,iou"] + [
        f"{r['label_id']},{r['pixels_old']},{r['pixels_new']},"
        f"{'' if r['iou'] is None else round(r['iou'], 6)}" for r in report]
    path.write_text("\n".join(lines) + "\n")
    return path
