"""The widget's channels and volume tools, opened as users do (viewer, then the plugin menu).

Each tool runs in a background job; the tests wait for it and compare with the engine
called directly. Random weights give meaningless masks, so the thresholds that decide
when propagation stops and which automatic masks are kept are opened wide.
"""

from __future__ import annotations

import numpy as np
import pytest
from gui_helpers import Z, engine, go_to, preview, settle

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def nuclei():
    from napari_sam.synthetic import make_nuclei_stack

    image, _ = make_nuclei_stack((6, 128, 128), n_nuclei=10, seed=2)
    return image


def _open_wide(open_widget, image, **kw):
    viewer, w = open_widget(image, **kw)
    w.propagate_score.value, w.propagate_iou.value = -1000.0, 0.0
    w.everything_score.value, w.everything_stability.value = -1000.0, -1.0
    w.everything_points.value = 4
    return viewer, w


def _commit_point(viewer, w, qtbot, z, yx):
    go_to(viewer, viewer.layers["img"], z)
    viewer.layers["SAM points"].add([z, *yx])
    settle(qtbot, w)
    return w.commit()[0]


# ---------------------------------------------------------------- channels
def test_channels_first_tiff_from_naparis_reader(open_widget, make_napari_viewer, tmp_path,
                                                 qtbot, tiny_model, tiny_checkpoint, monkeypatch):
    import tifffile

    rng = np.random.default_rng(0)
    chw = rng.integers(0, 1000, (3, 96, 128)).astype(np.uint16)
    chw[1, 20:60, 30:80] += 3000
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, chw)
    monkeypatch.setenv("NAPARI_SAM_MODEL", str(tiny_checkpoint))
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari")  # napari's own reader: one (3, 96, 128) layer
    assert [tuple(lyr.data.shape) for lyr in viewer.layers] == [(3, 96, 128)]
    _, w = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    w.prefetch.value = False
    settle(qtbot, w)
    # the widget asks: the first axis is taken as channels, and it says so
    assert w.channel_axis.value and "channels" in w.messages.last_status
    assert w.channels.choices == (0, 1, 2) and not w.channels.native.isHidden()
    assert w.ctrl.geometry().labels_shape == (96, 128)
    assert viewer.layers["SAM points"].ndim == 2
    w.channels.value = [1]
    viewer.layers["SAM points"].add([50.0, 60.0])
    settle(qtbot, w)
    expected = engine(tiny_model, chw, axes="CYX", channel=1).predict(0, points=[(50, 60)])
    other = engine(tiny_model, chw, axes="CYX", channel=0).predict(0, points=[(50, 60)])
    assert not np.array_equal(expected.logits, other.logits)
    np.testing.assert_array_equal(preview(viewer) == 1, expected.mask)
    assert w.commit() == [1]
    assert viewer.layers["SAM labels"].data.shape == (96, 128)  # one channel's shape
    # three channels as RGB
    w.channels.value = [0, 1, 2]
    viewer.layers["SAM points"].add([50.0, 60.0])
    settle(qtbot, w)
    rgb = engine(tiny_model, chw, axes="CYX", channel=(0, 1, 2)).predict(0, points=[(50, 60)])
    np.testing.assert_array_equal(preview(viewer) == 1, rgb.mask)
    # untick: the first axis is slices after all
    w.channel_axis.value = False
    settle(qtbot, w)
    assert w.ctrl.geometry().labels_shape == (3, 96, 128)
    assert viewer.layers["SAM points"].ndim == 3


def test_channel_layers_of_our_reader_as_a_composite(make_napari_viewer, tmp_path, qtbot,
                                                    tiny_model, tiny_checkpoint, monkeypatch):
    import tifffile

    rng = np.random.default_rng(1)
    chw = rng.integers(0, 1000, (3, 64, 80)).astype(np.uint16)
    path = tmp_path / "three.tif"
    tifffile.imwrite(path, chw, metadata={"axes": "CYX"})
    monkeypatch.setenv("NAPARI_SAM_MODEL", str(tiny_checkpoint))
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-sam")  # one layer per channel
    names = [lyr.name for lyr in viewer.layers]
    assert names == ["three [c0]", "three [c1]", "three [c2]"]
    _, w = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    w.prefetch.value = False
    w.image.value = viewer.layers["three [c0]"]
    settle(qtbot, w)
    assert not w.channels.native.isHidden()
    w.channels.value = [viewer.layers["three [c1]"], viewer.layers["three [c2]"]]
    viewer.layers["SAM points"].add([30.0, 40.0])
    settle(qtbot, w)
    expected = engine(tiny_model, chw, axes="CYX", channel=(0, 1, 2)).predict(0, points=[(30, 40)])
    np.testing.assert_array_equal(preview(viewer) == 1, expected.mask)


