"""Bad inputs, one place: every case gives a clear error or a documented, correct behaviour.

Each case names the behaviour it checks; docs/reliability.md has the same list as a table.
A clear error is a ``ValueError`` subclass from :mod:`napari_sam._errors`
(:class:`InvalidInputError`, :class:`StackError`, :class:`CheckpointError`) or another
precise type, whose message names the offending value and what is accepted. Related tests
elsewhere: test_stacks.py (test_unreadable_and_missing_files, test_nan_inf_constant_bool,
test_axes_override_and_errors), test_engine.py (test_prompt_errors_are_clear,
test_truncated_chunk_is_detected_and_recomputed), test_labels.py
(test_bad_inputs_name_the_problem), test_models.py (test_non_sam_checkpoint,
test_malicious_pickle_is_refused).
"""

from __future__ import annotations

import pickle
import shutil
import struct
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

import napari_sam as ns
from napari_sam import CheckpointError, InvalidInputError, StackError
from napari_sam.labels import paint


@pytest.fixture(autouse=True)
def _fast():
    """Every case must finish within seconds: never a hang."""
    t0 = time.perf_counter()
    yield
    assert time.perf_counter() - t0 < 30, "a bad-input case took longer than 30 s"


# ------------------------------------------------------------------ corrupt TIFFs


@pytest.fixture(scope="module")
def tiff_bytes(tmp_path_factory) -> tuple[bytes, np.ndarray]:
    img = (np.arange(4 * 64 * 80).reshape(4, 64, 80) % 1000).astype(np.uint16)
    path = tmp_path_factory.mktemp("tif") / "good.tif"
    tifffile.imwrite(path, img, metadata={"axes": "ZYX"}, photometric="minisblack")
    return path.read_bytes(), img


# offsets into a 4-page uncompressed ZYX uint16 TIFF (41,730 bytes: header 8, first IFD at
# 8, strips at 272 + 10,240 k, the other IFDs after the pixel data)
TRUNCATIONS = {"header": 4, "first-ifd-entry": 12, "ifd-values": 100, "first-strip": 200,
               "mid-strip-0": 5000, "mid-strip-1": 20000, "last-strip": 40000}


@pytest.mark.parametrize("where", list(TRUNCATIONS))
def test_truncated_tiff_gives_stack_error_naming_the_path(tmp_path, tiff_bytes, where):
    """Open or slice read raises StackError with the path; slices that are intact read
    exactly; nothing returns silently wrong pixels."""
    raw, img = tiff_bytes
    path = tmp_path / f"cut_{where}.tif"
    path.write_bytes(raw[: TRUNCATIONS[where]])
    try:
        stack = ns.open_stack(path)
    except StackError as err:
        assert str(path) in str(err) and "TIFF" in str(err)
        return
    failed = 0
    for i in range(len(stack)):
        try:
            s = stack[i]
        except StackError as err:
            assert str(path) in str(err) and f"slice {i}" in str(err)
            failed += 1
        else:  # a slice that reads is the right one
            np.testing.assert_array_equal(s, img[i])
    assert failed >= 1
    with pytest.raises(StackError, match=str(path.name)):
        stack.rgb(len(stack) - 1)


def _patch_compression(path: Path, code: int) -> None:
    buf = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        offsets = [page.tags[259].offset for page in tif.pages]
    for o in offsets:  # tag entry: code (2) type (2) count (4) value (4)
        assert struct.unpack_from("<H", buf, o)[0] == 259
        struct.pack_into("<H", buf, o + 8, code)
    path.write_bytes(bytes(buf))


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_unsupported_tiff_compression_is_refused_at_open(tmp_path, compression):
    path = tmp_path / "odd.tif"
    tifffile.imwrite(path, np.ones((3, 16, 16), np.uint16), metadata={"axes": "ZYX"},
                     photometric="minisblack", compression=compression)
    _patch_compression(path, 60000)
    with pytest.raises(StackError) as info:
        ns.open_stack(path)
    msg = str(info.value)
    assert str(path) in msg and "compression 60000" in msg and "readable:" in msg


