"""The dock widget in a real viewer (Xvfb), with the tiny random-weight SAM.

The tiny model's masks are meaningless, so every test compares the widget's output with
the engine called directly on the same slice and prompts.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest

pytestmark = pytest.mark.gui

Z, YX = 3, (40.0, 70.0)


@pytest.fixture(scope="module")
def nuclei():
    from napari_sam.synthetic import make_nuclei_stack

    image, _ = make_nuclei_stack((6, 128, 128), n_nuclei=10, seed=2)
    return image


@pytest.fixture
def sam_widget(make_napari_viewer, tiny_checkpoint, monkeypatch):
    """A factory: viewer + image layer + widget (synchronous, no prefetch by default)."""
    monkeypatch.setenv("NAPARI_SAM_MODEL", str(tiny_checkpoint))
    from napari_sam._napari.widget import SamWidget

    def make(image, *, synchronous=True, prefetch=False, **layer_kwargs):
        viewer = make_napari_viewer()
        viewer.add_image(image, name="img", **layer_kwargs)
        widget = SamWidget(viewer, synchronous=synchronous)
        widget.prefetch_check.setChecked(prefetch)
        viewer.window.add_dock_widget(widget)
        return viewer, widget

    return make


def _go_to(viewer, layer, z):
    """Show data slice ``z`` of ``layer`` (world step along axis 0)."""
    world_z = layer.data_to_world([z, 0, 0])[0]
    viewer.dims.set_point(0, world_z)


_SEGMENTERS: dict = {}


def _expected(tiny_model, image, z, **prompts):
    """The engine's answer, computed directly (one segmenter per image, reused)."""
    import napari_sam as ns

    key = id(image)
    if key not in _SEGMENTERS:
        _SEGMENTERS.clear()
        _SEGMENTERS[key] = (image, ns.Segmenter(tiny_model, ns.open_stack(image)))
    return _SEGMENTERS[key][1].predict(z, **prompts)


def test_point_gives_label_on_its_slice_only(sam_widget, nuclei, tiny_model):
    viewer, w = sam_widget(nuclei)
    assert w.ctrl.model_spec.endswith("tiny_sam.pth")  # from $NAPARI_SAM_MODEL
    img = viewer.layers["img"]
    _go_to(viewer, img, Z)
    pts = viewer.layers["SAM points"]
    pts.add([Z, *YX])
    expected = _expected(tiny_model, nuclei, Z, points=[YX], point_labels=[1])
    assert expected.mask.any()
    np.testing.assert_array_equal(viewer.layers["SAM preview"].data.astype(bool), expected.mask)

    # a point on another slice is ignored for slice Z
    pts.add([Z + 1, 10, 10])
    np.testing.assert_array_equal(viewer.layers["SAM preview"].data.astype(bool), expected.mask)

    # N flips polarity: a negative point, red, refines the same object
    w.toggle_polarity()
    assert not w.ctrl.positive
    assert pts.features["positive"].all()  # add mode: existing (selected) points unchanged
    pts.add([Z, 90.0, 20.0])
    assert not pts.features["positive"].iloc[-1]
    np.testing.assert_allclose(pts.face_color[-1], [1, 0, 0, 1])
    expected2 = _expected(tiny_model, nuclei, Z, points=[YX, (90.0, 20.0)],
                          point_labels=[1, 0], multimask=False)
    np.testing.assert_array_equal(viewer.layers["SAM preview"].data.astype(bool), expected2.mask)

    label_id = w.commit()
    labels = viewer.layers["SAM labels"].data
    assert label_id == 1
    assert labels.shape == nuclei.shape
    np.testing.assert_array_equal(labels[Z] == 1, expected2.mask)
    assert not np.delete(labels, Z, axis=0).any()  # only on slice Z
    # prompts of slice Z are cleared, the other slice keeps its point
    assert len(pts.data) == 1 and pts.data[0][0] == Z + 1
    assert not viewer.layers["SAM preview"].data.any()
    # in select mode N flips the selected points
    pts.mode = "select"
    pts.selected_data = {0}
    w.toggle_polarity()
    assert w.ctrl.positive and pts.features["positive"].iloc[0]


