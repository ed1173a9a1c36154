"""Painting masks into label images without losing what is already there.

Rules
-----
* :func:`paint` writes ``label_id`` (the next free id by default) where ``mask`` is True and
  the label image is 0. Existing labels are kept unless ``overwrite=True``.
* It writes **in place** whenever ``label_id`` fits the label image's dtype. When it does not
  (id 256 into ``uint8``, for example), the dtype grows to the smallest of uint8 → uint16 →
  uint32 → uint64 (int8 → int16 → int32 → int64 for signed images) that holds the id, and a
  **new array** is returned in :attr:`PaintResult.labels`; the input is left untouched.
  Always continue with ``result.labels``.
* Every paint returns an :class:`UndoRecord` (the region it touched, the values before and
  after), so :func:`undo` restores the region exactly and :func:`redo` re-applies it.
  :class:`LabelHistory` keeps undo/redo stacks bounded in bytes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ._errors import InvalidInputError

__all__ = [
    "PaintResult",
    "UndoRecord",
    "LabelHistory",
    "paint",
    "undo",
    "redo",
    "next_label_id",
    "grown_dtype",
    "apply_changes",
    "object_changes",
    "volume_changes",
]

_UNSIGNED = (np.uint8, np.uint16, np.uint32, np.uint64)
_SIGNED = (np.int8, np.int16, np.int32, np.int64)


@dataclass(frozen=True)
class UndoRecord:
    """What one paint changed: enough to revert or re-apply it exactly.

    Attributes
    ----------
    region : tuple of slice
        Index into the full label image, one slice per axis (leading slice axes are
        ``slice(k, k + 1)``), covering the bounding box of the painted mask.
    before, after : numpy.ndarray
        The label values in ``region`` before and after the paint.
    label_id : int
        The id that was painted.
    """

    region: tuple[slice, ...]
    before: np.ndarray
    after: np.ndarray
    label_id: int

    @property
    def nbytes(self) -> int:
        """Memory held by the record."""
        return int(self.before.nbytes + self.after.nbytes)


@dataclass(frozen=True)
class PaintResult:
    """Result of :func:`paint`.

    Attributes
    ----------
    label_id : int
        The id that was painted.
    labels : numpy.ndarray
        The label image: the input array itself, or a new array when the dtype had to grow.
    record : UndoRecord
        Pass to :func:`undo` to revert the paint exactly.
    n_pixels : int
        Number of pixels that changed (0 when the mask was empty or fully occupied).
    """

    label_id: int
    labels: np.ndarray
    record: UndoRecord
    n_pixels: int


def next_label_id(labels: np.ndarray) -> int:
    """Return the smallest id above every id in ``labels`` (1 for an empty image)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return 1
    return max(int(labels.max()), 0) + 1


def grown_dtype(dtype: np.dtype, label_id: int) -> np.dtype:
    """Return ``dtype`` if it can hold ``label_id``, else the next integer dtype that can.

    Raises
    ------
    InvalidInputError
        If no 64-bit integer type holds ``label_id``.
    """
    dtype = np.dtype(dtype)
    if np.iinfo(dtype).max >= label_id:
        return dtype
    family = _SIGNED if np.issubdtype(dtype, np.signedinteger) else _UNSIGNED
    for candidate in family:
        cand = np.dtype(candidate)
        if cand.itemsize >= dtype.itemsize and np.iinfo(cand).max >= label_id:
            return cand
    raise InvalidInputError(
        f"label_id {label_id} does not fit any {family[-1].__name__} label image"
    )


def _check_labels(labels: np.ndarray) -> None:
    if not isinstance(labels, np.ndarray):
        raise InvalidInputError(
            f"labels must be a numpy array (a napari Labels layer's data), got "
            f"{type(labels).__name__}; convert lazy arrays with numpy.asarray first"
        )
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidInputError(
            f"labels must have an integer dtype (uint8, uint16, uint32, int32, ...), "
            f"got {labels.dtype}"
        )