# ------------------------------------------------------------------ zarr


def test_zarr_missing_chunk_reads_as_fill_value(tmp_path):
    """Documented: zarr semantics. A missing chunk is the array's fill value (a sparse
    array and a deleted chunk look the same); napari-sam does not second-guess it."""
    import zarr

    z = zarr.open_array(tmp_path / "m.zarr", mode="w", shape=(4, 32, 32), chunks=(1, 32, 32),
                        dtype="u2", fill_value=7)
    z[:] = 100
    shutil.rmtree(tmp_path / "m.zarr" / "c" / "2")
    stack = ns.open_stack(tmp_path / "m.zarr")
    np.testing.assert_array_equal(stack[2], 7)
    np.testing.assert_array_equal(stack[1], 100)


def test_zarr_corrupt_chunk_gives_stack_error(tmp_path):
    import zarr

    z = zarr.open_array(tmp_path / "c.zarr", mode="w", shape=(3, 32, 32), chunks=(1, 32, 32),
                        dtype="u2")
    z[:] = np.arange(3 * 32 * 32).reshape(3, 32, 32)
    chunk = tmp_path / "c.zarr" / "c" / "1" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:10])
    stack = ns.open_stack(tmp_path / "c.zarr")
    with pytest.raises(StackError, match=r"slice 1 of .*c\.zarr"):
        stack[1]


# ------------------------------------------------------------------ shapes and dtypes


@pytest.mark.parametrize("shape, axes", [((2, 3, 4, 16, 16), "TZCYX"),
                                         ((2, 3, 4, 16, 3), "TZYXC")])
def test_5d_without_axes_follows_the_shape_rule(shape, axes):
    assert ns.open_stack(np.zeros(shape, np.uint8)).axes == axes


def test_6d_without_axes_asks_for_axes():
    a = np.zeros((2, 2, 3, 4, 16, 16), np.uint8)
    with pytest.raises(StackError, match=r"6D array of shape \(2, 2, 3, 4, 16, 16\); pass axes="):
        ns.open_stack(a)
    s = ns.open_stack(a, axes="ATZCYX")
    assert len(s) == 2 * 2 * 3 and s.slice_shape == (16, 16)
    with pytest.raises(StackError, match="5 letters for 6 dimensions"):
        ns.open_stack(a, axes="TZCYX")


