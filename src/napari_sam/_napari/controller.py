"""The widget's state without Qt widgets: layers in, engine requests out, layers written.

:class:`SamController` owns the SAM layers ("SAM points", "SAM boxes", "SAM preview",
"SAM labels") of one viewer and the preview of the slice in view. The GUI thread turns
the prompt layers into a :class:`Request` (cheap); a worker answers it
(:meth:`SamController.answer`: model, embedding, one batched decoder call); the GUI
thread shows the answer (:meth:`SamController.show`). Commits and the volume tools write
through the labels layer's own history (``data_setitem`` inside ``block_history``), so
napari's Ctrl+Z and the widget's Undo share one history.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..engine.prompt import Prompt
from . import sam_layers as L
from .geometry import ImageGeometry, SlicePrompts, prompt_view_ok, prompts_for_slice, same_layer
from .session import EngineSettings, Session

__all__ = ["Request", "Answer", "SamController"]

_seq = itertools.count(1)


@dataclass(frozen=True)
class Request:
    """What the slice in view asks the engine for (built on the GUI thread)."""

    settings: EngineSettings
    index: int
    position: tuple[int, ...]
    objects: tuple[Prompt, ...]
    chains: tuple[tuple[dict, ...], ...] = ()  # per object, the prompt steps before this one
    seq: int = field(default_factory=lambda: next(_seq))

    def key(self) -> tuple:
        return (self.settings.key(), self.index, tuple(p.key() for p in self.objects))


@dataclass
class Answer:
    """The engine's answer to a :class:`Request` (built in the worker)."""

    request: Request
    predictions: list  # one Prediction per object
    embedded: bool  # the slice had to be encoded first
    chosen: list[int] = field(default_factory=list)  # mask shown per object

    def mask(self, k: int) -> np.ndarray:
        return self.predictions[k].mask_at(self.chosen[k])

    def logits(self, k: int) -> np.ndarray:
        return self.predictions[k].logits[self.chosen[k]]