def test_scaled_translated_layers_give_the_same_mask(sam_widget, nuclei, tiny_model):
    import napari

    scale, translate = (4.0, 0.5, 0.25), (10.0, 5.0, -3.0)
    viewer, w = sam_widget(nuclei, scale=scale, translate=translate)
    img = viewer.layers["img"]
    _go_to(viewer, img, Z)
    assert w.ctrl.current_index() == Z
    # prompt layers given in world coordinates (identity transform), unlike the image
    world = img.data_to_world([Z, *YX])
    viewer.layers.remove("SAM points")
    viewer.layers.remove("SAM boxes")
    pts = viewer.add_points(np.zeros((0, 3)), ndim=3, name="SAM points",
                            features={"positive": np.zeros(0, bool)},
                            feature_defaults={"positive": True})
    boxes = viewer.add_shapes(ndim=3, name="SAM boxes")
    w.reset_choices()
    pts.add(world)
    expected = _expected(tiny_model, nuclei, Z, points=[YX], point_labels=[1])
    np.testing.assert_array_equal(viewer.layers["SAM preview"].data.astype(bool), expected.mask)
    # the preview lies on the image's grid
    prev = viewer.layers["SAM preview"]
    assert tuple(prev.scale) == scale[1:] and tuple(prev.translate) == translate[1:]

    # a box drawn in world coordinates on the same slice
    pts.data = np.zeros((0, 3))
    box_data = [[Z, 30, 50], [Z, 60, 90]]
    corners = np.array([img.data_to_world([z, y, x]) for z, y, x in
                        [box_data[0], [Z, 30, 90], box_data[1], [Z, 60, 50]]])
    boxes.add_rectangles(corners)
    expected_box = _expected(tiny_model, nuclei, Z, box=[30, 50, 60, 90])
    np.testing.assert_array_equal(viewer.layers["SAM preview"].data.astype(bool),
                                  expected_box.mask)

    # a point outside the image is reported, not crashed on
    boxes.data = []
    pts.add(img.data_to_world([Z, 500.0, 20.0]))
    assert "outside the image" in w.status_label.text()
    assert not viewer.layers["SAM preview"].data.any()
    assert isinstance(viewer, napari.Viewer)


def test_commit_undo_redo_never_overwrites(sam_widget, nuclei, tiny_model):
    viewer, w = sam_widget(nuclei)
    img = viewer.layers["img"]
    _go_to(viewer, img, Z)
    expected = _expected(tiny_model, nuclei, Z, points=[YX], point_labels=[1]).mask
    # an existing object covering the left half of the expected mask
    existing = np.zeros(nuclei.shape, np.uint16)
    xs = np.nonzero(expected)[1]
    half = expected & (np.arange(128)[None, :] < np.median(xs))
    existing[Z][half] = 7
    viewer.add_labels(existing.copy(), name="SAM labels", scale=img.scale)
    w.ctrl.points_layer().add([Z, *YX])
    assert w.commit() == 8
    labels = viewer.layers["SAM labels"].data
    np.testing.assert_array_equal(labels[Z][half], 7)  # kept
    np.testing.assert_array_equal(labels[Z] == 8, expected & ~half)
    after = labels.copy()

    w.undo()
    np.testing.assert_array_equal(viewer.layers["SAM labels"].data, existing)
    w.redo()
    np.testing.assert_array_equal(viewer.layers["SAM labels"].data, after)
    w.undo()
    np.testing.assert_array_equal(viewer.layers["SAM labels"].data, existing)

    # with "Overwrite existing labels" ticked the new object replaces the old one
    w.overwrite_check.setChecked(True)
    w.ctrl.points_layer().add([Z, *YX])
    assert w.commit() == 8
    np.testing.assert_array_equal(viewer.layers["SAM labels"].data[Z] == 8, expected)

    # the keyboard shortcuts are bound on the viewer and reach the widget
    from napari.utils.key_bindings import KeyBinding

    keymap = viewer.keymap
    keymap[KeyBinding.from_str("Shift-Z")](viewer)
    np.testing.assert_array_equal(viewer.layers["SAM labels"].data, existing)
    keymap[KeyBinding.from_str("Shift-Y")](viewer)
    assert (viewer.layers["SAM labels"].data == 8).sum() == expected.sum()
    for key in ("N", "Shift-C", "Shift-X", "Shift-M"):
        assert KeyBinding.from_str(key) in keymap


