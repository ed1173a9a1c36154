"""The prompt type: one object's points, box and mask input on one 2D slice.

Coordinates are napari's (row, col) = (y, x) in the slice's pixel grid; a box is
(y0, x0, y1, x1). A :class:`Prompt` is validated once, when it is made
(:meth:`Prompt.of`: shapes, finiteness, labels) and against a slice
(:meth:`Prompt.check`: bounds; the box is clipped to the slice). Everything that decodes
(:meth:`napari_sam.Segmenter.predict_many`, propagation, segment-everything, tiling, batch
jobs, the widget) takes prompts of this type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .._errors import InvalidInputError

__all__ = ["Prompt"]


@dataclass(frozen=True, eq=False)
class Prompt:
    """One object's prompts on one slice.

    Make one with :meth:`Prompt.of`; the fields are already validated arrays.

    Attributes
    ----------
    points : numpy.ndarray of float64, shape (N, 2)
        (y, x) pixel coordinates; N may be 0.
    labels : numpy.ndarray of int64, shape (N,)
        1 positive (object), 0 negative (background).
    box : numpy.ndarray of float64, shape (4,), or None
        (y0, x0, y1, x1) with y0 < y1 and x0 < x1.
    mask_input : numpy.ndarray of float32, shape (1, s, s), or None
        Low-resolution logits of an earlier prediction to refine (s = 256 for SAM).
    """

    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None = None
    mask_input: np.ndarray | None = None

    # ------------------------------------------------------------------ making
    @classmethod
    def of(
        cls,
        *,
        points: Any = None,
        point_labels: Any = None,
        box: Any = None,
        mask_input: Any = None,
    ) -> "Prompt":
        """Validate prompts given as array-likes (shapes, finite values, labels).

        Parameters
        ----------
        points : array-like, shape (N, 2) or (2,), optional
            (y, x) pixel coordinates of the slice.
        point_labels : array-like of {0, 1}, shape (N,), optional
            Default: all positive.
        box : array-like, shape (4,), optional
            (y0, x0, y1, x1); the corners may be given in any order.
        mask_input : array-like, shape (1, s, s) or (s, s), optional
            Logits of an earlier prediction (``Prediction.logits[k]``).

        Raises
        ------
        InvalidInputError
            Naming the argument, what it got and what is accepted.
        """
        pts, labels = _points(points, point_labels)
        return cls(pts, labels, _box(box), _mask(mask_input))

    @classmethod
    def from_dict(cls, d: dict) -> "Prompt":
        """Inverse of :meth:`to_dict` (a ``mask_input`` is not stored there)."""
        return cls.of(points=d.get("points") or None, point_labels=d.get("point_labels") or None,
                      box=d.get("box"))

    # ------------------------------------------------------------------ views
    @property
    def n_points(self) -> int:
        return len(self.points)

    @property
    def empty(self) -> bool:
        """True when there is neither a point, a box nor a mask input."""
        return self.n_points == 0 and self.box is None and self.mask_input is None

    @property
    def multimask(self) -> bool:
        """SAM's rule: three candidate masks for a lone point, one mask for anything richer."""
        return self.n_points == 1 and self.box is None and self.mask_input is None

    @property
    def kind(self) -> tuple[int, bool, bool]:
        """(number of points, has a box, has a mask input): prompts of one kind decode in
        one batched call without padding (padding changes SAM's output)."""
        return (self.n_points, self.box is not None, self.mask_input is not None)

    def extent(self) -> tuple[float, float, float, float]:
        """(y0, x0, y1, x1) covering the points (their whole pixels) and the box."""
        ys: list[float] = []
        xs: list[float] = []
        if self.n_points:
            ys += [self.points[:, 0].min() - 0.5, self.points[:, 0].max() + 0.5]
            xs += [self.points[:, 1].min() - 0.5, self.points[:, 1].max() + 0.5]
        if self.box is not None:
            ys += [self.box[0], self.box[2]]
            xs += [self.box[1], self.box[3]]
        if not ys:
            raise InvalidInputError("a prompt with neither points nor a box has no extent")
        return min(ys), min(xs), max(ys), max(xs)

    def key(self) -> bytes:
        """Bytes that identify the prompt (for caching a prediction)."""
        parts = [self.points.tobytes(), self.labels.tobytes(),
                 b"" if self.box is None else self.box.tobytes(),
                 b"" if self.mask_input is None else self.mask_input.tobytes()]
        return b"|".join(parts)

    def to_dict(self) -> dict:
        """JSON-able ``{"points": [[y, x], ...], "point_labels": [...], "box": [...] or None}``."""
        return {"points": self.points.tolist(), "point_labels": self.labels.tolist(),
                "box": None if self.box is None else self.box.tolist()}

    def __repr__(self) -> str:
        box = None if self.box is None else self.box.tolist()
        return (f"Prompt(points={self.points.tolist()}, labels={self.labels.tolist()}, "
                f"box={box}, mask_input={'yes' if self.mask_input is not None else None})")

    # ------------------------------------------------------------------ derived
    def shifted(self, dy: float, dx: float) -> "Prompt":
        """The same prompt with coordinates moved by (-dy, -dx) (into a tile at (dy, dx))."""
        off = np.array([dy, dx], dtype=np.float64)
        return Prompt(self.points - off, self.labels,
                      None if self.box is None else self.box - np.tile(off, 2), self.mask_input)

    def with_mask_input(self, logits: Any) -> "Prompt":
        """The same points and box, refining from ``logits`` (or None to drop it)."""
        return Prompt(self.points, self.labels, self.box, _mask(logits))

    def check(self, slice_shape: Sequence[int], *, mask_size: int | None = None) -> "Prompt":
        """Check against a slice of shape (Y, X); returns the prompt with its box clipped.

        Raises
        ------
        InvalidInputError
            When the prompt is empty, a point or the box lies outside the slice, or the
            mask input does not have shape (1, ``mask_size``, ``mask_size``).
        """
        shape = (int(slice_shape[0]), int(slice_shape[1]))
        if self.empty:
            raise InvalidInputError(
                "no prompt given: pass points=[[y, x], ...] with point_labels, a box "
                "[y0, x0, y1, x1], or mask_input"
            )
        if self.n_points:
            pts = self.points
            outside = ~((pts >= -0.5) & (pts <= np.asarray(shape) - 0.5)).all(axis=1)
            if outside.any():
                raise InvalidInputError(
                    f"points {pts[outside].tolist()} (y, x) lie outside the slice of shape {shape}"
                )
        box = self.box
        if box is not None:
            y0, x0, y1, x1 = box
            h, w = shape
            if y1 < 0 or x1 < 0 or y0 > h or x0 > w:
                raise InvalidInputError(
                    f"box {box.tolist()} (y0, x0, y1, x1) lies outside the slice of shape {shape}")
            box = np.array([max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)])
        if self.mask_input is not None and mask_size is not None:
            if self.mask_input.shape != (1, mask_size, mask_size):
                raise InvalidInputError(
                    f"mask_input must be SAM logits of shape (1, {mask_size}, {mask_size}) or "
                    f"({mask_size}, {mask_size}) (Prediction.logits[k]), got shape "
                    f"{self.mask_input.shape}")
        return Prompt(self.points, self.labels, box, self.mask_input)


