"""Tiny, deterministic SAM models for tests, notebooks and demos.

A tiny SAM has the official prompt encoder and mask decoder but a small image encoder
(embed dim 32, 2 blocks by default), so it encodes a 1024x1024 image in a fraction of a
second on a CPU. Its weights are random but fixed by ``seed``; the masks it predicts are
meaningless, but every code path (shapes, caching, prompts, painting) is the real one.

Examples
--------
>>> from napari_sam.testing import make_tiny_checkpoint
>>> from napari_sam import load_model
>>> path = make_tiny_checkpoint(tmp_path / "tiny.pth")        # doctest: +SKIP
>>> model = load_model(checkpoint=path, device="cpu")          # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from segment_anything.modeling import Sam

__all__ = ["make_tiny_sam", "make_tiny_checkpoint"]


def make_tiny_sam(
    *,
    embed_dim: int = 32,
    depth: int = 2,
    num_heads: int = 2,
    global_attn_indexes: tuple[int, ...] = (1,),
    image_size: int = 1024,
    window_size: int = 14,
    prompt_embed_dim: int = 256,
    seed: int = 0,
) -> Sam:
    """Build a small SAM with random, seeded weights (eval mode, CPU).

    Parameters
    ----------
    embed_dim, depth, num_heads, global_attn_indexes, image_size, window_size, prompt_embed_dim
        Image encoder shape, see :class:`napari_sam.models.Architecture`.
    seed : int, optional
        Same seed, same weights. The global torch random state is left untouched.

    Returns
    -------
    segment_anything.modeling.Sam
    """
    import torch

    from .models.architecture import Architecture, build_sam

    arch = Architecture(
        encoder_embed_dim=embed_dim,
        encoder_depth=depth,
        encoder_num_heads=num_heads,
        encoder_global_attn_indexes=tuple(global_attn_indexes),
        image_size=image_size,
        window_size=window_size,
        prompt_embed_dim=prompt_embed_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_sam(arch)
        # SAM zero-initialises the position embeddings; make them random too, so that a
        # mix-up of blocks or tables changes the output
        with torch.no_grad():
            for name, param in sam.named_parameters():
                if name.endswith(("pos_embed", "rel_pos_h", "rel_pos_w")):
                    param.normal_(0.0, 0.02)
    return sam.eval()


def make_tiny_checkpoint(path: str | os.PathLike, **kwargs) -> Path:
    """Save the state dict of ``make_tiny_sam(**kwargs)`` with ``torch.save``.

    Parameters
    ----------
    path : str or os.PathLike
        Where to write the checkpoint; parent folders are created.
    **kwargs
        Passed to :func:`make_tiny_sam`.

    Returns
    -------
    Path
        ``path``.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(make_tiny_sam(**kwargs).state_dict(), path)
    return path
