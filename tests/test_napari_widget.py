"""The widget the way users open it: the viewer first, then Plugins > napari-sam.

``viewer.window.add_plugin_dock_widget`` hands the plugin a proxy viewer and builds the
widget exactly as the menu does; clicks are answered by the widget's background thread.
The tiny model's masks are meaningless, so every test compares the widget's output with
the engine called directly on the same slice and prompts.
"""

from __future__ import annotations

import threading
from typing import ClassVar

import numpy as np
import pytest
from gui_helpers import YX, Z, engine, go_to, preview, settle

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def nuclei():
    from napari_sam.synthetic import make_nuclei_stack

    image, _ = make_nuclei_stack((6, 128, 128), n_nuclei=10, seed=2)
    return image


# ---------------------------------------------------------------- the click path
def test_opens_ready_for_the_first_click(open_widget, nuclei, qtbot, tiny_model):
    import napari

    viewer, w = open_widget(nuclei)
    assert not isinstance(w.viewer, napari.Viewer) or type(w.viewer) is not napari.Viewer  # a proxy
    pts = viewer.layers["SAM points"]
    assert viewer.layers.selection.active is pts and pts.mode == "add"
    assert "Click on the image" in w.messages.last_status
    assert w.ctrl.model_spec.endswith("tiny_sam.pth")  # from $NAPARI_SAM_MODEL
    img = viewer.layers["img"]
    go_to(viewer, img, Z)
    pts.add([Z, *YX])
    settle(qtbot, w)
    expected = engine(tiny_model, nuclei).predict(Z, points=[YX], point_labels=[1])
    assert expected.mask.any()
    np.testing.assert_array_equal(preview(viewer) == 1, expected.mask)
    # decoded in the widget's worker thread, never on the GUI thread
    assert w.decoder.threads and threading.get_ident() not in w.decoder.threads
    assert "Z 3" in w.messages.last_status and "Shift+C" in w.messages.last_status
    # a point on another slice is ignored for slice Z
    pts.add([Z + 1, 10, 10])
    settle(qtbot, w)
    np.testing.assert_array_equal(preview(viewer) == 1, expected.mask)


def test_commit_then_click_again_and_one_undo_history(open_widget, nuclei, qtbot, tiny_model):
    viewer, w = open_widget(nuclei)
    img, pts = viewer.layers["img"], viewer.layers["SAM points"]
    go_to(viewer, img, Z)
    pts.add([Z, *YX])
    settle(qtbot, w)
    first = engine(tiny_model, nuclei).predict(Z, points=[YX], point_labels=[1]).mask
    assert w.commit() == [1]
    labels = viewer.layers["SAM labels"]
    np.testing.assert_array_equal(labels.data[Z] == 1, first)
    assert not np.delete(labels.data, Z, axis=0).any()
    # the points layer is active in add mode again: the next click starts the next object
    assert viewer.layers.selection.active is viewer.layers["SAM points"]
    assert viewer.layers["SAM points"].mode == "add"
    assert not len(pts.data) and not preview(viewer).any()  # prompts of slice Z cleared
    pts.add([Z, 100.0, 30.0])
    settle(qtbot, w)
    assert preview(viewer).any()
    assert w.commit() == [2]
    assert set(np.unique(labels.data)) == {0, 1, 2}
    # two undos (napari's own undo, what Ctrl+Z calls, and the widget's): empty again
    labels.undo()
    assert set(np.unique(labels.data)) == {0, 1}
    w.undo()
    assert not labels.data.any()
    w.redo()
    np.testing.assert_array_equal(labels.data[Z] == 1, first)
    # the keyboard shortcuts are bound on the viewer and reach the widget
    from napari.utils.key_bindings import KeyBinding

    viewer.keymap[KeyBinding.from_str("Shift-Z")](viewer)
    assert not labels.data.any()
    for key in ("N", "Shift-C", "Shift-X", "Shift-M", "Shift-Y"):
        assert KeyBinding.from_str(key) in viewer.keymap


