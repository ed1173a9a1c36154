"""Existing labels as prompts: refine a segmentation with SAM, or carry one slice's labels
through Z.

A label made by any tool (a threshold, StarDist, Cellpose, a hand-painted layer) becomes
SAM's prompt on each slice where it appears: its bounding box and its mask (as the
low-resolution logits SAM refines from), the rule of
:meth:`napari_sam.Segmenter.prompt_from_mask`. The labels of a slice are decoded together,
in batched decoder calls (:meth:`napari_sam.Segmenter.predict_many`).

:func:`refine_labels`     every label (or the chosen ones) replaced by SAM's mask;
:func:`propagate_labels`  every label of one slice followed through Z (or T), written on
                          the other slices where they are free.

Both take the labels as an array of the stack's label shape ((slice axes..., Y, X); a lazy
zarr array is read one slice at a time) and return new labels; the input is never changed.
Pixel rules: a refined label is written where it is free or was itself; where refined
labels overlap, the lower id keeps the pixel; labels that are not refined are kept as
they are. Propagated labels never overwrite existing labels unless ``overwrite``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .._errors import InvalidInputError
from .volume import DEFAULT_STRATEGY, PropagationResult, Seed, propagate_many

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.segment import Segmenter

__all__ = ["RefineResult", "PropagateLabelsResult", "check_labels_shape", "label_masks",
           "refine_labels", "refine_slice", "propagate_labels", "propagated_slices",
           "follow_slice_labels"]

Progress = Callable[[int, int], None]


@dataclass
class RefineResult:
    """Refined labels and, per label and slice, how it changed.

    ``report`` rows: ``label_id``, ``position`` (slice axes), ``pixels_old``,
    ``pixels_new``, ``iou`` (old vs new), ``score`` (SAM's predicted IoU).
    """

    labels: Any
    report: list[dict] = field(default_factory=list)

    @property
    def mean_iou(self) -> float | None:
        ious = [r["iou"] for r in self.report]
        return float(np.mean(ious)) if ious else None


@dataclass
class PropagateLabelsResult:
    """Labels with the seed slice's labels carried through Z, and each label's propagation."""

    labels: np.ndarray
    results: dict[int, PropagationResult] = field(default_factory=dict)


def check_labels_shape(labels: Any, stack: Any) -> None:
    """Labels must have the stack's label shape (slice axes..., Y, X)."""
    want = tuple(stack.shape[stack.axes.index(a)] for a in stack.slice_axes) + tuple(stack.slice_shape)
    shape = tuple(getattr(labels, "shape", ()))
    if shape != want:
        raise InvalidInputError(
            f"labels of shape {shape} do not fit the image: expected {want} (axes "
            f"{stack.slice_axes + 'YX'}, the image's slice axes and one channel)")
    dtype = np.dtype(getattr(labels, "dtype", np.int64))
    if dtype.kind not in "iub":
        raise InvalidInputError(f"labels must be integers, got dtype {dtype}")


def _regions(labels2d: np.ndarray, *, ids: Sequence[int] | None = None, min_area: int = 1):
    """The :func:`skimage.measure.regionprops` of a (Y, X) label slice, by id, filtered."""
    from skimage.measure import regionprops

    lab = np.asarray(labels2d)
    if lab.ndim != 2:
        raise InvalidInputError(f"a label slice must be 2D (Y, X), got shape {lab.shape}")
    if lab.dtype.kind == "b":
        lab = lab.astype(np.uint8)
    if lab.dtype.kind == "i" and lab.size and lab.min() < 0:
        raise InvalidInputError("labels must not be negative")
    wanted = None if ids is None else {int(i) for i in ids}
    return [r for r in regionprops(lab)
            if (wanted is None or r.label in wanted) and r.area >= min_area]


def _full(region, shape: tuple[int, ...]) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[region.slice] = region.image
    return m


def label_masks(labels2d: np.ndarray, *, ids: Sequence[int] | None = None,
                min_area: int = 1) -> list[tuple[int, np.ndarray]]:
    """(id, full-size bool mask) of every label of a (Y, X) slice, by id; regions come from
    :func:`skimage.measure.regionprops` (one bounding box each, no full scan per label)."""
    shape = np.shape(labels2d)
    return [(int(r.label), _full(r, shape)) for r in _regions(labels2d, ids=ids, min_area=min_area)]


def refine_slice(seg: "Segmenter", index: int, labels2d: np.ndarray, *,
                 ids: Sequence[int] | None = None, batch_size: int = 32
                 ) -> tuple[np.ndarray, list[dict]]:
    """Refine the labels of one (Y, X) slice (slice ``index`` of ``seg.stack``).

    Labels are decoded ``batch_size`` at a time, and only that many full-size masks are
    held at once. Returns the new slice (the input's dtype) and one report row per
    refined label.
    """
    lab = np.asarray(labels2d)
    regions = _regions(lab, ids=ids)
    new = lab.copy()
    rows: list[dict] = []
    if not regions:
        return new, rows
    new[np.isin(lab, [r.label for r in regions])] = 0  # refined labels' old pixels are free
    step = max(int(batch_size), 1)
    for start in range(0, len(regions), step):  # in id order: lower ids paint first
        chunk = regions[start:start + step]
        olds = [_full(r, lab.shape) for r in chunk]
        preds = seg.predict_many(index, [seg.prompt_from_mask(index, m) for m in olds])
        for r, old, p in zip(chunk, olds, preds):
            now = p.mask & (new == 0)  # free, or a refined label's old pixel: its final pixels
            new[now] = r.label
            union = int(np.count_nonzero(old | now))
            rows.append({"label_id": int(r.label), "pixels_old": int(old.sum()),
                         "pixels_new": int(now.sum()),
                         "iou": float(np.count_nonzero(old & now) / union) if union else 0.0,
                         "score": float(p.score)})
    return new, rows


def refine_labels(seg: "Segmenter", labels: Any, *, indices: Sequence[int] | None = None,
                  ids: Sequence[int] | None = None, out: Any = None, batch_size: int = 32,
                  progress: Progress | None = None,
                  should_stop: Callable[[], bool] | None = None) -> RefineResult:
    """Refine every label of an existing segmentation with SAM, slice by slice.

    Parameters
    ----------
    seg : Segmenter or TiledSegmenter
        On the image the labels belong to.
    labels : array-like, shape (slice axes..., Y, X)
        Integer labels (numpy, zarr or dask); read one slice at a time.
    indices : sequence of int, optional
        Slice indices (:meth:`napari_sam.Stack.index`) to refine; default every slice
        that holds a label (each slice is read once).
    ids : sequence of int, optional
        Only these labels (default all).
    out : array-like, optional
        Where the result goes (same shape; written one slice at a time, so it can be a
        zarr array on disk); default a new numpy array of the labels' dtype, a copy of
        ``labels`` on the slices not refined.
    batch_size : int
        Labels decoded together per decoder call.
    progress : callable(done, total), optional
    should_stop : callable() -> bool, optional
        Polled between slices; True stops (the slices done so far are in ``out``).

    Returns
    -------
    RefineResult
    """
    stack = seg.stack
    check_labels_shape(labels, stack)
    if out is None:
        out = np.array(labels[...], copy=True)
    elif tuple(out.shape) != tuple(labels.shape):
        raise InvalidInputError(f"out has shape {tuple(out.shape)}, labels {tuple(labels.shape)}")
    todo = range(len(stack)) if indices is None else [int(i) for i in indices]
    result = RefineResult(out)
    for done, index in enumerate(todo):
        if should_stop is not None and should_stop():
            break
        pos = tuple(stack.position(index))
        page = np.asarray(labels[pos])  # read once
        if indices is not None or page.any():  # by default slices without labels are left
            new, rows = refine_slice(seg, index, page, ids=ids, batch_size=batch_size)
            out[pos] = new
            result.report += [{**r, "position": list(pos)} for r in rows]
        if progress is not None:
            progress(done + 1, len(todo))
    return result


def propagated_slices(ids: Sequence[int], results: Sequence[PropagationResult], *,
                      place: Callable[[int], tuple]) -> dict[tuple, np.ndarray]:
    """The propagated labels on every slice but the seed slice, as {position: (Y, X) ids},
    the lower id kept where objects overlap; ``place(z)`` is the label-array position of
    z on the line. The caller writes them where the labels are free
    (:func:`napari_sam.labels.volume_changes`)."""
    out: dict[tuple, np.ndarray] = {}
    for k, r in sorted(zip(ids, results), key=lambda kr: kr[0]):
        for z in r.accepted:
            if z == r.seed_z:
                continue
            values = out.setdefault(tuple(place(z)), np.zeros(r.mask.shape[1:], np.int64))
            values[r.mask[z] & (values == 0)] = k
    return out


def follow_slice_labels(seg: "Segmenter", page: np.ndarray, *, index: int,
                        position: Sequence[int], axis: int, limits: tuple[int, int] | None = None,
                        min_score: float = 0.5, min_iou: float = 0.3,
                        progress: Progress | None = None,
                        should_stop: Callable[[], bool] | None = None) -> dict[tuple, np.ndarray]:
    """Every label of the (Y, X) slice ``page`` (slice ``index``, at label-array
    ``position``) followed along slice axis ``axis`` in one batched propagation; returns
    :func:`propagated_slices` (the widget's "all on this slice" Propagate, and its replay)."""
    objects = label_masks(page)
    res = propagate_many(seg, [Seed(int(index), mask=m) for _, m in objects], axis=axis,
                         limits=limits, min_score=min_score, min_iou=min_iou,
                         progress=progress, should_stop=should_stop)
    at = tuple(int(p) for p in position)
    return propagated_slices([k for k, _ in objects], res,
                             place=lambda z: tuple(z if k == axis else p for k, p in enumerate(at)))


def propagate_labels(seg: "Segmenter", labels: Any, *, index: int,
                     ids: Sequence[int] | None = None, axis: int | str | None = None,
                     limits: tuple[int, int] | None = None, strategy: str = DEFAULT_STRATEGY,
                     min_score: float = 0.5, min_iou: float = 0.3, max_slices: int | None = None,
                     overwrite: bool = False, group_size: int = 16,
                     progress: Progress | None = None,
                     should_stop: Callable[[], bool] | None = None) -> PropagateLabelsResult:
    """Follow every label of slice ``index`` through Z (or ``axis``), keeping its id.

    Each label's mask on the seed slice is its seed (:func:`~.volume.propagate_many`, one
    batched decoder call per slice for a group of ``group_size`` labels). On the other
    slices a label is written where the labels are 0 (or everywhere with ``overwrite``);
    between propagated labels the lower id wins.

    Parameters
    ----------
    seg : Segmenter or TiledSegmenter
    labels : array-like, shape (slice axes..., Y, X)
    index : int
        The seed slice (:meth:`napari_sam.Stack.index`).
    ids : sequence of int, optional
        Only these labels of the seed slice.
    axis, limits, strategy, min_score, min_iou, max_slices
        As :func:`~.volume.propagate_many`.
    overwrite : bool
        Propagated labels replace existing labels on the other slices.

    Returns
    -------
    PropagateLabelsResult
        ``labels``: a new numpy array; ``results``: per id, its propagation (slices
        accepted, why each direction stopped) without the masks.
    """
    stack = seg.stack
    check_labels_shape(labels, stack)
    if not 0 <= int(index) < len(stack):
        raise InvalidInputError(f"slice index {index} is out of range (0..{len(stack) - 1})")
    pos = tuple(stack.position(int(index)))
    objects = label_masks(np.asarray(labels[pos]), ids=ids)
    if not objects:
        raise InvalidInputError(f"slice {index} (position {pos}) holds no label to propagate"
                                + ("" if ids is None else f" among ids {list(ids)}"))
    out = np.array(labels[...], copy=True)
    result = PropagateLabelsResult(out)
    groups = [objects[s:s + group_size] for s in range(0, len(objects), max(int(group_size), 1))]
    taken: dict[tuple, np.ndarray] = {}  # pixels a propagated label took, per slice
    for g, group in enumerate(groups):
        if should_stop is not None and should_stop():
            break
        res = propagate_many(seg, [Seed(int(index), mask=m) for _, m in group], strategy=strategy,
                             min_score=min_score, min_iou=min_iou, max_slices=max_slices,
                             axis=axis, limits=limits, should_stop=should_stop)
        line = res[0].indices
        place = lambda z, line=line: tuple(stack.position(line[z]))  # noqa: E731
        for p, values in propagated_slices([k for k, _ in group], res, place=place).items():
            free = (values > 0) & ~taken.setdefault(p, np.zeros(values.shape, bool))
            if not overwrite:
                free &= np.asarray(labels[p]) == 0
            out[p][free] = values[free]
            taken[p] |= free
        for (k, _), r in zip(group, res):
            result.results[k] = PropagationResult(np.zeros((0,), bool), r.indices, r.seed_z,
                                                  r.steps, r.stop)
        if progress is not None:
            progress(g + 1, len(groups))
    return result
