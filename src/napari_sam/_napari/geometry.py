"""Where the slice in view is, and what the prompt layers hold on it: plain functions.

Everything here works on napari layer objects but needs no Qt and no model, so it is
unit-testable on its own. Coordinates follow napari: (row, col) = (y, x), leading axes
first. The chain for a prompt is always::

    prompt layer data coords --data_to_world--> world coords
        --(completed with the viewer's current point)--> image layer world_to_data
        --> image data coords (..., y, x)

so scale, translate (and affine) of the image layer and of the prompt layers are honoured
independently. A prompt belongs to the slice whose position along the image's slice axes
(all but Y, X and a channel axis) equals its rounded coordinates there.

Plugins get a proxy viewer whose layers are new proxy objects at every access: compare
layers with :func:`same_layer`, never with ``is``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..engine.prompt import Prompt

__all__ = [
    "ImageGeometry",
    "SlicePrompts",
    "guess_channel_axis",
    "image_data",
    "prompt_view_ok",
    "prompts_for_slice",
    "same_layer",
    "unwrap",
]

_SLICE_LETTERS = "TZ"
_EXTRA_LETTERS = "ABDEFGHJKLMNOPQRUVW"


def unwrap(obj: Any) -> Any:
    """The napari object behind a plugin proxy (the object itself otherwise)."""
    while hasattr(type(obj), "__wrapped__") or "Proxy" in type(obj).__name__:
        inner = getattr(obj, "__wrapped__", None)
        if inner is None:
            break
        obj = inner
    return obj


def same_layer(a: Any, b: Any) -> bool:
    """Whether two (possibly proxied) references name the same layer."""
    return a is not None and b is not None and unwrap(a) is unwrap(b)


def image_data(layer: Any) -> Any:
    """The full-resolution array of an image layer (level 0 of a multiscale layer)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def slice_letters(k: int) -> str:
    """Letters for ``k`` leading slice axes: "", "Z", "TZ", "ATZ", ..."""
    if k <= len(_SLICE_LETTERS):
        return _SLICE_LETTERS[len(_SLICE_LETTERS) - k:]
    return _EXTRA_LETTERS[: k - len(_SLICE_LETTERS)] + _SLICE_LETTERS


def prompt_view_ok(ndisplay: int, order: Sequence[int], ndim: int) -> bool:
    """True when the viewer shows the last two axes (Y, X) in 2D, the only prompting view."""
    return ndisplay == 2 and tuple(order[-2:]) == (ndim - 2, ndim - 1)