# ---------------------------------------------------------------- volume tools
def _run(qtbot, w, job):
    assert job is not None, w.messages.last_status
    qtbot.waitUntil(lambda: not job.running, timeout=300_000)
    settle(qtbot, w)


def test_propagate_the_committed_object_is_one_undo_step(open_widget, nuclei, qtbot, tiny_model):
    from napari_sam.workflows.volume import Seed, propagate_many

    viewer, w = _open_wide(open_widget, nuclei)
    label = _commit_point(viewer, w, qtbot, Z, (40.0, 70.0))
    labels = viewer.layers["SAM labels"]
    seed = labels.data[Z] == label
    before = labels.data.copy()
    _run(qtbot, w, w.propagate())  # label 0: the last committed
    assert "Propagated label 1" in w.messages.last_status
    seg = engine(tiny_model, nuclei)
    [res] = propagate_many(seg, [Seed(Z, mask=seed)], min_score=-1000.0, min_iou=0.0)
    assert len(res.accepted) > 1
    for z in range(nuclei.shape[0]):
        want = res.mask[z] if z != Z else seed
        np.testing.assert_array_equal(labels.data[z] == label, want & (before[z] == 0) | (before[z] == label))
    w.undo()  # the whole propagation, in one step
    np.testing.assert_array_equal(labels.data, before)
    # a range along Z: only slices 2..4
    w.from_spin.value, w.to_spin.value = 2, 4
    _run(qtbot, w, w.propagate())
    on = [z for z in range(6) if (labels.data[z] == label).any()]
    assert on == [2, 3, 4]


def test_propagate_can_be_cancelled(open_widget, nuclei, qtbot):
    viewer, w = _open_wide(open_widget, nuclei)
    _commit_point(viewer, w, qtbot, Z, (40.0, 70.0))
    before = viewer.layers["SAM labels"].data.copy()
    job = w.propagate()
    w.cancel()
    qtbot.waitUntil(lambda: not job.running, timeout=300_000)
    settle(qtbot, w)
    np.testing.assert_array_equal(viewer.layers["SAM labels"].data, before)  # nothing written
    assert w.progress.native.isHidden() and w.cancel_btn.native.isHidden()


def test_segment_everything_new_ids_never_overwrite(open_widget, nuclei, qtbot, tiny_model):
    from napari_sam.workflows.auto import SliceLinker, auto_segment_slice

    viewer, w = _open_wide(open_widget, nuclei)
    label = _commit_point(viewer, w, qtbot, Z, (40.0, 70.0))
    labels = viewer.layers["SAM labels"]
    before = labels.data.copy()
    _run(qtbot, w, w.segment_everything())  # the slice in view
    seg = engine(tiny_model, nuclei)
    opts = dict(points_per_side=4, pred_iou_thresh=-1000.0, stability_score_thresh=-1.0)
    auto = auto_segment_slice(seg, Z, **opts)
    assert auto.max() >= 1
    after = labels.data
    np.testing.assert_array_equal(after[before > 0], before[before > 0])  # never overwritten
    new = (after[Z] > label)
    np.testing.assert_array_equal(new, (auto > 0) & (before[Z] == 0))
    np.testing.assert_array_equal(np.delete(after, Z, axis=0), np.delete(before, Z, axis=0))
    w.undo()
    np.testing.assert_array_equal(labels.data, before)
    # a range, merged in 3D
    w.everything_range.value = True
    w.from_spin.value, w.to_spin.value = 1, 3
    _run(qtbot, w, w.segment_everything())
    linker = SliceLinker()
    merged = [linker.link(auto_segment_slice(seg, z, **opts)) for z in (1, 2, 3)]
    for z, m in zip((1, 2, 3), merged):
        got = labels.data[z].astype(np.int64)
        free = before[z] == 0
        np.testing.assert_array_equal(got[free] > 0, (m > 0)[free])
        ids = got[free & (m > 0)] - m[free & (m > 0)]
        assert len(set(ids.tolist())) <= 1  # one offset: 3D ids kept across slices
    assert not labels.data[0].any() and not labels.data[4].any()


