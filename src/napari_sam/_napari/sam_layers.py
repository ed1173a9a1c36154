"""The SAM layers: created on the image's grid, read for prompts, written through history.

"SAM points" (positive / negative in the ``positive`` feature), "SAM boxes" (rectangles),
"SAM preview" (a 2D labels layer on the image's (Y, X) grid, one value per previewed
object) and "SAM labels" (the committed objects, one channel's shape). Labels are written
with ``Labels.data_setitem`` inside ``Labels.block_history``: one undo step per commit or
tool run, in napari's own history (Ctrl+Z undoes it too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .geometry import ImageGeometry, unwrap

__all__ = [
    "BOXES_NAME", "LABELS_NAME", "POINTS_NAME", "PREVIEW_NAME", "IdCounter", "boxes_layer",
    "find", "new_labels_layer", "paint_objects", "points_layer", "show_preview",
]

POINTS_NAME, BOXES_NAME = "SAM points", "SAM boxes"
PREVIEW_NAME, LABELS_NAME = "SAM preview", "SAM labels"
POSITIVE_COLOUR, NEGATIVE_COLOUR = "lime", "red"
_PREVIEW_COLOURS = ["cyan", "magenta", "yellow", "orange", "dodgerblue", "springgreen",
                    "violet", "gold"]


def find(viewer: Any, name: str, kind: str) -> Any:
    """The layer called ``name`` of type ``kind`` ("points", "shapes", "labels"), or None."""
    for layer in viewer.layers:
        if layer.name == name and type(unwrap(layer)).__name__.lower() == kind:
            return layer
    return None


def _grid(geo: ImageGeometry, ndim: int) -> dict[str, Any]:
    """scale / translate of the image's data axes without the channel axis, last ``ndim``."""
    keep = [a for a in range(geo.ndim) if a != geo.channel_axis]
    scale = np.asarray(geo.layer.scale)[keep][-ndim:]
    translate = np.asarray(geo.layer.translate)[keep][-ndim:]
    return {"scale": tuple(scale), "translate": tuple(translate)}


def points_layer(viewer: Any, geo: ImageGeometry | None, positive: bool, *,
                 create: bool = True) -> Any:
    """The "SAM points" layer, created on the image's grid (one channel) when missing."""
    layer = find(viewer, POINTS_NAME, "points")
    if layer is None and create and geo is not None:
        ndim = len(geo.labels_shape)
        layer = viewer.add_points(
            np.zeros((0, ndim)), ndim=ndim, name=POINTS_NAME, size=8, border_width=0.1,
            features={"positive": np.zeros(0, dtype=bool)},
            feature_defaults={"positive": positive}, face_color="positive",
            face_color_cycle={True: POSITIVE_COLOUR, False: NEGATIVE_COLOUR}, **_grid(geo, ndim),
        )
        layer.mode = "add"
    return layer


def boxes_layer(viewer: Any, geo: ImageGeometry | None, *, create: bool = True) -> Any:
    """The "SAM boxes" Shapes layer (each rectangle is one object)."""
    layer = find(viewer, BOXES_NAME, "shapes")
    if layer is None and create and geo is not None:
        ndim = len(geo.labels_shape)
        layer = viewer.add_shapes(ndim=ndim, name=BOXES_NAME, face_color="transparent",
                                  edge_color="yellow", edge_width=2, **_grid(geo, ndim))
        layer.mode = "add_rectangle"
    return layer


def new_labels_layer(viewer: Any, geo: ImageGeometry, data: Any = None) -> Any:
    """A new "SAM labels" layer of one channel's shape on the image's grid (in memory, or
    over ``data``: the zarr array of the labels file saved as you go)."""
    shape = geo.labels_shape
    data = np.zeros(shape, np.uint16) if data is None else data
    return viewer.add_labels(data, name=LABELS_NAME, opacity=0.6, **_grid(geo, len(shape)))


def preview_layer(viewer: Any, geo: ImageGeometry, *, create: bool = True) -> Any:
    """The 2D "SAM preview" labels layer on the image's (Y, X) grid (re-made when the slice
    shape changed); adding it keeps the user's active layer active."""
    layer = find(viewer, PREVIEW_NAME, "labels")
    shape = geo.slice_shape
    if create and (layer is None or tuple(layer.data.shape) != shape):
        from napari.utils.colormaps import DirectLabelColormap

        if layer is not None:
            viewer.layers.remove(layer)
        colours = {None: "transparent", 0: "transparent"}
        colours.update({k + 1: _PREVIEW_COLOURS[k % len(_PREVIEW_COLOURS)] for k in range(255)})
        active = viewer.layers.selection.active
        layer = viewer.add_labels(np.zeros(shape, np.uint8), name=PREVIEW_NAME, opacity=0.5,
                                  colormap=DirectLabelColormap(color_dict=colours),
                                  **_grid(geo, 2))
        if active is not None:
            viewer.layers.selection.active = active
    return layer


