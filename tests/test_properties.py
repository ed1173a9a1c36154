"""Property tests: painting and undo, coordinate transforms, axes inference.

Extends test_labels.py::test_property_paint_keeps_or_overwrites_and_undoes (one paint)
with sequences of paints, nD indexing and the history; no model is needed.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from napari_sam import StackError
from napari_sam.io.formats import check_axes
from napari_sam.io.stacks import infer_axes, open_stack
from napari_sam.labels import LabelHistory, next_label_id, paint, redo, undo
from napari_sam.models.sam import to_sam_xy as _to_sam_xy

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------ paint / undo / redo


@st.composite
def paint_sequences(draw):
    """A label volume (..., Y, X), and a list of (mask, index, label_id, overwrite)."""
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    h, w = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    dtype = draw(st.sampled_from([np.uint8, np.int8, np.uint16, np.int32, np.int64]))
    hi = 120 if np.dtype(dtype).kind == "i" and np.dtype(dtype).itemsize == 1 else 250
    lo = -3 if np.dtype(dtype).kind == "i" else 0
    labels = draw(hnp.arrays(dtype, (*lead, h, w), elements=st.integers(lo, hi)))
    steps = []
    for _ in range(draw(st.integers(1, 6))):
        k = draw(st.integers(0, len(lead)))  # index some of the leading axes
        index = tuple(draw(st.integers(0, n - 1)) for n in lead[:k])
        mask = draw(hnp.arrays(bool, (*lead[k:], h, w)))
        label_id = draw(st.one_of(st.none(), st.integers(1, 400)))  # > 127 / 255 grows
        steps.append((mask, index, label_id, draw(st.booleans())))
    return labels, steps


@SETTINGS
@given(paint_sequences())
def test_paints_then_undos_in_reverse_restore_exactly(case):
    labels, steps = case
    original = labels.copy()
    current, records, states = labels, [], []
    for mask, index, label_id, overwrite in steps:
        before = current.copy()
        expected_id = next_label_id(current) if label_id is None else label_id
        res = paint(current, mask, label_id=label_id, overwrite=overwrite, index=index or None)
        assert res.label_id == expected_id
        out = res.labels
        assert np.iinfo(out.dtype).max >= res.label_id  # grew instead of wrapping
        target = (slice(None),) * 0 if not index else index
        was, now = before[target], out[target]
        # outside the mask nothing changes; inside: the id where free (or always with overwrite)
        np.testing.assert_array_equal(now[~mask], was[~mask])
        painted = mask if overwrite else mask & (was == 0)
        assert (now[painted] == res.label_id).all()
        np.testing.assert_array_equal(now[mask & ~painted], was[mask & ~painted])
        assert res.n_pixels == int(np.count_nonzero(now != was))
        # other slices of the volume are untouched
        rest = np.ones(out.shape, bool)
        rest[target] = False
        np.testing.assert_array_equal(out[rest], before[rest])
        records.append(res.record)
        states.append(out.copy())
        current = out
    after = current.copy()
    for rec in reversed(records):
        undo(current, rec)
    np.testing.assert_array_equal(current, original)  # values; dtype may have grown
    for rec, state in zip(records, states):
        redo(current, rec)
        np.testing.assert_array_equal(current, state)
    np.testing.assert_array_equal(current, after)


@SETTINGS
@given(paint_sequences(), st.integers(0, 6))
def test_history_undo_all_redo_all(case, n_undo):
    labels, steps = case
    labels = labels.astype(np.int64)  # no growth: the history works in place
    original = labels.copy()
    history = LabelHistory()
    for mask, index, label_id, overwrite in steps:
        history.push(paint(labels, mask, label_id=label_id, overwrite=overwrite,
                           index=index or None).record)
    final = labels.copy()
    undone = 0
    while undone < n_undo and history.undo(labels) is not None:
        undone += 1
    if undone == len(steps):
        np.testing.assert_array_equal(labels, original)
    while history.redo(labels) is not None:
        pass
    np.testing.assert_array_equal(labels, final)


# ------------------------------------------------------------------ coordinates


finite = st.floats(-1e6, 1e6, allow_nan=False)


@SETTINGS
@given(hnp.arrays(np.float64, st.tuples(st.integers(0, 5), st.sampled_from([2, 4])), elements=finite))
def test_sam_xy_flip_is_an_involution(yx):
    xy = _to_sam_xy(yx)
    np.testing.assert_array_equal(_to_sam_xy(xy), yx)
    pairs = yx.reshape(len(yx), yx.shape[1] // 2, 2)
    np.testing.assert_array_equal(xy.reshape(pairs.shape), pairs[..., ::-1])


class _Layer:
    """napari's scale/translate data <-> world transform (Layer.data_to_world /
    world_to_data for an axis-aligned layer), without Qt."""

    def __init__(self, ndim, scale, translate):
        self.ndim = ndim
        self.data = np.zeros((1,) * ndim)
        self.scale = np.asarray(scale, float)
        self.translate = np.asarray(translate, float)

    def data_to_world(self, c):
        return np.asarray(c, float) * self.scale + self.translate

    def world_to_data(self, w):
        return (np.asarray(w, float) - self.translate) / self.scale


scales = st.floats(0.05, 20, allow_nan=False)
shifts = st.floats(-1000, 1000, allow_nan=False)


@SETTINGS
@given(st.data())
def test_prompt_coords_round_trip_data_world_data(data):
    from napari_sam._napari.geometry import ImageGeometry

    ndim = data.draw(st.integers(2, 4))
    image = _Layer(ndim, data.draw(st.lists(scales, min_size=ndim, max_size=ndim)),
                   data.draw(st.lists(shifts, min_size=ndim, max_size=ndim)))
    # the prompt layer shares the image's transform: data -> world -> data is the identity
    pts = data.draw(hnp.arrays(np.float64, (data.draw(st.integers(1, 5)), ndim),
                               elements=st.floats(-100, 600, allow_nan=False)))
    world_point = image.data_to_world(np.zeros(ndim))
    geo = ImageGeometry(image)
    back = geo.to_data(image, pts, world_point)
    np.testing.assert_allclose(back, pts, rtol=1e-9, atol=1e-6)
    # a 2D prompt layer with its own transform lands at the same world (y, x)
    yx_layer = _Layer(2, data.draw(st.lists(scales, min_size=2, max_size=2)),
                      data.draw(st.lists(shifts, min_size=2, max_size=2)))
    yx = pts[:, -2:]
    world_yx = np.array([yx_layer.data_to_world(r) for r in yx])
    got = geo.to_data(yx_layer, yx, world_point)
    np.testing.assert_allclose(image.data_to_world(got)[..., -2:] if got.ndim == 1 else
                               np.array([image.data_to_world(r)[-2:] for r in got]),
                               world_yx, rtol=1e-9, atol=1e-6)
    # the leading coordinates of a 2D prompt layer are the viewer's current slice
    assert geo.on_slice(got, np.zeros(ndim - 2, int)).all()


# ------------------------------------------------------------------ axes


@st.composite
def valid_axes(draw):
    n = draw(st.integers(2, 6))
    others = draw(st.lists(st.sampled_from(list("TZCABDEFG")), min_size=n - 2, max_size=n - 2,
                           unique=True))
    letters = draw(st.permutations(["Y", "X", *others]))
    shape = tuple(draw(st.integers(1, 4)) for _ in range(n))
    if "C" in letters and draw(st.booleans()):
        shape = tuple(3 if a == "C" else s for a, s in zip(letters, shape))
    return "".join(letters), shape


@SETTINGS
@given(valid_axes(), st.booleans())
def test_any_valid_axes_are_accepted_and_round_trip(case, lower):
    axes, shape = case
    given_axes = axes.lower() if lower else axes
    assert check_axes(given_axes, shape) == axes
    stack = open_stack(np.zeros(shape, np.uint8), axes=given_axes)
    assert stack.axes == axes and stack.shape == shape
    assert stack.slice_shape == (shape[axes.index("Y")], shape[axes.index("X")])
    slice_axes = "".join(a for a in axes if a not in "YXC")
    assert stack.slice_axes == slice_axes
    assert len(stack) == int(np.prod([shape[axes.index(a)] for a in slice_axes]))
    # reopening with the found axes gives the same stack
    assert open_stack(stack.data, axes=stack.axes).axes == axes
    for i in range(len(stack)):
        assert stack.index(stack.position(i)) == i


@st.composite
def invalid_axes(draw):
    n = draw(st.integers(2, 6))
    shape = tuple(draw(st.integers(1, 4)) for _ in range(n))
    kind = draw(st.sampled_from(["length", "repeat", "no-y", "no-x", "digit"]))
    letters = ["Y", "X", *"TZABD"[: n - 2]]
    if kind == "length":
        letters = letters + ["E"] if draw(st.booleans()) else letters[:-1]
    elif kind == "repeat" and n >= 3:
        letters[-1] = letters[0]
    elif kind == "repeat":
        letters = ["Y", "Y"]
    elif kind == "no-y":
        letters[0] = "Q"
    elif kind == "no-x":
        letters[1] = "Q"
    else:
        letters[-1] = "1"
    return "".join(draw(st.permutations(letters))), shape


@SETTINGS
@given(invalid_axes())
def test_invalid_axes_raise_stack_error_naming_them(case):
    axes, shape = case
    with pytest.raises(StackError) as info:
        check_axes(axes, shape)
    assert repr(axes) in str(info.value) and str(shape) in str(info.value)


@SETTINGS
@given(st.lists(st.integers(1, 6), min_size=2, max_size=7))
def test_infer_axes_fits_the_shape_or_asks(shape):
    if len(shape) > 5:
        with pytest.raises(StackError, match="pass axes="):
            infer_axes(shape)
        return
    axes = infer_axes(shape)
    assert check_axes(axes, tuple(shape)) == axes
    assume(len(shape) >= 3)
    if shape[-1] in (3, 4):
        assert axes.endswith("C")
