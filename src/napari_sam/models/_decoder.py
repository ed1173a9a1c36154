"""A faster forward pass of SAM's mask decoder, checked against ``sam.mask_decoder``.

The same modules and weights as the reference ``MaskDecoder.forward``, three changes:

* **per-slice reuse.** In the first two-way block the image tokens have not met the
  prompt yet, so their projections (keys and values of the token-to-image attention,
  queries of the image-to-token attention) depend on the slice alone. They are computed
  once per slice and reused for every click on it (the last few slices are kept; prompts
  with a ``mask_input`` change the image tokens and are computed in full).
* **upscaling as matrix products.** The two transposed convolutions of the output
  upscaling (kernel 2, stride 2) are matrix products in token-major layout (no layout
  copies), and only the masks asked for (3 with ``multimask``, else 1) are formed.
* **precision.** Optionally the image-side matrix products (4096 tokens x 256 channels
  for the official models) run in bfloat16 or float16; the prompt tokens, layer norms,
  residual stream, IoU head and returned logits stay float32.

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
            self.layers = []
            for layer in tr.layers:
                t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
                self.layers.append({
                    # token -> image keys and image -> token queries both read (image + pos):
                    # one matrix product for the two, split after
                    "kq": cast(torch.cat([t2i.k_proj.weight, i2t.q_proj.weight])),
                    "bkq": cast(torch.cat([t2i.k_proj.bias, i2t.q_proj.bias])),
                    "split": (t2i.k_proj.out_features, i2t.q_proj.out_features),
                    # token -> image values read the image alone
                    "v": cast(t2i.v_proj.weight), "bv": cast(t2i.v_proj.bias),
                    # image -> token output projection
                    "o": cast(i2t.out_proj.weight), "bo": cast(i2t.out_proj.bias),
                })
            fin = tr.final_attn_token_to_image
            self.final = {
                "k": cast(fin.k_proj.weight), "bk": cast(fin.k_proj.bias),
                "v": cast(fin.v_proj.weight), "bv": cast(fin.v_proj.bias),
            }
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

    def _projections(self, lw: dict, keys: "torch.Tensor", pos: "torch.Tensor"):
        """One block's image-side projections of image tokens ``keys``: token -> image keys
        and values, image -> token queries, in the working dtype."""
        import torch.nn.functional as F

        kq = F.linear((keys + pos).to(self.dtype), lw["kq"], lw["bkq"])
        k, q_img = kq.split(lw["split"], dim=-1)
        return k, q_img, F.linear(keys.to(self.dtype), lw["v"], lw["bv"])

    def _first_block(self, w: _Weights, src: "torch.Tensor") -> dict:
        """Prompt-independent projections of the first block, from image tokens ``src``."""
        k, q_img, v = self._projections(w.layers[0], src, w.pos)
        return {"src": src, "k": k, "q": q_img, "v": v}

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

    def _image_to_token(self, attn, w: dict, q_img, tokens, values) -> "torch.Tensor":
        """Image queries (1 or B, HW, I) attend to the tokens; returns (B, HW, C)."""
        import torch
        import torch.nn.functional as F

        n = attn.num_heads
        k = _heads(attn.k_proj(tokens).to(self.dtype), n)  # (B, n, T, c)
        v = _heads(attn.v_proj(values).to(self.dtype), n)
        q = _heads(q_img, n)  # (1 or B, n, HW, c)
        # scores as (B, n, T, HW): the softmax runs over T along a strided axis,
        # which is far faster on the CPU than a softmax over a short last axis
        scores = torch.matmul(k, q.transpose(-1, -2)) * (k.shape[-1] ** -0.5)
        probs = torch.softmax(scores.float(), dim=-2).to(self.dtype)
        out = torch.matmul(probs.transpose(-1, -2), v)  # (B, n, HW, c)
        return F.linear(_merge(out), w["o"], w["bo"])

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
        """
        import torch
        import torch.nn.functional as F

        sam = self.sam
        md = sam.mask_decoder
        if not is_stock_decoder(sam):  # checked per call: hooks may come and go
            return md(
                image_embeddings=features, image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
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
            keys, queries = state["src"], tokens
            for i, layer in enumerate(tr.layers):
                lw = w.layers[i]
                if layer.skip_first_layer_pe:
                    queries = layer.self_attn(q=queries, k=queries, v=queries)
                else:
                    q = queries + tokens
                    queries = queries + layer.self_attn(q=q, k=q, v=queries)
                queries = layer.norm1(queries)
                if i == 0:  # the image tokens have not met the prompt yet
                    k, q_img, v = state["k"], state["q"], state["v"]
                else:
                    k, q_img, v = self._projections(lw, keys, w.pos)
                attn = self._token_to_image(layer.cross_attn_token_to_image, queries + tokens, k, v)
                queries = layer.norm2(queries + attn)
                queries = layer.norm3(queries + layer.mlp(queries))
                attn = self._image_to_token(layer.cross_attn_image_to_token, lw, q_img, queries + tokens, queries)
                keys = layer.norm4(keys + attn.float())
            fw = w.final
            k = F.linear((keys + w.pos).to(self.dtype), fw["k"], fw["bk"])
            v = F.linear(keys.to(self.dtype), fw["v"], fw["bv"])
            attn = self._token_to_image(tr.final_attn_token_to_image, queries + tokens, k, v)
            queries = tr.norm_final_attn(queries + attn)

            chosen = list(range(1, md.num_mask_tokens)) if multimask else [0]
            hyper = torch.stack(
                [md.output_hypernetworks_mlps[j](queries[:, 1 + j]) for j in chosen], dim=1
            )
            masks = self._upscale(w, keys, hyper)
            iou = md.iou_prediction_head(queries[:, 0])[:, chosen]
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
