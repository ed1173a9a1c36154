"""Training a mask decoder on objects: prompts sampled the way users click, SAM's
correction rounds, the losses, and the single-click IoU that measures the result.

Everything here works on cached image embeddings (``seg.embedding(i)``): the image encoder
is never run with gradients. All masks of the loss live in the decoder's low-resolution
frame (256 x 256 for the official models: the slice resized to the model's input size
and padded, then divided by 4); points go to the decoder in slice pixels (y, x), as in
:meth:`napari_sam.models.sam.SamModel.decode`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .._errors import InvalidInputError
from .volume import interior_points, mask_box

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..engine.segment import Segmenter
    from ..models.sam import SamModel

__all__ = ["LOSSES", "DecoderTrainer", "check_loss", "TrainingObject", "first_prompt", "losses",
           "single_click_iou"]

LOSSES = ("balanced", "sam")


def check_loss(kind: str) -> None:
    """Raise InvalidInputError unless ``kind`` is one of :data:`LOSSES`."""
    if kind not in LOSSES:
        raise InvalidInputError(f"loss must be one of {', '.join(LOSSES)}, got {kind!r}")


@dataclass(frozen=True, eq=False)
class TrainingObject:
    """One object on one slice: slice ``index`` of the stack, its (Y, X) bool ``mask``,
    and the label id it had (0 when unknown)."""

    index: int
    mask: np.ndarray
    label_id: int = 0


# ---------------------------------------------------------------------- prompts
def first_prompt(mask: np.ndarray, rng: np.random.Generator | None, box_fraction: float):
    """The first prompt of an object: ``(points, labels, box)`` in slice pixels (y, x).

    With ``rng`` None: one click at the deepest point (what validation uses). Else a box
    (share ``box_fraction``; each side moved by normal noise of a tenth of the box's
    size, at most 2 px standard deviation)
    or one click at a random pixel of the object's inner part (distance to the edge at
    least 40 % of the deepest point's): where users click.
    """
    if rng is not None and rng.random() < box_fraction:
        box = mask_box(mask)
        side = np.array([box[2] - box[0], box[3] - box[1]] * 2)
        box = box + rng.normal(0, 0.1, 4) * np.minimum(side, 20)
        h, w = mask.shape
        box = np.clip(box, 0, [h, w, h, w])
        if box[2] - box[0] >= 1 and box[3] - box[1] >= 1:
            return [], [], box
    if rng is None:
        (y, x), = interior_points(mask, 1)
    else:
        from scipy import ndimage

        dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        ys, xs = np.nonzero(dist >= 0.4 * dist.max())
        k = int(rng.integers(len(ys)))
        y, x = float(ys[k]), float(xs[k])
    return [(float(y), float(x))], [1], None


def _correction(pred: np.ndarray, target: np.ndarray, rng: np.random.Generator | None):
    """A correction click in the low-resolution frame: in the larger error region (missed:
    positive, 1; wrongly included: negative, 0), at its deepest pixel (``rng`` None) or at a
    random one. None when the mask is right."""
    from scipy import ndimage

    missed, extra = target & ~pred, pred & ~target
    region, label = (missed, 1) if missed.sum() >= extra.sum() else (extra, 0)
    if not region.any():
        return None
    if rng is None:
        dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
        i, j = np.unravel_index(int(np.argmax(dist)), region.shape)
    else:
        ys, xs = np.nonzero(region)
        k = int(rng.integers(len(ys)))
        i, j = ys[k], xs[k]
    return (int(i), int(j)), label


# ---------------------------------------------------------------------- losses
def losses(logits: "torch.Tensor", iou_pred: "torch.Tensor", target: "torch.Tensor",
           kind: str = "balanced"):
    """The loss of each of K masks, and their IoU with the target.

    ``logits`` (K, s, s), ``iou_pred`` (K,), ``target`` (s, s) float in {0, 1}. Both kinds
    add the dice loss on the mask and the squared error of the predicted IoU (SAM's IoU
    head). ``"sam"``: SAM's own mask loss, 20 x focal (alpha 0.25, gamma 2) + dice.
    ``"balanced"``: binary cross-entropy with the object's pixels weighted by the
    background / object pixel ratio (at most 1000) + dice. A cell covers a few hundred of
    the 65,536 low-resolution pixels: from a decoder that is far off (random weights, or an
    image type SAM never saw) the focal loss settles on empty masks where the balanced one
    keeps learning (``benchmarks/RESULTS.md``, "Adapting the mask decoder").
    """
    import torch
    import torch.nn.functional as F

    t = target.expand_as(logits)
    p = torch.sigmoid(logits)
    if kind == "sam":
        ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
        pt = p * t + (1 - p) * (1 - t)
        mask_loss = 20 * ((0.25 * t + 0.75 * (1 - t)) * (1 - pt) ** 2 * ce).flatten(1).mean(1)
    elif kind == "balanced":
        n_in = target.sum().clamp(min=1.0)
        weight = ((target.numel() - n_in) / n_in).clamp(max=1000.0)
        mask_loss = F.binary_cross_entropy_with_logits(
            logits, t, pos_weight=weight, reduction="none").flatten(1).mean(1)
    else:
        check_loss(kind)
    inter = (p * t).flatten(1).sum(1)
    dice = 1 - (2 * inter + 1) / (p.flatten(1).sum(1) + t.flatten(1).sum(1) + 1)
    with torch.no_grad():
        hard, inside = logits > 0, t > 0.5
        iou = (hard & inside).flatten(1).sum(1) / (hard | inside).flatten(1).sum(1).clamp(min=1)
    return mask_loss + dice + (iou_pred - iou) ** 2, iou


# ---------------------------------------------------------------------- trainer
class DecoderTrainer:
    """Decodes objects through ``decoder`` (a trainable copy of the model's mask decoder)
    with gradients; the prompt encoder and the embeddings stay fixed."""

    def __init__(self, model: "SamModel", decoder: Any, seg: "Segmenter", *,
                 loss: str = "balanced") -> None:
        check_loss(loss)
        self.model, self.decoder, self.seg, self.loss = model, decoder, seg, loss
        self._targets: dict[TrainingObject, Any] = {}

    def target(self, obj: TrainingObject) -> "torch.Tensor":
        """The object's mask in the low-resolution frame, float (s, s)."""
        import torch

        from ..engine.segment import mask_to_logits

        if obj not in self._targets:  # objects hash by identity
            m = self.model
            low = mask_to_logits(obj.mask, m.image_size, m.mask_input_size) > 0
            self._targets[obj] = torch.as_tensor(low, dtype=torch.float32, device=m.device)
        return self._targets[obj]

    def forward(self, obj: TrainingObject, points, labels, box, mask_input, multimask: bool):
        """Low-resolution logits (K, s, s) and predicted IoU (K,) of one prompt."""
        import torch

        emb = self.seg.embedding(obj.index)
        m = self.model
        pts = np.asarray(points, float).reshape(1, -1, 2) if len(points) else None
        lab = np.asarray(labels, int).reshape(1, -1) if len(points) else None
        with torch.no_grad():
            point_t, box_t, mask_t = m.prompt_tensors(
                emb, points=pts, point_labels=lab, boxes=None if box is None else box[None],
                mask_input=mask_input)
            sparse, dense = m.sam.prompt_encoder(points=point_t, boxes=box_t, masks=mask_t)
            pe = m.sam.prompt_encoder.get_dense_pe()
        dtype = next(self.decoder.parameters()).dtype
        low, iou = self.decoder(image_embeddings=emb.features.to(dtype), image_pe=pe.to(dtype),
                                sparse_prompt_embeddings=sparse.to(dtype),
                                dense_prompt_embeddings=dense.to(dtype), multimask_output=multimask)
        return low[0].float(), iou[0].float()

    def _to_pixels(self, obj: TrainingObject, ij: tuple[int, int]) -> tuple[float, float]:
        """The centre of low-resolution pixel ``ij`` in slice pixels (y, x)."""
        m = self.model
        scale = m.image_size / max(obj.mask.shape)
        step = m.image_size / m.mask_input_size
        h, w = obj.mask.shape
        return (min((ij[0] + 0.5) * step / scale, h - 1.0), min((ij[1] + 0.5) * step / scale, w - 1.0))

    def episode(self, obj: TrainingObject, rng: np.random.Generator | None, *, rounds: int,
                box_fraction: float) -> "torch.Tensor":
        """The mean loss of one object over ``rounds`` prompts: the first one, then a
        correction click in the largest error (and the previous logits as mask input)
        per round, as SAM was trained. A lone click is scored by its best of three masks."""
        import torch

        points, labels, box = first_prompt(obj.mask, rng, box_fraction)
        points, labels = list(points), list(labels)
        target = self.target(obj)
        inside = target.cpu().numpy() > 0.5
        total, mask_input, done = 0.0, None, 0
        for r in range(rounds):
            lone = len(points) == 1 and box is None and mask_input is None
            low, iou_pred = self.forward(obj, points, labels, box, mask_input, multimask=lone)
            loss, _ = losses(low, iou_pred, target, self.loss)
            k = int(torch.argmin(loss.detach())) if lone else 0
            total, done = total + loss[k], done + 1
            if r == rounds - 1:
                break
            best = low[k].detach()
            click = _correction(best.cpu().numpy() > 0, inside, rng)
            if click is None:
                break
            points.append(self._to_pixels(obj, click[0]))
            labels.append(click[1])
            mask_input = best[None, None]
        return total / done


def single_click_iou(model: "SamModel", seg: "Segmenter", objects: Sequence[TrainingObject],
                     decoder: Any = None) -> list[float]:
    """The IoU of one click at each object's deepest point (the mask SAM scores best of
    three), at the slice's resolution: what a user gets from a first click."""
    import torch

    trainer = DecoderTrainer(model, decoder or model.sam.mask_decoder, seg)
    out = []
    with torch.no_grad():
        for obj in objects:
            points, labels, _ = first_prompt(obj.mask, None, 0.0)
            low, iou_pred = trainer.forward(obj, points, labels, None, None, multimask=True)
            best = int(torch.argmax(iou_pred))
            up = model.upsample_logits(seg.embedding(obj.index), low[best][None].cpu().numpy())
            pred = (up[0] > model.mask_threshold).numpy()
            union = np.count_nonzero(pred | obj.mask)
            out.append(np.count_nonzero(pred & obj.mask) / union if union else 0.0)
    return out
