"""The fast mask decoder (napari_sam._decoder) against ``sam.mask_decoder``.

float32: logits within 1e-4 of the reference (float rounding); bf16: the sign of the
low-res logits (the mask) agrees on >= 99 % of pixels, predicted IoU within 0.02.
"""

from __future__ import annotations

import numpy as np
import pytest

import napari_sam as ns

torch = pytest.importorskip("torch")
from napari_sam.models import speed as fast
from napari_sam.models._decoder import FastDecoder, decoder_for, is_stock_decoder
from napari_sam.models.speed import OFF, speed_config
from napari_sam.testing import make_tiny_sam

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def sam():
    return make_tiny_sam(seed=7)


def _features(seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 256, 64, 64, generator=g).to(device)


def _prompts(sam, kind: str, seed=0, device="cpu"):
    """Prompt-encoder inputs for one kind of prompt set (SAM's xy in the 1024 frame)."""
    g = torch.Generator().manual_seed(seed)
    b = 3 if kind.startswith("batch") else 1
    points = boxes = masks = None
    if "points" in kind or kind == "batch":
        coords = torch.rand(b, 4, 2, generator=g) * 1000
        labels = torch.tensor([[1, 0, 1, -1]] * b)  # -1: SAM's padding label
        points = (coords.to(device), labels.to(device))
    if "box" in kind:
        xy = torch.rand(b, 2, generator=g) * 500
        boxes = torch.cat([xy, xy + 100 + torch.rand(b, 2, generator=g) * 300], 1).to(device)
    if "mask" in kind:
        masks = (torch.randn(b, 1, 256, 256, generator=g) * 3).to(device)
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=masks)
    return sparse, dense, masks is None


def _reference(sam, feats, sparse, dense, multimask):
    with torch.inference_mode():
        return sam.mask_decoder(
            image_embeddings=feats, image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )


KINDS = ["points", "box", "points+box", "points+mask", "batch", "batch+box", "batch+points+mask"]


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_float32_matches_reference(sam, kind, multimask):
    feats = _features()
    sparse, dense, constant = _prompts(sam, kind)
    ref_logits, ref_iou = _reference(sam, feats, sparse, dense, multimask)
    dec = FastDecoder(sam, torch.float32)
    for _ in range(2):  # the second call reuses the slice's first-block projections
        logits, iou = dec(feats, sparse, dense, multimask=multimask, dense_is_constant=constant)
        assert logits.shape == ref_logits.shape and iou.shape == ref_iou.shape
        assert logits.dtype == torch.float32 and iou.dtype == torch.float32
        assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
        assert torch.allclose(iou, ref_iou, atol=1e-5)


def test_bf16_agrees_in_sign(sam):
    dec = FastDecoder(sam, torch.bfloat16)
    agree, iou_err = [], []
    for seed, kind in enumerate(KINDS):
        feats = _features(seed)
        sparse, dense, constant = _prompts(sam, kind, seed=seed)
        ref_logits, ref_iou = _reference(sam, feats, sparse, dense, True)
        logits, iou = dec(feats, sparse, dense, multimask=True, dense_is_constant=constant)
        assert logits.dtype == torch.float32
        agree.append(float(((logits > 0) == (ref_logits > 0)).float().mean()))
        iou_err.append(float((iou - ref_iou).abs().max()))
    assert min(agree) >= 0.99, agree
    assert max(iou_err) <= 0.02, iou_err
    # and bf16 really is a different computation (the test would catch a silent fp32)
    assert not torch.equal(logits, ref_logits)