def test_refine_a_label(open_widget, nuclei, qtbot, tiny_model):
    viewer, w = _open_wide(open_widget, nuclei)
    label = _commit_point(viewer, w, qtbot, Z, (40.0, 70.0))
    labels = viewer.layers["SAM labels"]
    old = labels.data[Z] == label
    before = labels.data.copy()
    w.label_id.value = label
    _run(qtbot, w, w.refine_label())
    seg = engine(tiny_model, nuclei)
    expected = seg.predict_many(Z, [seg.prompt_from_mask(Z, old)])[0].mask
    np.testing.assert_array_equal(labels.data[Z] == label, expected)
    assert "Refined label" in w.messages.last_status
    w.undo()
    np.testing.assert_array_equal(labels.data, before)
    w.label_id.value = 99
    assert w.refine_label() is None and "Label 99 is not on Z 3" in w.messages.last_status


def test_every_label_of_a_slice_from_another_tool(open_widget, nuclei, qtbot, tiny_model):
    """Labels made elsewhere (a Labels layer chosen in the widget) as prompts: refine all
    of the slice in view, then follow them through Z; each is one undo step."""
    from napari_sam.workflows.from_labels import label_masks, propagated_slices, refine_slice
    from napari_sam.workflows.volume import Seed, propagate_many

    viewer, w = _open_wide(open_widget, nuclei)
    theirs = np.zeros(nuclei.shape, np.int32)
    theirs[Z, 30:52, 60:82] = 4
    theirs[Z, 90:110, 20:44] = 9
    theirs[Z + 1, 0:10, 0:10] = 2  # on another slice: kept by both tools
    layer = viewer.add_labels(theirs.copy(), name="stardist")
    w.labels.value = layer
    go_to(viewer, viewer.layers["img"], Z)
    settle(qtbot, w)
    w.every_label.value = True
    _run(qtbot, w, w.refine_label())
    seg = engine(tiny_model, nuclei)
    want, rows = refine_slice(seg, Z, theirs[Z])
    np.testing.assert_array_equal(layer.data[Z], want)
    np.testing.assert_array_equal(np.delete(layer.data, Z, 0), np.delete(theirs, Z, 0))
    assert "Refined 2 labels on Z 3" in w.messages.last_status
    w.undo()
    np.testing.assert_array_equal(layer.data, theirs)
    _run(qtbot, w, w.propagate())
    objects = label_masks(theirs[Z])
    res = propagate_many(seg, [Seed(Z, mask=m) for _, m in objects], min_score=-1000.0, min_iou=0.0)
    slices = propagated_slices([4, 9], res, place=lambda z: (z,))
    assert slices
    for (z,), values in slices.items():
        free = theirs[z] == 0
        np.testing.assert_array_equal(layer.data[z][free], values[free])
        np.testing.assert_array_equal(layer.data[z][~free], theirs[z][~free])
    np.testing.assert_array_equal(layer.data[Z], theirs[Z])
    assert "Propagated 2 labels of Z 3" in w.messages.last_status
    w.undo()
    np.testing.assert_array_equal(layer.data, theirs)
    w.every_label.value = False
    empty = viewer.add_labels(np.zeros(nuclei.shape, np.int32), name="empty")
    w.labels.value = empty
    w.every_label.value = True
    assert w.refine_label() is None and "no labels on Z 3" in w.messages.last_status


def test_precompute_a_range(open_widget, nuclei, qtbot):
    viewer, w = open_widget(nuclei)
    w.from_spin.value, w.to_spin.value = 1, 4
    _run(qtbot, w, w.precompute())
    seg = w.ctrl.segmenter
    assert all(seg.cache.is_cached(i) for i in (1, 2, 3, 4)) and not seg.cache.is_cached(5)
    assert "Precomputed 4 slice(s)" in w.messages.last_status


def test_huge_slice_is_tiled(open_widget, qtbot, tiny_model):
    import napari_sam as ns

    big = np.zeros((4096, 4096), np.uint16)
    big[1000:1040, 2000:2050] = 3000
    viewer, w = open_widget(big)
    viewer.layers["SAM points"].add([1020.0, 2025.0])
    settle(qtbot, w, timeout=600_000)
    assert type(w.ctrl.segmenter).__name__ == "TiledSegmenter"
    expected = ns.TiledSegmenter(tiny_model, ns.open_stack(big)).predict(0, points=[(1020, 2025)])
    np.testing.assert_array_equal(preview(viewer) == 1, expected.mask)
    assert w.commit() == [1]
    # tiling off: the whole slice, resized by SAM
    w.tile_above.value = 0
    viewer.layers["SAM points"].add([1020.0, 2025.0])
    settle(qtbot, w, timeout=600_000)
    assert type(w.ctrl.segmenter).__name__ == "Segmenter"