def show_preview(viewer: Any, geo: ImageGeometry | None, masks: Sequence[np.ndarray]) -> None:
    """Show ``masks`` (each (Y, X) bool) in "SAM preview" as values 1..K (none: cleared)."""
    if geo is None:
        return
    layer = preview_layer(viewer, geo, create=bool(masks))
    if layer is None or tuple(layer.data.shape) != geo.slice_shape:
        return
    data = layer.data  # written in place: ~7 ms for a 1024 or 2048 px slice, against
    if not masks and not data.any():  # ~20-35 ms for a new array (layer.data = ...)
        return
    data[...] = 0
    for k, m in enumerate(masks):
        data[np.asarray(m, bool) & (data == 0)] = min(k + 1, 255)
    layer.refresh()


class IdCounter:
    """Next free label id of a labels layer, without rescanning the layer at every commit.

    The maximum is computed once per layer and data array and then only grows (an id
    freed by an undo is not handed out again, so a redo can never collide); a change the
    widget did not make (napari's brush) triggers a new scan.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._next = 1
        self._known: tuple[int, int] | None = None

    def _scan(self, layer: Any) -> int:
        data = layer.data
        if getattr(data, "size", 1) == 0:
            return 1
        if self._known is not None and self._known[0] == id(data):
            return self._known[1]
        if isinstance(data, np.ndarray):
            top = data.max()
        else:  # a lazy array (zarr): streamed chunk by chunk, never loaded whole
            import dask.array as da

            top = da.from_array(data, chunks=getattr(data, "chunks", "auto")).max().compute()
        return max(int(top), 0) + 1

    def start_from(self, layer: Any, next_id: int) -> None:
        """The next id of ``layer`` is known (a labels file's record): no scan needed."""
        self._known = (id(layer.data), int(next_id))
        self._key = None

    def next(self, layer: Any) -> int:
        key = (id(unwrap(layer)), id(layer.data))
        if key != self._key:
            self._key, self._next = key, self._scan(layer)
            layer.events.paint.connect(self._on_paint)
        return self._next

    def used(self, label_id: int) -> None:
        self._next = max(self._next, int(label_id) + 1)

    def _on_paint(self, event: Any = None) -> None:
        if getattr(self, "_painting", False):
            return
        top = _painted_max(getattr(event, "value", None))
        if top is None:
            self._key = None  # someone else painted, values unknown: rescan at the next commit
        else:
            self.used(top)

    def painting(self, on: bool) -> None:
        self._painting = on


def _painted_max(item: Any) -> int | None:
    """The largest value a napari paint history item wrote (None when it cannot be told)."""
    try:
        tops = []
        for atom in item:
            value = atom.new_value if hasattr(atom, "new_value") else atom[2]
            tops.append(int(np.max(value)))
        return max(tops) if tops else 0
    except Exception:  # noqa: BLE001 - an unknown history format: rescan instead
        return None


def grow_for(layer: Any, top_id: int) -> None:
    """Make the layer's dtype hold ``top_id`` (a new array: napari's history restarts)."""
    from ..labels import grown_dtype

    dtype = np.dtype(layer.data.dtype)
    new = grown_dtype(dtype, top_id)
    if new != dtype:
        if not isinstance(layer.data, np.ndarray):
            raise ValueError(
                f"labels layer {layer.name!r} is a {type(layer.data).__name__} of dtype {dtype}, "
                f"which cannot hold label {top_id}; choose another labels layer (the labels "
                "saved as you go are uint32)")
        layer.data = np.asarray(layer.data).astype(new)


def _fancy(layer: Any, position: Sequence[int], ys: np.ndarray, xs: np.ndarray) -> tuple:
    """napari's fancy index of pixels (ys, xs) on the slice at ``position``, in the
    smallest unsigned dtype that holds the layer's coordinates: napari keeps these arrays
    in its undo history (up to 100 steps), so uint16 instead of int64 takes the history of
    a commit from 28 to 10 bytes per pixel (uint32 labels)."""
    dtype = np.min_scalar_type(max(layer.data.shape) - 1)
    n = len(ys)
    return tuple(np.full(n, p, dtype) for p in position) + (ys.astype(dtype), xs.astype(dtype))


def paint_objects(layer: Any, position: Sequence[int], masks: Sequence[np.ndarray], *,
                  overwrite: bool, ids: IdCounter, label_ids: Sequence[int] | None = None,
                  replace: int | None = None) -> list[int]:
    """Paint 2D masks on the slice at ``position`` under new ids, as one undo step.

    Parameters
    ----------
    layer : napari.layers.Labels
    position : sequence of int
        Leading index of the slice in the labels data.
    masks : sequence of (Y, X) bool
        One per object, painted in order; an object never overwrites an earlier one.
    overwrite : bool
        Also paint over existing labels (never over this call's own objects).
    ids : IdCounter
        Hands out the new ids.
    label_ids : sequence of int, optional
        Ids to use instead of new ones.
    replace : int, optional
        With ``label_ids``: pixels of this id outside the new mask become 0 (refining).

    Returns
    -------
    list of int or None
        Per object, the id it was painted under (None: no free pixel, skipped).
    """
    from ..labels import object_changes

    pos = tuple(int(p) for p in position)
    current = np.array(layer.data[pos], copy=True)
    if label_ids is None:
        start = ids.next(layer)
        label_ids = list(range(start, start + len(masks)))
        fresh = True
    else:
        fresh = False
    changes, painted = object_changes(current, masks, label_ids, overwrite=overwrite,
                                      replace=replace)
    got = [v for v in painted if v is not None]
    if fresh and got:  # ids of skipped objects are handed out to the next ones
        remap = {old: start + k for k, old in enumerate(got)}
        changes = [(ys, xs, remap.get(v, v)) for ys, xs, v in changes]
        painted = [None if v is None else remap[v] for v in painted]
        ids.used(max(remap.values()))
    if not changes:
        return [None] * len(masks)
    grow_for(layer, max(c[2] for c in changes))
    ids.painting(True)
    try:
        with layer.block_history():
            for ys, xs, value in changes:
                if len(ys):
                    index = _fancy(layer, pos, ys, xs)
                    layer.data_setitem(index, value)
    finally:
        ids.painting(False)
    return painted


def paint_volume(layer: Any, slices: dict[tuple[int, ...], np.ndarray], *, overwrite: bool) -> int:
    """Write label slices (ids > 0 where set) at leading positions as one undo step.

    Existing labels are kept unless ``overwrite``. Returns the number of pixels changed.
    """
    from ..labels import volume_changes

    changed = 0
    with layer.block_history():
        for pos, values in slices.items():
            ys, xs, vals = volume_changes(np.asarray(layer.data[pos]), values, overwrite=overwrite)
            if len(ys):
                index = _fancy(layer, pos, ys, xs)
                layer.data_setitem(index, vals.astype(layer.data.dtype))
                changed += len(ys)
    return changed


def replace_slice(layer: Any, position: Sequence[int], *, before: np.ndarray,
                  after: np.ndarray) -> int:
    """Write ``after`` on the slice at ``position`` where it differs from ``before`` and
    the layer still holds ``before`` (edits made meanwhile are kept), as one undo step.
    Returns the number of pixels changed."""
    pos = tuple(int(p) for p in position)
    ys, xs = np.nonzero((after != before) & (np.asarray(layer.data[pos]) == before))
    if len(ys):
        grow_for(layer, int(after.max()))
        with layer.block_history():
            index = _fancy(layer, pos, ys, xs)
            layer.data_setitem(index, after[ys, xs].astype(layer.data.dtype))
    return len(ys)


def can_undo(layer: Any) -> bool:
    hist = getattr(unwrap(layer), "_undo_history", None)
    return True if hist is None else bool(len(hist))


def can_redo(layer: Any) -> bool:
    hist = getattr(unwrap(layer), "_redo_history", None)
    return True if hist is None else bool(len(hist))


def remove_on_slice(layer: Any, geo: ImageGeometry, position: Sequence[int],
                    world_point: Sequence[float]) -> int:
    """Remove the points / shapes of ``layer`` that lie on the slice at ``position``."""
    if type(unwrap(layer)).__name__ == "Points":
        on = np.flatnonzero(geo.on_slice(geo.to_data(layer, layer.data, world_point), position))
    else:
        on = np.array([i for i, v in enumerate(layer.data)
                       if geo.on_slice(geo.to_data(layer, v, world_point), position).all()], int)
    if len(on):
        layer.selected_data = set(on.tolist())
        layer.remove_selected()
    return len(on)


def set_polarity(layer: Any, positive: bool) -> None:
    """New points get ``positive``; in select mode the selected points change too."""
    if layer is None:
        return
    layer.feature_defaults = {"positive": positive}
    sel = sorted(layer.selected_data)
    if sel and layer.mode == "select":  # in add mode the newest point is selected
        layer.features.loc[sel, "positive"] = positive
        layer.refresh_colors()


def mark_added(layer: Any, indices: Any, positive: bool) -> None:
    """Set the polarity of freshly added points (napari reports them with negative indices)."""
    if layer is None or "positive" not in layer.features:
        return
    n = len(layer.data)
    idx = sorted({int(i) % n for i in (indices or ()) if -n <= int(i) < n})
    current = np.asarray(layer.features["positive"])[idx] if idx else []
    if idx and not np.all(current == positive):  # usually napari's default is right already
        layer.features.loc[idx, "positive"] = positive
        layer.refresh_colors()