def test_slice_projections_are_reused_per_slice_and_bounded(sam):
    dec = FastDecoder(sam, torch.float32)
    sparse, dense, _ = _prompts(sam, "points")
    slices = [_features(s) for s in range(4)]
    first = dec(slices[0], sparse, dense, multimask=True, dense_is_constant=True)
    state = dec._slices[id(slices[0])][1]
    again = dec(slices[0], sparse, dense, multimask=True, dense_is_constant=True)
    assert dec._slices[id(slices[0])][1] is state  # reused, not recomputed
    assert torch.equal(first[0], again[0])
    for f in slices[1:]:  # other slices give their own results, and the cache stays small
        out = dec(f, sparse, dense, multimask=True, dense_is_constant=True)
        assert torch.allclose(out[0], _reference(sam, f, sparse, dense, True)[0], atol=1e-4)
    assert len(dec._slices) <= 2


def test_changed_weights_are_seen(sam):
    dec = FastDecoder(sam, torch.float32)
    feats = _features()
    sparse, dense, _ = _prompts(sam, "points+box")
    before = dec(feats, sparse, dense, multimask=True, dense_is_constant=True)[0]
    with torch.no_grad():  # e.g. a fine-tuned state loaded into the same model
        sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj.weight.mul_(1.5)
        sam.mask_decoder.output_upscaling[0].bias.add_(0.3)
    after = dec(feats, sparse, dense, multimask=True, dense_is_constant=True)[0]
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.allclose(after, _reference(sam, feats, sparse, dense, True)[0], atol=1e-4)
    # a projection replaced by a new module of the same type is seen too
    attn = sam.mask_decoder.transformer.layers[1].cross_attn_image_to_token
    new = torch.nn.Linear(attn.q_proj.in_features, attn.q_proj.out_features)
    attn.q_proj = new
    replaced = dec(feats, sparse, dense, multimask=True, dense_is_constant=True)[0]
    assert not torch.allclose(replaced, after, atol=1e-3)
    assert torch.allclose(replaced, _reference(sam, feats, sparse, dense, True)[0], atol=1e-4)


def test_wrapped_projection_falls_back_to_the_module(sam):
    class Adapted(torch.nn.Linear):  # e.g. a LoRA-style adapter: forward is not x @ W.T + b
        def forward(self, x):
            return super().forward(x) * 1.5

    attn = sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image
    adapted = Adapted(attn.k_proj.in_features, attn.k_proj.out_features)
    adapted.load_state_dict(attn.k_proj.state_dict())
    dec = FastDecoder(sam, torch.float32)
    feats = _features()
    sparse, dense, _ = _prompts(sam, "points")
    dec(feats, sparse, dense, multimask=True, dense_is_constant=True)  # stock: fast path
    attn.k_proj = adapted
    assert not is_stock_decoder(sam)
    out = dec(feats, sparse, dense, multimask=True, dense_is_constant=True)
    assert torch.equal(out[0], _reference(sam, feats, sparse, dense, True)[0])


def test_modified_decoder_falls_back_to_the_module(sam):
    assert is_stock_decoder(sam)
    calls = []
    sam.mask_decoder.transformer.layers[1].register_forward_hook(lambda *a: calls.append(1))
    assert not is_stock_decoder(sam)
    feats = _features()
    sparse, dense, _ = _prompts(sam, "points")
    out = FastDecoder(sam, torch.bfloat16)(feats, sparse, dense, multimask=True, dense_is_constant=True)
    assert calls  # the hooked module really ran
    assert torch.equal(out[0], _reference(sam, feats, sparse, dense, True)[0])


def test_decoder_for_is_one_per_model_and_dtype(sam):
    a = decoder_for(sam, torch.float32)
    assert decoder_for(sam, torch.float32) is a
    assert decoder_for(sam, torch.bfloat16) is not a
    assert decoder_for(make_tiny_sam(seed=7), torch.float32) is not a


