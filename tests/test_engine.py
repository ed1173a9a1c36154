"""EmbeddingCache and Segmenter: equivalence with SamPredictor, caching, stores."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

import napari_sam as ns
from napari_sam.engine.store import EmbeddingStoreWarning


def iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def random_prompts(rng, shape, n=3):
    """Random point sets and boxes, as (y, x)."""
    h, w = shape
    out = []
    for _ in range(n):
        k = rng.integers(1, 4)
        pts = np.column_stack([rng.uniform(0, h - 1, k), rng.uniform(0, w - 1, k)])
        labels = rng.integers(0, 2, k)
        labels[0] = 1
        y0, y1 = np.sort(rng.uniform(0, h - 1, 2))
        x0, x1 = np.sort(rng.uniform(0, w - 1, 2))
        out.append((pts, labels, np.array([y0, x0, y1 + 1, x1 + 1])))
    return out


def reference(model, rgb):
    from segment_anything import SamPredictor

    pred = SamPredictor(model.sam)
    pred.set_image(rgb)
    return pred


def check_equivalent(seg, index, pred, rng, *, exact=True):
    ious = []
    for pts, labels, box in random_prompts(rng, seg.stack.slice_shape):
        xy = pts[:, ::-1]
        box_xy = box[[1, 0, 3, 2]]
        cases = [
            (dict(points=pts, point_labels=labels), dict(point_coords=xy, point_labels=labels)),
            (dict(box=box), dict(box=box_xy)),
            (dict(points=pts, point_labels=labels, box=box),
             dict(point_coords=xy, point_labels=labels, box=box_xy)),
        ]
        for ours_kw, ref_kw in cases:
            ref_masks, ref_scores, ref_logits = pred.predict(**ref_kw, multimask_output=True)
            p = seg.predict(index, **ours_kw)
            assert p.masks.shape == ref_masks.shape
            assert p.best == int(np.argmax(ref_scores))
            if exact:
                np.testing.assert_array_equal(p.masks, ref_masks)
                np.testing.assert_array_equal(p.scores, ref_scores)
            else:
                ious += [iou(a, b) for a, b in zip(p.masks, ref_masks)]
            # refinement from the previous logits
            ref2, _, _ = pred.predict(**ref_kw, mask_input=ref_logits[[p.best]], multimask_output=False)
            p2 = seg.predict(index, **ours_kw, mask_input=p.logits[p.best], multimask=False)
            if exact:
                np.testing.assert_array_equal(p2.masks, ref2)
            else:
                ious.append(iou(p2.mask, ref2[0]))
    return ious


def test_segmenter_equals_sampredictor_on_dsb2018(tiny_model, data_dir):
    stack = ns.open_stack(data_dir / "dsb2018" / "img2d.tif")
    seg = ns.Segmenter(tiny_model, stack, speed="off")  # the reference encoder: bit-exact
    check_equivalent(seg, 0, reference(tiny_model, stack.rgb(0)), np.random.default_rng(0))


def test_segmenter_equals_sampredictor_on_synthetic_stack(tiny_model, synthetic_stack):
    stack = ns.open_stack(synthetic_stack)
    seg = ns.Segmenter(tiny_model, stack, speed="off")
    rng = np.random.default_rng(1)
    for index in (4,):
        check_equivalent(seg, index, reference(tiny_model, stack.rgb(index)), rng)
    assert seg.cache.stats["encoder_calls"] == 1


def test_float16_store_masks_match_float32(tiny_model, data_dir, tmp_path):
    stack = ns.open_stack(data_dir / "dsb2018" / "img2d.tif")
    ns.Segmenter(tiny_model, stack, cache=tmp_path / "e.zarr", speed="off").embed()
    seg = ns.Segmenter(tiny_model, stack, cache=tmp_path / "e.zarr", memory_bytes=0, speed="off")
    ious = check_equivalent(seg, 0, reference(tiny_model, stack.rgb(0)), np.random.default_rng(2), exact=False)
    assert seg.cache.stats["encoder_calls"] == 0 and seg.cache.stats["store_hits"] > 0
    assert np.median(ious) >= 0.99 and min(ious) >= 0.95, (np.median(ious), min(ious))


def _stored_bytes(store) -> int:
    """Bytes on disk of one slice: its features chunk and (int8) its scales chunk."""
    import zarr

    root = zarr.open_group(store, mode="r")
    [(key, group)] = list(root.groups())
    total = 0
    for name in ("features", "scales"):
        folder = Path(store) / key / name
        chunks = [f for f in folder.rglob("*") if f.is_file() and f.name != "zarr.json"]
        total += sum(f.stat().st_size for f in chunks) // max(len(chunks), 1) if chunks else 0
    return total


def test_int8_store_is_1_mb_per_slice_and_masks_match_float32(tiny_model, data_dir, tmp_path):
    """The default store: int8 features with a scale per channel. Against SAM on fresh
    float32 features, on a real image: median mask IoU >= 0.99, p5 >= 0.97."""
    stack = ns.open_stack(data_dir / "dsb2018" / "img2d.tif")
    ns.Segmenter(tiny_model, stack, cache=tmp_path / "e.zarr", speed="off").embed()
    assert tiny_model.feature_shape == (256, 64, 64)  # as vit_b, vit_l and vit_h
    assert _stored_bytes(tmp_path / "e.zarr") <= 1.1e6
    seg = ns.Segmenter(tiny_model, stack, cache=tmp_path / "e.zarr", memory_bytes=0, speed="off")
    ious = check_equivalent(seg, 0, reference(tiny_model, stack.rgb(0)),
                            np.random.default_rng(4), exact=False)
    assert seg.cache.stats["encoder_calls"] == 0 and seg.cache.stats["store_hits"] > 0
    assert len(ious) >= 30
    assert np.median(ious) >= 0.99 and np.percentile(ious, 5) >= 0.97, (
        np.median(ious), np.percentile(ious, 5))


def test_older_float16_store_is_still_read(tiny_model, synthetic_stack, tmp_path):
    stack = ns.open_stack(synthetic_stack)
    ns.Segmenter(tiny_model, stack, cache=tmp_path / "e.zarr", store_dtype="float16").embed([1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "different stored dtype" warning: it is read
        seg = ns.Segmenter(tiny_model, stack, cache=tmp_path / "e.zarr")
    assert seg.cache.store_dtype == "int8"
    assert seg.is_stored(1) and seg.is_stored(2) and not seg.is_stored(3)
    seg.embed([1, 2, 3])  # only slice 3 is encoded
    assert seg.cache.stats["encoder_calls"] == 1
    fresh = ns.Segmenter(tiny_model, stack, speed=seg.cache.speed).embedding(2).features
    assert (seg.embedding(2).features - fresh).abs().max() <= 1e-2 * fresh.abs().max()
    assert seg.cache.stats["store_hits"] == 1 and seg.cache.stats["encoder_calls"] == 1
    again = ns.Segmenter(tiny_model, stack, cache=tmp_path / "e.zarr")
    assert list(again.cache.stored_indices()) == [1, 2, 3]


def test_float32_store_is_exact(tiny_model, synthetic_stack, tmp_path):
    stack = ns.open_stack(synthetic_stack)
    ns.Segmenter(tiny_model, stack, cache=tmp_path / "e.zarr", store_dtype="float32", speed="off").embed([2])
    seg = ns.Segmenter(tiny_model, stack, cache=tmp_path / "e.zarr", store_dtype="float32", speed="off")
    check_equivalent(seg, 2, reference(tiny_model, stack.rgb(2)), np.random.default_rng(3))
    assert seg.cache.stats["encoder_calls"] == 0


@pytest.mark.parametrize("speed, min_iou", [("fused", 0.999), ("auto", 0.98)])
def test_segment_boxes_is_one_batch_equal_to_single_boxes(tiny_model, synthetic_stack, speed, min_iou):
    # float32 ("fused"): batch and single agree to rounding; "auto" may run the decoder's
    # image side in bf16, where a batch of 3 and of 1 round a few near-zero logits apart
    seg = ns.Segmenter(tiny_model, synthetic_stack, speed=speed)
    boxes = np.array([[10, 10, 40, 50], [30, 60, 90, 120], [0, 0, 95, 127]])
    masks = seg.segment_boxes(1, boxes)
    assert masks.shape == (3, 96, 128) and masks.dtype == bool
    for box, mask in zip(boxes, masks):
        single = seg.predict(1, box=box, multimask=False).mask
        assert iou(mask, single) >= min_iou
    assert seg.segment_boxes(1, np.zeros((0, 4))).shape == (0, 96, 128)


def test_three_masks_exposed_with_scores(tiny_model, synthetic_stack):
    seg = ns.Segmenter(tiny_model, synthetic_stack)
    p = seg.predict(0, points=[[40, 40]], point_labels=[1])
    assert len(p) == 3 and p.scores.shape == (3,) and p.logits.shape == (3, 256, 256)
    assert p.best == int(np.argmax(p.scores))
    np.testing.assert_array_equal(p.mask, p.masks[p.best])
    mask = seg.segment(0, points=[[40, 40]])
    assert mask.shape == (96, 128) and mask.dtype == bool


def test_memory_cache_is_bounded_in_bytes(tiny_model, synthetic_stack):
    per_slice = 256 * 64 * 64 * 4
    cache = ns.EmbeddingCache(tiny_model, ns.open_stack(synthetic_stack), memory_bytes=2 * per_slice)
    for i in range(6):
        cache.get(i)
    assert len(cache._memory) == 2 and cache._memory_used <= 2 * per_slice
    cache.get(5)
    assert cache.stats["memory_hits"] == 1 and cache.stats["encoder_calls"] == 6
    cache.get(0)  # evicted: recomputed
    assert cache.stats["encoder_calls"] == 7


def test_embed_is_resumable_and_reports_progress(tiny_model, synthetic_stack, tmp_path):
    stack = ns.open_stack(synthetic_stack)
    seg = ns.Segmenter(tiny_model, stack, cache=tmp_path / "e.zarr")
    calls = []
    assert seg.embed(range(3), progress=lambda d, t: calls.append((d, t))) == 3
    assert calls == [(1, 3), (2, 3), (3, 3)]
    seg2 = ns.Segmenter(tiny_model, stack, cache=tmp_path / "e.zarr")
    assert seg2.embed() == 3  # only the 3 missing slices
    assert sorted(seg2.cache.stored_indices()) == list(range(6))
    stopped = ns.Segmenter(tiny_model, stack, cache=tmp_path / "f.zarr")
    assert stopped.embed(should_stop=lambda: stopped.cache.stats["encoder_calls"] >= 2) == 2


def _write_stack(path, data):
    tifffile.imwrite(path, data)
    return path


SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    import napari_sam as ns
    warnings.simplefilter("always")
    model = ns.load_model(checkpoint=sys.argv[1], device="cpu")
    seg = ns.Segmenter(model, sys.argv[2], cache=sys.argv[3])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for i in range(len(seg.stack)):
            seg.cache.get(i)
    print(json.dumps({"stats": seg.cache.stats, "warnings": [str(x.message) for x in w]}))
    """
)


