"""paint / undo / redo: ids, no overwriting, dtype growth, exact reverts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import napari_sam as ns
from napari_sam.labels import LabelHistory, grown_dtype, next_label_id


def disk(shape, center, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def test_paint_uses_next_free_id_and_keeps_existing_labels():
    labels = np.zeros((32, 32), np.uint16)
    labels[5:10, 5:10] = 7
    mask = np.zeros_like(labels, bool)
    mask[8:20, 8:20] = True
    res = ns.paint(labels, mask)
    assert res.label_id == 8
    assert res.labels is labels  # in place
    assert (labels[5:10, 5:10] == 7).all()  # old object untouched
    assert (labels[10:20, 10:20] == 8).all()
    assert res.n_pixels == 12 * 12 - 2 * 2


def test_overwrite_replaces_existing_labels():
    labels = np.full((8, 8), 3, np.uint8)
    res = ns.paint(labels, np.ones((8, 8), bool), overwrite=True, label_id=4)
    assert (labels == 4).all() and res.n_pixels == 64


def test_paint_into_slice_of_volume_with_index():
    labels = np.zeros((5, 16, 16), np.uint32)
    res = ns.paint(labels, disk((16, 16), (8, 8), 3), index=3)
    assert labels[3].sum() > 0 and labels[[0, 1, 2, 4]].sum() == 0
    assert res.record.region[0] == slice(3, 4)
    labels4 = np.zeros((2, 5, 16, 16), np.uint8)
    ns.paint(labels4, disk((16, 16), (8, 8), 3), index=(1, 2))
    assert labels4[1, 2].any() and labels4.sum() == labels4[1, 2].sum()


@pytest.mark.parametrize(
    "dtype, label_id, grown",
    [(np.uint8, 255, np.uint8), (np.uint8, 256, np.uint16), (np.uint8, 70000, np.uint32),
     (np.uint16, 2**32, np.uint64), (np.int8, 200, np.int16), (np.int32, 2**31, np.int64)],
)
def test_dtype_grows_instead_of_wrapping(dtype, label_id, grown):
    labels = np.zeros((4, 4), dtype)
    labels[0, 0] = 1
    before = labels.copy()
    mask = np.zeros((4, 4), bool)
    mask[2:, 2:] = True
    res = ns.paint(labels, mask, label_id=label_id)
    assert res.labels.dtype == grown
    assert res.labels[3, 3] == label_id
    if grown != dtype:
        assert res.labels is not labels
        np.testing.assert_array_equal(labels, before)  # input untouched
    assert grown_dtype(dtype, label_id) == grown


def test_next_free_id_grows_uint8():
    labels = np.zeros((4, 4), np.uint8)
    labels[0, 0] = 255
    res = ns.paint(labels, np.eye(4, dtype=bool))
    assert res.label_id == 256 and res.labels.dtype == np.uint16
    assert res.labels[0, 0] == 255  # the old object kept its id


def test_undo_redo_round_trip_is_exact():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (3, 40, 40)).astype(np.uint16)
    original = labels.copy()
    res = ns.paint(labels, disk((40, 40), (20, 20), 9), index=1, overwrite=True)
    painted = labels.copy()
    ns.undo(labels, res.record)
    np.testing.assert_array_equal(labels, original)
    ns.redo(labels, res.record)
    np.testing.assert_array_equal(labels, painted)


def test_undo_out_of_order_is_refused():
    labels = np.zeros((10, 10), np.uint8)
    a = ns.paint(labels, disk((10, 10), (5, 5), 4))
    ns.paint(labels, disk((10, 10), (5, 5), 4), overwrite=True)
    with pytest.raises(ns.InvalidInputError, match="changed since"):
        ns.undo(labels, a.record)


def test_history_undo_redo_stack():
    labels = np.zeros((20, 20), np.uint8)
    hist = LabelHistory()
    snapshots = [labels.copy()]
    for k in range(3):
        mask = np.zeros_like(labels, bool)
        mask[k * 5 : k * 5 + 5, :] = True
        hist.push(ns.paint(labels, mask).record)
        snapshots.append(labels.copy())
    for k in (2, 1, 0):
        assert hist.undo(labels) is not None
        np.testing.assert_array_equal(labels, snapshots[k])
    assert hist.undo(labels) is None and hist.can_redo
    hist.redo(labels)
    np.testing.assert_array_equal(labels, snapshots[1])
    hist.push(ns.paint(labels, np.ones_like(labels, bool), overwrite=True).record)
    assert not hist.can_redo  # a new paint clears redo


def test_history_is_bounded_in_bytes():
    labels = np.zeros((100, 100), np.uint8)
    hist = LabelHistory(max_bytes=30_000)
    for k in range(10):
        hist.push(ns.paint(labels, np.ones_like(labels, bool), overwrite=True, label_id=k + 1).record)
    assert hist.nbytes <= 30_000 and hist.can_undo


def test_bad_inputs_name_the_problem():
    labels = np.zeros((10, 10), np.uint8)
    with pytest.raises(ns.InvalidInputError, match=r"\(5, 5\).*\(10, 10\)"):
        ns.paint(labels, np.ones((5, 5), bool))
    with pytest.raises(ns.InvalidInputError, match="bool"):
        ns.paint(labels, np.ones((10, 10), np.uint8))
    with pytest.raises(ns.InvalidInputError, match="integer dtype"):
        ns.paint(np.zeros((10, 10), np.float32), np.ones((10, 10), bool))
    with pytest.raises(ns.InvalidInputError, match="positive"):
        ns.paint(labels, np.ones((10, 10), bool), label_id=0)
    with pytest.raises(ns.InvalidInputError, match="outside labels"):
        ns.paint(np.zeros((2, 10, 10), np.uint8), np.ones((10, 10), bool), index=5)
    assert labels.sum() == 0


def test_empty_mask_changes_nothing():
    labels = np.zeros((6, 6), np.uint8)
    res = ns.paint(labels, np.zeros((6, 6), bool))
    assert res.n_pixels == 0 and labels.sum() == 0
    ns.undo(labels, res.record)  # still a valid record


@settings(max_examples=60, deadline=None)
@given(
    labels=hnp.arrays(np.uint8, (12, 12), elements=st.integers(0, 5)),
    mask=hnp.arrays(bool, (12, 12)),
    overwrite=st.booleans(),
)
def test_property_paint_keeps_or_overwrites_and_undoes(labels, mask, overwrite):
    original = labels.copy()
    res = ns.paint(labels, mask, overwrite=overwrite)
    out = res.labels
    assert res.label_id == next_label_id(original)
    # pixels outside the mask never change
    np.testing.assert_array_equal(out[~mask], original[~mask])
    if overwrite:
        assert (out[mask] == res.label_id).all()
    else:
        np.testing.assert_array_equal(out[mask & (original > 0)], original[mask & (original > 0)])
        assert (out[mask & (original == 0)] == res.label_id).all()
    ns.undo(out, res.record)
    np.testing.assert_array_equal(out, original)
