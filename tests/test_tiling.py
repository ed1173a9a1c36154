"""Tiled segmentation of large slices: geometry, prompt -> tile mapping, pasting, stores."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import napari_sam as ns
from napari_sam.workflows.tiling import TiledSegmenter, TiledStack, tile_starts


@pytest.fixture(scope="module")
def big():
    """(2, 200, 300) float32 with bright disks; tile 128 / overlap 32 gives a 2 x 3 grid."""
    rng = np.random.default_rng(3)
    img = rng.normal(100, 5, (2, 200, 300)).astype(np.float32)
    yy, xx = np.mgrid[:200, :300]
    for cy, cx in [(20, 30), (100, 150), (180, 280), (60, 230)]:
        img[:, (yy - cy) ** 2 + (xx - cx) ** 2 < 64] += 400
    return img


@pytest.mark.parametrize("size, tile, overlap", [(4000, 1024, 256), (1024, 1024, 256),
                                                  (500, 1024, 256), (1025, 1024, 0),
                                                  (200, 128, 32), (7, 3, 2), (1, 1, 0)])
def test_tile_starts_cover_and_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    length = min(tile, size)
    covered = np.zeros(size, bool)
    for s in starts:
        assert 0 <= s and s + length <= size
        covered[s : s + length] = True
    assert covered.all()
    for a, b in zip(starts, starts[1:]):
        assert a + length - b >= overlap  # neighbours overlap by at least `overlap`
    if (size, tile, overlap) == (4000, 1024, 256):
        assert starts == [0, 768, 1536, 2304, 2976]  # 5 x 5 = 25 tiles per 4000^2 slice


@pytest.mark.parametrize("tile, overlap", [(0, 0), (128, 128), (128, -1)])
def test_bad_geometry_is_refused(tile, overlap):
    with pytest.raises(ns.InvalidInputError, match="overlap"):
        tile_starts(200, tile, overlap)


def test_tiled_stack_views_are_crops_of_the_parent(big):
    stack = ns.open_stack(big)
    tiles = TiledStack(stack, tile=128, overlap=32)
    assert tiles.grid == (2, 3) and len(tiles) == 12 and tiles.slice_shape == (128, 128)
    assert tiles.shape == stack.shape and tiles.axes == stack.axes
    assert tiles.normalisation() == stack.normalisation()
    assert tiles.fingerprint() != stack.fingerprint()
    assert tiles.fingerprint() != TiledStack(stack, tile=128, overlap=16).fingerprint()
    for i in range(len(tiles)):
        s, t = tiles.locate(i)
        assert tiles.view_index(s, t.index) == i
        np.testing.assert_array_equal(tiles[i], big[s][t.region])
        np.testing.assert_array_equal(tiles.rgb(i), stack.rgb(s)[t.region])
    # every pixel of a slice is in some tile; fingerprints tell tiles apart
    cover = np.zeros(stack.slice_shape, bool)
    for t in tiles.tiles:
        cover[t.region] = True
    assert cover.all()
    assert len({tiles.slice_fingerprint(i) for i in range(6)}) == 6


def test_small_slice_is_one_tile(big):
    tiles = TiledStack(ns.open_stack(big), tile=1024)
    assert tiles.n_tiles == 1 and tiles.slice_shape == (200, 300)


def test_prompt_to_tile_mapping(big):
    tiles = TiledStack(ns.open_stack(big), tile=128, overlap=32)
    # a point near the top-left corner: tile 0
    assert tiles.tile_for(9.5, 9.5, 10.5, 10.5).index == 0
    # x = 150 lies in tile columns 1 (96..224) only... and y = 100 in both rows: nearest centre
    t = tiles.tile_for(99.5, 149.5, 100.5, 150.5)
    assert (t.x0, t.x1) == (96, 224) and t.contains(99.5, 149.5, 100.5, 150.5)
    # a box crossing the column overlap is put in the tile that contains it whole
    t = tiles.tile_for(10, 100, 40, 200)
    assert t.x0 <= 100 and t.x1 >= 200
    # nearest centre among the containing tiles
    t = tiles.tile_for(150, 250, 160, 260)
    assert t.index == 5
    with pytest.raises(ns.InvalidInputError, match="do not fit in one 128 x 128 tile"):
        tiles.tile_for(0, 0, 150, 150)


def _direct(model, big, stack, s, t, **prompts):
    """Segment the crop directly with a plain Segmenter, and paste it into a full mask."""
    crop = ns.open_stack(big[:, t.y0:t.y1, t.x0:t.x1], contrast_limits=stack.contrast_limits)
    mask = ns.Segmenter(model, crop).segment(s, **prompts)
    full = np.zeros(stack.slice_shape, bool)
    full[t.region] = mask
    return full


def test_masks_are_pasted_where_the_crop_says(tiny_model, big):
    stack = ns.open_stack(big)
    seg = TiledSegmenter(tiny_model, stack, tile=128, overlap=32)
    cases = [
        dict(points=[[180, 280]], point_labels=[1]),
        dict(points=[[100, 150], [110, 160]], point_labels=[1, 0]),
        dict(box=[40, 210, 80, 250]),
        dict(box=[80, 250, 40, 210], points=[[60, 230]]),  # inverted corners
    ]
    for prompts in cases:
        t = seg.tile_for(1, **prompts)
        mask = seg.segment(1, **prompts)
        off = np.array([t.y0, t.x0], float)
        local = {}
        if "points" in prompts:
            local["points"] = np.asarray(prompts["points"], float) - off
            if "point_labels" in prompts:
                local["point_labels"] = prompts["point_labels"]
        if "box" in prompts:
            local["box"] = np.asarray(prompts["box"], float) - np.tile(off, 2)
        np.testing.assert_array_equal(mask, _direct(tiny_model, big, stack, 1, t, **local))
        assert not mask[~np.pad(np.ones((t.y1 - t.y0, t.x1 - t.x0), bool),
                                ((t.y0, 200 - t.y1), (t.x0, 300 - t.x1)))].any()
    # only the prompted tiles were encoded (on demand), not the 6 tiles of the slice
    assert seg.cache.stats["encoder_calls"] == len({seg.tile_for(1, **p).index for p in cases})
    # three candidate masks, full size
    p = seg.predict(1, points=[[180, 280]])
    assert p.masks.shape == (3, 200, 300) and p.logits.shape == (3, 256, 256)


def test_segment_boxes_groups_by_tile(tiny_model, big):
    stack = ns.open_stack(big)
    seg = TiledSegmenter(tiny_model, stack, tile=128, overlap=32)
    boxes = [[10, 20, 30, 40], [170, 270, 190, 290], [12, 22, 32, 44]]
    masks = seg.segment_boxes(0, boxes)
    assert masks.shape == (3, 200, 300)
    for b, m in zip(boxes, masks):
        np.testing.assert_array_equal(m, seg.segment(0, box=b, multimask=False))
    assert seg.segment_boxes(0, np.zeros((0, 4))).shape == (0, 200, 300)


def test_store_reuse_and_separation(tiny_model, big, tmp_path):
    store = tmp_path / "e.zarr"
    stack = ns.open_stack(big)
    first = TiledSegmenter(tiny_model, stack, tile=128, overlap=32, cache=store)
    assert first.embed([0]) == 6
    m1 = first.segment(0, points=[[20, 30]])
    again = TiledSegmenter(tiny_model, ns.open_stack(big), tile=128, overlap=32, cache=store)
    m2 = again.segment(0, points=[[20, 30]])
    assert again.cache.stats["encoder_calls"] == 0 and again.cache.stats["store_hits"] == 1
    assert np.array_equal(m1, m2) or (m1 ^ m2).sum() < 0.01 * m1.size  # float16 store
    assert again.embed([0]) == 0  # resumable: nothing left to do
    # whole-slice embeddings of the same stack go to their own group
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = ns.Segmenter(tiny_model, stack, cache=store)
    assert plain.cache.store_group.path != again.cache.store_group.path


def test_tiled_errors_are_clear(tiny_model, big):
    seg = TiledSegmenter(tiny_model, ns.open_stack(big), tile=128, overlap=32)
    with pytest.raises(ns.InvalidInputError, match="no prompt"):
        seg.segment(0)
    with pytest.raises(ns.InvalidInputError, match="outside the slice"):
        seg.segment(0, points=[[500, 5]])
    with pytest.raises(ns.InvalidInputError, match="do not fit in one"):
        seg.segment(0, points=[[5, 5], [190, 290]])
    with pytest.raises(IndexError):
        seg.segment(2, points=[[5, 5]])
