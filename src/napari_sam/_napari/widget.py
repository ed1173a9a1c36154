"""The napari-sam dock widget: a magicgui form over :class:`~.controller.SamController`.

Workflow: the widget opens with "SAM points" active in add mode, so the first click on
the image adds a point; "SAM preview" shows SAM's mask; Shift+C commits it into the labels
layer, and "SAM points" is active again for the next object. Rectangles drawn in "SAM
boxes" are objects of their own (several boxes: several objects, one decoder call).

Decoding never runs on the GUI thread: a click is answered by one background thread
(:class:`~.workers.LatestWorker`; the newest click wins), and the volume tools run as
:class:`~.workers.Job` with progress and Cancel. ``synchronous=True`` runs both inline
(scripts and tests that check results rather than threading).

Keyboard shortcuts (bound on the viewer; none of napari's defaults use them):

========  ===============================================================
N         toggle the polarity of new points (in select mode: of the selected ones)
Shift+C   commit the previewed object(s) under new label ids
Shift+X   clear the prompts of the slice in view
Shift+M   cycle SAM's candidate masks (a lone click has three)
Shift+Z   undo the last change of the labels layer (napari's Ctrl+Z does the same)
Shift+Y   redo
========  ===============================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from magicgui.widgets import Container, PushButton
from qtpy.QtCore import QTimer

from . import sam_layers as L
from . import tools
from .controller import SamController
from .form import Messages, build_form
from .geometry import ImageGeometry, guess_channel_axis, same_layer, unwrap
from .tool_actions import ToolActions
from .workers import Job, LatestWorker

__all__ = ["SHORTCUTS", "SamWidget"]

#: key (napari spelling) -> (widget method name, description)
SHORTCUTS = {
    "N": ("toggle_polarity", "toggle positive / negative for new points (select mode: selected points)"),
    "Shift-C": ("commit", "commit the preview under new label ids"),
    "Shift-X": ("clear_prompts", "clear the prompts of the slice in view"),
    "Shift-M": ("cycle_mask", "show SAM's next candidate mask"),
    "Shift-Z": ("undo", "undo the last change of the labels layer"),
    "Shift-Y": ("redo", "redo the last undone change"),
}
HINT = ("Click on the image to add a point to an object (Shift+click: a negative point), or "
        "draw rectangles in SAM boxes. Shift+C commits, Shift+Z undoes.")


class SamWidget(ToolActions, Container):
    """Dock widget for interactive Segment Anything on nD image stacks.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer (napari hands plugins a proxy of it).
    synchronous : bool
        Decode and run tools inline instead of in background threads.
    """

    def __init__(self, napari_viewer: Any, *, synchronous: bool = False) -> None:
        super().__init__(labels=False)
        self.viewer = napari_viewer
        self.synchronous = synchronous
        self.messages = Messages(self)
        self.ctrl = SamController(napari_viewer, status=self.messages.status_from_any_thread)
        self.decoder = LatestWorker(self.ctrl.answer, self._on_answer, synchronous=synchronous)
        self.job: Job | None = None
        self._hooked: set[int] = set()
        self._shift_flip = False
        self._resetting = False
        self._closed = False
        self._before_loading = ""
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.refresh)
        build_form(self)  # the magicgui widgets as attributes (form.py)
        self.messages.status(HINT)
        self._connect()
        self.reset_choices()
        if self.ctrl.image_layer is None:
            self.messages.status(f"Open an image, or choose one under Image. {HINT}")

    # ------------------------------------------------------------------ wiring
    def _connect(self) -> None:
        self.image.changed.connect(self._on_image)
        self.channels.changed.connect(self._on_channels)
        self.channel_axis.changed.connect(self._on_channel_axis)
        self.labels.changed.connect(self._on_labels)
        for w in (self.model, self.device):
            w.changed.connect(self._on_engine_settings)
        for w in (self.cache, self.cache_folder, self.tile_above):
            w.changed.connect(self._on_engine_settings)
        self.save_as_you_go.changed.connect(
            lambda v: setattr(self.ctrl.autosave, "enabled", bool(v)))
        self.positive.changed.connect(self._on_positive)
        self.overwrite.changed.connect(lambda v: setattr(self.ctrl, "overwrite", bool(v)))
        buttons: dict[PushButton, Callable[[], Any]] = {
            self.commit_btn: self.commit, self.clear_btn: self.clear_prompts,
            self.mask_btn: self.cycle_mask, self.undo_btn: self.undo, self.redo_btn: self.redo,
            self.propagate_btn: self.propagate, self.everything_btn: self.segment_everything,
            self.refine_btn: self.refine_label, self.precompute_btn: self.precompute,
            self.adapt_btn: self.adapt_model,
            self.cancel_btn: self.cancel, self.browse_btn: self._browse_model,
        }
        for btn, slot in buttons.items():
            btn.changed.connect(lambda *_, s=slot: s())
        self.axis.changed.connect(self._on_axis)
        dims = self.viewer.dims.events
        self._viewer_events = [(self.viewer.layers.events.removed, self._on_layer_removed)] + [
            (ev, self._schedule) for ev in (dims.current_step, dims.ndisplay, dims.order)]
        for ev, slot in self._viewer_events:
            ev.connect(slot)
        for key, (name, _) in SHORTCUTS.items():
            self.viewer.bind_key(key, self._key_handler(name), overwrite=True)
        self.native.destroyed.connect(self._teardown)

    def _teardown(self, *args: Any) -> None:
        """The dock widget is gone: stop listening to the viewer and stop background work."""
        self._closed = True
        try:
            self._timer.stop()
        except RuntimeError:  # Qt deleted it already
            pass
        for ev, slot in self._viewer_events:
            try:
                ev.disconnect(slot)
            except Exception:  # noqa: BLE001, S110 - the viewer is gone too
                pass
        self.decoder.stop()
        if self.job is not None:
            self.job.cancel()
        self.ctrl.session.close()

    def _key_handler(self, name: str) -> Callable[[Any], None]:
        def handler(viewer: Any) -> None:
            getattr(self, name)()
        handler.__doc__ = next(d for n, d in SHORTCUTS.values() if n == name)
        return handler

    # ------------------------------------------------------------------ choices
    def reset_choices(self, *args: Any) -> None:
        """Refill the layer choices (napari calls this when layers change)."""
        if self._resetting:
            return
        self._resetting = True
        try:
            super().reset_choices()
        finally:
            self._resetting = False
        self._on_image(self.image.value)

    # ------------------------------------------------------------------ layer changes
    def _on_image(self, layer: Any) -> None:
        if self._resetting:
            return
        gone = self.ctrl.image_gone()  # says so in the status line
        if gone and layer is None:
            return
        if same_layer(layer, self.ctrl.image_layer) or (layer is None and self.ctrl.image_layer is None):
            self._hook_prompt_layers()
            return
        self.ctrl.image_layer = layer
        guess = None if layer is None else guess_channel_axis(layer)
        self._resetting = True
        try:
            self.channel_axis.value = guess is not None
        finally:
            self._resetting = False
        self.channel_axis.visible = guess is not None
        self._set_channel_axis(guess)
        if layer is None:
            self.messages.status("Open an image, or choose one under Image.")
            return
        if gone:
            self.messages.status(f"{self.messages.last_status} Now segmenting {layer.name!r}.")
        elif guess is not None:
            self.messages.status(
                f"{layer.name!r} has {ImageGeometry(layer).shape[0]} entries on its first axis: "
                "SAM sees them as channels (channel 0 now). Choose one channel, or up to three "
                "as RGB, under Channels; untick 'First axis: channels' if they are slices.")
        self._prepare_prompt_layers()

    def _on_channel_axis(self, value: bool) -> None:
        if self._resetting or self.ctrl.image_layer is None:
            return
        self._set_channel_axis(0 if value else None)
        self._prepare_prompt_layers()

    def _set_channel_axis(self, axis: int | None) -> None:
        """Use data axis ``axis`` (0 or None) as channels; resets the channel choice."""
        self.ctrl.channel_axis = axis
        self.ctrl.composite = []
        self.ctrl.channels = (0,)
        self.ctrl.clear_preview()
        self.channels.reset_choices()
        self.channels.visible = bool(self.channels.choices)
        if axis is not None:
            self.channels.value = [0]
        self._update_axes()

    def _prepare_prompt_layers(self) -> None:
        """SAM layers for the image, "SAM points" active in add mode; then a refresh."""
        self.ctrl.prepare_layers()
        self._restore()
        self._hook_prompt_layers()
        self.ctrl.activate_points()
        self._schedule()

    def _restore(self) -> None:
        """Open the labels saved as you go for this image, when there are some."""
        if L.find(self.viewer, L.LABELS_NAME, "labels") is not None:
            return
        layer = self._guard(lambda: self.ctrl.autosave.open(create=False))
        if layer is not None:
            n = len(layer.metadata.get("napari_sam_provenance", []))
            self.messages.status(f"Restored the labels saved in {self.ctrl.autosave.path} "
                                 f"({n} recorded operations) and the prompts in progress.")

    def _on_channels(self, values: Any) -> None:
        values = [v for v in (values or []) if v is not None]
        if self.ctrl.channel_axis is not None:
            picked = tuple(int(v) for v in values)[:3] or (0,)
            if len(values) > 3:
                self.messages.status("SAM sees at most three channels (as RGB): using the first three.")
            self.ctrl.channels = picked
        else:
            self.ctrl.composite = list(values)[:2]
        self.ctrl.clear_preview()
        self._schedule()

    def _on_labels(self, layer: Any) -> None:
        if not self._resetting:
            self.ctrl.labels_layer = layer

    def _on_engine_settings(self, *args: Any) -> None:
        self.ctrl.model_spec = str(self.model.value)
        dev = str(self.device.value)
        self.ctrl.device = None if dev == "auto" else dev
        self.ctrl.cache_mode = str(self.cache.value)
        self.cache_folder.visible = self.ctrl.cache_mode == "path"
        self.ctrl.cache_path = str(self.cache_folder.value) if self.ctrl.cache_mode == "path" else None
        self.ctrl.tile_above = int(self.tile_above.value)
        settings = self.ctrl.settings()
        if self.ctrl.cache_mode == "next to image" and settings and settings.store() is None:
            self.messages.status("The image has no file: embeddings stay in memory.")
        self.ctrl.clear_preview()
        self._schedule()

    def _on_layer_removed(self, event: Any = None) -> None:
        if self.ctrl.image_gone():
            self.decoder.stop()
            self.ctrl.clear_preview()
            self.messages.status(f"{self.messages.last_status} Prompting is paused.")

    def _hook_prompt_layers(self) -> None:
        for layer in (self.ctrl.points_layer(create=False), self.ctrl.boxes_layer(create=False)):
            if layer is None or id(unwrap(layer)) in self._hooked:
                continue
            self._hooked.add(id(unwrap(layer)))
            layer.events.data.connect(self._on_prompts_changed)
            if layer.name == L.POINTS_NAME:
                layer.mouse_drag_callbacks.insert(0, self._shift_click)

    def _on_axis(self, *args: Any) -> None:
        self._update_axes(keep_axis=True)

    def _update_axes(self, keep_axis: bool = False) -> None:
        geo = self.ctrl.geometry()
        names = geo.axis_names() if geo is not None else []
        if not keep_axis:
            self.axis.reset_choices()
            if names:
                z = [k for k, n in enumerate(names) if n.upper() == "Z"]
                self.axis.value = z[0] if z else len(names) - 1
        self.volume_box.enabled = geo is not None
        k = self.axis.value
        n = geo.slice_dims[k] if geo is not None and k is not None and geo.slice_dims else 1
        for spin in (self.from_spin, self.to_spin):
            spin.max = max(n - 1, 0)
        self.from_spin.value, self.to_spin.value = 0, max(n - 1, 0)

    # ------------------------------------------------------------------ prompts
    def _shift_click(self, layer: Any, event: Any):
        """Shift+click in add mode adds a point of the other polarity."""
        if layer.mode != "add" or "Shift" not in event.modifiers:
            return
        yield
        while event.type == "mouse_move":
            yield
        self._shift_flip = True  # napari adds the point after this callback

    def _on_prompts_changed(self, event: Any = None) -> None:
        action = str(getattr(event, "action", "") or "").lower()
        if action.endswith(("adding", "changing", "removing")):
            return
        if action.endswith("added") and same_layer(event.source, self.ctrl.points_layer(False)):
            flip, self._shift_flip = self._shift_flip, False
            self.ctrl.on_points_added(getattr(event, "data_indices", ()), flip=flip)
        self._guard(self.ctrl.autosave.save_prompts)
        self._schedule()

    def _on_positive(self, value: bool) -> None:
        self.ctrl.set_positive(bool(value))
        self._schedule()

    def toggle_polarity(self) -> None:
        """Switch new (and, in select mode, selected) points between positive and negative."""
        self.positive.value = not self.positive.value

    # ------------------------------------------------------------------ preview
    def _schedule(self, event: Any = None) -> None:
        if self.synchronous:
            self.refresh()
        else:
            self._timer.start(0)  # coalesce the events of one user action

    def refresh(self) -> None:
        """Ask the engine for the preview of the slice in view (answered in the background)."""
        try:
            if self.ctrl.image_gone():
                return
            req = self.ctrl.request()
        except Exception as exc:  # noqa: BLE001 - shown to the user, never raised into Qt
            self.messages.error(exc)
            return
        self._prefetch()
        if req is None and self.decoder.idle:
            req = self.ctrl.warm_up()
            if req is not None:
                self._before_loading = self.messages.last_status
                self.messages.status(f"Loading model {self.ctrl.model_spec} ... (you can click "
                                     "already)")
                self.messages.busy(True)
        if req is not None:
            seg = self.ctrl.segmenter
            if seg is None or not seg.is_embedded(req.index, req.objects):
                self.messages.busy(True)
            self.decoder.submit(req)

    def _on_answer(self, req: Any, ans: Any, error: BaseException | None) -> None:
        if self._closed:
            return
        self.messages.busy(self.job is not None and self.job.running)
        if error is not None:
            if req is self.ctrl._last_request or self.synchronous:
                self.messages.error(error)
            return
        if not req.objects:  # the warm-up: the model is loaded
            if self.messages.last_status.startswith("Loading model"):
                self.messages.status(self._before_loading or HINT)
            self._prefetch()
            return
        if self.ctrl.show(ans):
            self.messages.ok()
        if ans.embedded:
            self._prefetch()

    def _prefetch(self) -> None:
        """The slice in view and its next ones in the direction of travel, in the background."""
        seg = self.ctrl.segmenter
        idx = self.ctrl.current_index()
        if seg is not None and idx is not None and self.prefetch.value:
            seg.prefetch(around=idx)

    # ------------------------------------------------------------------ actions
    def _guard(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - shown to the user, never raised into Qt
            self.messages.error(exc)
            if self.synchronous and not isinstance(exc, (tools.ToolError, ValueError)):
                raise
            return None

    def commit(self) -> list[int] | None:
        """Commit the previewed objects under new label ids; returns the ids."""
        self.decoder.wait(60)
        from qtpy.QtWidgets import QApplication

        QApplication.processEvents()  # deliver an answer that arrived meanwhile
        return self._guard(self.ctrl.commit)

    def clear_prompts(self) -> None:
        """Remove the prompts of the slice in view."""
        self._guard(self.ctrl.clear_prompts)

    def cycle_mask(self) -> None:
        """Show SAM's next candidate mask."""
        self._guard(self.ctrl.cycle_mask)

    def undo(self) -> None:
        """Undo the newest change of the labels layer."""
        self._guard(self.ctrl.undo)

    def redo(self) -> None:
        """Redo the newest undone change."""
        self._guard(self.ctrl.redo)

    def _browse_model(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getOpenFileName(self.native, "SAM checkpoint", "",
                                              "Checkpoints (*.pth *.pt *.bin);;All files (*)")
        if path:
            self.set_model(path)

    def set_model(self, spec: str) -> None:
        """Use a registry name or a checkpoint file (added to the model choices)."""
        if spec not in self._model_specs:
            self._model_specs.append(spec)
            self.model.reset_choices()
        self.model.value = spec

    @property
    def busy(self) -> bool:
        """True while a click is being answered or a tool runs."""
        return self.decoder.busy or bool(self.job is not None and self.job.running)

    def close(self) -> None:
        self._teardown()
        super().close()

