"""The napari-sam command, end to end on real files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

import napari_sam as ns
from napari_sam import cli
from napari_sam.io.prompt_files import read_prompts
from napari_sam.models.speed import reproducible, speed_config
from napari_sam.workflows import batch

BATCH_SPEED = reproducible(speed_config("cpu"))  # what batch jobs (and so the CLI) decode with


def _cmd(*args):
    return [sys.executable, "-m", "napari_sam.cli", *map(str, args)]


def test_help_and_version():
    out = subprocess.run(_cmd("--help"), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for sub in ("embed", "segment", "propagate", "auto"):
        assert sub in out.stdout
    out = subprocess.run(_cmd("--version"), capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == f"napari-sam {ns.__version__}"


@pytest.fixture
def stack3d(tmp_path):
    rng = np.random.default_rng(5)
    img = rng.normal(100, 5, (3, 40, 48))
    img[:, 8:24, 6:30] += 500
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, img.astype(np.uint16), metadata={"axes": "ZYX"}, photometric="minisblack")
    return path


def _napari_points_csv(path: Path, rows):
    """As napari writes a Points layer with a 'label' property: floats everywhere."""
    lines = ["index,axis-0,axis-1,axis-2,label"]
    lines += [f"{i},{z:.1f},{y:.1f},{x:.1f},{lab:.1f}" for i, (z, y, x, lab) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_segment_with_napari_points_csv(tiny_checkpoint, tiny_model, stack3d, tmp_path, capsys):
    csv = _napari_points_csv(tmp_path / "points.csv",
                             [(0, 15, 18, 1), (2, 30, 40, 1), (2, 12, 10, 0)])
    out = tmp_path / "out.ome.zarr"
    rc = cli.main(["segment", str(stack3d), "--prompts", str(csv), "--out", str(out),
                   "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "-q"])
    assert rc == 0
    assert "2 objects" in capsys.readouterr().out
    labels = np.asarray(zarr.open_array(out / "0")[:])
    assert not labels[1].any() and set(np.unique(labels[0]).tolist()) <= {0, 1}
    assert set(np.unique(labels[2]).tolist()) <= {0, 2}
    # the same masks as the engine gives for these prompts (negative point on slice 2)
    seg = ns.Segmenter(tiny_model, stack3d, speed=BATCH_SPEED)  # batch jobs decode in fp32
    m1 = seg.segment(0, points=[[15, 18]], point_labels=[1])
    m2 = seg.segment(2, points=[[30, 40], [12, 10]], point_labels=[1, 0], multimask=False)
    np.testing.assert_array_equal(labels[0] == 1, m1)
    np.testing.assert_array_equal(labels[2] == 2, m2)


def test_prompt_conventions(stack3d, tmp_path):
    st = ns.open_stack(stack3d)
    pts = tmp_path / "p.csv"
    pts.write_text("index,axis-0,axis-1,axis-2,object,positive\n"
                   "0,1.0,5.0,6.0,b,True\n1,1.0,7.0,8.0,b,False\n2,0.0,3.0,4.0,a,True\n")
    shp = tmp_path / "s.csv"
    shp.write_text("index,shape-type,vertex-index,axis-0,axis-1,axis-2\n"
                   + "".join(f"0,rectangle,{v},2.0,{y},{x}\n"
                             for v, (y, x) in enumerate([(4, 5), (4, 20), (15, 20), (15, 5)])))
    objs = read_prompts([pts, shp], st)
    assert [o.index for o in objs] == [1, 0, 2]
    np.testing.assert_array_equal(objs[0].points, [[5, 6], [7, 8]])
    np.testing.assert_array_equal(objs[0].point_labels, [1, 0])
    np.testing.assert_array_equal(objs[2].box, [4, 5, 15, 20])
    bad = tmp_path / "bad.csv"
    bad.write_text("index,axis-0,axis-1\n0,3.0,4.0\n")
    with pytest.raises(ns.InvalidInputError, match="needs 3"):
        read_prompts(bad, st)


def test_user_errors_exit_2_with_one_line(tiny_checkpoint, stack3d, tmp_path):
    out = subprocess.run(_cmd("segment", tmp_path / "nope.tif", "--prompts", tmp_path / "p.csv",
                              "--out", tmp_path / "o.tif", "--checkpoint", tiny_checkpoint),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("napari-sam: error:")


def test_kill_and_resume(tiny_checkpoint, tiny_model, tmp_path, kill_part_way):
    n = 6
    rng = np.random.default_rng(2)
    img = (rng.normal(100, 5, (n, 32, 32)) + 300 * (np.indices((32, 32))[0] > 16)).astype(np.uint16)
    stack = tmp_path / "vol.tif"
    tifffile.imwrite(stack, img, metadata={"axes": "ZYX"}, photometric="minisblack")
    csv = _napari_points_csv(tmp_path / "p.csv", [(z, 20, 10 + z, 1) for z in range(n)])
    out = tmp_path / "vol_labels.zarr"
    work = Path(str(out) + ".partial.zarr")
    args = _cmd("segment", stack, "--prompts", csv, "--out", out, "--checkpoint", tiny_checkpoint,
                "--device", "cpu", "-q")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    finished = kill_part_way(args, work, env=env)
    assert 2 <= finished < n, "the job should have been killed part way"
    again = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr
    m = re.search(r"(\d+) units computed, (\d+) already done, (\d+) slices encoded", again.stdout)
    assert m and (int(m[1]), int(m[2]), int(m[3])) == (n - finished, finished, n - finished)
    assert not work.exists()
    ref = batch.segment_prompts(stack, csv, tmp_path / "ref.zarr", model=tiny_model)
    np.testing.assert_array_equal(zarr.open_array(out / "0")[:], zarr.open_array(ref.out / "0")[:])


def test_sample_demo_without_stack(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "demo" / "sample_labels.tif"
    rc = cli.main(["segment", "--out", str(out), "--checkpoint", str(tiny_checkpoint),
                   "--sample-shape", "3,48,48", "--sample-nuclei", "2", "-q"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "mean IoU vs ground truth" in text and "real SAM weights" in text
    for name in ("napari_sam_sample.tif", "napari_sam_sample_truth.tif", "sample_labels.tif"):
        assert (out.parent / name).exists()


def test_folder_of_images(tiny_checkpoint, tiny_model, stack3d, tmp_path):
    """A folder as STACK: one output per image, prompts from <name>.csv; no CSV -> skipped."""
    src = tmp_path / "images"
    src.mkdir()
    data = tifffile.imread(stack3d)
    tifffile.imwrite(src / "a.tif", data, metadata={"axes": "ZYX"}, photometric="minisblack")
    tifffile.imwrite(src / "b.tif", data[::-1].copy(), metadata={"axes": "ZYX"}, photometric="minisblack")
    tifffile.imwrite(src / "c.tif", data, metadata={"axes": "ZYX"}, photometric="minisblack")
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    _napari_points_csv(prompts / "a.csv", [(1, 15, 18, 1)])
    _napari_points_csv(prompts / "b.csv", [(2, 30, 40, 1)])
    out = tmp_path / "labels"
    rc = cli.main(["segment", str(src), "--prompts", str(prompts), "--out", str(out),
                   "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "-q"])
    assert rc == 0
    outputs = sorted(p.name for p in out.iterdir())
    assert any(n.startswith("a.") for n in outputs) and any(n.startswith("b.") for n in outputs)
    assert not any(n.startswith("c.") for n in outputs)
    for name, (z, y, x) in (("a", (1, 15, 18)), ("b", (2, 30, 40))):
        path = next(out.glob(f"{name}.*"))
        labels = np.asarray(ns.open_stack(path).data)
        stack = ns.open_stack(src / f"{name}.tif")
        expected = ns.Segmenter(tiny_model, stack, speed=BATCH_SPEED).segment(z, points=[[y, x]])
        np.testing.assert_array_equal(labels[z] == 1, expected)
        assert not np.delete(labels, z, axis=0).any()


def test_segment_tiles_large_slices(tiny_checkpoint, tiny_model, tmp_path):
    """Slices longer than --tile-above px are segmented on full-resolution tiles."""
    rng = np.random.default_rng(9)
    img = rng.normal(100, 5, (1, 1400, 1300))
    img[0, 200:240, 900:950] += 900
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, img.astype(np.uint16), metadata={"axes": "ZYX"}, photometric="minisblack")
    csv = _napari_points_csv(tmp_path / "p.csv", [(0, 220, 925, 1), (0, 1300, 100, 1)])
    out = tmp_path / "big_labels.tif"
    installed = str(Path(sys.executable).with_name("napari-sam"))
    done = subprocess.run([installed, "segment", str(path), "--prompts", str(csv), "--out", str(out),
                           "--checkpoint", str(tiny_checkpoint), "--device", "cpu",
                           "--tile-above", "1024", "-q"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    labels = tifffile.imread(out)
    seg = ns.TiledSegmenter(tiny_model, ns.open_stack(path), speed=BATCH_SPEED)
    a = seg.segment(0, points=[[220, 925]])
    b = seg.segment(0, points=[[1300, 100]])
    assert a.any() and b.any()
    expected = np.where(a, 1, np.where(b, 2, 0))
    np.testing.assert_array_equal(labels.reshape(expected.shape), expected)
    # whole slices when asked: the job's signature differs, so the output is not reused
    out2 = tmp_path / "whole.tif"
    done = subprocess.run([installed, "segment", str(path), "--prompts", str(csv), "--out", str(out2),
                           "--checkpoint", str(tiny_checkpoint), "--device", "cpu",
                           "--tile-above", "0", "-q"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    whole = ns.Segmenter(tiny_model, ns.open_stack(path), speed=BATCH_SPEED)
    np.testing.assert_array_equal(tifffile.imread(out2).reshape(expected.shape) == 1,
                                  whole.segment(0, points=[[220, 925]]))


def test_channel_and_axes_options(tiny_checkpoint, tiny_model, tmp_path):
    """--channel picks what SAM sees; without it the command says it uses channel 0."""
    rng = np.random.default_rng(4)
    img = rng.normal(100, 5, (3, 2, 40, 48)).astype(np.float32)  # Z, C, Y, X
    img[:, 1, 10:30, 12:36] += 800  # the object is bright in channel 1 only
    path = tmp_path / "two.tif"
    tifffile.imwrite(path, img.astype(np.uint16), metadata={"axes": "ZCYX"}, imagej=True)
    csv = _napari_points_csv(tmp_path / "p.csv", [(1, 20, 24, 1)])
    installed = str(Path(sys.executable).with_name("napari-sam"))
    common = ["--prompts", str(csv), "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "-q"]
    one = subprocess.run([installed, "segment", str(path), "--out", str(tmp_path / "c1.tif"),
                          "--channel", "1", *common], capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    assert "channel 0" not in one.stderr
    zero = subprocess.run([installed, "segment", str(path), "--out", str(tmp_path / "c0.tif"), *common],
                          capture_output=True, text=True, timeout=600)
    assert zero.returncode == 0 and "has 2 channels" in zero.stderr and "--channel" in zero.stderr
    for name, channel in (("c1.tif", 1), ("c0.tif", 0)):
        seg = ns.Segmenter(tiny_model, ns.open_stack(path, channel=channel), speed=BATCH_SPEED)
        expected = seg.segment(1, points=[[20, 24]])
        got = tifffile.imread(tmp_path / name).reshape(3, 40, 48)
        np.testing.assert_array_equal(got[1] == 1, expected)
    c1 = tifffile.imread(tmp_path / "c1.tif").reshape(3, 40, 48)
    c0 = tifffile.imread(tmp_path / "c0.tif").reshape(3, 40, 48)
    assert not np.array_equal(c1, c0)
    # --axes overrides the metadata: the same file read as T, Z (2 slices per time point)
    bad = subprocess.run([installed, "segment", str(path), "--out", str(tmp_path / "x.tif"),
                          "--axes", "ZYX", *common], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "axes" in bad.stderr and bad.stderr.count("\n") <= 1
