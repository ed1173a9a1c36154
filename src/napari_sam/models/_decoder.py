"""A faster forward pass of SAM's mask decoder, checked against ``sam.mask_decoder``.

The same modules and weights as the reference ``MaskDecoder.forward``, four changes:

* **per-slice reuse.** In the first two-way block the image tokens have not met the
  prompt yet, so the token-to-image keys and values depend on the slice alone. They are
  computed once per slice and reused for every click on it (the last few slices are
  kept; prompts with a ``mask_input`` change the image tokens and are computed in full).
* **no per-prompt projections of the image.** From the first image-to-token attention
  on, each prompt has its own image tokens (4096 x 256 for the official models). The
  reference projects all of them to keys, values and queries in every attention; here
  the products are re-associated so the projections act on the prompt's few tokens
  instead (``q W_k`` against the image tokens, probabilities averaging the image tokens
  before ``W_v``, ``W_q`` and ``W_o`` folded into the tokens' keys and values): the same
  math with half the arithmetic per prompt (0.9 instead of 1.9 GFLOP for the official
  models) and no per-prompt projection outputs.
* **upscaling as matrix products, only where needed.** The two transposed convolutions
  of the output upscaling (kernel 2, stride 2) are matrix products in token-major layout
  (no layout copies), and only the masks asked for (3 with ``multimask``, else 1) are
  formed. With ``min_score`` (segment everything), prompts whose masks all score below
  it are not upscaled at all: the predicted IoU comes first in SAM's decoder.
* **precision.** Optionally the per-slice keys and values and the upscaling run in
  bfloat16 or float16; everything per prompt before the upscaling, the layer norms, the
  IoU head and the returned logits stay float32.

In float32 the logits agree with the reference to float rounding (tests). Decoders that
are not the stock ``segment_anything`` classes fall back to ``sam.mask_decoder`` itself.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from segment_anything.modeling import Sam

__all__ = ["FastDecoder", "decoder_for", "is_stock_decoder"]

_SLICES_KEPT = 2  # slices whose first-block projections are kept (current + one)
_CHUNK = 1  # prompts decoded together (see FastDecoder.__call__)


def is_stock_decoder(sam: "Sam") -> bool:
    """True for an unmodified ``MaskDecoder`` / ``TwoWayTransformer`` the fast path knows."""
    import torch.nn as nn
    from segment_anything.modeling.common import LayerNorm2d
    from segment_anything.modeling.mask_decoder import MaskDecoder
    from segment_anything.modeling.transformer import (
        Attention,
        TwoWayAttentionBlock,
        TwoWayTransformer,
    )

    md = sam.mask_decoder
    if type(md) is not MaskDecoder or type(md.transformer) is not TwoWayTransformer:
        return False
    tr = md.transformer
    attns = [tr.final_attn_token_to_image]
    for layer in tr.layers:
        if type(layer) is not TwoWayAttentionBlock:
            return False
        attns += [layer.self_attn, layer.cross_attn_token_to_image, layer.cross_attn_image_to_token]
    if any(type(a) is not Attention for a in attns):
        return False
    # the fast path reads the projections' weights directly: wrapped or adapted linears
    # (LoRA and the like) would be skipped
    linears = [getattr(a, n) for a in attns for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
    if any(type(m) is not nn.Linear for m in linears):
        return False
    ups = list(md.output_upscaling)
    kinds = [nn.ConvTranspose2d, LayerNorm2d, nn.GELU, nn.ConvTranspose2d, nn.GELU]
    if len(ups) != 5 or any(type(m) is not k for m, k in zip(ups, kinds)):
        return False
    for conv in (ups[0], ups[3]):
        if (conv.kernel_size, conv.stride, conv.padding, conv.output_padding, conv.dilation, conv.groups) != (
            (2, 2), (2, 2), (0, 0), (0, 0), (1, 1), 1
        ) or conv.bias is None:
            return False
    if ups[2].approximate != "none" or ups[4].approximate != "none":
        return False
    # per-instance forward overrides or hooks would be skipped by the fast path
    for mod in [md, tr, *tr.layers, *attns, *linears, *ups]:
        if "forward" in vars(mod) or mod._forward_hooks or mod._forward_pre_hooks:
            return False
    return True


def _heads(x: "torch.Tensor", n: int) -> "torch.Tensor":
    b, t, c = x.shape
    return x.reshape(b, t, n, c // n).transpose(1, 2)


def _merge(x: "torch.Tensor") -> "torch.Tensor":
    b, n, t, c = x.shape
    return x.transpose(1, 2).reshape(b, t, n * c)


def _transposed_conv_as_linear(conv) -> tuple["torch.Tensor", "torch.Tensor"]:
    """A ConvTranspose2d(k=2, s=2) as a linear map C_in -> (a, b, C_out): weight, bias.

    Input pixel (i, j) becomes output pixels (2i + a, 2j + b).
    """
    w = conv.weight  # (C_in, C_out, 2, 2)
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).t(), conv.bias.repeat(4)


class _Weights:
    """The decoder's image-side weights in the working dtype, laid out for matmuls."""

    def __init__(self, sam: "Sam", dtype: "torch.dtype", device: "torch.device") -> None:
        import torch

        md = sam.mask_decoder
        tr = md.transformer
        dt = dtype

        def cast(t: "torch.Tensor") -> "torch.Tensor":
            return t.detach().to(device=device, dtype=dt).contiguous()

        with torch.inference_mode():
            pe = sam.prompt_encoder.get_dense_pe().to(device)
            self.grid = tuple(pe.shape[-2:])
            self.pos = pe.flatten(2).transpose(1, 2).contiguous().float()  # (1, HW, C)
            # the first block's token -> image keys and values: the only image-side
            # projections that are formed (per slice); later blocks fold theirs into
            # the prompt's tokens (FastDecoder._token_to_image_folded and friends)
            t2i = tr.layers[0].cross_attn_token_to_image
            self.first = {"k": cast(t2i.k_proj.weight), "bk": cast(t2i.k_proj.bias),
                          "v": cast(t2i.v_proj.weight), "bv": cast(t2i.v_proj.bias)}
            conv1, norm, _, conv2, _ = md.output_upscaling
            self.up1, self.up1_b = (cast(t) for t in _transposed_conv_as_linear(conv1))
            self.up2, self.up2_b = (cast(t) for t in _transposed_conv_as_linear(conv2))
            self.norm_w, self.norm_b, self.norm_eps = cast(norm.weight), cast(norm.bias), norm.eps
            self.c1 = conv1.weight.shape[1]
            self.c2 = conv2.weight.shape[1]


