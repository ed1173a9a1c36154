"""SAM ViT architectures: their shape parameters, inferred from a state dict, and built.

This is the only module that builds a :class:`segment_anything.modeling.Sam`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._errors import CheckpointError
from .checkpoint import EXPECTED, PATCH_KEY, describe_keys

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from segment_anything.modeling import Sam

__all__ = ["Architecture", "OFFICIAL_ARCHITECTURES", "build_sam", "infer_architecture"]


@dataclass(frozen=True)
class Architecture:
    """Shape parameters of a SAM ViT model (everything ``build_sam`` needs).

    The mask decoder and prompt encoder are those of the official SAM (two-way transformer
    of depth 2, MLP 2048, 8 heads); only ``prompt_embed_dim`` varies.
    """

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    window_size: int = 14
    prompt_embed_dim: int = 256
    patch_size: int = 16

    @property
    def embedding_size(self) -> int:
        """Side of the square image embedding grid, ``image_size // patch_size``."""
        return self.image_size // self.patch_size

    @property
    def name(self) -> str:
        """``"vit_b"``, ``"vit_l"`` or ``"vit_h"`` for an official architecture, else ``"custom"``."""
        for name, arch in OFFICIAL_ARCHITECTURES.items():
            if arch == self:
                return name
        return "custom"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fields (global attention indexes as a list)."""
        d = dataclasses.asdict(self)
        d["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return d

    def describe(self) -> str:
        """One-line human description, used in error messages."""
        return (
            f"embed dim {self.encoder_embed_dim}, depth {self.encoder_depth}, "
            f"{self.encoder_num_heads} heads, global attention blocks "
            f"{list(self.encoder_global_attn_indexes)}, window {self.window_size}, "
            f"image size {self.image_size}, prompt dim {self.prompt_embed_dim}"
        )


OFFICIAL_ARCHITECTURES: dict[str, Architecture] = {
    "vit_b": Architecture(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": Architecture(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": Architecture(1280, 32, 16, (7, 15, 23, 31)),
}


def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> Architecture:
    """Infer a SAM architecture from the shapes in its state dict.

    Embed dim and patch size come from the patch embedding, image size from the absolute
    position embedding ``(1, H/16, W/16, C)``, depth from the block count, heads from the
    relative position tables ``(2*size-1, head_dim)`` (whose length also tells global from
    windowed blocks and gives the window size), prompt dim from the neck.

    Raises
    ------
    CheckpointError
        The state dict is not a SAM ViT state dict, or its shapes are inconsistent.
    """
    sd = state_dict

    def need(key: str) -> Any:
        if key not in sd:
            raise CheckpointError(f"state dict has no {key!r}; expected {EXPECTED}")
        return sd[key]

    if PATCH_KEY not in sd:
        raise CheckpointError(f"not a SAM state dict: found {describe_keys(sd)}; expected {EXPECTED}")
    patch = need(PATCH_KEY)
    if patch.ndim != 4 or patch.shape[2] != patch.shape[3]:
        raise CheckpointError(f"{PATCH_KEY} has shape {tuple(patch.shape)}; expected (C, 3, P, P)")
    embed_dim, patch_size = int(patch.shape[0]), int(patch.shape[2])
    pos = need("image_encoder.pos_embed")
    if pos.ndim != 4 or pos.shape[1] != pos.shape[2]:
        raise CheckpointError(
            f"image_encoder.pos_embed has shape {tuple(pos.shape)}; expected (1, N, N, {embed_dim})"
        )
    grid = int(pos.shape[1])
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise CheckpointError(f"image encoder blocks are {blocks}; expected 0..depth-1")
    head_dims, global_idx, windows = set(), [], set()
    for i in blocks:
        rel = need(f"image_encoder.blocks.{i}.attn.rel_pos_h")
        head_dims.add(int(rel.shape[1]))
        if rel.shape[0] == 2 * grid - 1:
            global_idx.append(i)
        else:
            windows.add((int(rel.shape[0]) + 1) // 2)
    if len(head_dims) != 1 or len(windows) > 1 or embed_dim % next(iter(head_dims)):
        raise CheckpointError(
            f"inconsistent attention shapes: head dims {sorted(head_dims)}, windows "
            f"{sorted(windows)} for embed dim {embed_dim}"
        )
    neck = need("image_encoder.neck.0.weight")
    prompt_dim = int(neck.shape[0])
    point = sd.get("prompt_encoder.point_embeddings.0.weight")
    if point is not None and int(point.shape[-1]) != prompt_dim:
        raise CheckpointError(
            f"neck output {prompt_dim} differs from prompt encoder dim {int(point.shape[-1])}"
        )
    return Architecture(
        encoder_embed_dim=embed_dim,
        encoder_depth=len(blocks),
        encoder_num_heads=embed_dim // next(iter(head_dims)),
        encoder_global_attn_indexes=tuple(global_idx),
        image_size=grid * patch_size,
        window_size=windows.pop() if windows else 14,
        prompt_embed_dim=prompt_dim,
        patch_size=patch_size,
    )


def build_sam(architecture: Architecture) -> Sam:
    """Build an untrained SAM with the given architecture (``segment_anything._build_sam``).

    The result is in eval mode, on the CPU, with freshly initialised weights.
    """
    from functools import partial

    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    a = architecture
    grid = a.embedding_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=a.encoder_depth,
            embed_dim=a.encoder_embed_dim,
            img_size=a.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=a.encoder_num_heads,
            patch_size=a.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(a.encoder_global_attn_indexes),
            window_size=a.window_size,
            out_chans=a.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=a.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(a.image_size, a.image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=a.prompt_embed_dim, mlp_dim=2048, num_heads=8),
            transformer_dim=a.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.eval()
    return sam
