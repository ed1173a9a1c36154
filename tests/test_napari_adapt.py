"""'Adapt to my annotations' in the widget, opened as users do (viewer, file, plugin menu)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from gui_helpers import go_to, settle

import napari_sam as ns
from napari_sam.synthetic import make_nuclei_stack
from napari_sam.workflows.adapt import AdaptSettings

pytestmark = pytest.mark.gui


@pytest.fixture
def cells(tmp_path, make_napari_viewer, tiny_checkpoint, monkeypatch, qtbot):
    """The viewer with cells.tif opened by napari's reader, the widget from the plugin menu,
    and a labels layer of 'their' nuclei chosen under Labels."""
    img, gt = make_nuclei_stack((2, 160, 160), n_nuclei=14, radius=(14.0, 22.0), seed=4)
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, img, metadata={"axes": "ZYX"})
    monkeypatch.setenv("NAPARI_SAM_MODEL", str(tiny_checkpoint))
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari")
    _, w = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    w.prefetch.value = False
    w.save_as_you_go.value = False
    settle(qtbot, w)
    theirs = viewer.add_labels(gt.astype(np.int32), name="theirs")
    w.labels.value = theirs
    go_to(viewer, viewer.layers["cells"], 0)
    settle(qtbot, w)
    return viewer, w, path, gt


def _wait(qtbot, w, job):
    assert job is not None, w.messages.last_status
    qtbot.waitUntil(lambda: not job.running, timeout=600_000)
    settle(qtbot, w)


def test_adapt_then_segment_with_the_adapted_model(cells, qtbot, tiny_checkpoint):
    viewer, w, path, gt = cells
    # one object committed on slice 1: that slice's labels join the training set
    go_to(viewer, viewer.layers["cells"], 1)
    viewer.layers["SAM points"].add([1, 80.0, 80.0])
    settle(qtbot, w)
    assert w.commit()
    go_to(viewer, viewer.layers["cells"], 0)
    settle(qtbot, w)
    seg = w.ctrl.segmenter
    assert seg.cache.stats["encoder_calls"] == 1  # slice 0 is embedded by the training

    _wait(qtbot, w, w.adapt_model(AdaptSettings(epochs=1, rounds=1)))
    out = path.with_name("cells.adapted.pth")
    status = w.messages.last_status
    assert "single-click IoU" in status and "cells.adapted.pth" in status, status
    assert out.exists() and w.model.value == str(out)
    model = ns.load_model(checkpoint=out, device="cpu")
    rec = model.adaptation
    n_objects = sum(len(np.unique(w.labels.value.data[z])) - 1 for z in (0, 1))
    assert rec["objects"]["train"] + rec["objects"]["val"] == n_objects
    assert sorted(rec["source"]["slices"]) == [0, 1]

    # the next click decodes with the adapted decoder, on the embeddings already computed
    viewer.layers["SAM points"].add([0, 60.0, 60.0])
    settle(qtbot, w)
    new = w.ctrl.segmenter
    assert new is not seg and new.model.adaptation is not None
    assert seg.cache.stats["encoder_calls"] == 2
    # the adapted model in memory is used, not read back from the file: one image encoder
    assert new.model.sam.image_encoder is seg.model.sam.image_encoder
    assert new.cache.stats["encoder_calls"] == 0
    want = ns.Segmenter(model, ns.open_stack(path)).predict(0, points=[(60.0, 60.0)])
    np.testing.assert_array_equal(w.ctrl.answer_shown.predictions[0].logits, want.logits)
    # a second adaptation never overwrites the first
    _wait(qtbot, w, w.adapt_model(AdaptSettings(epochs=1, rounds=1)))
    assert path.with_name("cells.adapted-2.pth").exists()


def test_cancel_keeps_the_model(cells, qtbot, monkeypatch):
    from napari_sam._napari import adapt_action

    viewer, w, path, _ = cells
    monkeypatch.setattr(adapt_action, "MAX_OBJECTS", 6)  # more are sampled down to this
    before = w.model.value
    steps = []
    job = w.adapt_model(AdaptSettings(epochs=200))
    assert job is not None and not w.cancel_btn.native.isHidden()
    job._progress.connect(lambda *a: steps.append(a))
    qtbot.waitUntil(lambda: len(steps) >= 1, timeout=300_000)
    assert steps[0][2].startswith("Adapting on 6 objects: epoch 1/200, loss ")
    w.cancel()
    _wait(qtbot, w, job)
    assert "cancelled, nothing was changed" in w.messages.last_status
    assert w.model.value == before
    assert not list(path.parent.glob("*.pth"))


def test_too_few_objects_is_explained(cells, qtbot):
    viewer, w, _, _ = cells
    w.labels.value.data = np.zeros_like(w.labels.value.data)
    assert w.adapt_model() is None
    assert "at least 4 objects" in w.messages.last_status
