"""Tests for napari_sam.stacks: real TIFF / zarr / OME-Zarr files written in tmp_path."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from numpy.testing import assert_array_equal

from napari_sam import StackError
from napari_sam.io.stacks import Stack, infer_axes, open_stack

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    return Path(os.environ.get("NAPARI_SAM_TEST_DATA", REPO.parent / "shared" / "data"))


def _ramp(shape, dtype=np.uint16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 1000, size=shape).astype(dtype)


# ------------------------------------------------------------------ axes inference


@pytest.mark.parametrize(
    "shape, axes",
    [
        ((64, 48), "YX"),
        ((64, 48, 3), "YXC"),
        ((64, 48, 4), "YXC"),
        ((5, 64, 48), "ZYX"),
        ((3, 64, 48), "ZYX"),  # small first dim is still Z (documented)
        ((5, 64, 48, 3), "ZYXC"),
        ((5, 2, 64, 48), "ZCYX"),
        ((5, 6, 64, 48), "TZYX"),
        ((2, 5, 3, 64, 48), "TZCYX"),
        ((2, 5, 64, 48, 3), "TZYXC"),
    ],
)
def test_infer_axes(shape, axes):
    assert infer_axes(shape) == axes


@pytest.mark.parametrize("shape", [(10,), (), (1, 2, 3, 4, 5, 6)])
def test_infer_axes_rejects(shape):
    with pytest.raises(StackError, match="axes|dimensions"):
        infer_axes(shape)


def test_numpy_zyx_slices_and_positions():
    a = _ramp((4, 20, 30))
    s = open_stack(a)
    assert (s.axes, s.shape, s.dtype, len(s), s.source) == ("ZYX", a.shape, a.dtype, 4, "numpy")
    assert s.slice_axes == "Z" and s.slice_shape == (20, 30) and s.channel is None
    assert not s.rgb_input and s.scale == (1.0, 1.0, 1.0) and s.units == (None,) * 3
    for i in range(4):
        assert_array_equal(s[i], a[i])
    assert_array_equal(s[-1], a[3])
    assert not np.shares_memory(s[0], a)  # a copy, not a view of the caller's array
    with pytest.raises(IndexError, match="len 4"):
        s[4]
    with pytest.raises(IndexError, match="len 4"):
        s[-5]
    r = repr(s)
    for part in ("numpy", "ZYX", "(4, 20, 30)", "uint16", "len=4"):
        assert part in r


def test_position_index_round_trip():
    a = np.zeros((2, 3, 2, 8, 9), np.uint8)
    s = open_stack(a, axes="TZCYX", channel=1)
    assert s.slice_axes == "TZ" and len(s) == 6
    seen = set()
    for i in range(len(s)):
        p = s.position(i)
        assert s.index(p) == i
        seen.add(p)
    assert seen == {(t, z) for t in range(2) for z in range(3)}
    assert s.position(4) == (1, 1)
    assert s.position(-1) == (1, 2)
    with pytest.raises(IndexError):
        s.index((2, 0))
    yx = open_stack(np.zeros((5, 6)))
    assert len(yx) == 1 and yx.slice_axes == "" and yx.position(0) == () and yx.index(()) == 0


def test_axes_override_and_errors():
    a = _ramp((3, 20, 30))
    s = open_stack(a, axes="cyx")
    assert s.axes == "CYX" and len(s) == 1 and s.channel == 0
    assert_array_equal(s[0], a[0])
    # X before Y: slices come back as (Y, X)
    t = open_stack(a, axes="ZXY")
    assert t.slice_shape == (30, 20)
    assert_array_equal(t[1], a[1].T)
    for bad in ("ZY", "ZYY", "ZXC", "Z1X", "ZYXC"):
        with pytest.raises(StackError, match=r"\(3, 20, 30\)") as info:
            open_stack(a, axes=bad)
        assert repr(bad) in str(info.value)
    with pytest.raises(StackError, match="pass axes="):
        open_stack(np.zeros((1, 1, 1, 1, 2, 5, 5)))
    with pytest.raises(StackError, match="at least 2"):
        open_stack(np.zeros(10))
    with pytest.raises(StackError, match="empty"):
        open_stack(np.zeros((3, 0, 5)))
    with pytest.raises(StackError, match="dtype"):
        open_stack(np.zeros((4, 4), complex))


# ------------------------------------------------------------------ channels


def test_channel_choice_reads_exactly_that_channel():
    a = _ramp((2, 4, 20, 30))  # ZCYX
    s = open_stack(a)
    assert s.axes == "ZCYX" and s.channel == 0 and not s.rgb_input
    for c in range(4):
        sc = open_stack(a, channel=c)
        assert sc.channel == c and len(sc) == 2
        for z in range(2):
            assert_array_equal(sc[z], a[z, c])
    rgb = open_stack(a, channel=(3, 1, 2))
    assert rgb.rgb_input and rgb.channel == (3, 1, 2)
    assert_array_equal(rgb[1], np.moveaxis(a[1, [3, 1, 2]], 0, -1))
    assert open_stack(a, channel=-1).channel == 3
    assert open_stack(a, channel=[2]).channel == 2
    for bad in (4, -5, (0, 1), (0, 1, 9), "r", True):
        with pytest.raises(StackError, match="4 channels"):
            open_stack(a, channel=bad)
    with pytest.raises(StackError, match="no C axis"):
        open_stack(a[:, 0], channel=0)


def test_rgb_defaults():
    rgba = _ramp((20, 30, 4), np.uint8)
    s = open_stack(rgba)
    assert s.axes == "YXC" and s.rgb_input and s.channel == (0, 1, 2)
    assert_array_equal(s[0], rgba[..., :3])  # alpha dropped
    assert s.contrast_limits is None and s.normalisation()["method"] == "passthrough"
    out = s.rgb(0)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    assert_array_equal(out, rgba[..., :3])
    # uint8 channel-first C of 3: RGB; uint16 C of 3 not last: channel 0
    assert open_stack(np.zeros((3, 8, 8), np.uint8), axes="CYX").rgb_input
    assert open_stack(np.zeros((3, 8, 8), np.uint16), axes="CYX").channel == 0
    # 16-bit RGB is normalised jointly
    s16 = open_stack(_ramp((20, 30, 3)))
    assert s16.rgb_input and s16.rgb(0).shape == (20, 30, 3)


# ------------------------------------------------------------------ normalisation


def test_contrast_limits_shared_and_overridable():
    a = np.stack([np.full((16, 16), v, np.uint16) for v in range(0, 1000, 100)])
    a[:, 0, 0] = 5000
    s = open_stack(a)
    lims = s.contrast_limits
    assert lims is not None and lims[0] < lims[1]
    assert s.contrast_limits is lims  # computed once
    assert all(s.contrast_limits == lims for _ in range(len(s)))
    imgs = [s.rgb(i) for i in range(len(s))]
    # the same value maps to the same output on every slice
    assert len({int(img[0, 0, 0]) for img in imgs}) == 1
    assert s.normalisation() == {
        "method": "percentile", "contrast_limits": list(lims), "percentiles": [1.0, 99.8],
        "channel": None, "rgb_input": False, "version": 1,
    }
    json.dumps(s.normalisation())
    f = open_stack(a, contrast_limits=(100, 300))
    assert f.contrast_limits == (100.0, 300.0)
    assert f.normalisation()["method"] == "fixed"
    assert_array_equal(f.rgb(2)[..., 0][1:, 1:], np.full((15, 15), 128, np.uint8))
    assert f.rgb(0)[1, 1, 0] == 0 and f.rgb(9)[1, 1, 0] == 255
    # reopening a stack with new options
    g = open_stack(s, contrast_limits=(0, 10))
    assert g.contrast_limits == (0.0, 10.0) and s.contrast_limits == lims
    assert open_stack(s) is s
    p = open_stack(a, percentiles=(0, 100))
    assert p.contrast_limits == (0.0, 5000.0)
    with pytest.raises(StackError, match="contrast_limits"):
        open_stack(a, contrast_limits=(5, 1))
    with pytest.raises(StackError, match="percentiles"):
        open_stack(a, percentiles=(50, 10))


def test_rgb_formula():
    a = np.array([[0, 50, 100, 150, 200]], np.float32)
    out = open_stack(a, contrast_limits=(50, 150)).rgb(0)
    expected = np.rint(np.clip((a - 50) / 100, 0, 1) * 255).astype(np.uint8)
    assert out.shape == (1, 5, 3)
    for c in range(3):
        assert_array_equal(out[..., c], expected)


def test_nan_inf_constant_bool():
    a = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    a[0, :3] = [np.nan, np.inf, -np.inf]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = open_stack(a)
        lo, hi = s.contrast_limits
        assert np.isfinite(lo) and np.isfinite(hi) and lo < hi
        out = s.rgb(0)[..., 0]
        assert out[0, 0] == 0 and out[0, 1] == 255 and out[0, 2] == 0
        const = open_stack(np.full((3, 8, 8), 7.0))
        assert const.contrast_limits == (7.0, 7.0)
        assert_array_equal(const.rgb(1), np.zeros((8, 8, 3), np.uint8))
        allnan = open_stack(np.full((8, 8), np.nan))
        assert_array_equal(allnan.rgb(0), 0)
        b = np.zeros((8, 8), bool)
        b[2:4, 3] = True
        bs = open_stack(b)
        assert bs.contrast_limits == (0.0, 1.0)
        assert_array_equal(bs.rgb(0)[..., 1], b.astype(np.uint8) * 255)
        # sparse image: equal percentiles fall back to min / max
        sp = np.zeros((100, 100), np.uint16)
        sp[5, 5] = 900
        ss = open_stack(sp)
        assert ss.contrast_limits == (0.0, 900.0) and ss.rgb(0)[5, 5, 0] == 255


# ------------------------------------------------------------------ identity


def test_fingerprints():
    a = _ramp((9, 16, 16))
    s = open_stack(a)
    f0 = s.fingerprint()
    per = [s.slice_fingerprint(i) for i in range(9)]
    assert len(set(per)) == 9 and len(per[0]) == 32
    assert f0 == open_stack(a.copy()).fingerprint()
    b = a.copy()
    b[3, 0, 0] += 1  # not a sampled slice
    sb = open_stack(b)
    assert sb.fingerprint() == f0
    assert sb.slice_fingerprint(3) != per[3] and sb.slice_fingerprint(2) == per[2]
    for i in (0, 4, 8):  # first, middle, last
        c = a.copy()
        c[i, 5, 5] += 1
        assert open_stack(c).fingerprint() != f0
    assert open_stack(a.astype(np.int32)).fingerprint() != f0
    assert open_stack(a, axes="CYX").fingerprint() != f0


# ------------------------------------------------------------------ TIFF files


def test_tiff_yx_and_rgb(tmp_path):
    a = _ramp((40, 50))
    tifffile.imwrite(tmp_path / "a.tif", a)
    s = open_stack(tmp_path / "a.tif")
    assert s.axes == "YX" and len(s) == 1 and s.source == str(tmp_path / "a.tif")
    assert_array_equal(s[0], a)
    rgb = _ramp((40, 50, 3), np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tiff", rgb, photometric="rgb")
    r = open_stack(str(tmp_path / "rgb.tiff"))
    assert r.axes == "YXC" and r.rgb_input and r.contrast_limits is None
    assert_array_equal(r.rgb(0), rgb)
    # planar RGB (S axis first) is still RGB
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb",
                     planarconfig="separate")
    p = open_stack(tmp_path / "planar.tif")
    assert p.axes == "CYX" and p.rgb_input
    assert_array_equal(p.rgb(0), rgb)


def test_tiff_axes_mapping(tmp_path):
    from napari_sam.io.tiff import map_tiff_axes

    assert map_tiff_axes("QYX") == ("ZYX", False)
    assert map_tiff_axes("IQYX") == ("ZTYX", False)
    assert map_tiff_axes("TZCYXS") == ("TZAYXC", True)  # RGB samples win the C letter
    assert map_tiff_axes("EYX") == ("EYX", False)
    # a TIFF without axes metadata follows the same shape rule as a numpy array
    a = _ramp((5, 2, 20, 30))
    tifffile.imwrite(tmp_path / "q.tif", a, photometric="minisblack")
    s = open_stack(tmp_path / "q.tif", channel=1)
    assert s.axes == "ZCYX" and len(s) == 5
    assert_array_equal(s[4], a[4, 1])
    rgb_stack = _ramp((4, 20, 30, 3), np.uint8)
    tifffile.imwrite(tmp_path / "rgbz.tif", rgb_stack, photometric="rgb")
    r = open_stack(tmp_path / "rgbz.tif")
    assert r.axes == "ZYXC" and r.rgb_input and len(r) == 4
    assert_array_equal(r.rgb(2), rgb_stack[2])


def test_reopen_stack_with_options():
    a = _ramp((2, 3, 20, 30))
    s = open_stack(a, axes="ZCYX", contrast_limits=(0, 500))
    t = open_stack(s, channel=2)
    assert t.axes == "ZCYX" and t.channel == 2 and t.contrast_limits == (0.0, 500.0)
    assert_array_equal(t[1], a[1, 2])
    p = open_stack(a, axes="ZCYX", percentiles=(0, 100))
    assert open_stack(p) is p
    assert open_stack(p, channel=1).normalisation()["percentiles"] == [0.0, 100.0]
    u = open_stack(s, axes="TZYX")
    assert u.channel is None and len(u) == 6


def test_tiff_zyx_reads_pages_lazily(tmp_path):
    a = _ramp((6, 40, 50))
    path = tmp_path / "z.tif"
    tifffile.imwrite(path, a, compression="zlib")
    with open_stack(path) as s:
        assert s.axes == "ZYX" and len(s) == 6  # tifffile's Q axis -> Z
        assert isinstance(s.data, zarr.Array) and s.data.chunks[0] == 1
        for i in range(6):
            assert_array_equal(s[i], a[i])


@pytest.mark.parametrize(
    "axes, shape",
    [("CYX", (2, 20, 30)), ("ZCYX", (3, 2, 20, 30)), ("TZYX", (2, 3, 20, 30)),
     ("TZCYX", (2, 3, 2, 20, 30))],
)
def test_imagej_hyperstacks(tmp_path, axes, shape):
    a = _ramp(shape)
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, a, imagej=True, resolution=(1 / 0.25, 1 / 0.25),
                     metadata={"axes": axes, "spacing": 1.5, "unit": "um", "finterval": 2.0})
    s = open_stack(path)
    assert s.axes == axes and s.shape == shape
    assert s.scale[axes.index("Y")] == pytest.approx(0.25)
    assert s.scale[axes.index("X")] == pytest.approx(0.25)
    assert s.units[axes.index("X")] == "µm"
    if "Z" in axes:
        assert s.scale[axes.index("Z")] == pytest.approx(1.5)
    if "T" in axes:
        assert s.scale[axes.index("T")] == pytest.approx(2.0) and s.units[axes.index("T")] == "s"
    assert len(s) == int(np.prod([n for a_, n in zip(axes, shape) if a_ not in "YXC"]))
    c = 1 if "C" in axes else None
    sc = open_stack(path, channel=c)
    for i in range(len(sc)):
        key = list(sc.position(i))
        full = []
        for ax in axes:
            full.append(slice(None) if ax in "YX" else (c if ax == "C" else key.pop(0)))
        assert_array_equal(sc[i], a[tuple(full)])


def test_ome_tiff_physical_size_and_bigtiff(tmp_path):
    a = _ramp((2, 4, 20, 30))
    path = tmp_path / "x.ome.tif"
    tifffile.imwrite(path, a, bigtiff=True, metadata={
        "axes": "CZYX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.3, "PhysicalSizeZ": 1.1,
        "PhysicalSizeZUnit": "nm"})
    assert tifffile.TiffFile(path).is_bigtiff
    s = open_stack(path, channel=1)
    assert s.axes == "CZYX" and s.slice_axes == "Z" and len(s) == 4
    assert s.scale == pytest.approx((1.0, 1.1, 0.3, 0.2))
    assert s.units == (None, "nm", "µm", "µm")
    assert_array_equal(s[2], a[1, 2])
    big = tmp_path / "big.btf"
    tifffile.imwrite(big, a[0], bigtiff=True, photometric="minisblack")
    b = open_stack(big)
    assert b.axes == "ZYX" and len(b) == 4
    assert_array_equal(b[3], a[0, 3])


def test_pyramidal_ome_tiff_uses_level0(tmp_path):
    a = _ramp((3, 64, 64))
    path = tmp_path / "pyr.ome.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(a, subifds=1, tile=(32, 32), metadata={"axes": "ZYX"})
        tw.write(a[:, ::2, ::2], subfiletype=1, tile=(32, 32))
    assert len(tifffile.TiffFile(path).series[0].levels) == 2
    s = open_stack(path)
    assert s.shape == (3, 64, 64) and s.axes == "ZYX"
    assert_array_equal(s[2], a[2])


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00" + b"\xff" * 20)
    with pytest.raises(StackError, match="bad.tif") as info:
        open_stack(bad)
    assert "TIFF" in str(info.value)
    txt = tmp_path / "notes.txt"
    txt.write_text("not an image")
    with pytest.raises(StackError, match="notes.txt"):
        open_stack(txt)
    with pytest.raises(FileNotFoundError, match="nothere.tif"):
        open_stack(tmp_path / "nothere.tif")
    empty_dir = tmp_path / "empty.zarr"
    empty_dir.mkdir()
    with pytest.raises(StackError, match="empty.zarr"):
        open_stack(empty_dir)


# ------------------------------------------------------------------ zarr / OME-Zarr


@pytest.mark.parametrize("fmt", [2, 3])
def test_zarr_arrays(tmp_path, fmt):
    a = _ramp((5, 20, 30))
    path = tmp_path / f"v{fmt}.zarr"
    z = zarr.create_array(str(path), shape=a.shape, chunks=(1, 20, 30), dtype=a.dtype,
                          zarr_format=fmt)
    z[:] = a
    s = open_stack(path)
    assert s.axes == "ZYX" and s.source == str(path) and len(s) == 5
    assert_array_equal(s[4], a[4])
    t = open_stack(zarr.open_array(str(path), mode="r"))
    assert t.source == "zarr"
    assert_array_equal(t[1], a[1])


def test_zarr_v3_dimension_names(tmp_path):
    a = _ramp((3, 20, 30))
    z = zarr.create_array(str(tmp_path / "d.zarr"), shape=a.shape, dtype=a.dtype,
                          dimension_names=["c", "y", "x"])
    z[:] = a
    s = open_stack(tmp_path / "d.zarr")
    assert s.axes == "CYX" and s.channel == 0


def _write_ome_zarr(path, a, axes, scale, fmt):
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    levels = [a, a[..., ::2, ::2]]
    datasets = []
    for i, level in enumerate(levels):
        arr = root.create_array(str(i), shape=level.shape, dtype=level.dtype)
        arr[:] = level
        s = list(scale[:-2]) + [scale[-2] * 2**i, scale[-1] * 2**i]
        datasets.append({"path": str(i),
                         "coordinateTransformations": [{"type": "scale", "scale": s}]})
    types = {"t": "time", "c": "channel"}
    ms = {"version": "0.4" if fmt == 2 else "0.5", "datasets": datasets,
          "axes": [{"name": n, "type": types.get(n, "space"),
                    **({"unit": "micrometer"} if n in "zyx" else {})} for n in axes]}
    if fmt == 2:
        root.attrs["multiscales"] = [ms]
    else:
        root.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}


@pytest.mark.parametrize("fmt", [2, 3])
def test_ome_zarr_level0(tmp_path, fmt):
    a = _ramp((2, 3, 4, 20, 30))
    path = tmp_path / "img.ome.zarr"
    _write_ome_zarr(path, a, "tczyx", [1.0, 1.0, 2.0, 0.5, 0.25], fmt)
    s = open_stack(path, channel=2)
    assert s.axes == "TCZYX" and s.shape == a.shape and s.slice_axes == "TZ"
    assert s.scale == (1.0, 1.0, 2.0, 0.5, 0.25)
    assert s.units[2:] == ("µm",) * 3
    assert len(s) == 8
    assert_array_equal(s[5], a[1, 2, 1])
    g = open_stack(zarr.open_group(str(path), mode="r"))
    assert g.shape == a.shape and g.axes == "TCZYX"


def test_ome_zarr_package(tmp_path):
    ome_zarr_writer = pytest.importorskip("ome_zarr.writer")
    a = _ramp((4, 32, 32))
    root = zarr.open_group(str(tmp_path / "pkg.zarr"), mode="w")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ome_zarr_writer.write_image(a, root, axes="zyx")
    s = open_stack(tmp_path / "pkg.zarr")
    assert s.axes == "ZYX" and s.shape == a.shape
    assert_array_equal(s[3], a[3])


def test_dask_array():
    da = pytest.importorskip("dask.array")
    a = _ramp((4, 20, 30))
    s = open_stack(da.from_array(a, chunks=(1, 20, 30)))
    assert s.source == "dask" and s.axes == "ZYX"
    assert isinstance(s[2], np.ndarray)
    assert_array_equal(s[2], a[2])
    assert s.fingerprint() == open_stack(a).fingerprint()


def test_pickle_round_trip(tmp_path):
    a = _ramp((3, 20, 30))
    tifffile.imwrite(tmp_path / "p.tif", a, photometric="minisblack")
    for src in (tmp_path / "p.tif", a):
        s = open_stack(src)
        lims = s.contrast_limits
        t = pickle.loads(pickle.dumps(s))
        assert isinstance(t, Stack) and t.axes == s.axes and t.contrast_limits == lims
        assert_array_equal(t[1], a[1])


# ------------------------------------------------------------------ real data


@pytest.mark.parametrize(
    "name, shape, axes",
    [("dsb2018/img2d.tif", (512, 512), "YX"), ("synthetic3d/img3d.tif", (31, 61, 57), "ZYX")],
)
def test_real_data(name, shape, axes):
    path = _data_dir() / name
    if not path.exists():
        pytest.skip(f"real test data not found at {path} (set NAPARI_SAM_TEST_DATA)")
    s = open_stack(path)
    assert s.shape == shape and s.axes == axes and s.dtype == np.uint16
    full = tifffile.imread(path)
    mid = len(s) // 2
    assert_array_equal(s[mid], full if full.ndim == 2 else full[mid])
    lo, hi = s.contrast_limits
    assert 0 <= lo < hi
    img = s.rgb(mid)
    assert img.shape == shape[-2:] + (3,) and img.dtype == np.uint8
    assert img.max() > 200 and img.min() == 0


# ------------------------------------------------------------------ memory


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np, tifffile, zarr
    from napari_sam.io.stacks import open_stack
    import psutil
    before = psutil.Process().memory_info().rss // 1024  # current RSS (KiB), after imports
    s = open_stack(sys.argv[1])
    img = s[len(s) // 2]
    rgb = s.rgb(len(s) // 2)
    # VmHWM is this process's own peak RSS; ru_maxrss would include the parent's peak
    # at fork time (Linux keeps it across fork + exec)
    after = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))
    print(json.dumps({"len": len(s), "shape": list(s.shape), "axes": s.axes,
                      "dtype": str(s.dtype), "sum": int(img.sum(dtype=np.int64)),
                      "rgb_max": int(rgb.max()), "rgb_shape": list(rgb.shape),
                      "limits": list(s.contrast_limits),
                      "peak_increase_bytes": (after - before) * 1024}))
    """
)


