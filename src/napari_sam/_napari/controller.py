"""The widget's brain without Qt widgets: layers in, engine calls, layers out.

:class:`SamController` owns the engine state of one viewer (model, segmenter, undo
history, the current prediction) and the SAM layers ("SAM points", "SAM boxes",
"SAM preview", "SAM labels"). Long work is exposed as generators (:meth:`embed_job`) that
the widget runs in napari's ``thread_worker`` or, for tests, inline. Everything else runs
on the GUI thread and is fast (prompt decoding takes milliseconds).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import prompts as P

__all__ = [
    "BOXES_NAME",
    "CACHE_MEMORY",
    "CACHE_NEXT_TO_IMAGE",
    "CACHE_PATH",
    "LABELS_NAME",
    "POINTS_NAME",
    "PREVIEW_NAME",
    "SamController",
    "sidecar_path",
]

CACHE_MEMORY, CACHE_NEXT_TO_IMAGE, CACHE_PATH = "memory", "next to image", "path"
POINTS_NAME, BOXES_NAME = "SAM points", "SAM boxes"
PREVIEW_NAME, LABELS_NAME = "SAM preview", "SAM labels"
_POSITIVE_COLOUR, _NEGATIVE_COLOUR = "lime", "red"
# the last loaded model, shared by every widget of the process (reopening the widget or
# switching images does not reload the weights)
_MODELS: dict[tuple, Any] = {}


def sidecar_path(image_path: str | Path) -> Path:
    """``cells.tif`` / ``cells.ome.tif`` / ``cells.zarr`` -> ``cells.embeddings.zarr``."""
    p = Path(image_path)
    name = p.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".zarr", ".btf"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return p.with_name(name + ".embeddings.zarr")


class SamController:
    """Engine state and SAM layers of one viewer.

    Parameters
    ----------
    viewer : napari.Viewer
    status : callable(str), optional
        Receives short messages for the user (the widget shows them).
    """

    def __init__(self, viewer: Any, *, status: Callable[[str], None] | None = None) -> None:
        import napari_sam as ns

        self.viewer = viewer
        self.status = status or (lambda msg: None)
        self.image_layer: Any = None
        self.labels_layer: Any = None  # None: create / reuse "SAM labels"
        self.model_spec: str = ns.default_model_name()
        self.device: str | None = None  # None = auto
        self.cache_mode: str = CACHE_MEMORY
        self.cache_path: str | None = None
        self.overwrite = False
        self.positive = True
        self.history = ns.LabelHistory()
        self._history_layer: Any = None
        self._model: Any = None
        self._model_key: Any = None
        self._seg: Any = None
        self._seg_key: Any = None
        self._engine_lock = threading.Lock()
        self._prediction: Any = None
        self._prediction_key: Any = None
        self._mask_k: int | None = None
        self._shift_flip = False

    # ------------------------------------------------------------------ engine
    def model_key(self) -> tuple:
        return (self.model_spec, self.device)

    def cache_target(self) -> str | None:
        """The embedding store path for the current settings, or None (memory only)."""
        if self.cache_mode == CACHE_PATH and self.cache_path:
            return str(self.cache_path)
        if self.cache_mode == CACHE_NEXT_TO_IMAGE and self.image_layer is not None:
            src = getattr(self.image_layer.source, "path", None)
            if src:
                return str(sidecar_path(src))
        return None

    def engine_key(self) -> tuple | None:
        if self.image_layer is None:
            return None
        return (id(self.image_layer), id(P.image_data(self.image_layer)), self.model_key(),
                self.cache_target())

    def engine_ready(self) -> bool:
        """True when the segmenter for the current settings exists."""
        return self._seg is not None and self._seg_key == self.engine_key()

    @property
    def segmenter(self) -> Any:
        """The current :class:`napari_sam.Segmenter` (None until :meth:`ensure_engine`)."""
        return self._seg if self.engine_ready() else None

    def ensure_engine(self) -> Any:
        """Load the model and build the segmenter if the settings changed (blocking).

        Safe to call from a worker thread: reads only plain attributes captured here.
        """
        import napari_sam as ns

        key = self.engine_key()
        if key is None:
            raise RuntimeError("choose an image layer first")
        layer = self.image_layer
        data = P.image_data(layer)
        axes = P.stack_axes(layer.ndim, bool(getattr(layer, "rgb", False)))
        store = self.cache_target()
        with self._engine_lock:
            if self._seg is not None and self._seg_key == key:
                return self._seg
            if self._model is None or self._model_key != self.model_key():
                spec = self.model_spec
                self.status(f"Loading model {spec} ...")
                model = _MODELS.get(self.model_key())
                if model is None:
                    if Path(spec).suffix and Path(spec).exists():
                        model = ns.load_model(checkpoint=spec, device=self.device)
                    else:
                        model = ns.load_model(spec, device=self.device)
                    _MODELS.clear()  # keep one model: vit_h weighs 2.5 GB
                    _MODELS[self.model_key()] = model
                self._model, self._model_key = model, self.model_key()
            stack = ns.open_stack(data, axes=axes)
            if self._seg is not None:  # the old engine's queued prefetches are no use now
                self._seg.cache.cancel_prefetch()
            self._seg = ns.Segmenter(self._model, stack, cache=store)
            self._seg_key = key
            self._prediction = self._prediction_key = None
            return self._seg

    def embed_job(self, indices: list[int], *, interactive: bool = True) -> Iterator[tuple]:
        """Generator: load the engine, then embed ``indices`` one by one.

        Yields ``("ready", None, None)`` once the engine is ready and
        ``("embedded", done, total, index)`` after each slice; a worker may stop it at any
        yield (cancel). ``interactive`` keeps the slices in the memory cache.
        """
        seg = self.ensure_engine()
        yield ("ready", 0, len(indices), None)
        for done, i in enumerate(indices, start=1):
            if interactive:
                seg.cache.get(i)
            else:
                seg.embed([i])
            yield ("embedded", done, len(indices), i)

    # ------------------------------------------------------------------ view
    def view_problem(self) -> str | None:
        """Why prompting is impossible in the current view, or None."""
        if self.image_layer is None:
            return "Choose an image layer."
        dims = self.viewer.dims
        if not P.prompt_view_ok(dims.ndisplay, dims.order, dims.ndim):
            return ("Prompting works in 2D display of the last two axes (Y, X) only: "
                    "switch to 2D (Ctrl+Y) and reset the axis order.")
        return None

    def current_position(self) -> tuple[int, ...] | None:
        """Slice position in view along the image's leading axes (None: outside)."""
        if self.image_layer is None:
            return None
        return P.slice_position(self.image_layer, self.viewer.dims.point)

    def current_index(self) -> int | None:
        """Slice index (see :meth:`napari_sam.Stack.index`) in view, or None."""
        pos = self.current_position()
        if pos is None:
            return None
        shape = P.image_data(self.image_layer).shape[: len(pos)]
        return int(np.ravel_multi_index(pos, shape)) if pos else 0

    def slice_shape(self) -> tuple[int, int]:
        shape = P.image_data(self.image_layer).shape
        if getattr(self.image_layer, "rgb", False):
            shape = shape[:-1]
        return int(shape[-2]), int(shape[-1])

    def n_slices(self) -> int:
        shape = P.image_data(self.image_layer).shape
        if getattr(self.image_layer, "rgb", False):
            shape = shape[:-1]
        return int(np.prod(shape[:-2], dtype=np.int64))

    # ------------------------------------------------------------------ layers
    def _find(self, name: str, kind: str) -> Any:
        for layer in self.viewer.layers:
            if layer.name == name and type(layer).__name__ == kind:
                return layer
        return None

    def points_layer(self, create: bool = True) -> Any:
        """The "SAM points" layer (created on the image's grid when missing)."""
        layer = self._find(POINTS_NAME, "Points")
        if layer is None and create and self.image_layer is not None:
            img = self.image_layer
            layer = self.viewer.add_points(
                np.zeros((0, img.ndim)), ndim=img.ndim, name=POINTS_NAME,
                scale=img.scale, translate=img.translate, size=8, border_width=0.1,
                features={"positive": np.zeros(0, dtype=bool)},
                feature_defaults={"positive": self.positive},
                face_color="positive",
                face_color_cycle={True: _POSITIVE_COLOUR, False: _NEGATIVE_COLOUR},
            )
            layer.mode = "add"
        return layer

    def boxes_layer(self, create: bool = True) -> Any:
        """The "SAM boxes" Shapes layer (rectangles are boxes)."""
        layer = self._find(BOXES_NAME, "Shapes")
        if layer is None and create and self.image_layer is not None:
            img = self.image_layer
            layer = self.viewer.add_shapes(
                ndim=img.ndim, name=BOXES_NAME, scale=img.scale, translate=img.translate,
                face_color="transparent", edge_color="yellow", edge_width=2,
            )
        return layer

    def preview_layer(self) -> Any:
        """The 2D "SAM preview" Labels layer on the image's (Y, X) grid."""
        layer = self._find(PREVIEW_NAME, "Labels")
        shape = self.slice_shape()
        img = self.image_layer
        if layer is None or layer.data.shape != shape:
            from napari.utils.colormaps import DirectLabelColormap

            if layer is not None:
                self.viewer.layers.remove(layer)
            cmap = DirectLabelColormap(color_dict={None: "transparent", 1: "cyan"})
            layer = self.viewer.add_labels(
                np.zeros(shape, np.uint8), name=PREVIEW_NAME, opacity=0.5, colormap=cmap,
                scale=img.scale[-2:], translate=img.translate[-2:],
            )
            self.viewer.layers.selection.active = self.points_layer(create=False) or img
        return layer

    def target_labels(self, create: bool = True) -> Any:
        """The Labels layer commits go to: the chosen one, else "SAM labels" (created)."""
        if self.labels_layer is not None and self.labels_layer in self.viewer.layers:
            layer = self.labels_layer
        else:
            layer = self._find(LABELS_NAME, "Labels")
        img = self.image_layer
        shape = P.image_data(img).shape
        if getattr(img, "rgb", False):
            shape = shape[:-1]
        if layer is None and create:
            layer = self.viewer.add_labels(
                np.zeros(shape, np.uint16), name=LABELS_NAME, scale=img.scale,
                translate=img.translate, opacity=0.6)
        if layer is not None and tuple(layer.data.shape) != tuple(shape):
            raise ValueError(f"labels layer {layer.name!r} has shape {layer.data.shape}, "
                             f"the image {img.name!r} needs {tuple(shape)}")
        if layer is not self._history_layer:
            self.history.clear()
            self._history_layer = layer
        return layer

    # ------------------------------------------------------------------ prompts
    def slice_prompts(self) -> P.SlicePrompts | None:
        """The prompts on the slice in view (None when there is no slice)."""
        pos = self.current_position()
        if pos is None:
            return None
        return P.prompts_for_slice(
            self.image_layer, self.points_layer(create=False), self.boxes_layer(create=False),
            pos, self.slice_shape(), self.viewer.dims.point)

    def set_positive(self, positive: bool) -> None:
        """Polarity of new points; in select mode also of the selected points."""
        self.positive = bool(positive)
        layer = self.points_layer(create=False)
        if layer is None:
            return
        layer.feature_defaults = {"positive": self.positive}
        sel = sorted(layer.selected_data)
        if sel and layer.mode == "select":  # in add mode the newest point is selected
            layer.features.loc[sel, "positive"] = self.positive
            layer.refresh_colors()

    def shift_click_callback(self, layer: Any, event: Any):
        """Mouse callback: Shift+click in add mode adds a point of the other polarity."""
        if layer.mode != "add" or "Shift" not in event.modifiers:
            return
        layer.feature_defaults = {"positive": not self.positive}
        yield
        while event.type == "mouse_move":
            yield
        self._shift_flip = True  # napari adds the point after this callback

    def on_points_added(self, indices: Any) -> None:
        """Give newly added points the current polarity (flipped after a Shift+click).

        napari copies the features of the selected point into the layer's defaults, so
        the defaults cannot be trusted: the polarity is set here, after the add.
        """
        flip, self._shift_flip = self._shift_flip, False
        layer = self.points_layer(create=False)
        if layer is None or "positive" not in layer.features:
            return
        n = len(layer.data)  # napari reports added points with negative indices
        idx = sorted({int(i) % n for i in (indices or ()) if -n <= int(i) < n})
        if not idx:
            return
        value = (not self.positive) if flip else self.positive
        layer.features.loc[idx, "positive"] = value
        layer.refresh_colors()

    def clear_prompts(self) -> int:
        """Remove the prompts of the slice in view; returns how many were removed."""
        pos = self.current_position()
        removed = 0
        if pos is None:
            return 0
        pts = self.points_layer(create=False)
        if pts is not None and len(pts.data):
            c = P.to_image_coords(self.image_layer, pts, pts.data, self.viewer.dims.point)
            on = np.flatnonzero(P.rows_on_slice(c, pos))
            if len(on):
                pts.selected_data = set(on.tolist())
                pts.remove_selected()
                removed += len(on)
        shp = self.boxes_layer(create=False)
        if shp is not None and len(shp.data):
            on = [i for i, v in enumerate(shp.data) if P.rows_on_slice(
                P.to_image_coords(self.image_layer, shp, v, self.viewer.dims.point), pos).all()]
            if on:
                shp.selected_data = set(on)
                shp.remove_selected()
                removed += len(on)
        self._prediction = self._prediction_key = None
        self.show_mask(None)
        return removed

    # ------------------------------------------------------------------ prediction
    def update_preview(self) -> int | None:
        """Recompute the preview for the slice in view.

        Returns
        -------
        int or None
            The slice index whose embedding is needed first (the caller embeds it and
            calls again), else None.
        """
        problem = self.view_problem()
        if problem:
            self.status(problem)
            return None
        index = self.current_index()
        prompts = self.slice_prompts()
        if index is None or prompts is None:
            self.show_mask(None)
            self.status("The viewer shows no slice of the image here.")
            return None
        for msg in prompts.problems:
            self.status(msg)
        if prompts.empty:
            self._prediction = self._prediction_key = None
            self.show_mask(None)
            return None
        seg = self.segmenter
        if seg is None or not seg.cache.is_cached(index):
            return index
        key = (index, prompts.points.tobytes(), prompts.labels.tobytes(),
               None if prompts.box is None else prompts.box.tobytes())
        if key != self._prediction_key:
            n_prompts = len(prompts.points) + (prompts.box is not None)
            self._prediction = seg.predict(index, multimask=n_prompts == 1,
                                           **prompts.as_kwargs())
            self._prediction_key = key
            self._mask_k = self._prediction.best
        self.show_mask(self._prediction.mask_at(self._mask_k))
        if not prompts.problems:
            self.status(f"Slice {index}: mask {self._mask_k + 1}/{len(self._prediction)} "
                        f"(score {self._prediction.scores[self._mask_k]:.2f})")
        return None

    def show_mask(self, mask: np.ndarray | None) -> None:
        if self.image_layer is None:
            return
        layer = self._find(PREVIEW_NAME, "Labels")
        if mask is None and layer is None:
            return
        layer = self.preview_layer()
        if mask is None:
            if layer.data.any():
                layer.data[:] = 0
                layer.refresh()
            return
        layer.data[:] = mask
        layer.refresh()

    @property
    def current_mask(self) -> np.ndarray | None:
        """The mask shown in the preview (None when there is none)."""
        if self._prediction is None:
            return None
        return self._prediction.mask_at(self._mask_k)

    def cycle_mask(self) -> None:
        """Show SAM's next candidate mask (single-prompt predictions have three)."""
        if self._prediction is None:
            self.status("No prediction to cycle: place a point first.")
            return
        self._mask_k = (self._mask_k + 1) % len(self._prediction)
        self.show_mask(self.current_mask)
        self.status(f"Mask {self._mask_k + 1}/{len(self._prediction)} "
                    f"(score {self._prediction.scores[self._mask_k]:.2f})")

    # ------------------------------------------------------------------ labels
    def commit(self) -> int | None:
        """Paint the current mask under a new id; returns the id (None if nothing)."""
        import napari_sam as ns

        mask = self.current_mask
        if mask is None or self._prediction_key is None:
            self.status("Nothing to commit: place prompts and wait for the preview.")
            return None
        index = self._prediction_key[0]
        position = self._seg.stack.position(index)
        layer = self.target_labels()
        data = layer.data
        if not isinstance(data, np.ndarray):
            raise TypeError(f"labels layer {layer.name!r} is not an in-memory array; "
                             "choose another labels layer")
        res = ns.paint(data, mask, overwrite=self.overwrite, index=position)
        if res.n_pixels == 0:
            self.status("Nothing painted: every pixel of the mask is already labelled "
                        "(tick 'Overwrite existing labels' to replace them).")
            return None
        self.history.push(res.record)
        if res.labels is not data:
            layer.data = res.labels
        layer.refresh()
        self.clear_prompts()
        self.status(f"Committed label {res.label_id} ({res.n_pixels} pixels) on slice {index}.")
        return res.label_id

    def undo(self) -> bool:
        """Undo the newest commit."""
        layer = self._history_layer
        if layer is None or not self.history.can_undo:
            self.status("Nothing to undo.")
            return False
        rec = self.history.undo(layer.data)
        layer.refresh()
        self.status(f"Undid label {rec.label_id}.")
        return True

    def redo(self) -> bool:
        """Redo the newest undone commit."""
        layer = self._history_layer
        if layer is None or not self.history.can_redo:
            self.status("Nothing to redo.")
            return False
        rec = self.history.redo(layer.data)
        layer.refresh()
        self.status(f"Redid label {rec.label_id}.")
        return True