def _full_region(
    labels_shape: tuple[int, ...], index: Sequence[int], bbox: tuple[slice, ...]
) -> tuple[slice, ...]:
    lead = []
    for axis, i in enumerate(index):
        size = labels_shape[axis]
        if not -size <= i < size:
            raise InvalidInputError(
                f"index {tuple(index)} is outside labels of shape {labels_shape}: "
                f"axis {axis} has {size} positions"
            )
        i = int(i) % size
        lead.append(slice(i, i + 1))
    return tuple(lead) + bbox


def _bbox(mask: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of the True pixels, as slices; empty slices for an empty mask."""
    bounds = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others)) if others else np.flatnonzero(mask)
        if hits.size == 0:
            return tuple(slice(0, 0) for _ in range(mask.ndim))
        bounds.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(bounds)


def _normalise_index(index: int | Sequence[int] | None) -> tuple[int, ...]:
    if index is None:
        return ()
    if isinstance(index, (int, np.integer)):
        return (int(index),)
    return tuple(int(i) for i in index)


def paint(
    labels: np.ndarray,
    mask: np.ndarray,
    *,
    label_id: int | None = None,
    overwrite: bool = False,
    index: int | Sequence[int] | None = None,
) -> PaintResult:
    """Paint ``mask`` into ``labels`` under a new (or given) id.

    Parameters
    ----------
    labels : numpy.ndarray of int, shape (..., Y, X)
        The label image; modified in place unless its dtype must grow (see module docs).
    mask : numpy.ndarray of bool
        Where to paint. Shape ``labels.shape`` when ``index`` is None, otherwise the
        shape of ``labels[index]`` (for example (Y, X) with ``index=(z,)`` into ZYX labels).
    label_id : int, optional
        Id to paint, > 0. Default: the next free id, ``labels.max() + 1``.
    overwrite : bool
        If False (default), pixels that already carry a label keep it.
    index : int or sequence of int, optional
        Position of the painted slice along the leading axes of ``labels``.

    Returns
    -------
    PaintResult
        ``label_id``, the label array to continue with, the undo record, and the number
        of pixels changed.

    Examples
    --------
    >>> labels = np.zeros((4, 4), np.uint8)
    >>> res = paint(labels, np.eye(4, dtype=bool))
    >>> res.label_id, res.n_pixels
    (1, 4)
    """
    _check_labels(labels)
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise InvalidInputError(f"mask must be a bool array, got dtype {mask.dtype}")
    lead = _normalise_index(index)
    target_shape = labels.shape[len(lead):]
    if len(lead) > labels.ndim or mask.shape != target_shape:
        raise InvalidInputError(
            f"mask of shape {mask.shape} does not match labels of shape {labels.shape} "
            f"at index {lead}: expected a mask of shape {target_shape}"
        )
    if label_id is None:
        label_id = next_label_id(labels)
    label_id = int(label_id)
    if label_id <= 0:
        raise InvalidInputError(f"label_id must be a positive integer, got {label_id}")

    dtype = grown_dtype(labels.dtype, label_id)
    if dtype != labels.dtype:
        labels = labels.astype(dtype)

    bbox = _bbox(mask)
    region = _full_region(labels.shape, lead, bbox)
    before = labels[region].copy()
    sub_mask = mask[bbox].reshape(before.shape)
    write = sub_mask if overwrite else sub_mask & (before == 0)
    after = before.copy()
    after[write] = label_id
    labels[region] = after
    n_changed = int(np.count_nonzero(after != before))
    record = UndoRecord(region=region, before=before, after=after, label_id=label_id)
    return PaintResult(label_id=label_id, labels=labels, record=record, n_pixels=n_changed)


def _apply(labels: np.ndarray, record: UndoRecord, *, expect: np.ndarray,
           put: np.ndarray, verb: str) -> None:
    _check_labels(labels)
    try:
        current = labels[record.region]
    except IndexError as err:
        raise InvalidInputError(
            f"cannot {verb}: the record's region {record.region} is outside labels of "
            f"shape {labels.shape}"
        ) from err
    if current.shape != expect.shape or not np.array_equal(current, expect):
        raise InvalidInputError(
            f"cannot {verb} label {record.label_id}: the labels in {record.region} changed "
            f"since; {verb} records in order (newest first for undo)"
        )
    labels[record.region] = put


def undo(labels: np.ndarray, record: UndoRecord) -> None:
    """Revert the paint described by ``record`` in place, exactly.

    Raises
    ------
    InvalidInputError
        If the region no longer holds what the paint wrote (undo out of order).
    """
    _apply(labels, record, expect=record.after, put=record.before, verb="undo")


def redo(labels: np.ndarray, record: UndoRecord) -> None:
    """Re-apply a paint reverted by :func:`undo`, in place."""
    _apply(labels, record, expect=record.before, put=record.after, verb="redo")


class LabelHistory:
    """Undo and redo stacks of :class:`UndoRecord`, bounded in bytes.

    Parameters
    ----------
    max_bytes : int
        Oldest undo records are dropped when the records hold more than this.
    """

    def __init__(self, *, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes = int(max_bytes)
        self._undo: deque[UndoRecord] = deque()
        self._redo: list[UndoRecord] = []

    def push(self, record: UndoRecord) -> None:
        """Remember a new paint; clears the redo stack."""
        self._undo.append(record)
        self._redo.clear()
        while len(self._undo) > 1 and self.nbytes > self.max_bytes:
            self._undo.popleft()

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self._undo) + sum(r.nbytes for r in self._redo)

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def undo(self, labels: np.ndarray) -> UndoRecord | None:
        """Revert the newest paint in ``labels``; returns its record, or None if none."""
        if not self._undo:
            return None
        record = self._undo[-1]
        undo(labels, record)
        self._redo.append(self._undo.pop())
        return record

    def redo(self, labels: np.ndarray) -> UndoRecord | None:
        """Re-apply the newest undone paint; returns its record, or None if none."""
        if not self._redo:
            return None
        record = self._redo[-1]
        redo(labels, record)
        self._undo.append(self._redo.pop())
        return record

    def clear(self) -> None:
        self._undo.clear()
        self._redo.clear()


# ---------------------------------------------------------------------- commit rules
# The pixel rules of the widget's commits and tools, as plain functions: the widget writes
# the changes through napari's history, replay (napari_sam.workflows.replay) into arrays.
Change = tuple  # (ys, xs, value): pixels of a slice and the value they get


def object_changes(current: np.ndarray, masks: Sequence[np.ndarray], label_ids: Sequence[int], *,
                   overwrite: bool, replace: int | None = None
                   ) -> tuple[list[Change], list[int | None]]:
    """The pixels a commit of several objects on one (Y, X) slice changes.

    Objects are painted in order and never over an earlier object of the same commit;
    existing labels are kept unless ``overwrite``. With ``replace`` (refining a label),
    that label's pixels outside the new mask become 0.

    Returns
    -------
    changes : list of (ys, xs, value)
    painted : list of int or None
        Per object, its id, or None when it got no pixel (skipped).
    """
    changes: list[Change] = []
    painted: list[int | None] = []
    mine = np.zeros(current.shape, bool)
    for m, label_id in zip(masks, label_ids):
        m = np.asarray(m, bool)
        free = m & ~mine & ((current == 0) | (current == label_id) | overwrite)
        if replace is not None:
            gone = (current == replace) & ~m
            if gone.any():
                changes.append((*np.nonzero(gone), 0))
        if not free.any() and not (replace is not None and changes):
            painted.append(None)
            continue
        mine |= free
        ys, xs = np.nonzero(free & (current != label_id))
        changes.append((ys, xs, int(label_id)))
        painted.append(int(label_id))
    return changes, painted


def volume_changes(current: np.ndarray, values: np.ndarray, *, overwrite: bool) -> Change:
    """The pixels where ``values`` (ids > 0 where set) is written onto a (Y, X) slice;
    existing labels are kept unless ``overwrite``."""
    free = (values > 0) & ((current == 0) | overwrite) & (current != values)
    ys, xs = np.nonzero(free)
    return ys, xs, values[ys, xs]


def apply_changes(labels: np.ndarray, position: Sequence[int], changes: Sequence[Change]) -> None:
    """Write ``changes`` into the slice of ``labels`` at leading ``position`` (in place)."""
    view = labels[tuple(int(p) for p in position)]
    for ys, xs, value in changes:
        view[ys, xs] = value
