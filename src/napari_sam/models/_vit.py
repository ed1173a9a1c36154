"""The fused image encoder: ``ImageEncoderViT.forward`` re-written as functions.

The same modules and weights as ``sam.image_encoder``, nothing patched or copied
(:func:`prepare_encoder` chooses when to use them, per :class:`~.speed.SpeedConfig`):

* on the CPU, SAM's decomposed relative-position bias is folded into the dot product
  (:func:`_augmented_qk`: queries carry their bias rows, keys one-hot codes of their
  row and column), so no (heads, N, N) bias is formed: global blocks (4096 tokens for
  the official models) run in ``scaled_dot_product_attention``'s flash kernel without a
  mask, windows (196 tokens) as two batched matmuls and a softmax; elsewhere (GPUs) the
  bias is an additive mask for SDPA, in a buffer kept per thread and shape (a fresh
  400 MB one page-faults);
* the residual stream is made contiguous once (``patch_embed`` hands back a permuted
  view) and, under autocast, stays float32, as do the neck's layer norms.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Callable

from .speed import SpeedConfig, amp_dtype

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from segment_anything.modeling import Sam

__all__ = ["encoder_for", "prepare_encoder"]


def _rel_terms(q: "torch.Tensor", rel_pos_h, rel_pos_w, hw: tuple[int, int]):
    """The two terms of SAM's decomposed relative-position bias, as in
    ``add_decomposed_rel_pos``: ``rel_h`` (B, nH, h, w, kh) and ``rel_w`` (B, nH, h, w, kw)
    of the *unscaled* queries ``q`` (B, nH, N, C)."""
    import torch
    from segment_anything.modeling.image_encoder import get_rel_pos

    h, w = hw
    b, nh, _, c = q.shape
    rh = get_rel_pos(h, h, rel_pos_h).to(q.dtype)  # (h, kh, C)
    rw = get_rel_pos(w, w, rel_pos_w).to(q.dtype)  # (w, kw, C)
    r_q = q.reshape(b, nh, h, w, c)
    return torch.einsum("bnhwc,hkc->bnhwk", r_q, rh), torch.einsum("bnhwc,wkc->bnhwk", r_q, rw)


def _rel_pos_bias(q: "torch.Tensor", rel_pos_h, rel_pos_w, hw: tuple[int, int]) -> "torch.Tensor":
    """SAM's decomposed relative-position bias as an additive mask, (B, nH, N, N).

    ``q`` is (B, nH, N, C) and *unscaled*, as in ``add_decomposed_rel_pos``.
    """
    import torch

    h, w = hw
    b, nh = q.shape[:2]
    rel_h, rel_w = _rel_terms(q, rel_pos_h, rel_pos_w, hw)
    # written straight into a contiguous buffer: einsum's outputs are permuted views, and a
    # plain ``+`` would inherit their layout and cost a second 4096 x 4096 x nH copy
    # (under torch.compile the fused kernel writes it contiguously anyway)
    if torch.compiler.is_compiling():
        return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, nh, h * w, h * w)
    bias = _bias_buffer((b, nh, h, w, h, w), q.dtype, q.device)
    torch.add(rel_h.contiguous()[..., :, None], rel_w.contiguous()[..., None, :], out=bias)
    return bias.view(b, nh, h * w, h * w)


_BUFFERS = threading.local()


def _bias_buffer(shape: tuple[int, ...], dtype, device) -> "torch.Tensor":
    """A reusable buffer for the relative-position bias, per thread and shape.

    A global-attention bias is 4096 x 4096 x nH (400 MB in bf16 for vit_b). A fresh buffer
    of that size is a fresh mapping whose pages fault in on first touch: ~170 ms per global
    layer, four times per slice, against ~25 ms to fill a resident one. Buffers are kept
    per thread (encoders in different threads never share one) and freed with the thread;
    window and global blocks each keep theirs (a few shapes per model).
    """
    import torch

    held = getattr(_BUFFERS, "bias", None)
    if held is None:
        held = _BUFFERS.bias = {}
    key = (tuple(shape), dtype, str(device))
    buf = held.get(key)
    if buf is None:
        if len(held) >= 4:  # another model or slice size: start over
            held.clear()
        buf = held[key] = torch.empty(shape, dtype=dtype, device=device)
    return buf


_SMALL_ATTENTION = 1024  # tokens per window up to which attention runs as plain matmuls


def _attention(attn, x: "torch.Tensor") -> "torch.Tensor":
    """``segment_anything...image_encoder.Attention.forward``, fused.

    On the CPU the relative-position bias is folded into the dot product
    (:func:`_augmented_qk`): windows (196 tokens) as two batched matmuls and a softmax,
    global attention (4096 tokens) in SDPA's flash kernel without a mask. Elsewhere (GPUs)
    one SDPA call with the bias as an additive mask.
    """
    import torch
    import torch.nn.functional as F

    b, h, w, _ = x.shape
    n = h * w
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, nH, N, C)
    nh, c = q.shape[1], q.shape[-1]
    if attn.use_rel_pos and x.device.type == "cpu":
        q_aug, k_aug = _augmented_qk(q, k, attn, (h, w))
        if n <= _SMALL_ATTENTION:
            # windows: (25 x 12) x 196 x 196 scores fit in cache; two batched matmuls and
            # a float32 softmax beat the flash kernel's tiling (29 vs 37 ms per vit_b
            # block), and v keeps its head size
            d = q_aug.shape[-1]
            scores = torch.bmm(q_aug.reshape(-1, n, d), k_aug.reshape(-1, n, d).transpose(1, 2))
            out = torch.bmm(scores.softmax(-1).to(v.dtype), v.reshape(-1, n, c))
            out = out.view(b, nh, n, c)
        else:
            # global: SDPA's flash kernel needs one head size, so v is zero-padded to the
            # augmented size and the padded outputs dropped
            v_pad = F.pad(v, (0, q_aug.shape[-1] - c))
            out = F.scaled_dot_product_attention(q_aug, k_aug, v_pad, scale=1.0)[..., :c]
    else:
        mask = _rel_pos_bias(q, attn.rel_pos_h, attn.rel_pos_w, (h, w)) if attn.use_rel_pos else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
    out = out.transpose(1, 2).reshape(b, h, w, -1)
    return attn.proj(out)


def _augmented_qk(q, k, attn, hw: tuple[int, int]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Queries and keys whose dot product is SAM's scaled score plus its rel-pos bias.

    The bias of query ``i`` and key ``j = (kh, kw)`` is ``rel_h[i, kh] + rel_w[i, kw]``
    (``add_decomposed_rel_pos``): a matrix of rank at most ``h + w``. Appending
    ``rel_h[i]`` and ``rel_w[i]`` to each scaled query and the one-hot codes of ``kh``
    and ``kw`` to each key gives ``scale * q.k + bias`` as one dot product, so the
    (nH, N, N) bias is never formed (400 MB in bf16 per vit_b global layer, written and
    read again) and bias and score are summed in the matmul's float32 accumulator rather
    than rounded to bf16 first. (B, nH, N, C) in, (B, nH, N, C + h + w) out.
    """
    import torch

    h, w = hw
    b, nh, n, _ = q.shape
    rel_h, rel_w = _rel_terms(q, attn.rel_pos_h, attn.rel_pos_w, hw)
    q_aug = torch.cat([q * attn.scale, rel_h.reshape(b, nh, n, h), rel_w.reshape(b, nh, n, w)], dim=-1)
    codes = _key_codes(h, w, q.dtype, q.device).expand(b, nh, n, h + w)
    return q_aug, torch.cat([k, codes], dim=-1)


