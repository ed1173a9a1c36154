"""npe2 manifest, reader and writer of the napari plugin (no viewer needed, except one)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from napari_sam._napari.reader import get_reader
from napari_sam._napari.writer import LabelsWriteError, write_labels


def _labels():
    rng = np.random.default_rng(0)
    return rng.integers(0, 70000, (4, 32, 48)).astype(np.uint32)


def test_npe2_validate():
    proc = subprocess.run([sys.executable, "-m", "npe2", "validate", "napari-sam"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "valid" in proc.stdout


def test_manifest_contributions():
    from npe2 import PluginManifest

    mf = PluginManifest.from_distribution("napari-sam")
    contrib = mf.contributions
    assert [w.display_name for w in contrib.widgets] == ["Segment Anything"]
    assert contrib.readers and contrib.writers and contrib.sample_data
    assert set(contrib.writers[0].filename_extensions) == {".tif", ".tiff", ".zarr"}


def test_reader_tiff_is_lazy_with_scale(tmp_path):
    import tifffile

    img = np.arange(5 * 20 * 30, dtype=np.uint16).reshape(5, 20, 30)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, img, imagej=True, resolution=(1 / 0.5, 1 / 0.5),
                     metadata={"spacing": 2.0, "unit": "um", "axes": "ZYX"})
    reader = get_reader(str(path))
    assert reader is not None
    [(data, kwargs, kind)] = reader(str(path))
    assert kind == "image"
    assert not isinstance(data, np.ndarray)  # lazy (zarr over tifffile's page store)
    np.testing.assert_array_equal(np.asarray(data[2]), img[2])
    assert kwargs["scale"] == pytest.approx((2.0, 0.5, 0.5))
    assert kwargs["axis_labels"] == ("z", "y", "x")
    assert kwargs["name"] == "stack"


def test_reader_channel_axis(tmp_path):
    import tifffile

    img = np.zeros((3, 2, 20, 30), np.uint16)  # Z C Y X (ImageJ order)
    path = tmp_path / "chan.tif"
    tifffile.imwrite(path, img, imagej=True, metadata={"axes": "ZCYX"})
    [(_, kwargs, _)] = get_reader(str(path))(str(path))
    assert kwargs["channel_axis"] == 1
    assert len(kwargs["scale"]) == 3 and kwargs["axis_labels"] == ("z", "y", "x")


def test_reader_declines_what_it_cannot_read(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff")
    assert get_reader(str(bad)) is None
    assert get_reader(str(tmp_path / "missing.tif")) is None
    txt = tmp_path / "a.txt"
    txt.write_text("x")
    assert get_reader(str(txt)) is None
    assert get_reader([str(bad), str(txt)]) is None


@pytest.mark.parametrize("ext", [".tif", ".zarr"])
def test_writer_reader_round_trip(tmp_path, ext):
    labels = _labels()
    path = str(tmp_path / f"labels{ext}")
    meta = {"scale": (4.0, 0.5, 0.25), "translate": (0.0, 0.0, 0.0), "name": "seg"}
    assert write_labels(path, labels, meta) == [path]
    [(data, kwargs, kind)] = get_reader(path)(path)
    np.testing.assert_array_equal(np.asarray(data), labels)
    assert np.asarray(data).dtype == np.uint32
    assert kwargs["scale"] == pytest.approx(meta["scale"])
    if ext == ".zarr":
        assert kind == "labels"  # our labels folder opens as labels
        assert not isinstance(data, np.ndarray)


def test_zarr_writer_keeps_translate_and_overwrites_only_labels(tmp_path):
    import zarr

    labels = _labels()
    path = str(tmp_path / "seg.zarr")
    write_labels(path, labels, {"scale": (2, 1, 1), "translate": (5, 6, 7)})
    [(_, kwargs, _)] = get_reader(path)(path)
    assert kwargs["translate"] == (5, 6, 7)
    # a labels folder written here may be replaced (napari's dialog asked)
    write_labels(path, labels[:, :16], {"scale": (2, 1, 1)})
    [(data, _, _)] = get_reader(path)(path)
    assert data.shape == (4, 16, 48)
    # an image zarr (or an embedding store) is never overwritten
    image = str(tmp_path / "image.zarr")
    zarr.create_array(image, shape=(4, 8, 8), dtype="uint16")
    with pytest.raises(LabelsWriteError, match="refusing"):
        write_labels(image, labels, {})
    assert zarr.open_array(image, mode="r").shape == (4, 8, 8)
    with pytest.raises(LabelsWriteError, match="use .tif"):
        write_labels(str(tmp_path / "x.png"), labels, {})


def test_reader_ome_zarr_image(tmp_path):
    import zarr

    path = str(tmp_path / "img.ome.zarr")
    g = zarr.open_group(path, mode="w", zarr_format=2)
    g.create_array("0", shape=(3, 16, 16), dtype="uint8", chunks=(1, 16, 16))
    g.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": n, "type": "space"} for n in "zyx"], "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [3, 2, 2]}]}]}]
    [(data, kwargs, kind)] = get_reader(path)(path)
    assert kind == "image" and data.shape == (3, 16, 16)
    assert kwargs["scale"] == pytest.approx((3, 2, 2))


@pytest.mark.gui
def test_viewer_opens_and_saves_through_the_plugin(make_napari_viewer, tmp_path):
    import tifffile

    img = np.arange(3 * 16 * 16, dtype=np.uint16).reshape(3, 16, 16)
    path = tmp_path / "v.tif"
    tifffile.imwrite(path, img, imagej=True, metadata={"spacing": 3.0, "axes": "ZYX"})
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(path), plugin="napari-sam")
    assert tuple(layer.scale) == pytest.approx((3.0, 1.0, 1.0))
    lab = viewer.add_labels(np.ones((3, 16, 16), np.uint16), scale=layer.scale)
    out = str(tmp_path / "saved.zarr")
    lab.save(out, plugin="napari-sam")
    [(_, kwargs, kind)] = get_reader(out)(out)
    assert kind == "labels" and kwargs["scale"] == pytest.approx((3.0, 1.0, 1.0))
