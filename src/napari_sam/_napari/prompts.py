"""Layer -> prompt conversion for the dock widget, as plain functions.

Everything here works on napari layer objects but needs no Qt, no viewer and no model, so
it is unit-testable on its own. Coordinates follow napari: (row, col) = (y, x), leading
axes first.

The chain for a prompt is always::

    prompt layer data coords --data_to_world--> world coords
        --(completed with the viewer's current point)--> image layer world_to_data
        --> image data coords (..., y, x)

so scale, translate (and affine) of the image layer and of the prompt layers are honoured
independently. A prompt belongs to the slice whose position along the image's leading
(non-YX) axes equals its rounded leading coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "SlicePrompts",
    "image_data",
    "prompt_view_ok",
    "prompts_for_slice",
    "rows_on_slice",
    "slice_position",
    "stack_axes",
    "to_image_coords",
]

_SLICE_LETTERS = "TZ"
_EXTRA_LETTERS = "ABDEFGHJKLMNOPQRUVW"


@dataclass
class SlicePrompts:
    """The prompts of one slice in image pixel coordinates.

    Attributes
    ----------
    points : numpy.ndarray, shape (N, 2)
        (y, x) of the points on the slice.
    labels : numpy.ndarray of int, shape (N,)
        1 positive, 0 negative.
    box : numpy.ndarray, shape (4,) or None
        (y0, x0, y1, x1) of the newest rectangle on the slice.
    n_boxes : int
        Number of rectangles on the slice (only the newest is used).
    problems : list of str
        Human-readable notes on prompts that were skipped (outside the image, ...).
    """

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    box: np.ndarray | None = None
    n_boxes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """True when there is neither a point nor a box."""
        return len(self.points) == 0 and self.box is None

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :meth:`napari_sam.Segmenter.predict`."""
        kwargs: dict[str, Any] = {}
        if len(self.points):
            kwargs["points"] = self.points
            kwargs["point_labels"] = self.labels
        if self.box is not None:
            kwargs["box"] = self.box
        return kwargs


def stack_axes(ndim: int, rgb: bool = False) -> str:
    """Axes string for :func:`napari_sam.open_stack` of an image layer's data.

    Parameters
    ----------
    ndim : int
        ``layer.ndim`` (napari excludes an RGB axis from it).
    rgb : bool
        ``layer.rgb``: the data carry a trailing RGB(A) axis.

    Returns
    -------
    str
        e.g. ``"YX"``, ``"ZYX"``, ``"TZYX"``, ``"ZYXC"`` (leading axes in layer order).
    """
    k = ndim - 2
    if k < 0:
        raise ValueError(f"an image layer for SAM needs at least 2 dimensions, got {ndim}")
    lead = _SLICE_LETTERS[-k:] if 0 < k <= len(_SLICE_LETTERS) else ""
    if k > len(_SLICE_LETTERS):
        lead = _EXTRA_LETTERS[: k - len(_SLICE_LETTERS)] + _SLICE_LETTERS
    return lead + "YX" + ("C" if rgb else "")


def image_data(layer: Any) -> Any:
    """The full-resolution array of an image layer (level 0 of a multiscale layer)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def to_image_coords(
    image_layer: Any,
    prompt_layer: Any,
    data_coords: np.ndarray,
    world_point: Sequence[float],
) -> np.ndarray:
    """Convert prompt layer data coordinates to image layer data coordinates.

    Parameters
    ----------
    image_layer : napari.layers.Image
    prompt_layer : napari.layers.Layer
        The layer the coordinates belong to (Points or Shapes).
    data_coords : numpy.ndarray, shape (N, prompt_layer.ndim)
        Coordinates in the prompt layer's data space.
    world_point : sequence of float
        The viewer's current world point (``viewer.dims.point``); fills the world axes
        that the prompt layer does not have (a 2D prompt layer applies to every slice).

    Returns
    -------
    numpy.ndarray, shape (N, image_layer.ndim)
    """
    data_coords = np.atleast_2d(np.asarray(data_coords, dtype=np.float64))
    world_point = np.asarray(world_point, dtype=np.float64)
    out = np.empty((len(data_coords), image_layer.ndim), dtype=np.float64)
    k = prompt_layer.ndim
    for i, row in enumerate(data_coords):
        world = np.asarray(prompt_layer.data_to_world(row), dtype=np.float64)
        full = world_point.copy() if len(world_point) >= k else np.zeros(k)
        full[-k:] = world
        out[i] = image_layer.world_to_data(full)
    return out


def slice_position(image_layer: Any, world_point: Sequence[float]) -> tuple[int, ...] | None:
    """Position of the slice in view along the image's leading axes.

    Parameters
    ----------
    image_layer : napari.layers.Image
    world_point : sequence of float
        ``viewer.dims.point``.

    Returns
    -------
    tuple of int or None
        Rounded data coordinates of the leading (non-YX) axes, or None when the viewer
        shows a position outside the image.
    """
    data = np.asarray(image_layer.world_to_data(np.asarray(world_point, dtype=np.float64)))
    lead = np.round(data[:-2]).astype(int)
    shape = image_layer.data.shape if not getattr(image_layer, "multiscale", False) else (
        image_layer.data[0].shape)
    for p, n in zip(lead, shape[: len(lead)]):
        if not 0 <= p < n:
            return None
    return tuple(int(p) for p in lead)


def rows_on_slice(image_coords: np.ndarray, position: Sequence[int]) -> np.ndarray:
    """Boolean mask of the rows whose rounded leading coordinates equal ``position``."""
    image_coords = np.atleast_2d(image_coords)
    k = len(position)
    if k == 0:
        return np.ones(len(image_coords), dtype=bool)
    lead = np.round(image_coords[:, :k]).astype(int)
    return (lead == np.asarray(position, dtype=int)[None]).all(axis=1)


def _inside(yx: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    h, w = shape
    return (yx[:, 0] >= -0.5) & (yx[:, 0] <= h - 0.5) & (yx[:, 1] >= -0.5) & (yx[:, 1] <= w - 0.5)


def point_polarity(points_layer: Any) -> np.ndarray:
    """1 / 0 per point from the layer's ``positive`` feature (all positive without it)."""
    n = len(points_layer.data)
    features = points_layer.features
    if "positive" not in features:
        return np.ones(n, dtype=np.int64)
    return np.asarray(features["positive"], dtype=bool).astype(np.int64)


