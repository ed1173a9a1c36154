"""The volume tools of the widget: propagate, segment everything, refine a label, precompute.

Each tool is planned on the GUI thread (:class:`ToolRun`: it reads the layers it needs),
runs its ``job`` in a worker thread (engine calls only, with progress and cancel), and
``apply`` writes the result on the GUI thread as one step of the labels layer's history.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import sam_layers as L
from .provenance import keep, tool_record

if TYPE_CHECKING:  # pragma: no cover
    from .controller import SamController

__all__ = ["ToolRun", "ToolError", "everything", "precompute", "propagate", "propagate_all",
           "refine", "refine_all"]

Progress = Callable[[int, int, str], None]


class ToolError(ValueError):
    """A tool cannot run with the current choices; the message says what to change."""


@dataclass
class ToolRun:
    """One planned tool run: ``job`` in a worker, ``apply`` on the GUI thread."""

    title: str
    job: Callable[[Progress, Callable[[], bool]], Any]
    apply: Callable[[Any], str]


def _line(ctrl: "SamController", axis: int, lo: int | None, hi: int | None):
    """Positions of the slices along slice axis ``axis`` through the slice in view, lo..hi."""
    geo = ctrl.geometry()
    pos = ctrl.current_position()
    if pos is None:
        raise ToolError("The viewer shows no slice of the image: move into the image first.")
    if not geo.lead_axes:
        return pos, [pos]
    n = geo.slice_dims[axis]
    lo = 0 if lo is None else max(0, min(int(lo), n - 1))
    hi = n - 1 if hi is None else max(0, min(int(hi), n - 1))
    lo, hi = min(lo, hi), max(lo, hi)
    line = []
    for z in range(lo, hi + 1):
        p = list(pos)
        p[axis] = z
        line.append(tuple(p))
    return pos, line


def _label_mask(ctrl: "SamController", label_id: int, pos: tuple[int, ...]):
    layer = ctrl.target_labels(create=False)
    if layer is None:
        raise ToolError("There are no labels yet: commit an object first (Shift+C).")
    if label_id <= 0:
        label_id = ctrl.last_committed
        if not label_id:
            raise ToolError("Choose a label id (or commit an object first: 0 means the last one).")
    mask = np.asarray(layer.data[pos]) == label_id
    if not mask.any():
        where = ctrl.where(pos) or "this image"
        raise ToolError(f"Label {label_id} is not on {where}: go to a slice where it "
                        "is, or choose another label id.")
    return layer, label_id, mask


def propagate(ctrl: "SamController", *, label_id: int, axis: int, lo: int | None = None,
              hi: int | None = None, min_score: float = 0.5, min_iou: float = 0.3) -> ToolRun:
    """Follow label ``label_id`` (0: the last committed) from the slice in view along slice
    axis ``axis``, in both directions, until it vanishes or over lo..hi."""
    from ..workflows.volume import Seed, propagate_many

    geo = ctrl.geometry()
    if not geo.lead_axes:
        raise ToolError("A 2D image has no slices to propagate through.")
    pos, line = _line(ctrl, axis, lo, hi)
    layer, label_id, mask = _label_mask(ctrl, label_id, pos)
    settings, index = ctrl.settings(), geo.index(pos)
    z_lo, z_hi = line[0][axis], line[-1][axis]
    name = geo.axis_names()[axis]

    def job(progress: Progress, should_stop):
        seg = ctrl.session.engine(settings)
        return propagate_many(
            seg, [Seed(index, mask=mask)], axis=axis, limits=(z_lo, z_hi), min_score=min_score,
            min_iou=min_iou,
            progress=lambda d, t: progress(d, t, f"Propagating label {label_id} along {name}"),
            should_stop=should_stop)[0]

    def apply(res) -> str:
        slices = {}
        for z in res.accepted:
            p = list(pos)
            p[axis] = z
            if tuple(p) != pos:
                slices[tuple(p)] = np.where(res.mask[z], label_id, 0)
        L.paint_volume(layer, slices, overwrite=ctrl.overwrite)
        keep(ctrl, layer, [tool_record(
            ctrl, label_ids=[label_id], source="propagation", parent=label_id, position=pos,
            params={"axis": axis, "limits": [z_lo, z_hi], "min_score": min_score,
                    "min_iou": min_iou, "overwrite": ctrl.overwrite})])
        acc = res.accepted
        span = f"{name} {acc[0]}..{acc[-1]}" if acc else "no slice"
        stops = ", ".join(f"{d}: {why}" for d, why in res.stop.items())
        return f"Propagated label {label_id} over {span} ({len(acc)} slices; stopped {stops})."

    return ToolRun(f"Propagate label {label_id}", job, apply)


def _slice_labels(ctrl: "SamController", pos: tuple[int, ...]):
    layer = ctrl.target_labels(create=False)
    current = None if layer is None else np.array(layer.data[pos], copy=True)
    if current is None or not current.any():
        raise ToolError(f"There are no labels on {ctrl.where(pos) or 'this image'}: paint or "
                        "commit some, or open a segmentation as a Labels layer.")
    return layer, current


def propagate_all(ctrl: "SamController", *, axis: int, lo: int | None = None,
                  hi: int | None = None, min_score: float = 0.5, min_iou: float = 0.3) -> ToolRun:
    """Follow every label of the slice in view along ``axis`` (one batched decoder call per
    slice); written where the labels are free (or everywhere with overwrite), lower ids
    first (:func:`napari_sam.workflows.from_labels.propagated_slices`)."""
    from ..workflows.from_labels import follow_slice_labels

    geo = ctrl.geometry()
    if not geo.lead_axes:
        raise ToolError("A 2D image has no slices to propagate through.")
    pos, line = _line(ctrl, axis, lo, hi)
    layer, current = _slice_labels(ctrl, pos)
    ids = [int(k) for k in np.unique(current[current > 0])]
    settings, index = ctrl.settings(), geo.index(pos)
    z_lo, z_hi = line[0][axis], line[-1][axis]
    name = geo.axis_names()[axis]

    def job(progress: Progress, should_stop):
        seg = ctrl.session.engine(settings)
        return follow_slice_labels(
            seg, current, index=index, position=pos, axis=axis, limits=(z_lo, z_hi),
            min_score=min_score, min_iou=min_iou, should_stop=should_stop,
            progress=lambda d, t: progress(d, t, f"Propagating {len(ids)} labels along {name}"))

    def apply(slices) -> str:
        changed = L.paint_volume(layer, slices, overwrite=ctrl.overwrite)
        keep(ctrl, layer, [tool_record(
            ctrl, label_ids=ids, source="propagation", position=pos,
            params={"every": True, "axis": axis, "limits": [z_lo, z_hi], "min_score": min_score,
                    "min_iou": min_iou, "overwrite": ctrl.overwrite})])
        return (f"Propagated {len(ids)} labels of {ctrl.where(pos)} along {name} to "
                f"{len(slices)} slices ({changed} pixels).")

    return ToolRun(f"Propagate {len(ids)} labels", job, apply)


def refine_all(ctrl: "SamController") -> ToolRun:
    """Every label of the slice in view becomes a prompt (box and mask), decoded together;
    SAM's masks replace them (:func:`napari_sam.workflows.from_labels.refine_slice`)."""
    from ..workflows.from_labels import refine_slice

    pos = ctrl.current_position()
    if pos is None:
        raise ToolError("The viewer shows no slice of the image: move into the image first.")
    layer, current = _slice_labels(ctrl, pos)
    settings, index = ctrl.settings(), ctrl.geometry().index(pos)

    def job(progress: Progress, should_stop):
        seg = ctrl.session.engine(settings)
        progress(0, 1, "Refining the labels of the slice")
        return refine_slice(seg, index, current)

    def apply(out) -> str:
        new, rows = out
        changed = L.replace_slice(layer, pos, before=current, after=new)
        keep(ctrl, layer, [tool_record(ctrl, label_ids=[r["label_id"] for r in rows],
                                       source="refinement", position=pos,
                                       params={"every": True})])
        mean = np.mean([r["iou"] for r in rows]) if rows else 0.0
        return (f"Refined {len(rows)} labels on {ctrl.where(pos) or 'the image'} ({changed} "
                f"pixels changed; mean IoU old vs new {mean:.2f}).")

    return ToolRun("Refine every label", job, apply)