_CODES: dict = {}
_CODES_LOCK = threading.Lock()


def _key_codes(h: int, w: int, dtype, device) -> "torch.Tensor":
    """One-hot codes of each key's row and column, (h * w, h + w), cached per shape."""
    import torch

    key = (h, w, dtype, str(device))
    with _CODES_LOCK:
        codes = _CODES.get(key)
    if codes is None:
        rows = torch.arange(h * w, device=device) // w
        cols = torch.arange(h * w, device=device) % w
        codes = torch.zeros(h * w, h + w, dtype=dtype, device=device)
        codes[torch.arange(h * w), rows] = 1
        codes[torch.arange(h * w), h + cols] = 1
        with _CODES_LOCK:
            if len(_CODES) > 8:
                _CODES.clear()
            _CODES[key] = codes
    return codes


def _block(blk, x: "torch.Tensor", fused: bool) -> "torch.Tensor":
    """``Block.forward`` with the attention of :func:`_attention` when ``fused``."""
    from segment_anything.modeling.image_encoder import window_partition, window_unpartition

    shortcut = x
    x = blk.norm1(x)
    if blk.window_size > 0:
        hw = (x.shape[1], x.shape[2])
        x, pad_hw = window_partition(x, blk.window_size)
    x = _attention(blk.attn, x) if fused else blk.attn(x)
    if blk.window_size > 0:
        x = window_unpartition(x, blk.window_size, pad_hw, hw)
    x = shortcut + x  # float32 residual stream under autocast (shortcut is float32)
    return x + blk.mlp(blk.norm2(x))


