"""Provenance and replay: every object records how it was made, and replay makes it again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

import napari_sam as ns
from napari_sam.io.labels_files import open_labels
from napari_sam.workflows import batch
from napari_sam.workflows.replay import replay

NAPARI_SAM = str(Path(sys.executable).with_name("napari-sam"))


@pytest.fixture
def cells(tmp_path):
    rng = np.random.default_rng(3)
    img = rng.normal(100, 5, (4, 48, 56))
    img[:, 10:30, 12:40] += 600
    img[:, 34:44, 8:20] += 400
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, img.astype(np.uint16), metadata={"axes": "ZYX"}, photometric="minisblack")
    return path


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    from napari_sam.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("other") / "other_sam.pth", seed=1)


def _csv(path, rows):
    lines = ["index,axis-0,axis-1,axis-2,label"] + [
        f"{i},{z},{y},{x},{lab}" for i, (z, y, x, lab) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("suffix", [".ome.zarr", ".tif"])
def test_batch_labels_record_and_replay(cells, tmp_path, tiny_model, tiny_checkpoint,
                                        other_checkpoint, suffix):
    csv = _csv(tmp_path / "p.csv", [(1, 20, 25, 1), (2, 38, 14, 1)])
    out = tmp_path / f"labels{suffix}"
    batch.segment_prompts(cells, csv, out, model=tiny_model)
    table = ns.read_provenance(out)
    assert list(table["label_id"]) == [1, 2]
    assert list(table["source"]) == ["prompts", "prompts"]
    assert table["points"][0] == [[20.0, 25.0]] and table["position"][1] == (2,)
    assert set(table["checkpoint_sha256"]) == {tiny_model.checkpoint_sha256}
    assert table["image"][0] == str(cells) and table["version"][0] == ns.__version__
    assert table["contrast_limits"][0] == list(ns.open_stack(cells).contrast_limits)
    # the same model: the same labels
    same = replay(out, checkpoint=tiny_checkpoint, out=tmp_path / f"again{suffix}")
    assert same.identical and all(r["iou"] == 1.0 for r in same.report)
    # another model, from the command line: new labels and a report
    done = subprocess.run([NAPARI_SAM, "replay", str(out), "--checkpoint", str(other_checkpoint),
                           "--device", "cpu", "--out", str(tmp_path / f"other{suffix}"), "-q"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "replay:" in done.stdout and "mean IoU" in done.stdout
    report = (tmp_path / f"other{suffix}.report.csv").read_text().splitlines()
    assert report[0] == "label_id,pixels_old,pixels_new,iou" and len(report) == 3
    new, _ = open_labels(tmp_path / f"other{suffix}")
    seg = ns.Segmenter(ns.load_model(checkpoint=other_checkpoint, device="cpu"), cells,
                       speed=ns.Segmenter(tiny_model, cells).cache.speed)
    other = ns.read_provenance(tmp_path / f"other{suffix}")
    assert set(other["checkpoint_sha256"]) != {tiny_model.checkpoint_sha256}
    assert np.asarray(new).reshape(4, 48, 56).shape == (4, 48, 56) and seg is not None


@pytest.mark.gui
def test_widget_objects_record_and_replay(cells, tmp_path, make_napari_viewer, monkeypatch,
                                          qtbot, tiny_checkpoint, other_checkpoint):
    from gui_helpers import settle

    monkeypatch.setenv("NAPARI_SAM_MODEL", str(tiny_checkpoint))
    viewer = make_napari_viewer()
    viewer.open(str(cells), plugin="napari-sam")
    _, w = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    w.prefetch.value = False
    w.propagate_score.value, w.propagate_iou.value = -1000.0, 0.0
    w.everything_score.value, w.everything_stability.value = -1000.0, -1.0
    w.everything_points.value = 3
    settle(qtbot, w)
    pts, boxes = viewer.layers["SAM points"], viewer.layers["SAM boxes"]
    viewer.dims.set_point(0, 1)
    pts.add([1, 20, 25])           # object 1: a click, refined by two more
    settle(qtbot, w)
    w.cycle_mask()                 # the user keeps another candidate mask
    pts.add([1, 24, 30])
    settle(qtbot, w)
    w.toggle_polarity()
    pts.add([1, 40, 50])
    settle(qtbot, w)
    w.toggle_polarity()
    assert w.commit() == [1]
    boxes.add_rectangles(np.array([[1, 34, 8], [1, 34, 20], [1, 44, 20], [1, 44, 8]], float))
    boxes.add_rectangles(np.array([[1, 2, 40], [1, 2, 54], [1, 12, 54], [1, 12, 40]], float))
    settle(qtbot, w)
    assert w.commit() == [2, 3]    # two boxes, one commit
    w.label_id.value = 1
    job = w.propagate()
    qtbot.waitUntil(lambda job=job: not job.running, timeout=300_000)
    settle(qtbot, w)
    job = w.refine_label()
    qtbot.waitUntil(lambda job=job: not job.running, timeout=300_000)
    settle(qtbot, w)
    job = w.segment_everything()
    qtbot.waitUntil(lambda job=job: not job.running, timeout=300_000)
    settle(qtbot, w)
    viewer.dims.set_point(0, 2)
    pts.add([2, 38, 14])           # one more, then undone with napari's own undo
    settle(qtbot, w)
    undone = w.commit()[0]
    viewer.layers["SAM labels"].undo()
    labels = viewer.layers["SAM labels"]
    out = tmp_path / "mine.ome.zarr"
    labels.save(str(out), plugin="napari-sam")
    table = ns.read_provenance(out)
    assert list(table["source"][:3]) == ["click", "box", "box"]
    first = table.iloc[0]
    assert first["n_steps"] == 3 and first["steps"][0]["mask"] is not None
    assert [s["refine"] for s in first["steps"]] == [False, True, True]
    assert first["point_labels"] == [1, 1, 0] and first["position"] == (1,)
    assert {"propagation", "refinement", "automatic"} <= set(table["source"])
    assert undone in set(table["label_id"])  # recorded, but no longer in the labels
    again = replay(out, checkpoint=tiny_checkpoint, out=tmp_path / "again.ome.zarr")
    assert again.identical, [r for r in again.report if r["iou"] != 1.0]
    other = replay(out, checkpoint=other_checkpoint, out=tmp_path / "other.ome.zarr")
    assert len(other.report) == len(np.unique(np.asarray(labels.data))) - 1