class FastDecoder:
    """``sam.mask_decoder`` as a faster function; see the module docstring.

    Parameters
    ----------
    sam : segment_anything.modeling.Sam
        The model (not changed; weights are read again whenever they change).
    dtype : torch.dtype
        Precision of the image-side matrix products: float32, bfloat16 or float16.
    """

    def __init__(self, sam: "Sam", dtype: "torch.dtype") -> None:
        self.sam = sam
        self.dtype = dtype
        self._lock = threading.Lock()
        self._key: Any = None
        self._weights: _Weights | None = None
        self._slices: "OrderedDict[int, tuple[weakref.ref, dict]]" = OrderedDict()

    # ----------------------------------------------------------------- caches
    def _current_weights(self, device: "torch.device") -> _Weights:
        """Weights in the working dtype; rebuilt if any parameter was replaced, moved
        (``.to``) or changed in place (loading weights bumps the tensors' versions)."""
        params = [*self.sam.mask_decoder.parameters(), *self.sam.prompt_encoder.pe_layer.buffers()]
        key = (str(device), [(id(p), p.data_ptr(), p._version) for p in params])
        with self._lock:
            if key != self._key or self._weights is None:
                self._weights = _Weights(self.sam, self.dtype, device)
                self._key = key
                self._slices.clear()
            return self._weights

    def _first_block(self, w: _Weights, src: "torch.Tensor") -> dict:
        """Prompt-independent work of the first block, from image tokens ``src``: the
        token -> image keys and values."""
        import torch.nn.functional as F

        fw = w.first
        k = F.linear((src + w.pos).to(self.dtype), fw["k"], fw["bk"])
        v = F.linear(src.to(self.dtype), fw["v"], fw["bv"])
        return {"src": src, "k": k, "v": v}

    def _slice_state(self, w: _Weights, features: "torch.Tensor", dense: "torch.Tensor") -> dict:
        """:meth:`_first_block` of a slice with no mask prompt, cached per features tensor."""
        key = id(features)
        with self._lock:
            hit = self._slices.get(key)
            if hit is not None and hit[0]() is features:
                self._slices.move_to_end(key)
                return hit[1]
        state = self._first_block(w, (features + dense[:1]).flatten(2).transpose(1, 2).contiguous())
        with self._lock:
            self._slices[key] = (weakref.ref(features), state)
            while len(self._slices) > _SLICES_KEPT:
                self._slices.popitem(last=False)
        return state

    # ---------------------------------------------------------------- forward
    def _token_to_image(self, attn, queries, k, v) -> "torch.Tensor":
        """Tokens (B, T, C) float32 attend to image keys/values (1 or B, HW, I)."""
        import torch.nn.functional as F

        n = attn.num_heads
        q = _heads(attn.q_proj(queries).to(self.dtype), n)
        b = q.shape[0]
        kh, vh = _heads(k, n).expand(b, -1, -1, -1), _heads(v, n).expand(b, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, kh, vh)
        return attn.out_proj(_merge(out).float())

    @staticmethod
    def _token_to_image_folded(attn, queries, keys, pos) -> "torch.Tensor":
        """Tokens (B, T, C) attend to per-prompt image tokens, without projecting them.

        The reference projects every image token to keys ``W_k (keys + pos) + b_k`` and
        values ``W_v keys + b_v`` (HW x C x I per prompt). Re-associated: the queries go
        back through ``W_k`` (scores ``(q_h W_k,h) . (keys + pos)``; ``q_h . b_k,h`` is
        the same for every key and drops out of the softmax), and the probabilities
        average the image tokens first (``(P keys) W_v^T + b_v``, rows of P summing to
        1). Same math, in float32. ``keys`` (1 or B, HW, C); ``pos`` (1, HW, C) is
        applied as a product of its own, so ``keys + pos`` is never formed per prompt.
        """
        import torch
        import torch.nn.functional as F

        n = attn.num_heads
        b, t, _ = queries.shape
        c = keys.shape[-1]
        d = attn.internal_dim // n
        q = attn.q_proj(queries).reshape(b, t, n, d).transpose(1, 2) * d**-0.5  # (B, n, T, d)
        # every head's queries against the same image tokens: one attention of n T
        # queries, image tokens as keys and values, pos as an additive (nT x HW) mask.
        # SDPA sums over the image tokens in a fixed order (a plain product would let
        # the BLAS split that long sum across threads: results would then depend on
        # the thread count, which batch jobs must not)
        qt = torch.matmul(q, attn.k_proj.weight.view(n, d, c)).reshape(b, 1, n * t, c)
        bias = torch.matmul(qt, pos.transpose(-1, -2))  # (B, 1, nT, HW)
        img = keys.expand(b, -1, -1).unsqueeze(1)
        avg = F.scaled_dot_product_attention(qt, img, img, attn_mask=bias, scale=1.0)
        avg = avg.view(b, n, t, c)
        out = torch.matmul(avg, attn.v_proj.weight.view(n, d, c).transpose(-1, -2))
        out = out + attn.v_proj.bias.view(n, 1, d)  # (B, n, T, d)
        return attn.out_proj(out.transpose(1, 2).reshape(b, t, n * d))

    @staticmethod
    def _image_to_token_folded(attn, keys, pos, tokens, values) -> "torch.Tensor":
        """Image tokens ``keys`` (1 or B, HW, C, with ``pos`` added for the queries) attend
        to the prompt's tokens; returns ``keys`` + the attention's output, (B, HW, C).

        Re-associated as :meth:`_token_to_image_folded`: instead of projecting every
        image token to queries (``W_q kp + b_q``), each token's key goes back through
        ``W_q`` (``A = k_h W_q,h``, plus the bias term ``b_q,h . k_h`` per token), and
        instead of projecting the attended values per image token, each token's value
        goes through the output projection first (``M = v_h W_o,h^T``): the output is
        ``P^T M + b_o``, one product with the (B, HW, n T) probabilities, accumulated
        straight onto ``keys`` (the residual).
        """
        import torch

        n = attn.num_heads
        b, t, _ = tokens.shape
        c = keys.shape[-1]
        d = attn.internal_dim // n
        scale = d**-0.5
        k = attn.k_proj(tokens).reshape(b, t, n, d).transpose(1, 2)  # (B, n, T, d)
        v = attn.v_proj(values).reshape(b, t, n, d).transpose(1, 2)
        a = torch.matmul(k, attn.q_proj.weight.view(n, d, c)) * scale  # (B, n, T, C)
        bias = (k * attn.q_proj.bias.view(n, 1, d)).sum(-1) * scale  # (B, n, T)
        a = a.reshape(b, n * t, c)
        scores = torch.matmul(a, pos.transpose(-1, -2)) + bias.reshape(b, n * t, 1)  # (B, nT, HW)
        scores = torch.baddbmm(scores, a, keys.expand(b, -1, -1).transpose(-1, -2))
        # softmax over each head's T tokens, along a strided axis (a softmax over a
        # short last axis is far slower on the CPU)
        probs = scores.view(b, n, t, -1).softmax(dim=-2).view(b, n * t, -1)
        m = torch.matmul(v, attn.out_proj.weight.view(c, n, d).permute(1, 2, 0))  # (B, n, T, C)
        residual = (keys + attn.out_proj.bias).expand(b, -1, -1)
        return torch.baddbmm(residual, probs.transpose(1, 2), m.reshape(b, n * t, c))

    def _upscale(self, w: _Weights, keys, hyper) -> "torch.Tensor":
        """Image tokens (B, HW, C) and hypernetwork outputs (B, K, C2) -> (B, K, 4h, 4w)."""
        import torch
        import torch.nn.functional as F

        b = keys.shape[0]
        h, wd = w.grid
        y = F.linear(keys.to(self.dtype), w.up1, w.up1_b).reshape(b, h * wd * 4, w.c1)
        y = F.gelu(F.layer_norm(y, (w.c1,), w.norm_w, w.norm_b, w.norm_eps))
        y = F.gelu(F.linear(y, w.up2, w.up2_b)).reshape(b, h * wd * 16, w.c2)
        m = torch.bmm(y, hyper.to(self.dtype).transpose(1, 2)).float()  # rows (i, j, a, b, c, d)
        k = m.shape[-1]
        m = m.reshape(b, h, wd, 2, 2, 2, 2, k).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return m.reshape(b, k, 4 * h, 4 * wd)

    def __call__(
        self,
        features: "torch.Tensor",
        sparse: "torch.Tensor",
        dense: "torch.Tensor",
        *,
        multimask: bool,
        dense_is_constant: bool,
        min_score: float | None = None,
    ) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Low-res logits (B, K, 4h, 4w) and predicted IoU (B, K), like ``mask_decoder``.

        Parameters
        ----------
        features : torch.Tensor, (1, C, h, w)
            The slice's image embedding.
        sparse, dense : torch.Tensor
            The prompt encoder's outputs for B prompt sets.
        multimask : bool
            Masks 1-3 (True) or mask 0 (False), as ``multimask_output``.
        dense_is_constant : bool
            True when no mask prompt was given (``dense`` is the same "no mask"
            embedding everywhere): the first block's image-side work is reused per slice.
        min_score : float, optional
            Early rejection: prompts none of whose returned masks has a predicted IoU
            above this are not upscaled (the most expensive step per prompt), and their
            logits are NaN. The predicted IoU comes before the upscaling in SAM's
            decoder, so the kept logits are exactly those of a full decode.

        Prompts go through one at a time (``_CHUNK``): each prompt has its own image
        tokens (HW x C float32, 4 MB for the official models) from the first block on,
        and one prompt's stay in memory the allocator reuses; larger groups need fresh,
        page-faulting memory each time (per prompt on a 2-core CPU: 13 ms one at a
        time, 16-19 ms in groups of 2 to 8, 27 ms in groups of 64).
        """
        import torch

        b = sparse.shape[0]
        if not is_stock_decoder(self.sam):  # checked per call: hooks may come and go
            md = self.sam.mask_decoder
            return md(
                image_embeddings=features, image_pe=self.sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
        masks, ious = [], []
        for s in range(0, b, _CHUNK):
            d = dense if dense_is_constant else dense[s:s + _CHUNK]
            m, iou = self._decode(features, sparse[s:s + _CHUNK], d, multimask,
                                  dense_is_constant, min_score)
            masks.append(m)
            ious.append(iou)
        return torch.cat(masks), torch.cat(ious)

    def _decode(self, features, sparse, dense, multimask: bool, dense_is_constant: bool,
                min_score: float | None) -> tuple["torch.Tensor", "torch.Tensor"]:
        """:meth:`__call__` for one group of prompts."""
        import torch

        sam = self.sam
        md = sam.mask_decoder
        tr = md.transformer
        with torch.inference_mode():
            w = self._current_weights(features.device)
            b = sparse.shape[0]
            out_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
            tokens = torch.cat((out_tokens[None].expand(b, -1, -1), sparse), dim=1)
            if dense_is_constant:
                state = self._slice_state(w, features, dense)
            else:
                src = (features + dense).flatten(2).transpose(1, 2).contiguous()
                state = self._first_block(w, src)
            # image tokens: the slice's (1, HW, C) until the first image -> token
            # attention, then one set per prompt (B, HW, C)
            keys, queries = state["src"], tokens
            for i, layer in enumerate(tr.layers):
                if layer.skip_first_layer_pe:
                    queries = layer.self_attn(q=queries, k=queries, v=queries)
                else:
                    q = queries + tokens
                    queries = queries + layer.self_attn(q=q, k=q, v=queries)
                queries = layer.norm1(queries)
                if i == 0:  # the image tokens have not met the prompt yet: keys and
                    # values of the slice, projected once per slice
                    attn = self._token_to_image(layer.cross_attn_token_to_image, queries + tokens,
                                                state["k"], state["v"])
                else:
                    attn = self._token_to_image_folded(layer.cross_attn_token_to_image,
                                                       queries + tokens, keys, w.pos)
                queries = layer.norm2(queries + attn)
                queries = layer.norm3(queries + layer.mlp(queries))
                keys = layer.norm4(self._image_to_token_folded(
                    layer.cross_attn_image_to_token, keys, w.pos, queries + tokens, queries))
            attn = self._token_to_image_folded(tr.final_attn_token_to_image, queries + tokens,
                                               keys, w.pos)
            queries = tr.norm_final_attn(queries + attn)

            chosen = list(range(1, md.num_mask_tokens)) if multimask else [0]
            hyper = torch.stack(
                [md.output_hypernetworks_mlps[j](queries[:, 1 + j]) for j in chosen], dim=1
            )
            iou = md.iou_prediction_head(queries[:, 0])[:, chosen]
            if min_score is None:
                return self._upscale(w, keys, hyper), iou
            kept = torch.nonzero(iou.amax(dim=1) > min_score).flatten()
            h, wd = w.grid
            masks = torch.full((b, len(chosen), 4 * h, 4 * wd), float("nan"), device=keys.device)
            if len(kept):  # keys: one set per prompt after the first block
                masks[kept] = self._upscale(w, keys[kept], hyper[kept])
        return masks, iou


_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_DECODERS_LOCK = threading.Lock()


def decoder_for(sam: "Sam", dtype: "torch.dtype") -> FastDecoder:
    """The :class:`FastDecoder` of ``sam`` in ``dtype`` (one per model and dtype)."""
    with _DECODERS_LOCK:
        per_model = _DECODERS.setdefault(sam, {})
        dec = per_model.get(dtype)
        if dec is None:
            dec = per_model[dtype] = FastDecoder(sam, dtype)
        return dec
