"""The SAM family: :class:`SamModel`, a loaded SAM with its identity, encoder and decoder.

It implements :class:`~napari_sam.models.base.PromptableModel`. Coordinates are
napari's (y, x) everywhere in the project; SAM wants (x, y): the one flip is
:func:`to_sam_xy`, called where prompts meet SAM (:meth:`SamModel.decode`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .._errors import InvalidInputError
from .architecture import Architecture
from .base import Embedding

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from segment_anything.modeling import Sam

    from .speed import SpeedConfig

__all__ = ["SamModel", "to_sam_xy"]


def to_sam_xy(yx: np.ndarray) -> np.ndarray:
    """THE flip: napari (y, x) pairs -> SAM (x, y) pairs, along the last axis.

    Boxes (y0, x0, y1, x1) are two pairs, so the same flip gives SAM's (x0, y0, x1, y1).
    """
    yx = np.asarray(yx, dtype=np.float64)
    # explicit pair count (not -1): an empty (0, 2) array reshapes too
    return yx.reshape(*yx.shape[:-1], yx.shape[-1] // 2, 2)[..., ::-1].reshape(yx.shape)


@dataclass(eq=False)
class SamModel:
    """A loaded SAM model and what identifies it.

    Attributes
    ----------
    sam : segment_anything.modeling.Sam
        In eval mode, on ``device``, with ``requires_grad`` False.
    architecture : Architecture
    checkpoint_sha256 : str
        SHA-256 of the checkpoint file; for an in-memory Sam, SHA-256 over its state dict
        (names, shapes, dtypes, bytes, in sorted order).
    name : str
        Registry name, checkpoint file name, or ``"custom"``.
    device : torch.device
    checkpoint_path : Path or None
    adaptation : dict or None
        For a model adapted by :func:`napari_sam.workflows.adapt.adapt`: its record (base
        model, training objects, settings, validation scores), saved in the checkpoint.
    """

    sam: Sam
    architecture: Architecture
    checkpoint_sha256: str
    name: str
    device: torch.device
    checkpoint_path: Path | None = field(default=None)
    adaptation: dict | None = field(default=None)

    @property
    def image_size(self) -> int:
        """Side of the square input SAM expects (1024 for the official models)."""
        return self.architecture.image_size

    def signature(self) -> dict[str, Any]:
        """The model's identity (batch job signatures): architecture and checkpoint hash."""
        return {"architecture": self.architecture.to_dict(), "checkpoint_sha256": self.checkpoint_sha256}

    def embedding_signature(self) -> dict[str, Any]:
        """What an embedding store must match: the architecture and the hash of the
        checkpoint whose image encoder this is (an adapted decoder keeps its base's)."""
        sha = self.checkpoint_sha256
        if self.adaptation and self.adaptation.get("encoder_unchanged"):
            sha = self.adaptation["base_checkpoint_sha256"]
        return {"architecture": self.architecture.to_dict(), "checkpoint_sha256": sha}

    # ------------------------------------------------------------------ PromptableModel
    @property
    def feature_shape(self) -> tuple[int, int, int]:
        a = self.architecture
        return (a.prompt_embed_dim, a.embedding_size, a.embedding_size)

    @property
    def mask_input_size(self) -> int:
        """Side of the low-resolution logits (256 for the official models)."""
        return 4 * self.architecture.embedding_size

    def speed_config(self, mode: "str | SpeedConfig" = "auto") -> "SpeedConfig":
        """The speed paths on this model's device (see :func:`napari_sam.models.speed.speed_config`)."""
        from .speed import SpeedConfig, speed_config

        return mode if isinstance(mode, SpeedConfig) else speed_config(self.device, mode=mode)

    def encode(self, rgbs: Sequence[np.ndarray], *, speed: "SpeedConfig | None" = None) -> list[Embedding]:
        """Embeddings of slices, ``speed.batch_size`` slices per encoder call.

        Preprocessing is exactly ``SamPredictor.set_image``'s; the encoder is the
        reference module (``speed=speed.OFF``) or a fast path (:mod:`napari_sam.models.speed`).

        Parameters
        ----------
        rgbs : sequence of numpy.ndarray of uint8, each (Y, X, 3)
            Normalised slices (:meth:`napari_sam.Stack.rgb`); sizes may differ.
        speed : SpeedConfig, optional
            Default :meth:`speed_config` (batch 4 on CUDA, 1 on the CPU).

        Returns
        -------
        list of Embedding
            One per slice, in order; each ``features`` is its own (1, C, h, w) float32
            tensor on the model's device (not a view of the batch).
        """
        import torch

        from ._vit import encoder_for

        cfg = self.speed_config() if speed is None else speed
        run = encoder_for(self.sam, cfg)
        out: list[Embedding] = []
        for start in range(0, len(rgbs), cfg.batch_size):
            chunk = rgbs[start : start + cfg.batch_size]
            xs, sizes = zip(*(self.preprocess(rgb) for rgb in chunk))
            with torch.inference_mode():
                feats = run(torch.cat(xs))
            for i, (rgb, size) in enumerate(zip(chunk, sizes)):
                out.append(Embedding(feats[i : i + 1].clone(), size,
                                     (int(rgb.shape[0]), int(rgb.shape[1]))))
        return out

    def preprocess(self, rgb: np.ndarray) -> tuple["torch.Tensor", tuple[int, int]]:
        """One (Y, X, 3) uint8 image -> ((1, 3, S, S) float32, input size), as ``SamPredictor``.

        ``ResizeLongestSide.apply_image`` (PIL resize of the uint8 image), then
        ``sam.preprocess`` (normalise with the pixel mean and std, pad to S x S).
        """
        import torch
        from segment_anything.utils.transforms import ResizeLongestSide

        if not (isinstance(rgb, np.ndarray) and rgb.ndim == 3 and rgb.shape[2] == 3
                and rgb.dtype == np.uint8):
            raise InvalidInputError(
                "each slice must be a (Y, X, 3) uint8 array (Stack.rgb(i)), got "
                f"{type(rgb).__name__} of shape {getattr(rgb, 'shape', None)} and dtype "
                f"{getattr(rgb, 'dtype', None)}")
        size = self.image_size
        short = ResizeLongestSide.get_preprocess_shape(rgb.shape[0], rgb.shape[1], size)
        if min(short) < 1:
            raise InvalidInputError(
                f"a slice of shape {rgb.shape[:2]} is too elongated for SAM: resized so that "
                f"its longest side is {size} px, its short side would be {min(short)} px; crop "
                f"it, or give slices whose aspect ratio is below 1:{2 * size}")
        resized = ResizeLongestSide(size).apply_image(rgb)
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        with torch.inference_mode():
            return self.sam.preprocess(x), (int(x.shape[-2]), int(x.shape[-1]))

    def decode(self, emb: Embedding, *, points=None, point_labels=None, boxes=None,
               mask_input=None, multimask: bool, speed: "SpeedConfig | None" = None,
               min_score: float | None = None):
        """SAM's prompt encoder and mask decoder for B prompt sets on one embedding.

        The same calls as ``SamPredictor.predict_torch``; the one place where prompts meet
        SAM. With ``speed.fast_decoder`` the mask decoder runs as
        :class:`napari_sam.models._decoder.FastDecoder`.

        Parameters
        ----------
        points : array, shape (B, N, 2), optional
            (y, x) pixel coordinates of the slice.
        point_labels : array, shape (B, N), optional
            1 positive, 0 negative, -1 padding (ignored by SAM).
        boxes : array, shape (B, 4), optional
            (y0, x0, y1, x1).
        mask_input : array, shape (B, 1, s, s), optional
            Low-resolution logits of earlier predictions.
        speed : SpeedConfig, optional
            Default :meth:`speed_config`; ``speed.OFF`` runs ``sam.mask_decoder`` itself.
        min_score : float, optional
            Early rejection (fast decoder only): prompts with no returned mask scored
            above this are not upscaled, and their logits are NaN; the others' logits
            are unchanged. The reference decoder decodes every prompt.

        Returns
        -------
        (torch.Tensor, torch.Tensor)
            Low-resolution logits (B, K, s, s) and predicted IoU (B, K), float32 on the CPU.
        """
        import torch

        from .speed import decoder_dtype

        sam = self.sam
        cfg = self.speed_config() if speed is None else speed
        point_t, box_t, mask_t = self.prompt_tensors(emb, points=points, point_labels=point_labels,
                                                     boxes=boxes, mask_input=mask_input)
        with torch.inference_mode():
            sparse, dense = sam.prompt_encoder(points=point_t, boxes=box_t, masks=mask_t)
            if cfg.fast_decoder:
                from ._decoder import decoder_for

                fast = decoder_for(sam, decoder_dtype(self.device, cfg))
                low_res, iou = fast(emb.features, sparse, dense, multimask=multimask,
                                    dense_is_constant=mask_t is None, min_score=min_score)
            else:
                low_res, iou = sam.mask_decoder(
                    image_embeddings=emb.features,
                    image_pe=sam.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=multimask,
                )
        return low_res.float().cpu(), iou.float().cpu()

    def prompt_tensors(self, emb: Embedding, *, points=None, point_labels=None, boxes=None,
                       mask_input=None):
        """Prompts as ``sam.prompt_encoder`` takes them: (y, x) flipped to SAM's (x, y) and
        scaled to the model's input frame, as ``SamPredictor`` does; arguments as
        :meth:`decode`. Returns (points, labels) or None, boxes or None, masks or None."""
        import torch
        from segment_anything.utils.transforms import ResizeLongestSide

        device = self.device
        transform = ResizeLongestSide(self.sam.image_encoder.img_size)
        point_t = box_t = mask_t = None
        if points is not None:
            coords = transform.apply_coords(to_sam_xy(points), emb.original_size)
            point_t = (torch.as_tensor(coords, dtype=torch.float, device=device),
                       torch.as_tensor(point_labels, dtype=torch.int, device=device))
        if boxes is not None:
            sam_boxes = transform.apply_boxes(to_sam_xy(boxes), emb.original_size)
            box_t = torch.as_tensor(sam_boxes, dtype=torch.float, device=device)
        if mask_input is not None:
            mask_t = torch.as_tensor(mask_input, dtype=torch.float, device=device)
        return point_t, box_t, mask_t

    @property
    def mask_threshold(self) -> float:
        """Logits above this are inside the mask."""
        return float(self.sam.mask_threshold)

    def upsample_logits(self, emb: Embedding, logits: np.ndarray) -> "torch.Tensor":
        """(K, s, s) low-resolution logits -> (K, Y, X) float logits at the slice's resolution."""
        import torch

        with torch.inference_mode():
            return self.sam.postprocess_masks(torch.as_tensor(logits)[None], emb.input_size,
                                              emb.original_size)[0]

    def upsample(self, emb: Embedding, logits: np.ndarray) -> np.ndarray:
        """(K, s, s) logits -> (K, Y, X) bool masks at the slice's resolution."""
        return (self.upsample_logits(emb, logits) > self.mask_threshold).numpy()