def test_commit_never_overwrites_unless_asked(open_widget, nuclei, qtbot, tiny_model):
    viewer, w = open_widget(nuclei)
    img = viewer.layers["img"]
    go_to(viewer, img, Z)
    expected = engine(tiny_model, nuclei).predict(Z, points=[YX], point_labels=[1]).mask
    existing = np.zeros(nuclei.shape, np.uint16)
    half = expected & (np.arange(128)[None, :] < np.median(np.nonzero(expected)[1]))
    existing[Z][half] = 7
    viewer.add_labels(existing.copy(), name="mine", scale=img.scale)
    w.labels.value = viewer.layers["mine"]
    viewer.layers["SAM points"].add([Z, *YX])
    settle(qtbot, w)
    assert w.commit() == [8]
    data = viewer.layers["mine"].data
    np.testing.assert_array_equal(data[Z][half], 7)  # kept
    np.testing.assert_array_equal(data[Z] == 8, expected & ~half)
    w.undo()
    np.testing.assert_array_equal(viewer.layers["mine"].data, existing)
    w.overwrite.value = True
    viewer.layers["SAM points"].add([Z, *YX])
    settle(qtbot, w)
    w.commit()
    np.testing.assert_array_equal(viewer.layers["mine"].data[Z] > 7, expected)


def test_second_click_refines_from_the_previous_logits(open_widget, nuclei, qtbot, tiny_model):
    viewer, w = open_widget(nuclei)
    go_to(viewer, viewer.layers["img"], Z)
    pts = viewer.layers["SAM points"]
    pts.add([Z, *YX])
    settle(qtbot, w)
    w.toggle_polarity()  # a negative point
    pts.add([Z, 90.0, 20.0])
    settle(qtbot, w)
    assert not pts.features["positive"].iloc[-1]
    np.testing.assert_allclose(pts.face_color[-1], [1, 0, 0, 1])
    seg = engine(tiny_model, nuclei)
    first = seg.predict(Z, points=[YX], point_labels=[1])
    refined = seg.predict(Z, points=[YX, (90.0, 20.0)], point_labels=[1, 0],
                          mask_input=first.logits[first.best], multimask=False)
    plain = seg.predict(Z, points=[YX, (90.0, 20.0)], point_labels=[1, 0], multimask=False)
    assert not np.array_equal(refined.logits, plain.logits)  # the test can tell them apart
    np.testing.assert_array_equal(preview(viewer) == 1, refined.mask)
    [obj] = w.ctrl.answer_shown.request.objects
    assert obj.mask_input is not None


def test_several_boxes_are_several_objects_in_one_decoder_call(open_widget, nuclei, qtbot,
                                                               tiny_model, monkeypatch):
    from napari_sam.models.sam import SamModel

    viewer, w = open_widget(nuclei)
    go_to(viewer, viewer.layers["img"], Z)
    calls = []
    original = SamModel.decode

    def counted(self, emb, **kw):
        calls.append(kw.get("boxes"))
        return original(self, emb, **kw)

    monkeypatch.setattr(SamModel, "decode", counted)
    boxes = viewer.layers["SAM boxes"]
    b1, b2 = [30, 50, 60, 90], [80, 10, 110, 40]
    boxes.add_rectangles(np.array([[Z, 30, 50], [Z, 30, 90], [Z, 60, 90], [Z, 60, 50]], float))
    boxes.add_rectangles(np.array([[Z, 80, 10], [Z, 80, 40], [Z, 110, 40], [Z, 110, 10]], float))
    settle(qtbot, w)
    assert calls and calls[-1] is not None and len(calls[-1]) == 2  # both boxes, one call
    expected = engine(tiny_model, nuclei).segment_boxes(Z, [b1, b2])
    prev = preview(viewer)
    np.testing.assert_array_equal(prev == 1, expected[0])
    np.testing.assert_array_equal(prev == 2, expected[1] & ~expected[0])
    assert w.commit() == [1, 2]
    labels = viewer.layers["SAM labels"].data
    np.testing.assert_array_equal(labels[Z] == 1, expected[0])
    np.testing.assert_array_equal(labels[Z] == 2, expected[1] & ~expected[0])
    w.undo()  # one commit, one undo step
    assert not viewer.layers["SAM labels"].data.any()


def test_newest_click_wins(open_widget, nuclei, qtbot, tiny_model):
    viewer, w = open_widget(nuclei)
    go_to(viewer, viewer.layers["img"], Z)
    pts = viewer.layers["SAM points"]
    pts.add([Z, *YX])
    settle(qtbot, w)
    w.clear_prompts()
    gate = threading.Event()
    original = w.ctrl.answer
    seen = []

    def slow(req):
        seen.append(req.objects[0].points.tolist() if req.objects else None)
        gate.wait(30)
        return original(req)

    w.decoder._fn = slow
    for y in (20.0, 30.0, 50.0):  # three clicks while the first one is being answered
        pts.add([Z, y, 60.0])
        qtbot.wait(20)
    gate.set()
    settle(qtbot, w)
    # the second click's request was replaced by the third before the worker took it
    assert len(seen) == 2 and seen[-1] == [[20.0, 60.0], [30.0, 60.0], [50.0, 60.0]]
    expected = engine(tiny_model, nuclei).predict(
        Z, points=[(20, 60), (30, 60), (50, 60)], point_labels=[1, 1, 1], multimask=False)
    assert w.ctrl.answer_shown.request.objects[0].n_points == 3
    assert preview(viewer).any() == expected.mask.any()