def test_speed_config_switches_the_decoder(monkeypatch):
    monkeypatch.delenv(fast.ENV_FAST, raising=False)
    assert speed_config("cpu").fast_decoder and speed_config("cpu", mode="fused").fast_decoder
    assert not speed_config("cpu", mode="off").fast_decoder and not OFF.fast_decoder
    assert fast.decoder_dtype("cpu", speed_config("cpu", mode="fused")) == torch.float32
    assert fast.decoder_dtype("cpu", speed_config("cpu", mode="bf16")) == torch.bfloat16
    # batch jobs: same encoder, decoder image side in float32 (labels independent of
    # thread count and prompt grouping)
    batch_cfg = fast.reproducible(speed_config("cpu", mode="bf16"))
    assert batch_cfg.autocast == "bf16" and fast.decoder_dtype("cpu", batch_cfg) == torch.float32
    with pytest.raises(ValueError, match="decoder_precision"):
        fast.SpeedConfig(decoder_precision="bf16")
    monkeypatch.setenv(fast.ENV_FAST, "0")
    assert not speed_config("cpu").fast_decoder


def test_segmenter_fast_and_reference_decoders_agree(tiny_model, synthetic_stack):
    ref = ns.Segmenter(tiny_model, synthetic_stack, speed="off")
    fused = ns.Segmenter(tiny_model, synthetic_stack, speed="fused")
    emb = ref.embedding(1)
    rng = np.random.default_rng(0)
    for _ in range(5):
        pts = rng.uniform(0, 90, (3, 2))
        labels = rng.integers(0, 2, 3)
        a = tiny_model.decode(emb, points=pts[None], point_labels=labels[None], multimask=True, speed=OFF)
        b = tiny_model.decode(emb, points=pts[None], point_labels=labels[None], multimask=True,
                   speed=speed_config("cpu", mode="fused"))
        assert torch.allclose(a[0], b[0], atol=1e-4) and torch.allclose(a[1], b[1], atol=1e-5)
        p_ref = ref.predict(1, points=pts, point_labels=labels)
        p_fast = fused.predict(1, points=pts, point_labels=labels)
        np.testing.assert_allclose(p_fast.logits, p_ref.logits, atol=1e-3)
        assert p_fast.best == p_ref.best


@pytest.mark.parametrize("speed", ["fused", "bf16"])
def test_end_to_end_masks_match_sampredictor_on_real_image(tiny_model, data_dir, speed):
    """What a user gets (fast encoder + fast decoder) against SamPredictor, DSB2018 slice.

    The issue's fidelity target: median IoU >= 0.99, 5th percentile >= 0.95.
    """
    from segment_anything import SamPredictor

    stack = ns.open_stack(data_dir / "dsb2018" / "img2d.tif")
    rgb = stack.rgb(0)
    pred = SamPredictor(tiny_model.sam)
    pred.set_image(rgb)
    seg = ns.Segmenter(tiny_model, stack, speed=speed)
    rng = np.random.default_rng(0)
    ious = []
    for _ in range(24):
        pts = rng.uniform(0, rgb.shape[0] - 1, (int(rng.integers(1, 4)), 2))
        labels = rng.integers(0, 2, len(pts))
        labels[0] = 1
        m, s, _ = pred.predict(point_coords=pts[:, ::-1], point_labels=labels)
        ref = m[np.argmax(s)]
        got = seg.segment(0, points=pts, point_labels=labels)
        union = np.logical_or(got, ref).sum()
        ious.append(1.0 if union == 0 else np.logical_and(got, ref).sum() / union)
    if speed == "fused":
        assert min(ious) >= 0.99, ious
    assert np.median(ious) >= 0.99 and np.percentile(ious, 5) >= 0.95, ious


