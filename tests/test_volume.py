"""Propagation mechanics, automatic per-slice segmentation, and the 3D merge."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import napari_sam as ns
from napari_sam.workflows import auto as auto_mod
from napari_sam.workflows import volume as V


# ---------------------------------------------------------------- the 3D merge
def test_merge_slices_exact_ids():
    s = np.zeros((4, 6, 8), np.uint16)
    s[0, 0:3, 0:3] = 5          # A
    s[0, 3:6, 5:8] = 2          # B
    s[1, 0:3, 0:3] = 1          # continues A (IoU 1)
    s[1, 3:6, 5:8] = 9          # continues B
    s[1, 0:2, 5:7] = 3          # new C
    s[2, 0:3, 1:3] = 4          # A again (IoU 6/9 with A)
    s[2, 3:6, 0:2] = 7          # new D (no overlap)
    s[3, 0:3, 0:3] = 1          # A; B and C ended, gap ids must not be reused
    s[3, 3:6, 5:8] = 2          # B came back after a gap: a NEW id, E
    out = auto_mod.merge_slices(s, min_iou=0.5)
    # new ids in order of first appearance: slice, then the 2D id (B=2 before A=5)
    A, B, C, D, E = 2, 1, 3, 4, 5
    expected = np.zeros_like(out)
    expected[0, 0:3, 0:3] = A
    expected[0, 3:6, 5:8] = B
    expected[1, 0:3, 0:3] = A
    expected[1, 3:6, 5:8] = B
    expected[1, 0:2, 5:7] = C
    expected[2, 0:3, 1:3] = A
    expected[2, 3:6, 0:2] = D
    expected[3, 0:3, 0:3] = A
    expected[3, 3:6, 5:8] = E
    assert out.dtype == np.uint32
    np.testing.assert_array_equal(out, expected)


def test_merge_one_to_one_and_threshold():
    s = np.zeros((2, 4, 8), np.uint8)
    s[0, :, 0:8] = 1            # one wide object
    s[1, :, 0:5] = 1            # splits into two: the better overlap keeps the id
    s[1, :, 5:8] = 2
    out = auto_mod.merge_slices(s, min_iou=0.3)
    assert (out[1, :, 0:5] == 1).all() and (out[1, :, 5:8] == 2).all()
    out = auto_mod.merge_slices(s, min_iou=0.7)  # 5/8 < 0.7: nothing links
    assert set(np.unique(out[1]).tolist()) == {2, 3}


def test_merge_matches_optimally_where_greedy_fails():
    """Previous slice: B1 = x 0..9, B2 = x 10..19. Now: A1 = x 3..14, A2 = x 0..2.
    IoU(A1, B1) = 7/15, IoU(A1, B2) = 5/17, IoU(A2, B1) = 3/10. Greedy takes the best pair
    (A1-B1) and leaves A2 unmatched; the optimal matching links both (A1-B2, A2-B1)."""
    s = np.zeros((2, 1, 20), np.uint8)
    s[0, 0, 0:10], s[0, 0, 10:20] = 1, 2
    s[1, 0, 3:15], s[1, 0, 0:3] = 1, 2
    out = auto_mod.merge_slices(s, min_iou=0.25)
    assert set(np.unique(out[1]).tolist()) == {0, 1, 2}  # no new id: both objects continue
    assert (out[1, 0, 3:15] == 2).all() and (out[1, 0, 0:3] == 1).all()


def test_small_region_cleanup_as_sams_generator():
    m = np.zeros((30, 30), bool)
    m[5:25, 5:25] = True
    m[10:12, 10:12] = False     # a 4-pixel hole
    m[14:20, 14:20] = False     # a 36-pixel hole
    m[0, 0] = m[28, 28] = True  # two 1-pixel islands
    out = auto_mod._clean(m, 10)
    assert out[10:12, 10:12].all() and not out[14:20, 14:20].any()
    assert not out[0, 0] and not out[28, 28]
    assert out.sum() == 400 - 36


def test_auto_with_small_region_cleanup(tiny_model, synthetic_stack):
    seg = ns.Segmenter(tiny_model, ns.open_stack(synthetic_stack))
    opts = dict(points_per_side=4, pred_iou_thresh=-1000.0, stability_score_thresh=-1.0)
    plain = auto_mod.auto_segment_slice(seg, 2, **opts)
    clean = auto_mod.auto_segment_slice(seg, 2, min_region_area=50, **opts)
    assert plain.shape == clean.shape and clean.max() >= 1
    assert all(np.count_nonzero(clean == k) >= 16 for k in range(1, int(clean.max()) + 1))


def test_auto_masks_are_sams_automatic_mask_generator(tiny_model, synthetic_stack):
    """Same embedding (the reference encoder), same settings: the same masks, in the same
    order, as segment-anything's own generator; with every candidate kept, then with a
    predicted-IoU threshold that keeps about half of them."""
    from segment_anything import SamAutomaticMaskGenerator

    stack = ns.open_stack(synthetic_stack)
    seg = ns.Segmenter(tiny_model, stack, speed="off")
    nms = 1.0  # random weights give near-identical boxes: keep them all through the NMS
    everything = auto_mod.auto_masks(seg, 2, points_per_side=4, pred_iou_thresh=-100.0,
                                     stability_score_thresh=0.0, box_nms_thresh=nms)
    half = float(np.median([m.score for m in everything]))
    for iou_t in (-100.0, half):
        ours = auto_mod.auto_masks(seg, 2, points_per_side=4, pred_iou_thresh=iou_t,
                                   stability_score_thresh=0.0, box_nms_thresh=nms)
        gen = SamAutomaticMaskGenerator(tiny_model.sam, points_per_side=4, points_per_batch=64,
                                        pred_iou_thresh=iou_t, stability_score_thresh=0.0,
                                        box_nms_thresh=nms, crop_n_layers=0,
                                        min_mask_region_area=0, output_mode="binary_mask")
        theirs = gen.generate(stack.rgb(2))
        assert len(ours) == len(theirs) and len(ours) > 0
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a.full(stack.slice_shape), b["segmentation"])
            assert a.score == pytest.approx(b["predicted_iou"], abs=1e-6)
            x0, y0, x1, y1 = a.box
            assert [x0, y0, x1 - x0, y1 - y0] == list(b["bbox"])
    assert 0 < len(ours) < len(everything)


# ---------------------------------------------------------------- propagation with a decoder we control
def _disk(shape, cy, cx, r):
    yy, xx = np.indices(shape)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


class FakeSegmenter(ns.Segmenter):
    """A Segmenter whose predict_many returns a scripted mask and score per slice."""

    def __init__(self, stack, script):
        self.stack = stack
        self.model = SimpleNamespace(mask_input_size=256)
        self.script = script  # slice index -> (mask, score)
        self.calls = []

    def predict_many(self, index, prompts, *, multimask=None):
        out = []
        for p in prompts:
            self.calls.append({"index": index, "points": p.points if p.n_points else None,
                               "box": p.box, "mask_input": p.mask_input,
                               "multimask": p.multimask if multimask is None else multimask})
            mask, score = self.script[index]
            out.append(SimpleNamespace(mask=mask, scores=np.array([score]), best=0, score=score,
                                       logits=np.full((1, 256, 256), float(index))))
        return out


@pytest.fixture
def stack():
    return ns.open_stack(np.zeros((9, 40, 40), np.uint16))


def test_propagate_stops_on_score_and_end(stack):
    script = {z: (_disk((40, 40), 20, 20, 8), 0.9) for z in range(9)}
    script[7] = (_disk((40, 40), 20, 20, 8), 0.2)  # low predicted IoU
    seg = FakeSegmenter(stack, script)
    r = V.propagate(seg, 4, points=[[20, 20]], min_score=0.5)
    assert r.stop == {"down": "end", "up": "score"}
    assert r.accepted == [0, 1, 2, 3, 4, 5, 6]
    assert r.visited == list(range(8))          # 8 was never visited
    assert not r.mask[7].any() and r.mask[:7].all(axis=0).any()
    assert [c["index"] for c in seg.calls][0] == 4  # the seed slice is predicted first


def test_propagate_stops_on_overlap_empty_and_max(stack):
    script = {z: (_disk((40, 40), 20, 20, 6), 0.9) for z in range(9)}
    script[2] = (_disk((40, 40), 20, 34, 5), 0.9)   # jumped away: IoU with slice 3 is 0
    script[6] = (np.zeros((40, 40), bool), 0.9)
    seg = FakeSegmenter(stack, script)
    r = V.propagate(seg, 4, mask=_disk((40, 40), 20, 20, 6), min_iou=0.3)
    assert r.stop == {"down": "overlap", "up": "empty"}
    assert r.accepted == [3, 4, 5]
    assert seg.calls[0]["index"] in (3, 5)          # a seed mask is not predicted again
    r = V.propagate(FakeSegmenter(stack, script), 4, mask=_disk((40, 40), 20, 20, 6), max_slices=1)
    assert r.accepted == [3, 4, 5] and r.stop == {"down": "max_slices", "up": "max_slices"}


@pytest.mark.parametrize("strategy", V.STRATEGIES)
def test_strategies_prompt_from_previous_mask(stack, strategy):
    seed = np.zeros((40, 40), bool)
    seed[10:20, 5:25] = True
    script = {z: (seed, 0.9) for z in range(9)}
    seg = FakeSegmenter(stack, script)
    V.propagate(seg, 4, mask=seed, strategy=strategy, max_slices=2)
    first = seg.calls[0]
    if strategy in ("box", "mask"):
        np.testing.assert_array_equal(first["box"], [10, 5, 20, 25])
        assert first["multimask"] is False
    if strategy == "points":
        pts = np.asarray(first["points"]).astype(int)
        assert len(pts) >= 1 and seed[pts[:, 0], pts[:, 1]].all()
    if strategy == "mask":
        assert first["mask_input"].shape == (1, 256, 256)  # Prompt keeps (1, s, s)
        m = first["mask_input"][0]
        # seed has no logits: the mask itself, in SAM's padded 256 frame (40 -> 1024 -> 256)
        assert m[int(15 * 6.4), int(15 * 6.4)] > 0 and m[200, 200] < 0
        later = [c for c in seg.calls if c["index"] == 2]
        assert later and (later[0]["mask_input"] == 3.0).all()  # slice 3's logits reused


def test_z_line_tzyx():
    st = ns.open_stack(np.zeros((2, 5, 16, 16), np.uint16), axes="TZYX")
    line, z0 = V.z_line(st, st.index((1, 3)))
    assert line == [st.index((1, z)) for z in range(5)] and z0 == 3


# ---------------------------------------------------------------- the real decoder (tiny model)
@pytest.fixture(scope="module")
def tiny_seg(tiny_model):
    rng = np.random.default_rng(0)
    img = rng.normal(100, 5, (4, 48, 48))
    img[:, 12:30, 10:34] += 400
    return ns.Segmenter(tiny_model, img.astype(np.uint16))


def test_propagate_many_batched_equals_one_by_one(tiny_seg):
    seeds = [V.Seed(1, box=[12, 10, 30, 34]), V.Seed(2, points=[[20, 20]]),
             V.Seed(1, mask=_disk((48, 48), 30, 30, 6))]
    opts = {"min_score": -1e9, "min_iou": 0.0, "strategy": "box"}
    batched = V.propagate_many(tiny_seg, seeds, **opts)
    single = V.propagate_many(tiny_seg, seeds, batch=False, **opts)
    for a, b in zip(batched, single):
        assert a.visited == b.visited and a.stop == b.stop
        assert np.mean(a.mask != b.mask) < 1e-3
        assert a.mask.shape == (4, 48, 48)


def test_auto_segment_slice_paints_disjoint_consecutive_ids(tiny_seg):
    lab = auto_mod.auto_segment_slice(tiny_seg, 1, points_per_side=6, pred_iou_thresh=-1e9,
                               stability_score_thresh=0.0, min_area=4, max_area_fraction=1.0)
    assert lab.shape == (48, 48) and lab.dtype == np.uint32
    ids = np.unique(lab[lab > 0])
    assert ids.tolist() == list(range(1, len(ids) + 1))
    # painted largest first: id 1 has the largest area
    if len(ids) > 1:
        areas = np.bincount(lab.ravel())[1:]
        assert areas[0] == areas.max()