def everything(ctrl: "SamController", *, axis: int | None = None, lo: int | None = None,
               hi: int | None = None, **auto: Any) -> ToolRun:
    """Segment everything on the slice in view (``axis`` None) or on slices lo..hi along
    ``axis``; objects are linked across slices into 3D ids, written as new ids, never
    over existing labels."""
    from ..workflows.auto import SliceLinker, auto_segment_slice

    geo = ctrl.geometry()
    if axis is None or not geo.lead_axes:
        pos = ctrl.current_position()
        if pos is None:
            raise ToolError("The viewer shows no slice of the image: move into the image first.")
        line = [pos]
    else:
        _, line = _line(ctrl, axis, lo, hi)
    layer = ctrl.target_labels()
    settings = ctrl.settings()
    indices = [geo.index(p) for p in line]

    def job(progress: Progress, should_stop):
        seg = ctrl.session.engine(settings)
        linker, out = SliceLinker(), {}
        for done, (p, i) in enumerate(zip(line, indices)):
            if should_stop():
                return None
            progress(done, len(line), f"Segmenting everything on {ctrl.where(p) or 'the image'}")
            out[p] = linker.link(auto_segment_slice(seg, i, **auto))
        progress(len(line), len(line), "")
        return out

    def apply(slices) -> str:
        start = ctrl.ids.next(layer) - 1
        shifted = {p: np.where(v > 0, v.astype(np.int64) + start, 0) for p, v in slices.items()}
        n = int(max((v.max() for v in slices.values()), default=0))
        if n:
            L.grow_for(layer, start + n)
        changed = L.paint_volume(layer, shifted, overwrite=False)
        ctrl.ids.used(start + n)
        if n:
            keep(ctrl, layer, [tool_record(
                ctrl, label_ids=range(start + 1, start + n + 1), source="automatic",
                position=line[0], params={"positions": [list(p) for p in line], "start": start,
                                          "options": dict(auto)})])
        where = (ctrl.where(line[0]) or "the image") if len(line) == 1 else f"{len(line)} slices"
        return (f"Segment everything: {n} object(s) on {where} as labels {start + 1}..{start + n} "
                f"({changed} pixels; existing labels kept).") if n else (
            f"Segment everything found no object on {where}.")

    return ToolRun("Segment everything", job, apply)