@requires_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cuda_decoder(dtype):
    sam = make_tiny_sam(seed=7).to("cuda")
    feats = _features(device="cuda")
    sparse, dense, constant = _prompts(sam, "batch+box", device="cuda")
    ref_logits, _ = _reference(sam, feats, sparse, dense, True)
    logits, _ = FastDecoder(sam, getattr(torch, dtype))(feats, sparse, dense, multimask=True,
                                                        dense_is_constant=constant)
    agree = float(((logits > 0) == (ref_logits > 0)).float().mean())
    assert agree >= (0.9999 if dtype == "float32" else 0.99)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_early_rejection_keeps_exact_logits_and_skips_the_rest(sam, dtype):
    """min_score: prompts with no mask scored above it are not upscaled (NaN logits); the
    others' logits and every score are those of a full decode, bit for bit."""
    feats = _features(seed=2)
    g = torch.Generator().manual_seed(3)
    coords, labels = torch.rand(12, 1, 2, generator=g) * 1000, torch.ones(12, 1, dtype=torch.long)
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    dec = FastDecoder(sam, dtype)
    full, iou = dec(feats, sparse, dense, multimask=True, dense_is_constant=True)
    threshold = float(iou.amax(dim=1).median())  # about half the prompts pass
    got, got_iou = dec(feats, sparse, dense, multimask=True, dense_is_constant=True, min_score=threshold)
    kept = iou.amax(dim=1) > threshold
    assert 0 < int(kept.sum()) < 12
    assert torch.equal(got_iou, iou)
    assert torch.equal(got[kept], full[kept])
    assert torch.isnan(got[~kept]).all()
    # and against segment-anything's own decoder
    ref, ref_iou = _reference(sam, feats, sparse, dense, True)
    if dtype == torch.float32:
        assert torch.allclose(got[kept], ref[kept], atol=1e-4, rtol=1e-4)
        assert torch.allclose(got_iou, ref_iou, atol=1e-5)


def test_segment_everything_fast_equals_reference_decoder(tiny_model, synthetic_stack):
    """auto_masks through the fast decoder (folded attention, early rejection, fp32 as in
    batch jobs) finds the masks segment-anything's decoder finds, in the same order."""
    from napari_sam.workflows import auto

    stack = ns.open_stack(synthetic_stack)
    ref_seg = ns.Segmenter(tiny_model, stack, speed="off")
    fast_seg = ns.Segmenter(tiny_model, stack, speed="fused")
    everything = auto.auto_masks(ref_seg, 2, points_per_side=6, pred_iou_thresh=-100.0,
                                 stability_score_thresh=0.0, box_nms_thresh=1.0)
    half = float(np.median([m.score for m in everything]))
    opts = dict(points_per_side=6, pred_iou_thresh=half, stability_score_thresh=0.0, box_nms_thresh=1.0)
    ref = auto.auto_masks(ref_seg, 2, **opts)
    got = auto.auto_masks(fast_seg, 2, **opts)
    assert 0 < len(ref) < len(everything)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.score == pytest.approx(b.score, abs=1e-4)
        fa, fb = a.full(stack.slice_shape), b.full(stack.slice_shape)
        # float rounding may flip a pixel whose logit is ~0, nothing more
        assert np.count_nonzero(fa != fb) <= max(2, 0.001 * fb.sum())


def test_float32_decoder_does_not_depend_on_the_thread_count(sam):
    """Batch jobs decode in float32 so that a run with other threads (a resumed job, a
    cluster worker) paints the same labels: no sum may be split differently per thread.
    (Power-of-two thread counts: with 3, torch's elementwise exp splits a tensor off its
    SIMD width and may round a few values differently in the last bit.)"""
    feats = _features(seed=4)
    prompts = {kind: _prompts(sam, kind, seed=5) for kind in ("points", "batch+box", "points+mask")}
    outs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 4, 1):
            torch.set_num_threads(threads)
            for kind, (sparse, dense, constant) in prompts.items():
                dec = FastDecoder(sam, torch.float32)
                logits, iou = dec(feats, sparse, dense, multimask=True, dense_is_constant=constant)
                outs.append((threads, kind, logits, iou))
    finally:
        torch.set_num_threads(before)
    first = {kind: (logits, iou) for threads, kind, logits, iou in outs if threads == 1}
    for threads, kind, logits, iou in outs:
        assert torch.equal(logits, first[kind][0]), (threads, kind)
        assert torch.equal(iou, first[kind][1]), (threads, kind)