def run_process(*args):
    out = subprocess.run([sys.executable, "-c", SCRIPT, *map(str, args)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_store_reopened_in_new_process_makes_no_encoder_call(tiny_checkpoint, synthetic_stack, tmp_path):
    tif = _write_stack(tmp_path / "s.tif", synthetic_stack)
    first = run_process(tiny_checkpoint, tif, tmp_path / "e.zarr")
    assert first["stats"]["encoder_calls"] == 6
    second = run_process(tiny_checkpoint, tif, tmp_path / "e.zarr")
    assert second["stats"]["encoder_calls"] == 0
    assert second["stats"]["store_hits"] == 6 and second["warnings"] == []


def test_two_processes_share_one_store(tiny_checkpoint, synthetic_stack, tmp_path):
    tif = _write_stack(tmp_path / "s.tif", synthetic_stack)
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(tiny_checkpoint), str(tif),
                               str(tmp_path / "e.zarr")], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        p.communicate()
        assert p.returncode == 0
    after = run_process(tiny_checkpoint, tif, tmp_path / "e.zarr")
    assert after["stats"]["encoder_calls"] == 0 and after["warnings"] == []


def test_changed_slice_is_recomputed_not_served_stale(tiny_model, synthetic_stack, tmp_path):
    data = synthetic_stack.copy()
    ns.Segmenter(tiny_model, data, cache=tmp_path / "e.zarr").embed()
    data[3, 10:20, 10:20] += 1  # not among the fingerprint's sampled slices (0, 3?, 5)
    data[4, 10:20, 10:20] += 1
    seg = ns.Segmenter(tiny_model, ns.open_stack(data, contrast_limits=ns.open_stack(synthetic_stack).contrast_limits),
                       cache=tmp_path / "e.zarr")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        for i in range(6):
            seg.cache.get(i)
    fresh = ns.EmbeddingCache(tiny_model, seg.stack).get(4)
    assert (seg.cache.get(4).features - fresh.features).abs().max() < 1e-2
    assert seg.cache.stats["encoder_calls"] >= 2  # both changed slices recomputed


def test_changed_model_or_normalisation_recomputes(tiny_model, synthetic_stack, tmp_path):
    from napari_sam.testing import make_tiny_checkpoint

    store = tmp_path / "e.zarr"
    ns.Segmenter(tiny_model, synthetic_stack, cache=store).embed([0])
    other = ns.load_model(checkpoint=make_tiny_checkpoint(tmp_path / "other.pth", seed=1), device="cpu")
    with pytest.warns(EmbeddingStoreWarning, match="different model"):
        seg = ns.Segmenter(other, synthetic_stack, cache=store)
    seg.cache.get(0)
    assert seg.cache.stats["encoder_calls"] == 1
    with pytest.warns(EmbeddingStoreWarning, match="normalisation"):
        seg = ns.Segmenter(tiny_model, ns.open_stack(synthetic_stack, contrast_limits=(0, 5000)), cache=store)
    seg.cache.get(0)
    assert seg.cache.stats["encoder_calls"] == 1
    # the original embeddings were kept and are still served
    seg = ns.Segmenter(tiny_model, synthetic_stack, cache=store)
    seg.cache.get(0)
    assert seg.cache.stats["encoder_calls"] == 0


def test_truncated_chunk_is_detected_and_recomputed(tiny_model, synthetic_stack, tmp_path):
    store = tmp_path / "e.zarr"
    first = ns.Segmenter(tiny_model, synthetic_stack, cache=store)
    first.embed([1])
    chunk = Path(first.cache.store_group.store.root) / first.cache.store_group.path / "features" / "c" / "1" / "0" / "0" / "0"
    assert chunk.exists()
    chunk.write_bytes(chunk.read_bytes()[:1000])
    seg = ns.Segmenter(tiny_model, synthetic_stack, cache=store)
    with pytest.warns(EmbeddingStoreWarning, match="recomputing slice 1"):
        emb = seg.cache.get(1)
    assert seg.cache.stats["encoder_calls"] == 1
    assert emb.features.shape == (1, 256, 64, 64)
    # and the repaired chunk is served next time
    again = ns.Segmenter(tiny_model, synthetic_stack, cache=store)
    again.cache.get(1)
    assert again.cache.stats["encoder_calls"] == 0


def test_foreign_zarr_is_never_written(tiny_model, synthetic_stack, tmp_path):
    import zarr

    user = zarr.open_array(tmp_path / "data.zarr", mode="w", shape=(4, 4), dtype="u1")
    user[:] = 7
    with pytest.raises(ns.InvalidInputError, match="napari-sam did not write"):
        ns.Segmenter(tiny_model, synthetic_stack, cache=tmp_path / "data.zarr")
    assert (zarr.open_array(tmp_path / "data.zarr", mode="r")[:] == 7).all()


def test_prompt_errors_are_clear(tiny_model, synthetic_stack):
    seg = ns.Segmenter(tiny_model, synthetic_stack)
    with pytest.raises(ns.InvalidInputError, match="no prompt"):
        seg.segment(0)
    with pytest.raises(ns.InvalidInputError, match=r"outside the slice of shape \(96, 128\)"):
        seg.segment(0, points=[[200, 5]])
    with pytest.raises(ns.InvalidInputError, match=r"shape \(N, 2\)"):
        seg.segment(0, points=[[1, 2, 3]])
    with pytest.raises(ns.InvalidInputError, match="1 \\(positive\\) or 0"):
        seg.segment(0, points=[[5, 5]], point_labels=[2])
    with pytest.raises(ns.InvalidInputError, match="no area"):
        seg.segment(0, box=[10, 10, 10, 40])
    with pytest.raises(IndexError, match="6 slices"):
        seg.segment(6, points=[[5, 5]])
    # inverted box corners are accepted
    a = seg.segment(0, box=[40, 50, 10, 20])
    b = seg.segment(0, box=[10, 20, 40, 50])
    np.testing.assert_array_equal(a, b)


def test_fast_path_is_default_and_keyed_in_the_store(tiny_model, synthetic_stack, tmp_path):
    """The default encoder is the fast path for the device; a store keeps precisions apart."""
    from napari_sam.models.speed import speed_config

    seg = ns.Segmenter(tiny_model, synthetic_stack, cache=tmp_path / "e.zarr")
    assert seg.cache.speed == speed_config(tiny_model.device)
    seg.embed([0])
    with pytest.warns(EmbeddingStoreWarning, match="encoder precision"):
        ref = ns.Segmenter(tiny_model, synthetic_stack, cache=tmp_path / "e.zarr", speed="off")
    ref.cache.get(0)
    assert ref.cache.stats["encoder_calls"] == 1  # not served the fast path's features
    fast = seg.cache.get(0).features
    exact = ref.cache.get(0).features
    scale = exact.abs().mean()
    assert ((fast - exact).abs().mean() / scale) < 0.05


def test_batched_embed_equals_one_by_one(tiny_model, synthetic_stack, tmp_path):
    from napari_sam.models.speed import speed_config, with_batch_size

    cfg = with_batch_size(speed_config(tiny_model.device, mode="fused"), 4)
    batched = ns.Segmenter(tiny_model, synthetic_stack, cache=tmp_path / "b.zarr", speed=cfg)
    assert batched.embed() == 6 and batched.embed() == 0
    single = ns.Segmenter(tiny_model, synthetic_stack, speed=speed_config(tiny_model.device, mode="fused"))
    for i in (0, 5):
        a, b = batched.cache.get(i).features, single.cache.get(i).features
        assert (a - b).abs().max() <= 1e-2 * b.abs().max()  # float16 store


WALK_SCRIPT = textwrap.dedent(
    """
    import json, sys, numpy as np, psutil
    import napari_sam as ns
    model = ns.load_model(checkpoint=sys.argv[1], device="cpu")
    import tifffile
    from napari_sam.synthetic import make_nuclei_stack
    tile = make_nuclei_stack((1, 512, 512), n_nuclei=12, z_anisotropy=1.0)[0][0]
    page = np.zeros((2048, 2048), np.uint16)
    page[:512, :512] = tile
    tifffile.imwrite(sys.argv[2], (np.roll(page, z, axis=1) for z in range(90)), shape=(90, 2048, 2048),
                     dtype=np.uint16, compression="zlib", photometric="minisblack")
    stack = ns.open_stack(sys.argv[2])
    cache = ns.EmbeddingCache(model, stack, memory_bytes=4 * 256 * 64 * 64 * 4)
    rss = []
    for i in range(len(stack)):
        cache.get(i)
        rss.append(psutil.Process().memory_info().rss)
    print(json.dumps(rss))
    """
)


@pytest.mark.slow
def test_rss_stays_flat_while_walking_slices(tiny_checkpoint, tmp_path):
    """RSS stays flat once the memory cache is full (bench_engine walks 1000 slices)."""
    out = subprocess.run([sys.executable, "-c", WALK_SCRIPT, str(tiny_checkpoint), str(tmp_path / "walk.tif")],
                         capture_output=True, text=True, check=True)
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    walked = 60 * 2048 * 2048 * 2  # raw bytes of slices 30..90 (uint16)
    growth = max(rss[30:]) - rss[30]
    # relative to what was read: a leak of one slice copy per slice would be 100 %
    assert growth < walked / 8, f"RSS grew by {growth / 1e6:.0f} MB over {walked / 1e6:.0f} MB read"