@dataclass(frozen=True)
class ImageGeometry:
    """The image layer as the engine sees it: slice axes, a channel axis, the slice shape.

    Parameters
    ----------
    layer : napari.layers.Image
        The image (a proxy is fine).
    channel_axis : int or None
        Data axis holding channels (only 0 is offered by the widget: the axis napari's
        reader puts first for a channels-first file), or None.
    """

    layer: Any
    channel_axis: int | None = None

    @property
    def data(self) -> Any:
        return image_data(self.layer)

    @property
    def rgb(self) -> bool:
        return bool(getattr(self.layer, "rgb", False))

    @property
    def shape(self) -> tuple[int, ...]:
        """Data shape without a trailing RGB axis."""
        shape = tuple(int(s) for s in self.data.shape)
        return shape[:-1] if self.rgb else shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def lead_axes(self) -> tuple[int, ...]:
        """Data axes enumerated by the slice index (all but a channel axis, Y and X)."""
        return tuple(a for a in range(self.ndim - 2) if a != self.channel_axis)

    @property
    def slice_dims(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.lead_axes)

    @property
    def slice_shape(self) -> tuple[int, int]:
        return self.shape[-2], self.shape[-1]

    @property
    def labels_shape(self) -> tuple[int, ...]:
        """Shape of a labels image for this image: one channel's shape."""
        return tuple(self.shape[a] for a in range(self.ndim) if a != self.channel_axis)

    @property
    def n_slices(self) -> int:
        return int(np.prod(self.slice_dims, dtype=np.int64))

    @property
    def n_channels(self) -> int:
        return 1 if self.channel_axis is None else self.shape[self.channel_axis]

    def axes(self) -> str:
        """Axis letters of the data for :func:`napari_sam.open_stack` (C for channels/RGB)."""
        letters = list(slice_letters(len(self.lead_axes)))
        out = []
        for a in range(self.ndim - 2):
            out.append("C" if a == self.channel_axis else letters.pop(0))
        return "".join(out) + "YX" + ("C" if self.rgb else "")

    def axis_names(self) -> list[str]:
        """Display names of the slice axes: the layer's axis labels where they are named,
        else T, Z (as in :meth:`axes`)."""
        labels = list(getattr(self.layer, "axis_labels", ()) or ())
        letters = [c for c in self.axes() if c not in "CYX"]
        names = []
        for a, letter in zip(self.lead_axes, letters):
            label = str(labels[a]) if a < len(labels) else ""
            named = label and not label.lstrip("-").isdigit() and not label.startswith("axis")
            names.append((label.upper() if len(label) == 1 else label) if named else letter)
        return names

    def describe(self, position: Sequence[int]) -> str:
        """A slice position in the user's axes, e.g. ``"T 1, Z 3"`` ("" for a 2D image)."""
        return ", ".join(f"{n} {int(p)}" for n, p in zip(self.axis_names(), position))

    # ------------------------------------------------------------------ positions
    def lead_coords(self, data_coords: np.ndarray) -> np.ndarray:
        """The slice-axis columns of image data coordinates (N, ndim)."""
        return np.atleast_2d(data_coords)[:, list(self.lead_axes)]

    def position(self, world_point: Sequence[float]) -> tuple[int, ...] | None:
        """Position of the slice in view along the slice axes, or None outside the image."""
        data = np.asarray(self.layer.world_to_data(np.asarray(world_point, dtype=np.float64)))
        lead = np.round(self.lead_coords(data)[0]).astype(int)
        if any(not 0 <= p < n for p, n in zip(lead, self.slice_dims)):
            return None
        return tuple(int(p) for p in lead)

    def index(self, position: Sequence[int]) -> int:
        """Slice index (C order over the slice axes) of a position."""
        return int(np.ravel_multi_index(tuple(position), self.slice_dims)) if position else 0

    def position_of(self, index: int) -> tuple[int, ...]:
        """Inverse of :meth:`index`."""
        if not self.slice_dims:
            return ()
        return tuple(int(v) for v in np.unravel_index(int(index), self.slice_dims))

    def labels_index(self, position: Sequence[int]) -> tuple[int, ...]:
        """Leading index of a slice into a labels image of :attr:`labels_shape`."""
        return tuple(int(p) for p in position)

    def to_data(self, prompt_layer: Any, coords: np.ndarray, world_point: Sequence[float]) -> np.ndarray:
        """Prompt layer data coordinates (N, prompt ndim) -> image data coordinates (N, ndim).

        World axes the prompt layer does not have are taken from ``world_point``
        (``viewer.dims.point``).
        """
        coords = np.atleast_2d(np.asarray(coords, dtype=np.float64))
        world_point = np.asarray(world_point, dtype=np.float64)
        out = np.empty((len(coords), self.layer.ndim), dtype=np.float64)
        k = prompt_layer.ndim
        for i, row in enumerate(coords):
            world = np.asarray(prompt_layer.data_to_world(row), dtype=np.float64)
            full = world_point.copy() if len(world_point) >= k else np.zeros(k)
            full[-k:] = world
            out[i] = self.layer.world_to_data(full)  # uses the last ndim world axes
        return out

    def on_slice(self, data_coords: np.ndarray, position: Sequence[int]) -> np.ndarray:
        """Boolean mask of the rows whose rounded slice-axis coordinates equal ``position``."""
        lead = self.lead_coords(data_coords)
        if not len(position):
            return np.ones(len(lead), dtype=bool)
        return (np.round(lead).astype(int) == np.asarray(position, dtype=int)[None]).all(axis=1)


def guess_channel_axis(layer: Any) -> int | None:
    """0 when the image's first axis holds channels, else None.

    Channels: the first axis is labelled c / ch / channel, or the layer was read from a
    file whose metadata says its first axis is channels (napari's own reader leaves a
    channels-first TIFF as one layer with the channels first). Arrays without such
    metadata are taken as slices."""
    geo = ImageGeometry(layer)
    if geo.rgb or geo.ndim < 3:
        return None
    labels = list(getattr(layer, "axis_labels", ()) or ())
    if labels and str(labels[0]).lower() in ("c", "ch", "channel", "channels"):
        return 0
    path = getattr(getattr(layer, "source", None), "path", None)
    if not path:
        return None
    try:
        import napari_sam as ns

        stack = ns.open_stack(path)
        stack.close()
    except Exception:  # noqa: BLE001 - not a file napari-sam reads: no metadata to go by
        return None
    same = tuple(stack.shape) == tuple(geo.data.shape)
    return 0 if same and stack.axes[0] == "C" else None


