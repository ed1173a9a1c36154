"""Existing labels as prompts: refine them, propagate one slice's labels, from the API and
the installed command (resumable, with provenance and replay), and ``napari-sam info``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

import napari_sam as ns
from napari_sam.io.labels_files import open_labels
from napari_sam.models.speed import reproducible
from napari_sam.workflows.from_labels import (
    label_masks,
    propagate_labels,
    propagated_slices,
    refine_labels,
    refine_slice,
)
from napari_sam.workflows.volume import Seed, propagate_many

NAPARI_SAM = str(Path(sys.executable).with_name("napari-sam"))


@pytest.fixture
def cells(tmp_path):
    rng = np.random.default_rng(3)
    img = rng.normal(100, 5, (5, 48, 56))
    img[:, 10:30, 12:40] += 600
    img[:, 34:44, 8:20] += 400
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, img.astype(np.uint16), metadata={"axes": "ZYX"}, photometric="minisblack")
    return path


@pytest.fixture
def other_tool_labels(tmp_path):
    """Labels as another tool writes them: int32, ids not contiguous, 3 slices of 5."""
    lab = np.zeros((5, 48, 56), np.int32)
    lab[1, 12:28, 14:38] = 7
    lab[1, 35:43, 9:19] = 3
    lab[2, 12:28, 14:38] = 7
    lab[3, 30:46, 4:22] = 12
    path = tmp_path / "stardist.tif"
    tifffile.imwrite(path, lab)
    return lab, path


def _seg(model, path):
    return ns.Segmenter(model, ns.open_stack(path), speed=reproducible(model.speed_config()))


def test_label_masks_by_id_from_regionprops():
    lab = np.zeros((20, 30), np.uint16)
    lab[2:5, 3:9] = 4
    lab[10:15, 20:25] = 2
    got = label_masks(lab)
    assert [k for k, _ in got] == [2, 4]
    np.testing.assert_array_equal(got[1][1], lab == 4)
    assert [k for k, _ in label_masks(lab, ids=[4])] == [4]
    with pytest.raises(ns.InvalidInputError, match="2D"):
        label_masks(np.zeros((2, 3, 4), int))


def test_refine_every_label_as_its_box_and_mask(cells, other_tool_labels, tiny_model):
    lab, _ = other_tool_labels
    seg = _seg(tiny_model, cells)
    kept = lab.copy()
    res = refine_labels(seg, lab)
    np.testing.assert_array_equal(lab, kept)  # the input is never changed
    out = res.labels
    assert out.dtype == lab.dtype and out.shape == lab.shape
    for z in (0, 4):  # slices without labels: as they were
        np.testing.assert_array_equal(out[z], lab[z])
    # slice 1: both labels decoded together; where they overlap the lower id (3) wins
    preds = seg.predict_many(1, [seg.prompt_from_mask(1, lab[1] == k) for k in (3, 7)])
    m3, m7 = preds[0].mask, preds[1].mask
    np.testing.assert_array_equal(out[1] == 3, m3)
    np.testing.assert_array_equal(out[1] == 7, m7 & ~m3)
    assert set(np.unique(out[1])) <= {0, 3, 7}
    rows = {(r["position"][0], r["label_id"]): r for r in res.report}
    assert set(rows) == {(1, 3), (1, 7), (2, 7), (3, 12)}
    a, b = lab[1] == 7, out[1] == 7
    assert rows[(1, 7)]["iou"] == pytest.approx((a & b).sum() / (a | b).sum())
    assert rows[(1, 7)]["pixels_old"] == a.sum() and rows[(1, 7)]["pixels_new"] == b.sum()


def test_refine_chosen_ids_into_a_zarr_on_disk(cells, other_tool_labels, tiny_model, tmp_path):
    import zarr

    lab, _ = other_tool_labels
    seg = _seg(tiny_model, cells)
    src = zarr.create_array(tmp_path / "in.zarr", shape=lab.shape, chunks=(1, 48, 56), dtype="int32")
    src[...] = lab
    dst = zarr.create_array(tmp_path / "out.zarr", shape=lab.shape, chunks=(1, 48, 56), dtype="int32")
    dst[...] = lab
    refine_labels(seg, src, ids=[7], out=dst)
    want = refine_labels(seg, lab, ids=[7]).labels
    np.testing.assert_array_equal(dst[...], want)
    np.testing.assert_array_equal(want == 3, lab == 3)  # not chosen: kept as it was
    np.testing.assert_array_equal(want == 12, lab == 12)
    assert not np.array_equal(want == 7, lab == 7)


def test_propagate_the_labels_of_one_slice(cells, other_tool_labels, tiny_model):
    lab, _ = other_tool_labels
    seg = _seg(tiny_model, cells)
    res = propagate_labels(seg, lab, index=1, min_score=-1000.0, min_iou=0.0)
    out = res.labels
    assert set(res.results) == {3, 7}
    np.testing.assert_array_equal(out[1], lab[1])  # the seed slice is the user's
    np.testing.assert_array_equal(out[lab > 0], lab[lab > 0])  # never over existing labels
    seeds = [Seed(1, mask=lab[1] == k) for k in (3, 7)]
    direct = propagate_many(seg, seeds, min_score=-1000.0, min_iou=0.0)
    slices = propagated_slices([3, 7], direct, place=lambda z: (z,))
    assert slices and 1 not in {p[0] for p in slices}
    for (z,), values in slices.items():
        free = lab[z] == 0
        np.testing.assert_array_equal(out[z][free], values[free])
    with pytest.raises(ns.InvalidInputError, match="holds no label"):
        propagate_labels(seg, lab, index=0)


def test_labels_that_do_not_fit_the_image(cells, tiny_model):
    seg = _seg(tiny_model, cells)
    with pytest.raises(ns.InvalidInputError, match=r"expected \(5, 48, 56\)"):
        refine_labels(seg, np.zeros((5, 40, 56), np.uint16))
    with pytest.raises(ns.InvalidInputError, match="integers"):
        refine_labels(seg, np.zeros((5, 48, 56), np.float32))


def _cli(*args, **kw):
    return subprocess.run([NAPARI_SAM, *map(str, args)], capture_output=True, text=True, **kw)


def test_cli_refine_records_and_replays(cells, other_tool_labels, tiny_model, tiny_checkpoint,
                                        tmp_path):
    lab, labels_path = other_tool_labels
    out = tmp_path / "refined.ome.zarr"
    r = _cli("refine", labels_path, cells, "-o", out, "--checkpoint", tiny_checkpoint, "-q")
    assert r.returncode == 0, r.stderr
    assert "refine:" in r.stdout and "3 objects" in r.stdout
    got = np.asarray(open_labels(out)[0][...])
    want = refine_labels(_seg(tiny_model, cells), lab).labels
    np.testing.assert_array_equal(got, want)
    table = ns.read_provenance(out)
    assert sorted(table["label_id"]) == [3, 7, 12] and set(table["source"]) == {"refinement"}
    assert set(table["checkpoint_sha256"]) == {tiny_model.checkpoint_sha256}
    again = _cli("replay", out, "--checkpoint", tiny_checkpoint, "-o", tmp_path / "again.ome.zarr")
    assert again.returncode == 0, again.stderr
    assert "identical to the original" in again.stdout
    # the labels of slice 1 through Z, as a TIFF
    prop = tmp_path / "propagated.tif"
    r = _cli("refine", labels_path, cells, "-o", prop, "--propagate-from", 1, "--min-score",
             -1000, "--min-iou", 0, "--checkpoint", tiny_checkpoint, "-q")
    assert r.returncode == 0, r.stderr
    got = tifffile.imread(prop)
    want = propagate_labels(_seg(tiny_model, cells), lab, index=1, min_score=-1000.0,
                            min_iou=0.0, group_size=8).labels
    np.testing.assert_array_equal(got, want)
    assert set(ns.read_provenance(prop)["source"]) == {"propagation"}
    bad = _cli("refine", labels_path, cells, "-o", tmp_path / "x.tif", "--propagate-from", 0,
               "--checkpoint", tiny_checkpoint)
    assert bad.returncode == 2 and "holds no label to propagate" in bad.stderr


def test_cli_refine_resumes_after_kill(cells, other_tool_labels, tiny_checkpoint, tmp_path,
                                       kill_part_way):
    import os

    _, labels_path = other_tool_labels
    out = tmp_path / "refined.tif"
    args = [sys.executable, "-m", "napari_sam.cli", "refine", labels_path, cells, "-o", out,
            "--checkpoint", tiny_checkpoint, "-q"]
    done = kill_part_way(args, Path(str(out) + ".partial.zarr"), env=dict(os.environ), min_done=1)
    assert done == 1 and not out.exists()
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "2 units computed, 1 already done" in r.stdout
    whole = tmp_path / "whole.tif"
    assert _cli("refine", labels_path, cells, "-o", whole, "--checkpoint", tiny_checkpoint,
                "-q").returncode == 0
    np.testing.assert_array_equal(tifffile.imread(out), tifffile.imread(whole))


def test_cli_info_before_and_after_embed(cells, tiny_checkpoint, tmp_path):
    r = _cli("info", cells)
    assert r.returncode == 0, r.stderr
    assert "axes:           ZYX" in r.stdout and "slices:         5" in r.stdout
    assert "single channel" in r.stdout and "not there yet" in r.stdout
    store = tmp_path / "cells.embeddings.zarr"
    assert str(store) in r.stdout
    assert _cli("embed", cells, "--checkpoint", tiny_checkpoint, "-q").returncode == 0
    r = _cli("info", cells)
    assert "5 of 5 slices stored" in r.stdout and "not there yet" not in r.stdout
    # a multichannel stack: the channel SAM sees, and how to pick another
    cyx = np.random.default_rng(0).integers(0, 999, (3, 40, 50)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "three.tif", cyx, metadata={"axes": "CYX"}, photometric="minisblack")
    r = _cli("info", tmp_path / "three.tif", "--channel", 2)
    assert "2 of 3" in r.stdout and "a single 2D image" in r.stdout
    bad = _cli("info", tmp_path / "missing.tif")
    assert bad.returncode == 2 and "missing.tif" in bad.stderr


def test_refine_slice_on_an_empty_slice_changes_nothing(cells, tiny_model):
    seg = _seg(tiny_model, cells)
    new, rows = refine_slice(seg, 0, np.zeros((48, 56), np.uint16))
    assert rows == [] and not new.any()