class SamController:
    """Engine state and SAM layers of one viewer.

    Parameters
    ----------
    viewer : napari.Viewer
        The (possibly proxied) viewer.
    status : callable(str)
        Receives short messages for the user.
    """

    def __init__(self, viewer: Any, *, status: Callable[[str], None] | None = None) -> None:
        import napari_sam as ns

        self.viewer = viewer
        self.status = status or (lambda msg: None)
        self.session = Session(status=self.status)
        self.image_layer: Any = None
        self.channel_axis: int | None = None
        self.channels: tuple[int, ...] = (0,)
        self.composite: list[Any] = []  # extra image layers composited with image_layer
        self.labels_layer: Any = None  # None: create / reuse "SAM labels"
        self.model_spec: str = ns.default_model_name()
        self.device: str | None = None
        self.cache_mode, self.cache_path = "auto", None
        self.tile_above = 2048
        self.overwrite = False
        self.positive = True
        self.answer_shown: Answer | None = None
        self.last_committed = 0  # the newest id committed by this widget
        self.ids = L.IdCounter()
        from .autosave import Autosave

        self.autosave = Autosave(self)
        self._last_request: Request | None = None

    # ------------------------------------------------------------------ geometry
    def geometry(self) -> ImageGeometry | None:
        if self.image_layer is None:
            return None
        return ImageGeometry(self.image_layer, self.channel_axis)

    def image_gone(self) -> bool:
        """True (and the image forgotten) when the chosen image was removed from the viewer."""
        if self.image_layer is None:
            return False
        if any(same_layer(self.image_layer, lyr) for lyr in self.viewer.layers):
            return False
        name = self.image_layer.name
        self.image_layer = None
        self.composite = []
        self.status(f"The image layer {name!r} was removed: choose or open an image.")
        return True

    def settings(self) -> EngineSettings | None:
        """The engine settings for the current choices (None without an image)."""
        geo = self.geometry()
        if geo is None:
            return None
        data, axes, channel = geo.data, geo.axes(), None
        if self.channel_axis is not None:
            chans = tuple(self.channels[:3]) or (0,)
            channel = chans[0] if len(chans) == 1 else (chans + chans[-1:])[:3]
        elif self.composite:
            import dask.array as da

            arrays = [geo.data] + [ImageGeometry(lyr).data for lyr in self.composite[:2]]
            data = da.stack([da.asarray(a) for a in arrays], axis=0)
            axes = "C" + axes
            channel = tuple(range(len(arrays))) + (len(arrays) - 1,) * (3 - len(arrays))
        source = getattr(getattr(self.image_layer, "source", None), "path", None)
        return EngineSettings(
            data=data, data_id=id(data) if not self.composite else hash(
                tuple(id(ImageGeometry(lyr).data) for lyr in [self.image_layer, *self.composite])),
            axes=axes, channel=channel, source_path=source, model=self.model_spec,
            device=self.device, cache_mode=self.cache_mode, cache_path=self.cache_path,
            tile_above=self.tile_above)

    @property
    def segmenter(self) -> Any:
        """The built segmenter for the current settings, or None."""
        return self.session.current(self.settings())

    def view_problem(self) -> str | None:
        """Why prompting is impossible in the current view, or None."""
        if self.image_layer is None:
            return "Open an image, or choose one under Image."
        dims = self.viewer.dims
        if not prompt_view_ok(dims.ndisplay, dims.order, dims.ndim):
            return ("Prompting works in the 2D view of the last two axes (Y, X): switch to 2D "
                    "(Ctrl+Y) and reset the axis order.")
        return None

    def current_position(self) -> tuple[int, ...] | None:
        geo = self.geometry()
        return None if geo is None else geo.position(self.viewer.dims.point)

    def current_index(self) -> int | None:
        pos = self.current_position()
        return None if pos is None else self.geometry().index(pos)

    def where(self, position: tuple[int, ...] | None = None) -> str:
        """The slice in view in the user's axes, e.g. "T 1, Z 3" ("" for a 2D image)."""
        geo = self.geometry()
        pos = self.current_position() if position is None else position
        return geo.describe(pos) if geo is not None and pos is not None else ""

    # ------------------------------------------------------------------ layers
    def points_layer(self, create: bool = True) -> Any:
        return L.points_layer(self.viewer, self.geometry(), self.positive, create=create)

    def boxes_layer(self, create: bool = True) -> Any:
        return L.boxes_layer(self.viewer, self.geometry(), create=create)

    def prepare_layers(self) -> None:
        """Points, boxes and preview layers of the image's dimensionality (one channel).

        A prompt layer left from an image of another dimensionality is removed when
        empty, else renamed (its prompts are kept)."""
        ndim = len(self.geometry().labels_shape)
        for name, kind in ((L.POINTS_NAME, "points"), (L.BOXES_NAME, "shapes")):
            old = L.find(self.viewer, name, kind)
            if old is not None and old.ndim != ndim:
                if len(old.data):
                    old.name = f"{name} ({old.ndim}D)"
                else:
                    self.viewer.layers.remove(old)
        self.points_layer()
        self.boxes_layer()
        L.preview_layer(self.viewer, self.geometry())

    def activate_points(self) -> None:
        """Make "SAM points" the active layer in add mode: the next click adds a point."""
        layer = self.points_layer(create=self.image_layer is not None)
        if layer is None:
            return
        self.viewer.layers.selection.active = layer
        layer.mode = "add"

    def target_labels(self, create: bool = True) -> Any:
        """The labels layer commits go to: the chosen one, else "SAM labels" (created)."""
        geo = self.geometry()
        layer = None
        if self.labels_layer is not None and any(
                same_layer(self.labels_layer, lyr) for lyr in self.viewer.layers):
            layer = self.labels_layer
        if layer is None:
            layer = L.find(self.viewer, L.LABELS_NAME, "labels")
        if layer is None and create:  # saved as you go beside the image file, else in memory
            layer = self.autosave.open(create=True) or L.new_labels_layer(self.viewer, geo)
        if layer is not None and tuple(layer.data.shape) != geo.labels_shape:
            raise ValueError(
                f"labels layer {layer.name!r} has shape {tuple(layer.data.shape)}, but the "
                f"image {self.image_layer.name!r} needs {geo.labels_shape} (one channel's "
                "shape): choose another labels layer, or '(new) SAM labels'")
        return layer

    # ------------------------------------------------------------------ preview
    def slice_prompts(self) -> tuple[tuple[int, ...], SlicePrompts] | None:
        pos = self.current_position()
        if pos is None:
            return None
        prompts = prompts_for_slice(self.geometry(), self.points_layer(create=False),
                                    self.boxes_layer(create=False), pos, self.viewer.dims.point)
        return pos, prompts

    def request(self) -> Request | None:
        """The request for the slice in view, or None (the preview is cleared then).

        Objects whose points extend the points of an object shown in the preview (same
        box, same earlier points) refine from its logits, as SAM's own demo does.
        """
        problem = self.view_problem()
        if problem:
            self.status(problem)
            return None
        found = self.slice_prompts()
        if found is None:
            self.clear_preview()
            self.status("The viewer shows no slice of the image here.")
            return None
        pos, prompts = found
        for msg in prompts.problems:
            self.status(msg)
        if prompts.empty:
            had_preview = self.answer_shown is not None
            self.clear_preview()
            if had_preview and not prompts.problems:  # the preview's status is stale now
                head = self.where(pos)
                self.status(f"{head + ': c' if head else 'C'}lick on an object to add a point "
                            "(Shift+click: negative), or draw a box in SAM boxes.")
            return None
        geo = self.geometry()
        index = geo.index(pos)
        refined = [self._refined(index, p) for p in prompts.objects]
        req = Request(self.settings(), index, pos, tuple(p for p, _ in refined),
                      tuple(c for _, c in refined))
        if self._last_request is not None and self._last_request.key() == req.key():
            return None  # nothing changed (a dims event, a re-selection)
        self._last_request = req
        return req

    def _refined(self, index: int, prompt: Prompt) -> tuple[Prompt, tuple[dict, ...]]:
        """The prompt (with the logits to refine from) and the steps that led to it."""
        from ..workflows.records import step

        shown = self.answer_shown
        if shown is None or shown.request.index != index or prompt.n_points == 0:
            return prompt, ()
        for k, old in enumerate(shown.request.objects):
            same_box = (old.box is None) == (prompt.box is None) and (
                old.box is None or np.array_equal(old.box, prompt.box))
            n = old.n_points
            if (same_box and 0 < n < prompt.n_points
                    and np.array_equal(old.points, prompt.points[:n])
                    and np.array_equal(old.labels, prompt.labels[:n])):
                before = shown.request.chains[k] if shown.request.chains else ()
                done = step(old.with_mask_input(None), refine=old.mask_input is not None,
                            mask=shown.chosen[k])
                return prompt.with_mask_input(shown.logits(k)), (*before, done)
        return prompt, ()

    def warm_up(self) -> Request | None:
        """A request without objects: the worker loads the model and opens the engine, so
        that the first click does not wait for it (the prefetcher then embeds the slice)."""
        if self.view_problem() or self.segmenter is not None:
            return None
        pos = self.current_position()
        if pos is None:
            return None
        return Request(self.settings(), self.geometry().index(pos), pos, ())

    def answer(self, req: Request) -> Answer:
        """Worker thread: build the engine if needed, embed the slice, decode all objects."""
        seg = self.session.engine(req.settings)
        if not req.objects:  # a warm-up
            return Answer(req, [], False)
        embedded = not seg.is_embedded(req.index, req.objects)
        if embedded:
            self.status(f"Embedding {self.where(req.position) or 'the image'} ...")
        preds = seg.predict_many(req.index, list(req.objects))
        for p in preds:
            p.mask_at(p.best)  # upsample here, not on the GUI thread
        return Answer(req, preds, embedded, [p.best for p in preds])

    def show(self, ans: Answer) -> bool:
        """GUI thread: show an answer if it is still the newest request; True if shown."""
        if not ans.request.objects:  # a warm-up: nothing to show
            return False
        if self._last_request is None or ans.request.seq != self._last_request.seq:
            return False
        if self.current_index() != ans.request.index:
            return False
        self.answer_shown = ans
        L.show_preview(self.viewer, self.geometry(), [ans.mask(k) for k in range(len(ans.predictions))])
        scores = ", ".join(f"{p.scores[c]:.2f}" for p, c in zip(ans.predictions, ans.chosen))
        n = len(ans.predictions)
        what = "1 object" if n == 1 else f"{n} objects"
        extra = (f", mask {ans.chosen[0] + 1}/{len(ans.predictions[0])} (Shift+M: next)"
                 if n == 1 and len(ans.predictions[0]) > 1 else "")
        head = self.where(ans.request.position)
        head = f"{head}: {what}" if head else what.capitalize()
        self.status(f"{head} (score {scores}){extra}. Shift+C commits.")
        return True

    def clear_preview(self) -> None:
        self.answer_shown = None
        self._last_request = None
        L.show_preview(self.viewer, self.geometry(), [])

    def cycle_mask(self) -> None:
        """Show SAM's next candidate mask of the newest object (a lone click has three)."""
        ans = self.answer_shown
        if ans is None:
            self.status("No preview to cycle: place a point first.")
            return
        k = len(ans.predictions) - 1
        ans.chosen[k] = (ans.chosen[k] + 1) % len(ans.predictions[k])
        self.show(ans)

    # ------------------------------------------------------------------ labels
    def commit(self) -> list[int]:
        """Paint every previewed object under a new id (one undo step); returns the ids."""
        ans = self.answer_shown
        if ans is None:
            self.status("Nothing to commit: place prompts and wait for the preview.")
            return []
        layer = self.target_labels()
        masks = [ans.mask(k) for k in range(len(ans.predictions))]
        painted = L.paint_objects(layer, ans.request.position, masks, overwrite=self.overwrite,
                                  ids=self.ids)
        ids = [i for i in painted if i is not None]
        if ids:
            self.last_committed = ids[-1]
            from .provenance import commit_records, keep

            keep(self, layer, commit_records(self, ans, painted))
        where = self.where(ans.request.position)
        where = f" on {where}" if where else ""
        self.clear_prompts()
        self.activate_points()
        if not ids:
            self.status("Nothing painted: every pixel of the mask is already labelled "
                        "(tick 'Overwrite existing labels' to replace them).")
            return []
        self.status(f"Committed label{'s' if len(ids) > 1 else ''} "
                    f"{', '.join(map(str, ids))}{where}. Click for the next object.")
        return ids

    def undo(self) -> None:
        """Undo the newest change of the labels layer (its own history: Ctrl+Z too)."""
        layer = self.target_labels(create=False)
        if layer is None or not L.can_undo(layer):
            self.status("Nothing to undo.")
            return
        layer.undo()
        self.status(f"Undid the last change of {layer.name!r}.")

    def redo(self) -> None:
        """Redo the newest undone change of the labels layer."""
        layer = self.target_labels(create=False)
        if layer is None or not L.can_redo(layer):
            self.status("Nothing to redo.")
            return
        layer.redo()
        self.status(f"Redid the last change of {layer.name!r}.")

    def clear_prompts(self) -> int:
        """Remove the prompts of the slice in view; returns how many were removed."""
        pos = self.current_position()
        removed = 0
        if pos is not None:
            geo, point = self.geometry(), self.viewer.dims.point
            for layer in (self.points_layer(create=False), self.boxes_layer(create=False)):
                if layer is not None and len(layer.data):
                    removed += L.remove_on_slice(layer, geo, pos, point)
        self.clear_preview()
        return removed

    # ------------------------------------------------------------------ polarity
    def set_positive(self, positive: bool) -> None:
        """Polarity of new points; in select mode also of the selected points."""
        self.positive = bool(positive)
        L.set_polarity(self.points_layer(create=False), self.positive)

    def on_points_added(self, indices: Any, *, flip: bool = False) -> None:
        """Give newly added points the current polarity (the other one after Shift+click)."""
        L.mark_added(self.points_layer(create=False), indices,
                     (not self.positive) if flip else self.positive)