def prompts_for_slice(
    image_layer: Any,
    points_layer: Any | None,
    shapes_layer: Any | None,
    position: Sequence[int],
    slice_shape: Sequence[int],
    world_point: Sequence[float],
) -> SlicePrompts:
    """Collect the points and the newest rectangle that belong to one slice.

    Parameters
    ----------
    image_layer : napari.layers.Image
        The segmented image.
    points_layer : napari.layers.Points or None
        Point prompts; polarity from its boolean ``positive`` feature.
    shapes_layer : napari.layers.Shapes or None
        Box prompts: its rectangles (other shape types are skipped).
    position : sequence of int
        The slice's position along the image's leading axes (:func:`slice_position`).
    slice_shape : (int, int)
        (Y, X) of the image.
    world_point : sequence of float
        ``viewer.dims.point``.

    Returns
    -------
    SlicePrompts
    """
    out = SlicePrompts()
    if points_layer is not None and len(points_layer.data):
        coords = to_image_coords(image_layer, points_layer, points_layer.data, world_point)
        on = rows_on_slice(coords, position)
        yx = coords[on][:, -2:]
        polarity = point_polarity(points_layer)[on]
        inside = _inside(yx, slice_shape)
        if not inside.all():
            bad = np.round(yx[~inside], 1).tolist()
            out.problems.append(f"{len(bad)} point(s) outside the image ignored: (y, x) {bad}")
        out.points, out.labels = yx[inside], polarity[inside]
    if shapes_layer is not None and len(shapes_layer.data):
        boxes = []
        skipped = 0
        for verts, kind in zip(shapes_layer.data, shapes_layer.shape_type):
            coords = to_image_coords(image_layer, shapes_layer, verts, world_point)
            if not rows_on_slice(coords, position).all():
                continue
            if kind != "rectangle":
                skipped += 1
                continue
            yx = coords[:, -2:]
            y0, x0 = yx.min(axis=0)
            y1, x1 = yx.max(axis=0)
            h, w = slice_shape
            if y1 < -0.5 or x1 < -0.5 or y0 > h - 0.5 or x0 > w - 0.5:
                out.problems.append(
                    f"box (y0, x0, y1, x1) {np.round([y0, x0, y1, x1], 1).tolist()} lies "
                    "outside the image; ignored")
                continue
            if y1 - y0 < 1 or x1 - x0 < 1:
                out.problems.append("a box without area was ignored")
                continue
            boxes.append(np.array([y0, x0, y1, x1]))
        if skipped:
            out.problems.append(f"{skipped} non-rectangle shape(s) ignored: draw rectangles")
        out.n_boxes = len(boxes)
        if boxes:
            out.box = boxes[-1]
            if len(boxes) > 1:
                out.problems.append(f"{len(boxes)} boxes on this slice: using the newest one")
    return out


def prompt_view_ok(ndisplay: int, order: Sequence[int], ndim: int) -> bool:
    """True when the viewer shows the last two axes (Y, X) in 2D, the only prompting view."""
    return ndisplay == 2 and tuple(order[-2:]) == (ndim - 2, ndim - 1)
