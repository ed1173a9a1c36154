"""Labels that every tool reads: one writer (batch jobs, the widget, napari's save), NGFF
metadata checked by ome-zarr-models and read by ome-zarr-py, scale and translation kept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

import napari_sam as ns
from napari_sam.io.labels_files import is_labels, open_labels, read_record

NAPARI_SAM = str(Path(sys.executable).with_name("napari-sam"))
SCALE, TRANSLATE = (2.0, 0.5, 0.25), (10.0, -4.0, 3.0)


@pytest.fixture
def ome_image(tmp_path):
    """A (Z, Y, X) OME-Zarr image written by ome-zarr-py, with scale and translation."""
    from ome_zarr.io import parse_url
    from ome_zarr.writer import write_multiscale

    rng = np.random.default_rng(0)
    img = rng.normal(100, 5, (3, 48, 56)).astype(np.uint16)
    img[:, 10:30, 12:40] += 600
    path = tmp_path / "cells.ome.zarr"
    root = zarr.open_group(parse_url(path, mode="w").store, mode="w", zarr_format=2)
    write_multiscale([img], root, axes="zyx",
                     coordinate_transformations=[[{"type": "scale", "scale": list(SCALE)},
                                                  {"type": "translation",
                                                   "translation": list(TRANSLATE)}]])
    return path, img


def _points_csv(path, rows):
    lines = ["index,axis-0,axis-1,axis-2"] + [f"{i},{z},{y},{x}" for i, (z, y, x) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _ome_zarr_sees_labels(path) -> bool:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    nodes = list(Reader(parse_url(str(path)))())
    return any(isinstance(spec, Label) for node in nodes for spec in node.specs)


def test_translation_of_an_ome_zarr_image_is_read(ome_image):
    path, img = ome_image
    stack = ns.open_stack(path)
    assert stack.scale == SCALE and stack.translate == TRANSLATE
    from napari_sam._napari.reader import layer_data

    [(data, kwargs, kind)] = layer_data(str(path))
    assert kind == "image" and kwargs["translate"] == TRANSLATE and kwargs["scale"] == SCALE


def test_batch_labels_into_the_image_follow_ngff(ome_image, tmp_path, tiny_checkpoint):
    path, img = ome_image
    csv = _points_csv(tmp_path / "p.csv", [(1, 20, 25)])
    done = subprocess.run([NAPARI_SAM, "segment", str(path), "--prompts", str(csv), "--out", str(path),
                           "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "-q"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    labels = path / "labels" / "napari-sam"
    assert zarr.open_group(path / "labels", mode="r").attrs["labels"] == ["napari-sam"]
    # validated by ome-zarr-models and recognised as labels by ome-zarr-py
    from ome_zarr_models.v04.image_label import ImageLabel

    ImageLabel.from_zarr(zarr.open_group(labels, mode="r"))
    assert _ome_zarr_sees_labels(labels)
    data, meta = open_labels(labels)
    assert data.shape == img.shape and meta["scale"] == SCALE and meta["translate"] == TRANSLATE
    assert read_record(labels)["complete"] is True
    # the plugin's reader: the image, then its labels
    from napari_sam._napari.reader import layer_data

    layers = layer_data(str(path))
    assert [k for _, _, k in layers] == ["image", "labels"]
    assert layers[1][1]["translate"] == TRANSLATE and layers[1][1]["name"] == "napari-sam"


def test_batch_ome_zarr_and_tiff_outputs_open_as_labels(ome_image, tmp_path, tiny_checkpoint,
                                                      make_napari_viewer):
    path, img = ome_image
    csv = _points_csv(tmp_path / "p.csv", [(1, 20, 25), (2, 15, 15)])
    for out in (tmp_path / "out.ome.zarr", tmp_path / "out.tif"):
        done = subprocess.run([NAPARI_SAM, "segment", str(path), "--prompts", str(csv), "--out",
                               str(out), "--checkpoint", str(tiny_checkpoint), "--device", "cpu",
                               "-q"], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert is_labels(out)
    assert _ome_zarr_sees_labels(tmp_path / "out.ome.zarr")
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:  # OME-TIFF with physical sizes
        assert tif.is_ome and 'PhysicalSizeX="0.25"' in tif.ome_metadata
    viewer = make_napari_viewer()
    for out in (tmp_path / "out.ome.zarr", tmp_path / "out.tif"):
        [layer] = viewer.open(str(out), plugin="napari-sam")
        assert type(layer).__name__ == "Labels"
        assert tuple(layer.scale) == SCALE and tuple(layer.translate) == TRANSLATE
    a, b = (np.asarray(viewer.layers[i].data) for i in (0, 1))
    np.testing.assert_array_equal(a, b.reshape(a.shape))
    assert set(np.unique(a)) <= {0, 1, 2} and a.max() >= 1


def test_napari_save_uses_the_same_writer(make_napari_viewer, tmp_path, ome_image):
    viewer = make_napari_viewer()
    data = np.zeros((3, 48, 56), np.uint32)
    data[1, 5:9, 5:9] = 70000
    layer = viewer.add_labels(data, name="mine", scale=SCALE, translate=TRANSLATE)
    for name in ("saved.zarr", "saved.tif"):
        layer.save(str(tmp_path / name), plugin="napari-sam")
        back, meta = open_labels(tmp_path / name)
        np.testing.assert_array_equal(np.asarray(back).reshape(data.shape), data)
        assert tuple(meta["scale"]) == SCALE and tuple(meta["translate"]) == TRANSLATE
    assert _ome_zarr_sees_labels(tmp_path / "saved.zarr")
    assert read_record(tmp_path / "saved.zarr")["max_id"] == 70000
    # into an OME-Zarr image: its labels group, named after the layer
    path, _ = ome_image
    layer.save(str(path), plugin="napari-sam")
    assert (path / "labels" / "mine" / "0").is_dir()
    assert "mine" in zarr.open_group(path / "labels", mode="r").attrs["labels"]
    # a folder that is neither an image nor our labels is never written over
    store = tmp_path / "x.embeddings.zarr"
    zarr.open_group(store, mode="w").attrs["napari_sam"] = {"kind": "embedding-store"}
    from napari_sam._napari.writer import LabelsWriteError, write_labels

    with pytest.raises(LabelsWriteError, match="refusing to overwrite"):
        write_labels(str(store), data, {"scale": SCALE})
