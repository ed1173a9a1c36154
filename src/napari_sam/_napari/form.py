"""The widget's form (magicgui widgets, two collapsible sections) and its messages.

:func:`build_form` creates the widgets as attributes of the :class:`~.widget.SamWidget`
and lays them out so that the dock fits beside the canvas on a 1280-pixel-wide screen
(minimum width at most :data:`MAX_MIN_WIDTH`). :class:`Messages` owns the status line,
the progress bar and napari notifications: long messages wrap (paths and URLs included),
and an error is notified once, not once per click.
"""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING, Any

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    Select,
    SpinBox,
)
from qtpy.QtCore import QObject, Signal

from . import sam_layers as L
from .geometry import ImageGeometry, same_layer, unwrap

if TYPE_CHECKING:  # pragma: no cover
    from .widget import SamWidget

__all__ = ["MAX_MIN_WIDTH", "Messages", "axis_choices", "build_form", "channel_choices",
           "image_choices", "labels_choices", "model_choices", "wrappable"]

MAX_MIN_WIDTH = 380
CACHE_CHOICES = [("automatic", "auto"), ("memory only", "memory"),
                 ("next to the image file", "next to image"), ("in a folder", "path")]


def _row(*widgets: Any, label: str = "") -> Container:
    row = Container(widgets=list(widgets), layout="horizontal", labels=False, label=label)
    row.native.layout().setContentsMargins(0, 0, 0, 0)
    return row


def _collapsible(title: str, inner: Container, *, expanded: bool) -> Any:
    from superqt import QCollapsible

    box = QCollapsible(title)
    box.addWidget(inner.native)
    if expanded:
        box.expand(animate=False)
    else:
        box.collapse(animate=False)
    return box