def test_3d_view_and_placeholder(sam_widget, nuclei):
    from types import SimpleNamespace

    viewer, w = sam_widget(nuclei)
    # Shift+click in add mode: the point gets the other polarity, the default comes back
    pts = viewer.layers["SAM points"]
    assert pts.mode == "add" and pts.mouse_drag_callbacks[0] == w.ctrl.shift_click_callback
    event = SimpleNamespace(modifiers=("Shift",), type="mouse_press")
    gen = w.ctrl.shift_click_callback(pts, event)
    next(gen)
    event.type = "mouse_release"
    with pytest.raises(StopIteration):
        next(gen)
    pts.add([5, 10, 10])  # what napari's add mode does next (slice 5 is not in view)
    assert not pts.features["positive"].iloc[-1]
    np.testing.assert_allclose(pts.face_color[-1], [1, 0, 0, 1])
    pts.add([5, 20, 20])  # a plain click: positive again
    assert pts.features["positive"].iloc[-1]
    np.testing.assert_allclose(pts.face_color[-1], [0, 1, 0, 1])

    assert not w.propagate_btn.isEnabled() and w.propagate_btn.toolTip()
    viewer.dims.ndisplay = 3
    assert "2D" in w.status_label.text()
    viewer.dims.ndisplay = 2
    viewer.dims.order = (1, 0, 2)
    assert "2D" in w.status_label.text()


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


def test_lazy_zarr_stack_reads_only_a_few_slices(sam_widget, tmp_path, tiny_model):
    import zarr

    rng = np.random.default_rng(0)
    path = tmp_path / "big.zarr"
    arr = zarr.create_array(str(path), shape=(100, 256, 256), chunks=(1, 256, 256),
                            dtype="uint16", fill_value=0)
    arr[...] = rng.integers(0, 1000, (100, 256, 256), dtype=np.uint16)  # write only
    store, keys = _CountingStore.make(path)
    lazy = zarr.open_array(store, mode="r")
    viewer, w = sam_widget(lazy, prefetch=True, contrast_limits=(0, 1000), multiscale=False)
    keys.clear()
    img = viewer.layers["img"]
    _go_to(viewer, img, 50)
    w.ctrl.points_layer().add([50, 128.0, 128.0])
    seg = w.ctrl.segmenter
    assert seg.cache.prefetcher.wait(timeout=120)  # neighbours prefetched in the background
    assert all(seg.cache.in_memory(i) for i in (49, 50, 51, 52))
    w.commit()
    chunks = {k for k in keys if k.startswith("c/")}
    assert 4 <= len(chunks) <= 16, sorted(chunks)  # contrast sample + 4 slices, not 100
    expected = _expected(tiny_model, arr, 50, points=[(128.0, 128.0)], point_labels=[1])
    labels = viewer.layers["SAM labels"].data
    np.testing.assert_array_equal(labels[50] == 1, expected.mask)
    assert labels.shape == (100, 256, 256) and not labels[49].any()

    # stepping backwards: the prefetcher follows the direction of travel
    _go_to(viewer, img, 49)
    assert seg.cache.prefetcher.wait(timeout=120)
    assert seg.cache.in_memory(48) and seg.cache.in_memory(47)
    assert not seg.cache.in_memory(53)


def test_event_loop_runs_while_embedding(sam_widget, nuclei, qtbot):
    from qtpy.QtCore import QTimer

    viewer, w = sam_widget(nuclei, synchronous=False)
    _go_to(viewer, viewer.layers["img"], Z)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(10)
    worker = w.embed_current()
    assert worker is not None and w.busy
    assert w.progress.isVisible() or not w.isVisible()
    qtbot.waitUntil(lambda: not w.busy, timeout=60000)
    timer.stop()
    assert w.ctrl.segmenter.cache.is_cached(Z)
    assert len(ticks) >= 10, f"the event loop processed only {len(ticks)} timer events"

    # end to end in the background: a point -> preview once the worker is done
    w.ctrl.points_layer().add([Z, *YX])
    qtbot.waitUntil(lambda: "SAM preview" in viewer.layers
                    and viewer.layers["SAM preview"].data.any(), timeout=30000)

    # cancel a long precompute
    w.from_spin.setValue(0)
    w.to_spin.setValue(5)
    w.precompute()
    w.cancel()
    qtbot.waitUntil(lambda: not w.busy, timeout=60000)
    assert not all(w.ctrl.segmenter.cache.is_cached(i) for i in range(6))
