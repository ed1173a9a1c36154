"""What the engine needs from a model family: an image to an embedding, prompts to masks.

The engine (embedding cache, store, :class:`napari_sam.Segmenter`) and the front ends talk
to models only through :class:`PromptableModel`. SAM (:class:`napari_sam.models.sam.SamModel`)
is the family implemented today; another family (SAM 2's image predictor, say) is added
by implementing the same methods in a module of its own and teaching
:func:`napari_sam.load_model` its checkpoints: the cache, the store (keyed by
:meth:`PromptableModel.signature`) and the front ends stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from .speed import SpeedConfig

__all__ = ["Embedding", "PromptableModel"]


@dataclass(frozen=True)
class Embedding:
    """The image embedding of one slice, with the sizes the decoder needs.

    Attributes
    ----------
    features : torch.Tensor, shape (1, C, h, w)
        Image-encoder output (C = 256, h = w = 64 for the official SAM models), float32,
        on the model's device.
    input_size : (int, int)
        (height, width) of the slice after resizing to the model's input, before padding.
    original_size : (int, int)
        (Y, X) of the slice.
    """

    features: "torch.Tensor"
    input_size: tuple[int, int]
    original_size: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return int(self.features.element_size() * self.features.nelement())


@runtime_checkable
class PromptableModel(Protocol):
    """A promptable segmentation model as the engine uses it.

    Attributes
    ----------
    name : str
        Registry name or checkpoint file name.
    device : torch.device
    feature_shape : (int, int, int)
        (C, h, w) of one slice's embedding (what the store allocates).
    mask_input_size : int
        Side of the low-resolution logits a prediction returns and ``mask_input`` takes.
    """

    name: str
    device: "torch.device"

    @property
    def feature_shape(self) -> tuple[int, int, int]: ...

    @property
    def mask_input_size(self) -> int: ...

    def signature(self) -> dict[str, Any]:
        """What stored embeddings depend on (architecture, weights); JSON-able."""

    def embedding_signature(self) -> dict[str, Any]:
        """What the image embeddings depend on (the store's key): the image encoder's
        identity. Equal to :meth:`signature` unless only the prompt side changed (an
        adapted mask decoder keeps its base model's embeddings)."""
        ...

    def speed_config(self, mode: "str | SpeedConfig" = "auto") -> "SpeedConfig":
        """The speed paths for this model's device (``mode`` as :func:`~.speed.speed_config`)."""

    def encode(self, rgbs: Sequence["np.ndarray"], *, speed: "SpeedConfig") -> list[Embedding]:
        """Embeddings of (Y, X, 3) uint8 slices, one per slice."""

    def decode(self, emb: Embedding, *, points: Any, point_labels: Any, boxes: Any,
               mask_input: Any, multimask: bool, speed: "SpeedConfig",
               min_score: float | None = None) -> tuple["torch.Tensor", "torch.Tensor"]:
        """B prompt sets on one embedding -> logits (B, K, s, s) and scores (B, K), on the CPU.

        Coordinates are (y, x) pixels of the slice: points (B, N, 2) with labels (B, N)
        (1, 0, or -1 for padding), boxes (B, 4) as (y0, x0, y1, x1), mask_input
        (B, 1, s, s) logits; any of them may be None. With ``min_score``, prompts with
        no mask scored above it may come back with NaN logits (not upscaled).
        """

    @property
    def mask_threshold(self) -> float: ...

    def upsample_logits(self, emb: Embedding, logits: "np.ndarray") -> "torch.Tensor":
        """(K, s, s) logits -> (K, Y, X) float logits at the slice's resolution."""

    def upsample(self, emb: Embedding, logits: "np.ndarray") -> "np.ndarray":
        """(K, s, s) logits -> (K, Y, X) bool masks (logits above ``mask_threshold``)."""