def build_form(w: "SamWidget") -> None:
    """Create the form's widgets on ``w`` and lay them out."""
    import napari_sam as ns

    w._model_specs = list(dict.fromkeys([*ns.list_models(), ns.default_model_name()]))
    w.image = ComboBox(label="Image", choices=lambda widget, w=w: image_choices(w),
                       tooltip="The image to segment (its slices are embedded on demand)")
    w.channels = Select(label="Channels", choices=lambda widget, w=w: channel_choices(w), visible=False,
                        tooltip="One channel, or up to three shown to SAM as RGB")
    w.channels.native.setMaximumHeight(80)
    w.channel_axis = CheckBox(value=False, text="First axis: channels", visible=False,
                              tooltip="The image's first axis holds channels (not slices)")
    w.model = ComboBox(label="Model", choices=lambda widget, w=w: model_choices(w), value=ns.default_model_name(),
                       tooltip="Registry name or SAM checkpoint file "
                               "(default: $NAPARI_SAM_MODEL, else vit_b)")
    w.browse_btn = PushButton(text="…", tooltip="Choose a SAM checkpoint file")
    w.browse_btn.native.setMaximumWidth(32)
    w.labels = ComboBox(label="Labels", choices=lambda widget, w=w: labels_choices(w),
                        tooltip="Where commits go; '(new)' creates 'SAM labels'")
    w.positive = CheckBox(value=True, text="New points positive (N)")
    w.overwrite = CheckBox(value=False, text="Overwrite labels")
    w.commit_btn = PushButton(text="Commit ⇧C")
    w.clear_btn = PushButton(text="Clear ⇧X")
    w.mask_btn = PushButton(text="Mask ⇧M", tooltip="SAM's next candidate mask")
    w.undo_btn = PushButton(text="Undo ⇧Z")
    w.redo_btn = PushButton(text="Redo ⇧Y")

    # volume tools
    w.axis = ComboBox(label="Along", choices=lambda widget, w=w: axis_choices(w), tooltip="Slice axis for the tools")
    w.from_spin = SpinBox(label="From", min=0, max=0)
    w.to_spin = SpinBox(label="to", min=0, max=0)
    w.label_id = SpinBox(label="Label", min=0, max=2**31 - 1, value=0,
                         tooltip="Label id for Propagate and Refine; 0: the last committed")
    w.every_label = CheckBox(value=False, text="all on this slice",
                             tooltip="Propagate and Refine act on every label of the slice in "
                             "view (existing labels from any tool as prompts)")
    w.propagate_btn = PushButton(text="Propagate", tooltip="Follow the label through the slices "
                                 "in both directions until it vanishes (within From..to)")
    w.refine_btn = PushButton(text="Refine", tooltip="The label becomes SAM's prompt (its box "
                              "and mask) on the slice in view; the result replaces it")
    w.everything_btn = PushButton(text="Segment everything",
                                  tooltip="New ids, never over existing labels")
    w.everything_range = CheckBox(value=False, text="on From..to")
    w.precompute_btn = PushButton(text="Precompute", tooltip="Embed the slices From..to")
    w.adapt_btn = PushButton(text="Adapt to my annotations",
                             tooltip="Fine-tune SAM's mask decoder on the objects committed so "
                             "far (a few are held out to measure it), save it beside the image "
                             "and segment with it; the embeddings are kept")
    w.volume_box = Container(widgets=[
        w.axis, _row(w.from_spin, w.to_spin, label="Slices"), _row(w.label_id, w.every_label, label="Label"),
        _row(w.propagate_btn, w.refine_btn),
        _row(w.everything_btn, w.everything_range), _row(w.precompute_btn, w.adapt_btn)])

    # settings
    w.device = ComboBox(label="Device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
    w.cache = ComboBox(label="Embeddings", choices=CACHE_CHOICES, value="auto",
                       tooltip="automatic: the store beside the image when there is one "
                               "(napari-sam embed writes it), else memory only")
    w.cache_folder = FileEdit(label="Folder", mode="d", visible=False)
    w.prefetch = CheckBox(value=True, text="Prefetch next slices")
    w.save_as_you_go = CheckBox(value=True, text="Save labels as you go",
                                tooltip="SAM labels of an image file live in <name>.labels.ome.zarr "
                                        "beside it (an OME-Zarr image: its labels/ group): every "
                                        "commit is on disk at once, and reopening restores it")
    w.tile_above = SpinBox(label="Tile above px", min=0, max=100_000, value=2048,
                           tooltip="Slices whose longest side exceeds this are segmented on "
                                   "1024 px tiles at full resolution (0: never)")
    w.propagate_score = FloatSpinBox(label="Propagate: min score", min=-1000.0, max=1.0, step=0.05,
                                     value=0.5, tooltip="A direction stops at a slice whose "
                                     "predicted IoU is below this")
    w.propagate_iou = FloatSpinBox(label="Propagate: min overlap", min=0.0, max=1.0, step=0.05,
                                   value=0.3, tooltip="A direction stops at a slice whose mask "
                                   "overlaps the previous one less (IoU)")
    w.everything_points = SpinBox(label="Everything: points/side", min=1, max=128, value=16)
    w.everything_score = FloatSpinBox(label="Everything: min score", min=-1000.0, max=1.0,
                                      step=0.01, value=0.88,
                                      tooltip="Masks with a lower predicted IoU are dropped")
    w.everything_stability = FloatSpinBox(label="Everything: min stability", min=-1.0, max=1.0,
                                          step=0.01, value=0.95)
    settings = Container(widgets=[w.device, w.cache, w.cache_folder, w.prefetch, w.save_as_you_go,
                                  w.tile_above,
                                  w.propagate_score, w.propagate_iou, w.everything_points, w.everything_score,
                                  w.everything_stability])

    w.progress = ProgressBar(visible=False)
    w.cancel_btn = PushButton(text="Cancel", visible=False)
    w.status_label = Label(value="")
    w.status_label.native.setWordWrap(True)
    keys = "  ".join(f"{k.replace('-', '+')}" for k in ("N", "Shift-C", "Shift-X", "Shift-M", "Shift-Z"))
    w.help_label = Label(value=f"Keys: {keys}; Shift+click: negative point")
    w.help_label.native.setWordWrap(True)

    form = Container(widgets=[w.image, w.channel_axis, w.channels,
                              _row(w.model, w.browse_btn, label="Model"), w.labels])
    w.extend([form, _row(w.positive, w.overwrite), _row(w.commit_btn, w.clear_btn),
              _row(w.mask_btn, w.undo_btn, w.redo_btn)])
    layout = w.native.layout()
    w.volume_section = _collapsible("Volume tools", w.volume_box, expanded=True)
    w.settings_section = _collapsible("Settings", settings, expanded=False)
    layout.addWidget(w.volume_section)
    layout.addWidget(w.settings_section)
    for extra in (_row(w.progress, w.cancel_btn), w.status_label, w.help_label):
        layout.addWidget(extra.native)
    layout.addStretch(1)
    # the choice widgets inside sections follow the layers too
    w._extra_choices = [w.channels]
    from qtpy.QtWidgets import QComboBox, QSizePolicy

    for combo in (w.image, w.model, w.labels, w.cache, w.axis, w.device):
        # long layer names and checkpoint paths must not widen the dock
        combo.native.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        combo.native.setMinimumContentsLength(8)
    for lbl in (w.status_label, w.help_label):
        lbl.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    w.native.setMinimumWidth(0)


# ---------------------------------------------------------------------- choices
# (magicgui calls these whenever napari resets the choices: layers added, removed, renamed)

def image_choices(w: "SamWidget") -> list[tuple[str, Any]]:
    import napari

    return [(lyr.name, unwrap(lyr)) for lyr in w.viewer.layers
            if isinstance(lyr, napari.layers.Image)]


def labels_choices(w: "SamWidget") -> list[tuple[str, Any]]:
    import napari

    out: list[tuple[str, Any]] = [(f"(new) {L.LABELS_NAME}", None)]
    return out + [(lyr.name, unwrap(lyr)) for lyr in w.viewer.layers
                  if isinstance(lyr, napari.layers.Labels) and lyr.name != L.PREVIEW_NAME]


def model_choices(w: "SamWidget") -> list[str]:
    return list(w._model_specs)


def axis_choices(w: "SamWidget") -> list[tuple[str, Any]]:
    geo = w.ctrl.geometry()
    names = geo.axis_names() if geo is not None else []
    return [(n, k) for k, n in enumerate(names)] or [("-", None)]


def channel_choices(w: "SamWidget") -> list[tuple[str, Any]]:
    layer = w.ctrl.image_layer
    if layer is None:
        return []
    geo = ImageGeometry(layer)
    if w.ctrl.channel_axis is not None:
        return [(f"channel {c}", c) for c in range(geo.shape[0])]
    same = [(lyr.name, unwrap(lyr)) for lyr in w.viewer.layers
            if type(unwrap(lyr)).__name__ == "Image" and not same_layer(lyr, layer)
            and not getattr(lyr, "rgb", False)
            and tuple(ImageGeometry(lyr).shape) == geo.shape]
    return [(f"{layer.name} (image)", None)] + same if same else []


_BREAK_AFTER = re.compile(r"([/\\_.\-=&?:,])")


def wrappable(text: str, *, longest: int = 28) -> str:
    """Let long words (paths, URLs) wrap: a zero-width space after / \\ _ . - = & ? : ,"""
    out = []
    for word in re.split(r"(\s+)", text):
        out.append(_BREAK_AFTER.sub("\\1\u200b", word) if len(word) > longest else word)
    return "".join(out)


class _Relay(QObject):
    text = Signal(str)


class Messages:
    """Status line, busy / progress bar and notifications of one widget.

    Parameters
    ----------
    widget : SamWidget
        Owns ``status_label``, ``progress`` and ``cancel_btn``.
    """

    def __init__(self, widget: "SamWidget") -> None:
        self.widget = widget
        self.last_status = ""
        self._last_error: str | None = None
        self._relay = _Relay()
        self._relay.text.connect(self.status)
        self._main = threading.get_ident()

    @property
    def _gone(self) -> bool:
        return bool(getattr(self.widget, "_closed", False))

    def status(self, msg: str) -> None:
        """Show ``msg`` (GUI thread); it replaces the previous status."""
        self.last_status = msg
        if self._gone:
            return
        label = getattr(self.widget, "status_label", None)
        if label is not None:
            try:
                label.value = wrappable(msg)
            except RuntimeError:  # the widget was deleted (napari closing)
                return
        try:
            self.widget.viewer.status = f"SAM: {msg}"
        except Exception:  # noqa: BLE001, S110 - the viewer is closing
            pass

    def status_from_any_thread(self, msg: str) -> None:
        if threading.get_ident() == self._main:
            self.status(msg)
        else:
            self._relay.text.emit(msg)

    def ok(self) -> None:
        """The last action worked: the next error is notified again."""
        self._last_error = None

    def error(self, exc: BaseException | str) -> None:
        """Show an error in the status line; notify it unless it is the same as the last one."""
        msg = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
        text = f"Error: {msg}"
        self.status(text)
        if msg != self._last_error:
            self._last_error = msg
            try:
                from napari.utils.notifications import show_error

                show_error(f"napari-sam: {msg}")
            except Exception:  # noqa: BLE001, S110 - no napari notification manager
                pass

    def busy(self, on: bool, title: str = "") -> None:
        """Show an indeterminate progress bar (and Cancel while a tool runs)."""
        w = self.widget
        if self._gone:
            return
        w.progress.visible = on
        tool = bool(w.job is not None and w.job.running)
        w.cancel_btn.visible = on and tool
        if on:
            w.progress.min, w.progress.max = 0, 0
            if title:
                self.status(f"{title} ...")

    def progress(self, done: int, total: int, message: str) -> None:
        w = self.widget
        if self._gone:
            return
        w.progress.visible = True
        w.progress.min, w.progress.max = 0, max(int(total), 1)
        w.progress.value = int(done)
        if message:
            self.status(f"{message} ({done}/{total})")