@pytest.mark.parametrize("shape", [(1, 1), (1, 50), (50, 1), (1, 2048), (100, 100_000)])
def test_thin_slices_within_sams_range_segment(tiny_model, shape):
    """Documented: a slice is usable while its short side is >= 1 px after resizing the
    long side to 1024 (aspect ratio up to 1:2048); the mask has the slice's shape."""
    img = np.zeros(shape, np.uint16)
    img[: max(1, shape[0] // 2), : max(1, shape[1] // 2)] = 500
    seg = ns.Segmenter(tiny_model, img)
    mask = seg.segment(0, points=[[0, 0]])
    assert mask.shape == shape and mask.dtype == bool


@pytest.mark.parametrize("shape", [(1, 2049), (2049, 1), (3, 100_000), (1, 100_000)])
def test_too_elongated_slices_are_refused(tiny_model, shape):
    seg = ns.Segmenter(tiny_model, np.zeros(shape, np.uint8))
    with pytest.raises(InvalidInputError, match=rf"slice of shape \({shape[0]}, {shape[1]}\) "
                       r"is too elongated.*1:2048"):
        seg.segment(0, points=[[0, 0]])


def test_empty_image_is_refused():
    with pytest.raises(StackError, match=r"shape \(0, 16\).*is empty"):
        ns.open_stack(np.zeros((0, 16), np.uint8))


def test_float_nan_inf_are_mapped_not_propagated():
    """Documented: contrast limits from finite values; NaN and -inf -> 0, +inf -> 255."""
    a = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    a[0, :3] = [np.nan, np.inf, -np.inf]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from NaN arithmetic either
        s = ns.open_stack(a)
        lo, hi = s.contrast_limits
        assert np.isfinite([lo, hi]).all() and lo < hi
        rgb = s.rgb(0)
        assert rgb.dtype == np.uint8 and list(rgb[0, :3, 0]) == [0, 255, 0]
        np.testing.assert_array_equal(ns.open_stack(np.full((8, 8), np.nan)).rgb(0), 0)
        np.testing.assert_array_equal(ns.open_stack(np.full((8, 8), np.inf)).rgb(0), 255)


def test_bool_image_maps_true_to_255():
    b = np.zeros((8, 8), bool)
    b[2:4, 3] = True
    s = ns.open_stack(b)
    assert s.contrast_limits == (0.0, 1.0)
    np.testing.assert_array_equal(s.rgb(0)[..., 0], b.astype(np.uint8) * 255)


@pytest.mark.parametrize("dtype", [np.complex64, object, "U3"])
def test_unsupported_image_dtypes_are_refused(dtype):
    with pytest.raises(StackError):
        ns.open_stack(np.zeros((8, 8), dtype=dtype))


# ------------------------------------------------------------------ labels


def test_int64_labels_with_negative_values():
    """Documented: negative values are existing labels (kept unless overwrite); the next
    id is max(labels.max(), 0) + 1; int64 stays int64 and in place."""
    lab = np.array([[-3, 0], [0, 5]], np.int64)
    res = paint(lab, np.ones((2, 2), bool))
    assert res.label_id == 6 and res.labels is lab
    np.testing.assert_array_equal(lab, [[-3, 6], [6, 5]])
    neg = np.full((2, 2), -5, np.int8)
    res = paint(neg, np.ones((2, 2), bool))
    assert res.label_id == 1 and res.n_pixels == 0
    res = paint(neg, np.ones((2, 2), bool), overwrite=True)
    np.testing.assert_array_equal(neg, 1)
    big = np.zeros((2, 2), np.int64)
    paint(big, np.eye(2, dtype=bool), label_id=2**62)
    assert big[0, 0] == 2**62
    with pytest.raises(InvalidInputError, match="does not fit any int64"):
        paint(big, np.eye(2, dtype=bool), label_id=2**63)
    with pytest.raises(InvalidInputError, match="positive integer, got -4"):
        paint(big, np.eye(2, dtype=bool), label_id=-4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(labels=np.zeros((3, 4), np.uint8), mask=np.ones((4, 3), bool)),
         r"mask of shape \(4, 3\) does not match labels of shape \(3, 4\)"),
        (dict(labels=np.zeros((2, 3, 4), np.uint8), mask=np.ones((3, 4), bool)),
         r"expected a mask of shape \(2, 3, 4\)"),
        (dict(labels=np.zeros((2, 3, 4), np.uint8), mask=np.ones((3, 4), bool), index=(5,)),
         r"index \(5,\) is outside labels of shape \(2, 3, 4\)"),
        (dict(labels=np.zeros((3, 4), np.float32), mask=np.ones((3, 4), bool)),
         "integer dtype.*got float32"),
        (dict(labels=np.zeros((3, 4), bool), mask=np.ones((3, 4), bool)), "integer dtype.*got bool"),
        (dict(labels=np.zeros((3, 4), np.uint8), mask=np.ones((3, 4), np.uint8)),
         "mask must be a bool array, got dtype uint8"),
        (dict(labels=[[0, 0]], mask=np.ones((1, 2), bool)), "numpy array.*got list"),
    ],
    ids=["transposed", "2d-mask-3d-labels", "index-outside", "float-labels", "bool-labels",
         "uint8-mask", "list-labels"],
)
def test_label_shape_and_dtype_mismatch(kwargs, match):
    before = np.array(kwargs["labels"], copy=True) if isinstance(kwargs["labels"], np.ndarray) else None
    with pytest.raises(InvalidInputError, match=match):
        paint(**kwargs)
    if before is not None:
        np.testing.assert_array_equal(kwargs["labels"], before)  # nothing half-painted