def test_event_loop_runs_while_a_click_is_answered(open_widget, nuclei, qtbot):
    """The answer is held back in the worker by a gate: GUI events must still be processed
    (a decode on the GUI thread would block them until the gate opens)."""
    from qtpy.QtCore import QTimer

    viewer, w = open_widget(nuclei)
    go_to(viewer, viewer.layers["img"], Z)
    gate = threading.Event()
    original = w.ctrl.answer
    w.decoder._fn = lambda req: (gate.wait(60), original(req))[1]
    viewer.layers["SAM points"].add([Z, *YX])
    qtbot.waitUntil(lambda: w.busy, timeout=5000)
    ran = threading.Event()
    QTimer.singleShot(0, ran.set)
    qtbot.waitUntil(ran.is_set, timeout=5000)  # the GUI ran it while the worker waits
    assert not gate.is_set() and w.busy
    gate.set()
    settle(qtbot, w)
    assert preview(viewer).any()


def test_shift_click_and_polarity(open_widget, nuclei, qtbot):
    from types import SimpleNamespace

    viewer, w = open_widget(nuclei)
    pts = viewer.layers["SAM points"]
    assert pts.mouse_drag_callbacks[0] == w._shift_click
    event = SimpleNamespace(modifiers=("Shift",), type="mouse_press")
    gen = w._shift_click(pts, event)
    next(gen)
    event.type = "mouse_release"
    with pytest.raises(StopIteration):
        next(gen)
    pts.add([5, 10, 10])  # what napari's add mode does next (slice 5 is not in view)
    assert not pts.features["positive"].iloc[-1]
    np.testing.assert_allclose(pts.face_color[-1], [1, 0, 0, 1])
    pts.add([5, 20, 20])  # a plain click: positive again
    assert pts.features["positive"].iloc[-1]
    # in select mode N flips the selected points
    pts.mode = "select"
    pts.selected_data = {0}
    w.toggle_polarity()
    assert not w.ctrl.positive and not pts.features["positive"].iloc[0]


def test_3d_view_is_reported(open_widget, nuclei, qtbot):
    viewer, w = open_widget(nuclei)
    viewer.dims.ndisplay = 3
    settle(qtbot, w)
    assert "2D" in w.messages.last_status
    viewer.dims.ndisplay = 2
    viewer.dims.order = (1, 0, 2)
    settle(qtbot, w)
    assert "2D" in w.messages.last_status


def test_scaled_translated_layers_give_the_same_mask(open_widget, nuclei, qtbot, tiny_model):
    scale, translate = (4.0, 0.5, 0.25), (10.0, 5.0, -3.0)
    viewer, w = open_widget(nuclei, scale=scale, translate=translate)
    img = viewer.layers["img"]
    go_to(viewer, img, Z)
    assert w.ctrl.current_index() == Z
    pts = viewer.layers["SAM points"]
    assert tuple(pts.scale) == scale  # the prompt layers are made on the image's grid
    pts.add([Z, *YX])
    settle(qtbot, w)
    expected = engine(tiny_model, nuclei).predict(Z, points=[YX], point_labels=[1])
    np.testing.assert_array_equal(preview(viewer) == 1, expected.mask)
    prev = viewer.layers["SAM preview"]
    assert tuple(prev.scale) == scale[1:] and tuple(prev.translate) == translate[1:]
    w.clear_prompts()
    # prompt layers in world coordinates (identity transform), unlike the image
    viewer.layers.remove("SAM points")
    world_pts = viewer.add_points(np.zeros((0, 3)), ndim=3, name="SAM points",
                                  features={"positive": np.zeros(0, bool)},
                                  feature_defaults={"positive": True})
    w.reset_choices()
    world_pts.add(img.data_to_world([Z, *YX]))
    settle(qtbot, w)
    np.testing.assert_array_equal(preview(viewer) == 1, expected.mask)
    # a point outside the image is reported, not crashed on
    world_pts.data = np.zeros((0, 3))
    world_pts.add(img.data_to_world([Z, 500.0, 20.0]))
    settle(qtbot, w)
    assert "outside the image" in w.messages.last_status
    assert not preview(viewer).any()


