"""Speed paths (napari_sam.fast): each one against the reference float32 encoder.

Tolerances (features are the output of a LayerNorm2d, mean |f| ~ 0.8):

* fused attention in float32: max |fast - ref| <= 1e-4 * mean |ref| (float rounding only);
* bf16 autocast: max |fast - ref| <= 0.15 * mean |ref| and mean |fast - ref| <= 0.02 * mean |ref|.
"""

from __future__ import annotations

import numpy as np
import pytest

import napari_sam as ns

torch = pytest.importorskip("torch")
from napari_sam.models import _vit as _encoder
from napari_sam.models import speed as fast
from napari_sam.models._vit import encoder_for, prepare_encoder
from napari_sam.models.speed import SpeedConfig, speed_config
from napari_sam.testing import make_tiny_sam

FP32_TOL = 1e-4
BF16_MAX_TOL, BF16_MEAN_TOL = 0.15, 0.02

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rel_err(out, ref):
    diff = (out.float() - ref.float()).abs()
    scale = ref.abs().mean()
    return float(diff.max() / scale), float(diff.mean() / scale)


@pytest.fixture(scope="module")
def vitlike():
    """A small ViT-like SAM: 4 heads, window and global blocks, random rel-pos tables."""
    return make_tiny_sam(embed_dim=64, depth=3, num_heads=4, global_attn_indexes=(1,), seed=3)


@pytest.fixture(scope="module")
def padded():
    """256 px input: a 16 x 16 token grid that window attention (14) must pad."""
    return make_tiny_sam(embed_dim=48, depth=2, num_heads=3, global_attn_indexes=(1,), image_size=256, seed=5)


def _x(sam, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sam.image_encoder.img_size
    return torch.randn(2, 3, s, s, generator=g)


def _ref(sam, x):
    with torch.inference_mode():
        return sam.image_encoder(x)


def _state(sam):
    return {k: v.clone() for k, v in sam.state_dict().items()}


# ----------------------------------------------------------------------- config
def test_speed_config_off_and_env(monkeypatch):
    assert speed_config("cpu", mode="off").is_reference
    monkeypatch.setenv(fast.ENV_FAST, "0")
    assert speed_config("cpu").is_reference
    assert speed_config("cpu", mode="bf16").is_reference


def test_speed_config_auto_cpu(monkeypatch):
    monkeypatch.delenv(fast.ENV_FAST, raising=False)
    cfg = speed_config("cpu")
    assert cfg.fused_attention and not cfg.compile and cfg.batch_size == 1
    assert cfg.autocast == ("bf16" if fast.cpu_has_fast_bf16() else None)
    assert speed_config("cpu", mode="fused").autocast is None
    assert speed_config("cpu", mode="compile").compile


def test_speed_config_rejects_bad_values():
    with pytest.raises(ValueError, match="mode"):
        speed_config("cpu", mode="turbo")
    with pytest.raises(ValueError, match="autocast"):
        SpeedConfig(autocast="int8")
    with pytest.raises(ValueError, match="batch_size"):
        SpeedConfig(batch_size=0)


# ------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("which", ["tiny", "vitlike", "padded"])
def test_fused_fp32_matches_reference(which, request, tiny_model):
    sam = tiny_model.sam if which == "tiny" else request.getfixturevalue(which)
    x = _x(sam)
    ref = _ref(sam, x)
    encode = prepare_encoder(sam, SpeedConfig(fused_attention=True, autocast=None))
    assert encode.fused
    out = encode(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    mx, _ = rel_err(out, ref)
    assert mx < FP32_TOL, mx


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("which", ["tiny", "vitlike"])
def test_bf16_within_tolerance(which, fused, request, tiny_model):
    sam = tiny_model.sam if which == "tiny" else request.getfixturevalue(which)
    x = _x(sam, seed=1)
    ref = _ref(sam, x)
    out = prepare_encoder(sam, SpeedConfig(fused_attention=fused, autocast="bf16"))(x)
    assert out.dtype == torch.float32
    mx, mean = rel_err(out, ref)
    assert mx < BF16_MAX_TOL and mean < BF16_MEAN_TOL, (mx, mean)


def test_reference_config_is_the_module(vitlike):
    x = _x(vitlike)
    out = prepare_encoder(vitlike, fast.OFF)(x)
    assert torch.equal(out, _ref(vitlike, x))


def test_prepare_encoder_leaves_sam_untouched(vitlike):
    from segment_anything.modeling.image_encoder import Attention

    before = _state(vitlike)
    forward = Attention.forward
    encode = prepare_encoder(vitlike, SpeedConfig(fused_attention=True, autocast="bf16"))
    encode(_x(vitlike))
    assert Attention.forward is forward
    for blk in vitlike.image_encoder.blocks:
        assert "forward" not in vars(blk.attn) and not blk.attn._forward_hooks
    after = vitlike.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unknown_encoder_falls_back(vitlike):
    """Hooked attention (or another backbone) is not bypassed: the module itself runs."""
    seen = []
    blk = vitlike.image_encoder.blocks[0]
    handle = blk.attn.register_forward_hook(lambda *a: seen.append(1))
    try:
        encode = prepare_encoder(vitlike, SpeedConfig(fused_attention=True, autocast=None))
        assert not encode.fused
        x = _x(vitlike)
        assert rel_err(encode(x), _ref(vitlike, x))[0] < FP32_TOL
        assert seen
    finally:
        handle.remove()


def test_encoder_for_caches_per_config(tiny_model):
    a = encoder_for(tiny_model.sam, SpeedConfig(autocast=None))
    assert encoder_for(tiny_model.sam, SpeedConfig(autocast=None)) is a
    assert encoder_for(tiny_model.sam, SpeedConfig(autocast="bf16")) is not a


# ------------------------------------------------------------------ batched encoding
def test_encode_batch_reference_equals_sampredictor(tiny_model):
    from segment_anything import SamPredictor

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (90, 130, 3), dtype=np.uint8)
    pred = SamPredictor(tiny_model.sam)
    pred.set_image(rgb)
    (emb,) = tiny_model.encode([rgb], speed=fast.OFF)
    assert torch.equal(emb.features, pred.features)
    assert emb.input_size == tuple(pred.input_size)
    assert emb.original_size == tuple(pred.original_size)


def test_encode_batch_matches_single_slices(tiny_model):
    rng = np.random.default_rng(1)
    rgbs = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in [(64, 80, 3), (100, 50, 3), (70, 70, 3)]]
    cfg = SpeedConfig(fused_attention=True, autocast=None, batch_size=2)
    batched = tiny_model.encode(rgbs, speed=cfg)
    single = [tiny_model.encode([r], speed=fast.OFF)[0] for r in rgbs]
    assert len(batched) == 3
    for b, s, r in zip(batched, single, rgbs):
        assert b.original_size == r.shape[:2] and b.input_size == s.input_size
        assert b.features.shape == s.features.shape
        # its own storage: the memory cache counts what it holds
        assert b.features.untyped_storage().nbytes() == b.nbytes
        assert rel_err(b.features, s.features)[0] < FP32_TOL