# ------------------------------------------------------------------ prompts


@pytest.fixture(scope="module")
def seg(tiny_model):
    rng = np.random.default_rng(0)
    return ns.Segmenter(tiny_model, rng.integers(0, 1000, (3, 48, 64)).astype(np.uint16))


@pytest.mark.parametrize(
    "prompts, match",
    [
        (dict(), "no prompt given"),
        (dict(points=[]), "no prompt given"),
        (dict(points=np.zeros((0, 2)), point_labels=[]), "no prompt given"),
        (dict(points=[], point_labels=[1]), "point_labels given for an empty list"),
        (dict(point_labels=[1]), "point_labels given without points"),
        (dict(points=[[60, 5]]), r"\[\[60.0, 5.0\]\] \(y, x\) lie outside the slice of shape \(48, 64\)"),
        (dict(points=[[-1, 5]]), "outside the slice"),
        (dict(points=[[5, np.nan]]), "finite"),
        (dict(points=[[1, 5, 5]]), r"shape \(N, 2\).*last two columns"),
        (dict(points=[[5, 5]], point_labels=[1, 1]), "one entry per point"),
        (dict(points=[[5, 5]], point_labels=[-1]), r"1 \(positive\) or 0"),
        (dict(box=[10, 10, 10, 40]), "has no area"),
        (dict(box=[10, 10, 10.5, 40]), "has no area"),
        (dict(box=[100, 100, 120, 130]), r"lies outside the slice of shape \(48, 64\)"),
        (dict(box=[1, 2, 3]), "4 numbers"),
        (dict(box=[0, 0, np.inf, 5]), "finite"),
        (dict(points=[[5, 5]], mask_input=np.zeros((64, 64))), r"mask_input must be SAM logits"),
    ],
    ids=["nothing", "empty-points", "empty-points-and-labels", "labels-for-empty",
         "labels-only", "point-below", "point-above", "nan-point", "3d-point",
         "label-count", "label-value", "zero-area-box", "sub-pixel-box", "box-outside",
         "box-3-numbers", "inf-box", "mask-input-shape"],
)
def test_prompt_errors(seg, prompts, match):
    with pytest.raises(InvalidInputError, match=match):
        seg.segment(0, **prompts)


def test_documented_prompt_behaviours(seg):
    # inverted box corners are the same box
    np.testing.assert_array_equal(seg.segment(0, box=[40, 50, 10, 20]),
                                  seg.segment(0, box=[10, 20, 40, 50]))
    # a box partly outside is clipped to the slice
    np.testing.assert_array_equal(seg.segment(0, box=[-10, -10, 20, 30]),
                                  seg.segment(0, box=[0, 0, 20, 30]))
    # points on the pixel border (-0.5 .. size - 0.5) are inside
    assert seg.segment(0, points=[[-0.5, 63.5]]).shape == (48, 64)
    # an empty list of points with a box is just the box
    np.testing.assert_array_equal(seg.segment(0, points=[], box=[5, 5, 30, 30]),
                                  seg.segment(0, box=[5, 5, 30, 30]))
    # no boxes: no masks
    assert seg.segment_boxes(0, np.zeros((0, 4))).shape == (0, 48, 64)
    with pytest.raises(InvalidInputError, match=r"boxes must have shape \(N, 4\)"):
        seg.segment_boxes(0, [1, 2, 3, 4])
    with pytest.raises(IndexError, match="3 slices"):
        seg.segment(3, points=[[5, 5]])