# ---------------------------------------------------------------- messages and layout
def test_messages_layout_and_removed_image(open_widget, qtbot, tmp_path, monkeypatch):
    from napari.utils.notifications import notification_manager

    monkeypatch.setenv("NAPARI_SAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("NAPARI_SAM_CHECKPOINTS", "")
    t4 = np.random.default_rng(1).integers(0, 500, (3, 5, 64, 64)).astype(np.uint16)
    viewer, w = open_widget(t4)
    assert w.native.minimumSizeHint().width() <= 380
    assert w.settings_section.isExpanded() is False  # device, cache, prefetch: folded away
    w.channel_axis.value = False  # these 3 are time points, not channels
    viewer.dims.set_point(0, 1)
    viewer.dims.set_point(1, 3)
    viewer.layers["SAM points"].add([1, 3, 30, 30])
    settle(qtbot, w)
    assert w.messages.last_status.startswith("T 1, Z 3: 1 object")
    w.commit()
    assert "on T 1, Z 3" in w.messages.last_status
    # the offline download error: remedy, URL and path, wrapped; notified once
    w.set_model("vit_b")
    records = notification_manager.records
    before = len(records)
    for y in (20, 25, 30):
        viewer.layers["SAM points"].add([1, 3, y, 30])
        settle(qtbot, w)
    msg = w.messages.last_status
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in msg
    assert str(tmp_path / "cache" / "sam_vit_b_01ec64.pth") in msg and "by hand" in msg
    label = w.status_label.native
    assert label.wordWrap() and "\u200b" in label.text()  # long words may break
    assert w.native.minimumSizeHint().width() <= 380
    new = [r for r in notification_manager.records[before:] if "could not download" in str(r.message)]
    assert len(new) == 1, [str(r.message) for r in notification_manager.records[before:]]
    # removing the image layer: a clear message, no exception
    viewer.layers.remove("img")
    settle(qtbot, w)
    assert "'img' was removed" in w.messages.last_status
    viewer.layers["SAM points"].add([1, 3, 40, 30])
    settle(qtbot, w)  # nothing to segment, and nothing raised


class _CountingStore:
    """Factory of a zarr WrapperStore that records the keys it serves."""

    @staticmethod
    def make(path):
        from zarr.storage import LocalStore, WrapperStore

        class Counting(WrapperStore):
            keys: ClassVar[list] = []

            async def get(self, key, prototype, byte_range=None):
                Counting.keys.append(key)
                return await super().get(key, prototype, byte_range)

        return Counting(LocalStore(str(path))), Counting.keys


def test_lazy_zarr_stack_reads_only_a_few_slices(open_widget, tmp_path, qtbot, tiny_model):
    import zarr

    rng = np.random.default_rng(0)
    path = tmp_path / "big.zarr"
    arr = zarr.create_array(str(path), shape=(100, 256, 256), chunks=(1, 256, 256),
                            dtype="uint16", fill_value=0)
    arr[...] = rng.integers(0, 1000, (100, 256, 256), dtype=np.uint16)  # write only
    store, keys = _CountingStore.make(path)
    lazy = zarr.open_array(store, mode="r")
    # every read from the first (the widget may prefetch around the slice in view while
    # it opens, so the slices 49..52 may be read before or after the click)
    viewer, w = open_widget(lazy, prefetch=True, contrast_limits=(0, 1000), multiscale=False)
    img = viewer.layers["img"]
    go_to(viewer, img, 50)
    viewer.layers["SAM points"].add([50, 128.0, 128.0])
    settle(qtbot, w)
    seg = w.ctrl.segmenter
    assert seg.prefetcher.wait(timeout=120)  # neighbours prefetched in the background
    assert all(seg.cache.in_memory(i) for i in (49, 50, 51, 52))
    w.commit()
    chunks = {k for k in keys if k.startswith("c/")}
    assert {"c/49/0/0", "c/50/0/0", "c/51/0/0", "c/52/0/0"} <= chunks
    assert len(chunks) <= 16, sorted(chunks)  # what napari shows + 4 slices, not 100
    expected = engine(tiny_model, arr).predict(50, points=[(128.0, 128.0)], point_labels=[1])
    labels = viewer.layers["SAM labels"].data
    np.testing.assert_array_equal(labels[50] == 1, expected.mask)
    assert labels.shape == (100, 256, 256) and not labels[49].any()
    # stepping backwards: the prefetcher follows the direction of travel
    go_to(viewer, img, 49)
    settle(qtbot, w)
    assert seg.prefetcher.wait(timeout=120)
    assert seg.cache.in_memory(48) and seg.cache.in_memory(47)
    assert not seg.cache.in_memory(53)