# ---------------------------------------------------------------------- prompts
@dataclass
class SlicePrompts:
    """The objects prompted on one slice, in image pixel coordinates.

    Attributes
    ----------
    objects : list of Prompt
        One prompt per object: each rectangle with the points inside it, then (when
        there are positive points outside every rectangle) one object of those points.
    problems : list of str
        Notes on prompts that were skipped (outside the image, not a rectangle, ...).
    """

    objects: list[Prompt] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.objects


def point_polarity(points_layer: Any) -> np.ndarray:
    """1 / 0 per point from the layer's ``positive`` feature (all positive without it)."""
    n = len(points_layer.data)
    features = points_layer.features
    if "positive" not in features:
        return np.ones(n, dtype=np.int64)
    return np.asarray(features["positive"], dtype=bool).astype(np.int64)


def _inside(yx: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    h, w = shape
    return (yx[:, 0] >= -0.5) & (yx[:, 0] <= h - 0.5) & (yx[:, 1] >= -0.5) & (yx[:, 1] <= w - 0.5)


def _slice_boxes(geo: ImageGeometry, shapes_layer: Any, position, world_point, out: SlicePrompts):
    boxes = []
    skipped = 0
    h, w = geo.slice_shape
    for verts, kind in zip(shapes_layer.data, shapes_layer.shape_type):
        coords = geo.to_data(shapes_layer, verts, world_point)
        if not geo.on_slice(coords, position).all():
            continue
        if kind != "rectangle":
            skipped += 1
            continue
        yx = coords[:, -2:]
        y0, x0 = yx.min(axis=0)
        y1, x1 = yx.max(axis=0)
        if y1 < -0.5 or x1 < -0.5 or y0 > h - 0.5 or x0 > w - 0.5:
            out.problems.append(
                f"box (y0, x0, y1, x1) {np.round([y0, x0, y1, x1], 1).tolist()} lies outside "
                "the image; ignored")
            continue
        if y1 - y0 < 1 or x1 - x0 < 1:
            out.problems.append("a box without area was ignored")
            continue
        boxes.append(np.array([max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)]))
    if skipped:
        out.problems.append(f"{skipped} non-rectangle shape(s) ignored: draw rectangles")
    return boxes


def prompts_for_slice(
    geo: ImageGeometry,
    points_layer: Any | None,
    shapes_layer: Any | None,
    position: Sequence[int],
    world_point: Sequence[float],
) -> SlicePrompts:
    """Collect the objects prompted on one slice.

    Every rectangle of ``shapes_layer`` on the slice is one object; points inside a
    rectangle (the smallest, when rectangles nest) refine that object. Points outside
    every rectangle form one more object when at least one of them is positive.

    Parameters
    ----------
    geo : ImageGeometry
        The segmented image.
    points_layer : napari.layers.Points or None
        Point prompts; polarity from its boolean ``positive`` feature.
    shapes_layer : napari.layers.Shapes or None
        Box prompts: its rectangles (other shape types are skipped).
    position : sequence of int
        The slice's position along the slice axes (:meth:`ImageGeometry.position`).
    world_point : sequence of float
        ``viewer.dims.point``.
    """
    out = SlicePrompts()
    yx = np.zeros((0, 2))
    polarity = np.zeros(0, dtype=np.int64)
    if points_layer is not None and len(points_layer.data):
        coords = geo.to_data(points_layer, points_layer.data, world_point)
        on = geo.on_slice(coords, position)
        yx, polarity = coords[on][:, -2:], point_polarity(points_layer)[on]
        inside = _inside(yx, geo.slice_shape)
        if not inside.all():
            bad = np.round(yx[~inside], 1).tolist()
            out.problems.append(f"{len(bad)} point(s) outside the image ignored: (y, x) {bad}")
        yx, polarity = yx[inside], polarity[inside]
    boxes = []
    if shapes_layer is not None and len(shapes_layer.data):
        boxes = _slice_boxes(geo, shapes_layer, position, world_point, out)
    owner = np.full(len(yx), -1)
    if boxes:
        areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
        for i, (y, x) in enumerate(yx):
            hits = [k for k, b in enumerate(boxes) if b[0] <= y <= b[2] and b[1] <= x <= b[3]]
            if hits:
                owner[i] = min(hits, key=lambda k: areas[k])
    for k, b in enumerate(boxes):
        mine = owner == k
        out.objects.append(Prompt.of(points=yx[mine] if mine.any() else None,
                                     point_labels=polarity[mine] if mine.any() else None, box=b))
    free = owner == -1
    if free.any():
        if (polarity[free] == 1).any():
            out.objects.append(Prompt.of(points=yx[free], point_labels=polarity[free]))
        else:
            out.problems.append(f"{int(free.sum())} negative point(s) outside every box and "
                                "without a positive point: ignored")
    return out