def _neck(neck, x: "torch.Tensor") -> "torch.Tensor":
    """The neck (conv, LayerNorm2d, conv, LayerNorm2d) with the norms in float32."""
    import torch
    from segment_anything.modeling.common import LayerNorm2d

    for layer in neck:
        if isinstance(layer, LayerNorm2d):
            with torch.autocast(x.device.type, enabled=False):
                x = layer(x.float())
        else:
            x = layer(x)
    return x


def _is_stock_vit(encoder) -> bool:
    """True for an unmodified ``ImageEncoderViT`` whose pieces the fused path knows."""
    from segment_anything.modeling.image_encoder import Attention, Block, ImageEncoderViT

    if type(encoder) is not ImageEncoderViT:
        return False
    for blk in encoder.blocks:
        if type(blk) is not Block or type(blk.attn) is not Attention:
            return False
        # a per-instance forward override or hooks would be skipped by the fused path
        for mod in (blk, blk.attn):
            if "forward" in vars(mod) or mod._forward_hooks or mod._forward_pre_hooks:
                return False
    return True


def prepare_encoder(sam: "Sam", config: SpeedConfig) -> Callable[["torch.Tensor"], "torch.Tensor"]:
    """A function ``x -> features`` running ``sam.image_encoder`` with ``config``.

    Parameters
    ----------
    sam : segment_anything.modeling.Sam
        The model; neither it nor its modules are changed, and no weights are copied
        (parameters are read at call time, so moving ``sam`` to another device is fine).
    config : SpeedConfig
        Which speed paths to use; ``autocast="auto"`` is resolved for the device of the
        input at each call.

    Returns
    -------
    callable
        ``encode(x)`` with ``x`` the preprocessed batch (B, 3, S, S) float32
        (``sam.preprocess`` output, S = 1024 for the official models), returning the
        image embeddings (B, C, S/16, S/16) float32 (C = 256), under ``inference_mode``.
    """
    import torch

    encoder = sam.image_encoder
    if config.is_reference:
        def reference(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return encoder(x)

        return reference

    stock = _is_stock_vit(encoder)
    fused = config.fused_attention and stock

    def body(x: torch.Tensor) -> torch.Tensor:
        if not stock:  # unknown backbone: the module itself (autocast still applies)
            return encoder(x).float()
        x = encoder.patch_embed(x)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        # the residual stream stays float32 under autocast, and contiguous: patch_embed
        # returns a permuted (NCHW-strided) view, and every layer norm and residual add
        # of all blocks would otherwise walk channels 4096 elements apart (0.6 s of 2 s
        # per vit_b slice on a CPU)
        x = x.float().contiguous()
        for blk in encoder.blocks:
            x = _block(blk, x, fused)
        return _neck(encoder.neck, x.permute(0, 3, 1, 2)).float()

    run = torch.compile(body, dynamic=False) if config.compile else body

    def encode(x: torch.Tensor) -> torch.Tensor:
        dtype = amp_dtype(x.device, config.autocast)
        with torch.inference_mode(), torch.autocast(
            x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None
        ):
            return run(x).float()

    encode.config = config  # type: ignore[attr-defined]
    encode.fused = fused  # type: ignore[attr-defined]
    return encode


_ENCODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_ENCODERS_LOCK = threading.Lock()


def encoder_for(sam: "Sam", config: SpeedConfig) -> Callable[["torch.Tensor"], "torch.Tensor"]:
    """:func:`prepare_encoder` for ``sam``, cached per (Sam, config)."""
    with _ENCODERS_LOCK:
        per_model = _ENCODERS.setdefault(sam, {})
        fn = per_model.get(config)
        if fn is None:
            fn = per_model[config] = prepare_encoder(sam, config)
        return fn