def test_encode_batch_rejects_non_rgb(tiny_model):
    with pytest.raises(ValueError, match="uint8"):
        tiny_model.encode([np.zeros((10, 10), np.uint8)], speed=fast.OFF)


def test_fused_masks_match_on_real_image(tiny_model, data_dir):
    """Masks from fused-attention features equal the reference masks (DSB2018 slice)."""
    from segment_anything import SamPredictor

    rgb = ns.open_stack(data_dir / "dsb2018" / "img2d.tif").rgb(0)
    pred = SamPredictor(tiny_model.sam)
    pred.set_image(rgb)
    ref_masks = []
    rng = np.random.default_rng(0)
    prompts = [rng.uniform(0, rgb.shape[0] - 1, (int(rng.integers(1, 4)), 2)) for _ in range(8)]
    for pts in prompts:
        m, s, _ = pred.predict(point_coords=pts[:, ::-1], point_labels=np.ones(len(pts)))
        ref_masks.append(m[np.argmax(s)])
    (emb,) = tiny_model.encode([rgb], speed=SpeedConfig(fused_attention=True, autocast=None))
    pred.features = emb.features
    ious = []
    for pts, ref in zip(prompts, ref_masks):
        m, s, _ = pred.predict(point_coords=pts[:, ::-1], point_labels=np.ones(len(pts)))
        got = m[np.argmax(s)]
        union = np.logical_or(got, ref).sum()
        ious.append(1.0 if union == 0 else np.logical_and(got, ref).sum() / union)
    assert np.median(ious) >= 0.99 and min(ious) >= 0.95, ious


