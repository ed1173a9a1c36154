"""The napari-sam dock widget: the Qt skin over :class:`~.controller.SamController`.

Workflow: choose an image layer; click points on the slice in view into "SAM points"
(green = positive, red = negative) and/or draw a rectangle into "SAM boxes"; the
"SAM preview" layer shows SAM's mask at once; commit it into the labels layer.

Keyboard shortcuts (bound on the viewer, so they work whichever layer is selected unless
that layer binds the same key; none of napari's defaults use them):

========  ===============================================================
N         toggle the polarity of new points (in select mode: of the selected ones)
Shift+C   commit the previewed object under a new label id
Shift+X   clear the prompts of the slice in view
Shift+M   cycle SAM's candidate masks (single-prompt predictions)
Shift+Z   undo the last commit (the widget's own history)
Shift+Y   redo the last undone commit
========  ===============================================================

Shift+click in the points layer's add mode adds a point of the other polarity.

Embedding (and model loading) runs off the GUI thread in napari's ``thread_worker``
with a progress bar and a Cancel button; ``synchronous=True`` runs the same generators
inline (tests, scripts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .controller import (
    BOXES_NAME,
    CACHE_MEMORY,
    CACHE_NEXT_TO_IMAGE,
    CACHE_PATH,
    LABELS_NAME,
    POINTS_NAME,
    PREVIEW_NAME,
    SamController,
)

__all__ = ["SHORTCUTS", "SamWidget"]

#: key (napari spelling) -> (widget method name, description)
SHORTCUTS = {
    "N": ("toggle_polarity", "toggle positive / negative for new points (select mode: selected points)"),
    "Shift-C": ("commit", "commit the previewed object under a new label"),
    "Shift-X": ("clear_prompts", "clear the prompts of the slice in view"),
    "Shift-M": ("cycle_mask", "show SAM's next candidate mask"),
    "Shift-Z": ("undo", "undo the last commit"),
    "Shift-Y": ("redo", "redo the last undone commit"),
}
_NEW_LABELS = f"(new) {LABELS_NAME}"
_CACHE_CHOICES = [("memory only", CACHE_MEMORY),
                  ("next to image file (<image>.embeddings.zarr)", CACHE_NEXT_TO_IMAGE),
                  ("custom path", CACHE_PATH)]


class SamWidget(QWidget):
    """Dock widget for interactive Segment Anything on nD image stacks.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer (injected by napari).
    synchronous : bool
        Run embedding and model loading inline instead of in a worker thread (tests).
    """

    status_changed = Signal(str)

    def __init__(self, napari_viewer: Any, *, synchronous: bool = False) -> None:
        super().__init__()
        import napari_sam as ns

        self.viewer = napari_viewer
        self.synchronous = synchronous
        self.ctrl = SamController(napari_viewer, status=self.status_changed.emit)
        self._workers: list[Any] = []
        self._pending: set[int] = set()  # slices queued in interactive jobs
        self._hooked: set[int] = set()
        self._resetting = False
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.refresh)

        # ---- widgets
        self.image_combo = QComboBox()
        self.model_combo = QComboBox()
        self.model_combo.setEditable(True)
        self.model_combo.addItems(ns.list_models())
        self.model_combo.setCurrentText(self.ctrl.model_spec)
        self.model_combo.setToolTip("Registry name or SAM checkpoint file "
                                    "(default: $NAPARI_SAM_MODEL, else vit_b)")
        model_browse = QPushButton("...")
        model_browse.setToolTip("Choose a SAM checkpoint file")
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.cache_combo = QComboBox()
        for text, _ in _CACHE_CHOICES:
            self.cache_combo.addItem(text)
        self.cache_edit = QLineEdit()
        self.cache_edit.setPlaceholderText("embeddings .zarr folder")
        self.cache_edit.setEnabled(False)
        self.labels_combo = QComboBox()
        self.positive_check = QCheckBox("New points are positive (N)")
        self.positive_check.setChecked(True)
        self.overwrite_check = QCheckBox("Overwrite existing labels")
        self.prefetch_check = QCheckBox("Prefetch next slices")
        self.prefetch_check.setChecked(True)

        self.commit_btn = QPushButton("Commit (Shift+C)")
        self.clear_btn = QPushButton("Clear (Shift+X)")
        self.mask_btn = QPushButton("Next mask (Shift+M)")
        self.undo_btn = QPushButton("Undo (Shift+Z)")
        self.redo_btn = QPushButton("Redo (Shift+Y)")
        self.embed_btn = QPushButton("Embed slice in view")
        self.from_spin, self.to_spin = QSpinBox(), QSpinBox()
        self.precompute_btn = QPushButton("Precompute")
        self.precompute_btn.setToolTip("Embed the slices from..to (inclusive) in the background")
        self.propagate_btn = QPushButton("Propagate through slices")
        self.propagate_btn.setEnabled(False)
        self.propagate_btn.setToolTip("Not available yet: propagation of an object through "
                                      "the slices of a volume comes with the volumes feature")
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setVisible(False)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        help_text = "<br>".join(f"<b>{k.replace('-', '+')}</b>: {d}"
                                for k, (_, d) in SHORTCUTS.items())
        help_label = QLabel(help_text + "<br><b>Shift+click</b>: point of the other polarity")
        help_label.setWordWrap(True)

        # ---- layout
        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        row = QHBoxLayout()
        row.addWidget(self.model_combo, 1)
        row.addWidget(model_browse)
        form.addRow("Model", row)
        form.addRow("Device", self.device_combo)
        form.addRow("Embeddings", self.cache_combo)
        form.addRow("", self.cache_edit)
        form.addRow("Labels", self.labels_combo)
        grid = QGridLayout()
        grid.addWidget(self.commit_btn, 0, 0)
        grid.addWidget(self.clear_btn, 0, 1)
        grid.addWidget(self.mask_btn, 1, 0)
        grid.addWidget(self.undo_btn, 2, 0)
        grid.addWidget(self.redo_btn, 2, 1)
        grid.addWidget(self.embed_btn, 1, 1)
        pre = QHBoxLayout()
        pre.addWidget(QLabel("Slices"))
        pre.addWidget(self.from_spin)
        pre.addWidget(QLabel("to"))
        pre.addWidget(self.to_spin)
        pre.addWidget(self.precompute_btn)
        prog = QHBoxLayout()
        prog.addWidget(self.progress, 1)
        prog.addWidget(self.cancel_btn)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        for w in (self.positive_check, self.overwrite_check, self.prefetch_check):
            layout.addWidget(w)
        layout.addLayout(grid)
        layout.addLayout(pre)
        layout.addWidget(self.propagate_btn)
        layout.addLayout(prog)
        layout.addWidget(self.status_label)
        layout.addWidget(help_label)
        layout.addStretch(1)

        # ---- signals
        self.status_changed.connect(self._show_status)
        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        self.labels_combo.currentIndexChanged.connect(self._on_labels_changed)
        self.model_combo.currentTextChanged.connect(self._on_model_changed)
        model_browse.clicked.connect(self._browse_model)
        self.device_combo.currentTextChanged.connect(self._on_model_changed)
        self.cache_combo.currentIndexChanged.connect(self._on_cache_changed)
        self.cache_edit.editingFinished.connect(self._on_cache_changed)
        self.positive_check.toggled.connect(self._on_positive)
        self.overwrite_check.toggled.connect(lambda v: setattr(self.ctrl, "overwrite", bool(v)))
        for btn, slot in ((self.commit_btn, self.commit), (self.clear_btn, self.clear_prompts),
                          (self.mask_btn, self.cycle_mask), (self.undo_btn, self.undo),
                          (self.redo_btn, self.redo), (self.embed_btn, self.embed_current),
                          (self.precompute_btn, self.precompute), (self.cancel_btn, self.cancel)):
            btn.clicked.connect(slot)
        layers = self.viewer.layers.events
        for ev in (layers.inserted, layers.removed, layers.reordered):
            ev.connect(self.reset_choices)
        dims = self.viewer.dims.events
        for ev in (dims.current_step, dims.ndisplay, dims.order):
            ev.connect(self._schedule)
        for key, (name, _) in SHORTCUTS.items():
            self.viewer.bind_key(key, self._key_handler(name), overwrite=True)
        self.reset_choices()

    # ------------------------------------------------------------------ choices
    def reset_choices(self, event: Any = None) -> None:
        """Refill the layer choosers (called when layers are added or removed)."""
        if self._resetting:
            return
        self._resetting = True
        try:
            images = [l for l in self.viewer.layers if type(l).__name__ == "Image"]
            current = self.ctrl.image_layer
            self.image_combo.clear()
            self.image_combo.addItems([l.name for l in images])
            if current in images:
                self.image_combo.setCurrentIndex(images.index(current))
            labels = [l for l in self.viewer.layers if type(l).__name__ == "Labels"
                      and l.name not in (PREVIEW_NAME, LABELS_NAME)]
            self._labels_choices = [None] + labels
            chosen = self.ctrl.labels_layer
            self.labels_combo.clear()
            self.labels_combo.addItems([_NEW_LABELS] + [l.name for l in labels])
            if chosen in labels:
                self.labels_combo.setCurrentIndex(labels.index(chosen) + 1)
        finally:
            self._resetting = False
        new = images[self.image_combo.currentIndex()] if images else None
        if new is not current:
            self._set_image(new)
        else:
            self._on_labels_changed()
            self._hook_prompt_layers()

    def _on_image_changed(self, index: int) -> None:
        if self._resetting:
            return
        images = [l for l in self.viewer.layers if type(l).__name__ == "Image"]
        self._set_image(images[index] if 0 <= index < len(images) else None)

    def _set_image(self, layer: Any) -> None:
        self.ctrl.image_layer = layer
        if layer is None:
            self._show_status("Open or choose an image layer.")
            return
        n = self.ctrl.n_slices()
        for spin in (self.from_spin, self.to_spin):
            spin.setRange(0, n - 1)
        self.to_spin.setValue(n - 1)
        self._resetting = True
        try:
            self.ctrl.points_layer()
            self.ctrl.boxes_layer()
        finally:
            self._resetting = False
        self.reset_choices()
        self._hook_prompt_layers()
        self._schedule()

    def _hook_prompt_layers(self) -> None:
        for layer in (self.ctrl.points_layer(create=False), self.ctrl.boxes_layer(create=False)):
            if layer is None or id(layer) in self._hooked:
                continue
            self._hooked.add(id(layer))
            layer.events.data.connect(self._on_prompts_changed)
            if layer.name == POINTS_NAME:
                layer.feature_defaults = {"positive": self.ctrl.positive}
                layer.mouse_drag_callbacks.insert(0, self.ctrl.shift_click_callback)

    def _on_labels_changed(self, index: int | None = None) -> None:
        if self._resetting:
            return
        i = self.labels_combo.currentIndex()
        choices = getattr(self, "_labels_choices", [None])
        self.ctrl.labels_layer = choices[i] if 0 <= i < len(choices) else None

    def _on_model_changed(self, *args: Any) -> None:
        self.ctrl.model_spec = self.model_combo.currentText().strip()
        dev = self.device_combo.currentText()
        self.ctrl.device = None if dev == "auto" else dev

    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "SAM checkpoint", "",
                                              "Checkpoints (*.pth *.pt *.bin);;All files (*)")
        if path:
            self.model_combo.setCurrentText(path)

    def _on_cache_changed(self, *args: Any) -> None:
        mode = _CACHE_CHOICES[self.cache_combo.currentIndex()][1]
        self.cache_edit.setEnabled(mode == CACHE_PATH)
        self.ctrl.cache_mode = mode
        self.ctrl.cache_path = self.cache_edit.text().strip() or None
        if mode == CACHE_NEXT_TO_IMAGE and self.ctrl.image_layer is not None \
                and self.ctrl.cache_target() is None:
            self._show_status("The image has no file: embeddings stay in memory.")

    def _on_positive(self, value: bool) -> None:
        self.ctrl.set_positive(bool(value))
        self._schedule()

    # ------------------------------------------------------------------ actions
    def _key_handler(self, name: str) -> Callable[[Any], None]:
        def handler(viewer: Any) -> None:
            getattr(self, name)()
        handler.__doc__ = SHORTCUTS[next(k for k, v in SHORTCUTS.items() if v[0] == name)][1]
        return handler

    def toggle_polarity(self) -> None:
        """Switch new (and selected) points between positive and negative."""
        self.positive_check.setChecked(not self.positive_check.isChecked())

    def commit(self) -> int | None:
        """Commit the previewed mask as a new label; returns its id."""
        return self._guard(self.ctrl.commit)

    def clear_prompts(self) -> None:
        """Remove the prompts of the slice in view."""
        self._guard(self.ctrl.clear_prompts)

    def cycle_mask(self) -> None:
        """Show SAM's next candidate mask."""
        self._guard(self.ctrl.cycle_mask)

    def undo(self) -> None:
        """Undo the newest commit."""
        self._guard(self.ctrl.undo)

    def redo(self) -> None:
        """Redo the newest undone commit."""
        self._guard(self.ctrl.redo)

    def _guard(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # shown to the user, never raised into Qt
            self._show_status(f"Error: {exc}")
            if self.synchronous:
                raise
            return None

    # ------------------------------------------------------------------ preview
    def _on_prompts_changed(self, event: Any = None) -> None:
        action = str(getattr(event, "action", "") or "")
        if action.endswith(("adding", "changing", "removing")) or action.lower() in (
                "adding", "changing", "removing"):
            return
        if action.lower().endswith("added") and event.source is self.ctrl.points_layer(False):
            self.ctrl.on_points_added(getattr(event, "data_indices", ()))
        self._schedule()

    def _schedule(self, event: Any = None) -> None:
        if self.synchronous:
            self.refresh()
        else:
            self._timer.start(30)

    def refresh(self) -> None:
        """Update the preview for the slice in view; embed it first when needed."""
        need = self._guard(self.ctrl.update_preview)
        if need is None:
            self._prefetch()
        elif need not in self._pending:  # the prefetch follows once it is embedded
            self._embed([need], interactive=True)

    def _prefetch(self) -> None:
        """Queue the slice in view and its next ones (direction of travel) in the engine's
        background prefetcher (lower CPU priority; a newer request replaces the queue)."""
        if not self.prefetch_check.isChecked() or not self.ctrl.engine_ready():
            return
        idx = self.ctrl.current_index()
        if idx is not None:
            self.ctrl.segmenter.prefetch(around=idx)

    # ------------------------------------------------------------------ workers
    def embed_current(self) -> Any:
        """Embed the slice in view in the background (its neighbours follow, see prefetch)."""
        idx = self.ctrl.current_index()
        if idx is None:
            self._show_status("No slice of the image in view.")
            return None
        return self._embed([idx], interactive=True)

    def precompute(self) -> Any:
        """Embed the slices from..to (inclusive) in the background (into the store)."""
        lo, hi = sorted((self.from_spin.value(), self.to_spin.value()))
        return self._embed(list(range(lo, hi + 1)), interactive=False)

    def cancel(self) -> None:
        """Stop every running embedding job after the slice it is working on."""
        for worker in list(self._workers):
            worker.quit()
        self._pending.clear()
        if self.ctrl.engine_ready():
            self.ctrl.segmenter.cache.cancel_prefetch()
        self._show_status("Cancelling after the current slice ...")

    def _embed(self, indices: list[int], *, interactive: bool) -> Any:
        if self.ctrl.image_layer is None:
            self._show_status("Choose an image layer first.")
            return None
        if interactive:
            self._pending.update(indices)
        gen = self.ctrl.embed_job(indices, interactive=interactive)
        return self.run_job(gen, on_done=self._job_done if interactive else None)

    def run_job(self, gen: Iterator[tuple], *, on_done: Callable[[], None] | None = None) -> Any:
        """Run an :meth:`SamController.embed_job` generator in a ``thread_worker``.

        Returns the worker (None when :attr:`synchronous`, where the job runs inline).
        """
        if self.synchronous:
            try:
                for item in gen:
                    self._on_item(item)
            finally:
                self._pending.clear()
            self._finish_progress()
            if on_done:
                on_done()
            return None
        from napari.qt.threading import create_worker

        def job():
            yield from gen

        worker = create_worker(job, _start_thread=False)
        worker.yielded.connect(self._on_item)
        worker.errored.connect(lambda exc: self._show_status(f"Error: {exc}"))
        worker.finished.connect(lambda: self._worker_done(worker, on_done))
        self._workers.append(worker)
        self.progress.setVisible(True)
        self.cancel_btn.setVisible(True)
        worker.start()
        return worker

    def _on_item(self, item: tuple) -> None:
        kind, done, total, index = item
        self.progress.setVisible(True)
        self.cancel_btn.setVisible(not self.synchronous)
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done)
        if kind == "ready":
            self._show_status(f"Embedding {total} slice(s) with {self.ctrl.model_spec} ...")
        else:
            self._pending.discard(index)
            if self.ctrl.current_index() == index:
                self.refresh()

    def _worker_done(self, worker: Any, on_done: Callable[[], None] | None) -> None:
        if worker in self._workers:
            self._workers.remove(worker)
        if not self._workers:
            self._pending.clear()
            self._finish_progress()
        if on_done:
            on_done()

    def _job_done(self) -> None:
        # the slice in view may have changed while the job ran
        if self.ctrl.engine_ready():
            idx = self.ctrl.current_index()
            if idx is not None and self.ctrl.segmenter.cache.is_cached(idx):
                self._guard(self.ctrl.update_preview)
            self._prefetch()

    def _finish_progress(self) -> None:
        self.progress.setVisible(False)
        self.cancel_btn.setVisible(False)

    @property
    def busy(self) -> bool:
        """True while a background job runs."""
        return bool(self._workers)

    def _show_status(self, msg: str) -> None:
        self.status_label.setText(msg)
        try:
            self.viewer.status = f"SAM: {msg}"
        except Exception:  # noqa: BLE001, S110 - the viewer is closing
            pass

    def closeEvent(self, event: Any) -> None:
        self.cancel()
        super().closeEvent(event)


__all__ += ["BOXES_NAME", "POINTS_NAME"]