def refine(ctrl: "SamController", *, label_id: int) -> ToolRun:
    """Label ``label_id`` on the slice in view becomes the prompt (its box and its mask);
    SAM's mask replaces it there."""
    pos = ctrl.current_position()
    if pos is None:
        raise ToolError("The viewer shows no slice of the image: move into the image first.")
    layer, label_id, mask = _label_mask(ctrl, label_id, pos)
    settings, index = ctrl.settings(), ctrl.geometry().index(pos)

    def job(progress: Progress, should_stop):
        seg = ctrl.session.engine(settings)
        progress(0, 1, f"Refining label {label_id}")
        pred = seg.predict_many(index, [seg.prompt_from_mask(index, mask)])[0]
        return pred.mask

    def apply(new_mask) -> str:
        L.paint_objects(layer, pos, [new_mask], overwrite=ctrl.overwrite, ids=ctrl.ids,
                        label_ids=[label_id], replace=label_id)
        keep(ctrl, layer, [tool_record(ctrl, label_ids=[label_id], source="refinement",
                                       parent=label_id, position=pos,
                                       params={"overwrite": ctrl.overwrite})])
        return (f"Refined label {label_id} on {ctrl.where(pos) or 'the image'}: {int(mask.sum())} -> "
                f"{int(np.count_nonzero(new_mask))} pixels.")

    return ToolRun(f"Refine label {label_id}", job, apply)


def precompute(ctrl: "SamController", *, axis: int | None, lo: int | None, hi: int | None) -> ToolRun:
    """Embed the slices lo..hi along ``axis`` (all slices of a 2D image: one) into the cache."""
    geo = ctrl.geometry()
    if axis is None or not geo.lead_axes:
        line = [ctrl.current_position() or ()]
    else:
        _, line = _line(ctrl, axis, lo, hi)
    settings = ctrl.settings()
    indices = [geo.index(p) for p in line]

    def job(progress: Progress, should_stop):
        seg = ctrl.session.engine(settings)
        return seg.embed(indices, progress=lambda d, t: progress(d, t, "Embedding slices"),
                         should_stop=should_stop)

    def apply(encoded) -> str:
        return f"Precomputed {len(indices)} slice(s) ({encoded} encoded, the rest were cached)."

    return ToolRun("Precompute embeddings", job, apply)