# ------------------------------------------------------------------ compile / GPU
@pytest.mark.slow
def test_compile_matches_eager(padded):
    x = _x(padded)
    ref = _ref(padded, x)
    out = prepare_encoder(padded, SpeedConfig(fused_attention=True, autocast=None, compile=True))(x)
    assert rel_err(out, ref)[0] < FP32_TOL


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mode", ["fused", "bf16", "fp16", "auto"])
def test_cuda_paths(vitlike, mode):
    import copy

    sam = copy.deepcopy(vitlike).cuda()
    x = _x(sam).cuda()
    ref = _ref(sam, x)
    cfg = speed_config("cuda", mode=mode)
    assert cfg.fused_attention and cfg.batch_size > 1
    out = prepare_encoder(sam, cfg)(x)
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    mx, mean = rel_err(out, ref)
    if cfg.autocast is None:
        # TF32 may be on for the reference matmuls: allow its rounding
        assert mx < 1e-2, mx
    else:
        assert mx < BF16_MAX_TOL and mean < BF16_MEAN_TOL, (mx, mean)


@pytest.mark.gpu
@requires_cuda
def test_cuda_encode_batch(tiny_checkpoint):
    model = ns.load_model(checkpoint=tiny_checkpoint, device="cuda")
    rng = np.random.default_rng(2)
    rgbs = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(5)]
    batched = model.encode(rgbs, speed=speed_config("cuda"))
    single = model.encode(rgbs, speed=fast.OFF)
    for b, s in zip(batched, single):
        assert b.features.device.type == "cuda"
        mx, mean = rel_err(b.features, s.features)
        assert mx < BF16_MAX_TOL and mean < BF16_MEAN_TOL


def test_bias_buffer_is_reused_per_thread_and_shape(vitlike):
    import threading

    a = _encoder._bias_buffer((1, 2, 4, 4, 4, 4), torch.bfloat16, "cpu")
    assert _encoder._bias_buffer((1, 2, 4, 4, 4, 4), torch.bfloat16, "cpu") is a
    assert _encoder._bias_buffer((1, 2, 3, 3, 3, 3), torch.bfloat16, "cpu") is not a
    assert _encoder._bias_buffer((1, 2, 4, 4, 4, 4), torch.bfloat16, "cpu") is a  # kept beside it
    other = []
    t = threading.Thread(target=lambda: other.append(_encoder._bias_buffer((1, 2, 4, 4, 4, 4), torch.bfloat16, "cpu")))
    t.start()
    t.join()
    assert other[0] is not a  # never shared between threads
    # reusing the buffers does not leak one slice's bias into the next
    encode = prepare_encoder(vitlike, SpeedConfig(fused_attention=True, autocast=None))
    x1, x2 = _x(vitlike, seed=1), _x(vitlike, seed=2)
    first = encode(x1).clone()
    encode(x2)
    assert torch.equal(encode(x1), first)


@pytest.mark.parametrize("hw", [(14, 14), (6, 9)])
def test_augmented_scores_equal_scaled_scores_plus_rel_pos_bias(vitlike, hw):
    """The CPU paths fold SAM's decomposed rel-pos bias into q.k: same scores, no bias matrix."""
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

    attn = vitlike.image_encoder.blocks[1].attn
    h, w = hw
    g = torch.Generator().manual_seed(4)
    c = attn.rel_pos_h.shape[1]
    q = torch.randn(2, 3, h * w, c, generator=g)
    k = torch.randn(2, 3, h * w, c, generator=g)
    # random tables long enough for this grid (get_rel_pos interpolates otherwise)
    attn_hw = type("A", (), {"rel_pos_h": torch.randn(2 * h - 1, c, generator=g),
                              "rel_pos_w": torch.randn(2 * w - 1, c, generator=g),
                              "scale": attn.scale})
    q_aug, k_aug = _encoder._augmented_qk(q, k, attn_hw, (h, w))
    assert q_aug.shape == k_aug.shape == (2, 3, h * w, c + h + w)
    got = q_aug @ k_aug.transpose(-1, -2)
    # segment_anything's own: scores of (B * nH, N, C) queries plus the decomposed bias
    ref = (q * attn.scale) @ k.transpose(-1, -2)
    ref = add_decomposed_rel_pos(ref.reshape(6, h * w, h * w), q.reshape(6, h * w, c),
                                 attn_hw.rel_pos_h, attn_hw.rel_pos_w, (h, w), (h, w))
    torch.testing.assert_close(got.reshape(6, h * w, h * w), ref, rtol=1e-5, atol=1e-4)
    # the additive mask the GPU path gives SDPA: the same bias
    bias = _encoder._rel_pos_bias(q, attn_hw.rel_pos_h, attn_hw.rel_pos_w, (h, w))
    torch.testing.assert_close((ref - ((q * attn.scale) @ k.transpose(-1, -2)).reshape(6, h * w, h * w)),
                               bias.reshape(6, h * w, h * w), rtol=1e-5, atol=1e-4)