# ---------------------------------------------------------------------- validation
def _points(points: Any, point_labels: Any) -> tuple[np.ndarray, np.ndarray]:
    none = (np.zeros((0, 2)), np.zeros(0, dtype=np.int64))
    if points is None:
        if point_labels is not None and np.asarray(point_labels).size:
            raise InvalidInputError("point_labels given without points")
        return none
    try:
        pts = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"points must be numbers of shape (N, 2) as (y, x), got {points!r}") from None
    if pts.size == 0:
        if point_labels is not None and np.asarray(point_labels).size:
            raise InvalidInputError("point_labels given for an empty list of points")
        return none
    if pts.ndim == 1 and pts.shape[0] == 2:
        pts = pts[None]
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise InvalidInputError(
            f"points must have shape (N, 2) as (y, x) pixel coordinates of the slice, got "
            f"shape {pts.shape}; for points of an nD layer pass only the last two columns"
        )
    if not np.isfinite(pts).all():
        raise InvalidInputError(f"points must be finite numbers, got {pts.tolist()}")
    labels = np.ones(len(pts), dtype=np.int64) if point_labels is None else np.asarray(point_labels)
    if labels.shape != (len(pts),):
        raise InvalidInputError(
            f"point_labels must have one entry per point ({len(pts)}), got shape {labels.shape}"
        )
    if not np.isin(labels, (0, 1)).all():
        raise InvalidInputError(
            f"point_labels must be 1 (positive) or 0 (negative), got {np.unique(labels).tolist()}"
        )
    return pts, labels.astype(np.int64)


def _box(box: Any) -> np.ndarray | None:
    if box is None:
        return None
    try:
        b = np.asarray(box, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInputError(f"box must be 4 numbers (y0, x0, y1, x1), got {box!r}") from None
    if b.shape != (4,):
        raise InvalidInputError(f"box must be 4 numbers (y0, x0, y1, x1), got shape {b.shape}")
    if not np.isfinite(b).all():
        raise InvalidInputError(f"box must be finite numbers, got {b.tolist()}")
    y0, y1 = sorted(b[[0, 2]])
    x0, x1 = sorted(b[[1, 3]])
    if y1 - y0 < 1 or x1 - x0 < 1:
        raise InvalidInputError(
            f"box {b.tolist()} (y0, x0, y1, x1) has no area: it must span at least one pixel "
            "along y and x"
        )
    return np.array([y0, x0, y1, x1])


def _mask(mask_input: Any) -> np.ndarray | None:
    if mask_input is None:
        return None
    m = np.asarray(mask_input, dtype=np.float32)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.shape[0] != 1 or m.shape[1] != m.shape[2]:
        raise InvalidInputError(
            "mask_input must be SAM logits of shape (1, s, s) or (s, s) (Prediction.logits[k]), "
            f"got shape {np.asarray(mask_input).shape}"
        )
    return m
