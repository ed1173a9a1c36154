"""Batch jobs: outputs, resumption, overwrite rules, and dask == local."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

import napari_sam as ns
from napari_sam.io.prompt_files import ObjectPrompt
from napari_sam.workflows import batch


@pytest.fixture(scope="module")
def stack_path(tmp_path_factory):
    rng = np.random.default_rng(3)
    img = rng.normal(100, 5, (4, 48, 56))
    img[:, 10:26, 8:30] += 500
    img[1:, 30:44, 34:50] += 300
    path = tmp_path_factory.mktemp("batch") / "stack.ome.tif"
    tifffile.imwrite(path, img.astype(np.uint16), ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeZ": 2.0, "PhysicalSizeY": 0.5,
                               "PhysicalSizeX": 0.5})
    return path


OBJECTS = [
    ObjectPrompt(1, np.array([[18.0, 18.0]]), np.array([1])),
    ObjectPrompt(1, box=np.array([30.0, 34.0, 44.0, 50.0])),
    ObjectPrompt(3, np.array([[36.0, 40.0], [18.0, 18.0]]), np.array([1, 0])),
]


def _direct(tiny_model, path, objects):
    """What segment_prompts must produce, computed with the plain engine (batch jobs decode
    in float32: ``fast.reproducible``)."""
    from napari_sam.models.speed import reproducible, speed_config

    seg = ns.Segmenter(tiny_model, path, speed=reproducible(speed_config("cpu")))
    labels = np.zeros(seg.stack.shape, np.uint32)
    for k, o in enumerate(objects, start=1):
        kw = {}
        if len(o.points):
            kw.update(points=o.points, point_labels=o.point_labels)
        if o.box is not None:
            kw["box"] = o.box
        mask = seg.predict(o.index, multimask=len(o.points) == 1 and o.box is None, **kw).mask
        labels[o.index][mask & (labels[o.index] == 0)] = k
    return labels


def test_segment_zarr_output_matches_engine_and_resumes(tiny_model, stack_path, tmp_path):
    out = tmp_path / "labels.ome.zarr"
    res = batch.segment_prompts(stack_path, OBJECTS, out, model=tiny_model)
    assert res.computed == 2 and res.n_objects == 3
    assert not (tmp_path / "labels.ome.zarr.partial.zarr").exists()
    lab = ns.open_stack(out)                     # OME-Zarr labels with the input's axes/scale
    assert lab.axes == "ZYX" and lab.scale == (2.0, 0.5, 0.5)
    assert zarr.open_array(out / "0").chunks == (1, 48, 56)
    got = np.asarray(lab.data)
    # batched decoding of the two objects on slice 1 vs one at a time: equal up to float noise
    want = _direct(tiny_model, stack_path, OBJECTS)
    assert np.mean(got != want) < 1e-3
    assert not got[[0, 2]].any()

    again = batch.segment_prompts(stack_path, OBJECTS, out, model=tiny_model)
    assert again.computed == 0 and again.encoder_calls == 0     # complete: nothing redone

    # interrupted after the first slice: the rerun does only the rest, same result
    out2 = tmp_path / "interrupted.zarr"

    def boom(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        batch.segment_prompts(stack_path, OBJECTS, out2, model=tiny_model, progress=boom)
    resumed = batch.segment_prompts(stack_path, OBJECTS, out2, model=tiny_model)
    assert (resumed.resumed, resumed.computed) == (1, 1)
    np.testing.assert_array_equal(np.asarray(zarr.open_array(out2 / "0")[:]), got)


def test_outputs_are_never_silently_overwritten(tiny_model, stack_path, tmp_path):
    out = tmp_path / "labels.zarr"
    batch.segment_prompts(stack_path, OBJECTS[:1], out, model=tiny_model)
    with pytest.raises(batch.OutputExistsError, match="different napari-sam job"):
        batch.segment_prompts(stack_path, OBJECTS[1:], out, model=tiny_model)
    batch.segment_prompts(stack_path, OBJECTS[1:], out, model=tiny_model, overwrite=True)
    assert set(np.unique(zarr.open_array(out / "0")[:]).tolist()) <= {0, 1, 2}
    foreign = tmp_path / "mine.zarr"
    zarr.open_group(foreign, mode="w").create_array("x", shape=(2,), dtype="u1")
    with pytest.raises(batch.OutputExistsError, match="not written by napari-sam"):
        batch.segment_prompts(stack_path, OBJECTS, foreign, model=tiny_model)
    tif = tmp_path / "theirs.tif"
    tifffile.imwrite(tif, np.zeros((2, 2), np.uint8))
    with pytest.raises(batch.OutputExistsError):
        batch.segment_prompts(stack_path, OBJECTS, tif, model=tiny_model)
    with pytest.raises(ns.InvalidInputError, match="extension"):
        batch.segment_prompts(stack_path, OBJECTS, tmp_path / "x.png", model=tiny_model)


def test_tiff_output_via_sidecar(tiny_model, stack_path, tmp_path):
    out = tmp_path / "labels.tif"
    batch.segment_prompts(stack_path, OBJECTS, out, model=tiny_model)
    assert not (tmp_path / "labels.tif.partial.zarr").exists()
    with tifffile.TiffFile(out) as tif:
        assert tif.series[0].axes == "ZYX" and tif.series[0].shape == (4, 48, 56)
        data = tif.asarray()
    ref = batch.segment_prompts(stack_path, OBJECTS, tmp_path / "ref.zarr", model=tiny_model)
    np.testing.assert_array_equal(data, np.asarray(zarr.open_array(ref.out / "0")[:]))
    # the finished TIFF is recognised: a rerun does nothing instead of refusing
    assert batch.segment_prompts(stack_path, OBJECTS, out, model=tiny_model).computed == 0


def test_dask_cluster_equals_local(tiny_model, stack_path, tmp_path):
    distributed = pytest.importorskip("distributed")
    jobs = {
        "segment": lambda out, **kw: batch.segment_prompts(stack_path, OBJECTS, out, **kw),
        "propagate": lambda out, **kw: batch.propagate_prompts(
            stack_path, OBJECTS, out, min_score=-1e9, min_iou=0.0, group_size=2, **kw),
        "auto": lambda out, **kw: batch.auto_segment(
            stack_path, out, points_per_side=3, pred_iou_thresh=-1e9, stability_score_thresh=0.0,
            max_area_fraction=1.0, **kw),
    }
    local = {}
    for name, run in jobs.items():
        res = run(tmp_path / f"local_{name}.zarr", model=tiny_model)
        local[name] = np.asarray(zarr.open_array(res.out / "0")[:])
    assert local["propagate"].any() and local["auto"].any()
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        for name, run in jobs.items():
            res = run(tmp_path / f"dask_{name}.zarr", checkpoint=tiny_model.checkpoint_path,
                      device="cpu", client=client)
            np.testing.assert_array_equal(np.asarray(zarr.open_array(res.out / "0")[:]), local[name],
                                          err_msg=name)