@pytest.mark.slow
def test_memory_large_compressed_tiff(tmp_path):
    """Peak RSS of open + one slice + rgb() on a 6.25 GiB (uncompressed) TIFF stays small."""
    pytest.importorskip("psutil")
    n, y, x = 200, 4096, 4096
    page = np.zeros((y, x), np.uint16)
    path = tmp_path / "large.tif"

    def pages():
        for i in range(n):
            page[100:110, 200:210] = i + 1  # a few values per page
            yield page

    try:
        import imagecodecs

        compression = "zstd" if imagecodecs.ZSTD.available else "zlib"
    except ImportError:
        compression = "zlib"
    tifffile.imwrite(path, pages(), shape=(n, y, x), dtype=np.uint16, bigtiff=True,
                     compression=compression, compressionargs={"level": 1}, rowsperstrip=256)
    uncompressed = n * y * x * 2
    assert path.stat().st_size < uncompressed / 100
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(path)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\nmemory: peak RSS increase {report['peak_increase_bytes'] / 2**20:.1f} MiB "
          f"for a {uncompressed / 2**30:.2f} GiB stack "
          f"({100 * report['peak_increase_bytes'] / uncompressed:.2f} %)")
    assert report["len"] == n and report["shape"] == [n, y, x] and report["axes"] == "ZYX"
    assert report["sum"] == 100 * (n // 2 + 1)
    # sparse pages: percentiles are equal, so the limits are the sample's min and max
    lo, hi = report["limits"]
    assert lo == 0.0 and 1 < hi <= n
    assert report["rgb_shape"] == [y, x, 3]
    assert report["rgb_max"] == round((n // 2 + 1) / hi * 255)
    assert report["peak_increase_bytes"] < 0.05 * uncompressed