class _Layer:
    """A stand-in for a napari layer: scale / translate transforms, no Qt."""

    def __init__(self, data, scale, translate=None, features=None, shape_type=None):
        self.data = data
        self.ndim = len(scale)
        self.scale = np.asarray(scale, float)
        self.translate = np.zeros(self.ndim) if translate is None else np.asarray(translate, float)
        self.features = features or {}
        self.shape_type = shape_type or []
        self.multiscale = False

    def data_to_world(self, c):
        return np.asarray(c, float) * self.scale + self.translate

    def world_to_data(self, w):
        return (np.asarray(w, float) - self.translate) / self.scale


def test_widget_points_on_another_slice_or_outside_are_skipped():
    """Documented (widget): prompts belong to the slice of their rounded leading
    coordinate; points on other slices are not used, points outside are reported."""
    from napari_sam._napari.geometry import ImageGeometry, prompts_for_slice

    image = _Layer(np.zeros((5, 40, 50)), scale=(2.0, 0.5, 0.5))
    pts = _Layer(np.array([[2, 10, 10], [3, 10, 10], [2, 100, 10], [2, 5, 6]], float),
                 scale=(2.0, 0.5, 0.5), features={"positive": [True, True, True, False]})
    boxes = _Layer([np.array([[4, 1, 1], [4, 1, 9], [4, 9, 9], [4, 9, 1]], float),
                    np.array([[2, 3, 3], [2, 3, 3], [2, 3, 3], [2, 3, 3]], float)],
                   scale=(2.0, 0.5, 0.5), shape_type=["rectangle", "rectangle"])
    out = prompts_for_slice(ImageGeometry(image), pts, boxes, (2,), (4.0, 0, 0))
    [obj] = out.objects  # the points of slice 2 inside the image: one object
    np.testing.assert_array_equal(obj.points, [[10, 10], [5, 6]])
    np.testing.assert_array_equal(obj.labels, [1, 0])
    assert obj.box is None  # the slice-4 box is elsewhere; the slice-2 one has no area
    assert any("outside the image" in p for p in out.problems)
    assert any("without area" in p for p in out.problems)


# ------------------------------------------------------------------ checkpoints


def _resnet18_state():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(weights=None).state_dict()


def _sam2_like_state():
    import torch

    return {"model": {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(96, 3, 7, 7),
                      "image_encoder.neck.convs.0.conv.weight": torch.zeros(256, 768, 1, 1),
                      "sam_mask_decoder.iou_token.weight": torch.zeros(1, 256),
                      "memory_encoder.out_proj.weight": torch.zeros(64, 256, 1, 1)}}


@pytest.mark.parametrize("make, found", [(_resnet18_state, "conv1.weight"),
                                         (_sam2_like_state, "trunk")],
                         ids=["torchvision-resnet18", "sam2-layout"])
def test_checkpoint_of_another_model_family(tmp_path, make, found):
    import torch

    path = tmp_path / "other.pth"
    torch.save(make(), path)
    with pytest.raises(CheckpointError) as info:
        ns.load_model(checkpoint=path, device="cpu")
    msg = str(info.value)
    assert "other.pth" in msg and "not a SAM checkpoint" in msg and found in msg
    assert "image_encoder.patch_embed.proj.weight" in msg  # what is accepted


class _Payload:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_pickle_checkpoint_carrying_code_is_never_run(tmp_path, tiny_checkpoint):
    import torch

    target = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    state = torch.load(tiny_checkpoint, weights_only=True)
    with open(path, "wb") as f:
        pickle.dump({**state, "x": _Payload(str(target))}, f)
    with pytest.raises(CheckpointError, match="evil.pth.*carries code"):
        ns.load_model(checkpoint=path, device="cpu")
    assert not target.exists()


def test_truncated_checkpoint_is_refused(tmp_path, tiny_checkpoint):
    path = tmp_path / "half.pth"
    path.write_bytes(tiny_checkpoint.read_bytes()[: tiny_checkpoint.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="half.pth"):
        ns.load_model(checkpoint=path, device="cpu")
