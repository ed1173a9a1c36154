"""Prompts to masks on one slice: :class:`Segmenter`.

Coordinates are napari's (row, col) = (y, x) in the slice's pixel grid everywhere in the
public API. SAM wants (x, y); the one flip happens in :func:`_to_sam_xy` below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from ._errors import InvalidInputError
from .embeddings import DEFAULT_MEMORY_BYTES, Embedding, EmbeddingCache

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .fast import SpeedConfig
    from .models import SamModel
    from .stacks import Stack

__all__ = ["Segmenter", "Prediction"]


def _to_sam_xy(yx: np.ndarray) -> np.ndarray:
    """THE flip: napari (y, x) pairs -> SAM (x, y) pairs, along the last axis.

    Boxes (y0, x0, y1, x1) are two pairs, so the same flip gives SAM's (x0, y0, x1, y1).
    """
    yx = np.asarray(yx, dtype=np.float64)
    # explicit pair count (not -1): an empty (0, 2) array reshapes too
    return yx.reshape(*yx.shape[:-1], yx.shape[-1] // 2, 2)[..., ::-1].reshape(yx.shape)


@dataclass
class Prediction:
    """SAM's masks for one prompt set on one slice.

    Attributes
    ----------
    scores : numpy.ndarray, shape (K,)
        SAM's predicted IoU of each mask (K = 3 with ``multimask``, else 1).
    logits : numpy.ndarray, shape (K, 256, 256)
        Low-resolution logits; ``logits[best][None]`` refines the next prediction as
        ``mask_input``.
    best : int
        Index of the mask with the highest predicted IoU.
    """

    scores: np.ndarray
    logits: np.ndarray
    best: int
    _upsample: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.scores)

    def mask_at(self, k: int) -> np.ndarray:
        """Mask ``k`` at full slice resolution, (Y, X) bool (upsampled on first use)."""
        if k not in self._cache:
            self._cache[k] = self._upsample(self.logits[k : k + 1])[0]
        return self._cache[k]

    @property
    def mask(self) -> np.ndarray:
        """The best mask, (Y, X) bool."""
        return self.mask_at(self.best)

    @property
    def masks(self) -> np.ndarray:
        """All K masks, (K, Y, X) bool, ordered as ``scores``."""
        return np.stack([self.mask_at(k) for k in range(len(self))])


class Segmenter:
    """Segment objects on the slices of a stack from point and box prompts.

    Parameters
    ----------
    model : SamModel, str, path or segment_anything Sam
        A loaded model, or anything :func:`napari_sam.load_model` accepts.
    stack : Stack, array or path
        A stack, or anything :func:`napari_sam.open_stack` accepts.
    cache : None, str, Path or EmbeddingCache
        None: embeddings in memory only. A path: a zarr embedding store, created if
        missing, reused across sessions and processes. An EmbeddingCache: used as is.
    memory_bytes : int
        Bound of the in-memory embedding cache.
    store_dtype : {"float16", "float32"}
        Precision of stored embeddings.
    speed : str or SpeedConfig
        Speed paths of the encoder (see :class:`EmbeddingCache`) and of the mask decoder
        (``SpeedConfig.fast_decoder``); "auto" picks per device, "off" gives the reference
        paths, bit-identical to ``SamPredictor``.

    Examples
    --------
    >>> seg = Segmenter(model, stack, cache="cells.embeddings.zarr")   # doctest: +SKIP
    >>> mask = seg.segment(12, points=[[40, 52]], point_labels=[1])    # doctest: +SKIP
    """

    def __init__(
        self,
        model: "SamModel | str | Path | Any",
        stack: "Stack | Any",
        *,
        cache: "str | Path | EmbeddingCache | None" = None,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        store_dtype: str = "float16",
        speed: Any = "auto",
    ) -> None:
        from .models import SamModel, load_model
        from .stacks import Stack, open_stack

        if isinstance(cache, EmbeddingCache):
            self.cache = cache
            self.model, self.stack = cache.model, cache.stack
            return
        self.model = model if isinstance(model, SamModel) else load_model(model)
        self.stack = stack if isinstance(stack, Stack) else open_stack(stack)
        self.cache = EmbeddingCache(
            self.model, self.stack, store=cache, memory_bytes=memory_bytes,
            store_dtype=store_dtype, speed=speed,
        )

    def __repr__(self) -> str:
        store = self.cache.store_path or "memory"
        return f"Segmenter(model={self.model.name!r}, stack={self.stack!r}, cache={str(store)!r})"

    # ---------------------------------------------------------------- embeddings
    def embed(
        self,
        indices: Iterable[int] | None = None,
        *,
        progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> int:
        """Precompute embeddings (default: every slice); see :meth:`EmbeddingCache.embed`."""
        return self.cache.embed(indices, progress=progress, should_stop=should_stop)

    def embedding(self, index: int) -> Embedding:
        """The embedding of slice ``index`` (computed on first use)."""
        return self.cache.get(index)

    def prefetch(self, indices: Iterable[int] | None = None, *, around: int | None = None) -> list[int]:
        """Embed slices in the background (lower CPU priority); returns the queued indices.

        Parameters
        ----------
        indices : iterable of int, optional
            Slices to embed, in order; replaces the earlier request.
        around : int, optional
            Instead of ``indices``: the slice the user is on; it and its next slices in
            the direction of travel are queued (:meth:`napari_sam.prefetch.Prefetcher.follow`).

        See Also
        --------
        napari_sam.prefetch.Prefetcher : ``wait()``, ``cancel()``, ``stats``.
        """
        if (indices is None) == (around is None):
            raise InvalidInputError("pass either indices=[...] or around=<slice index>")
        pre = self.cache.prefetcher
        return pre.follow(around) if around is not None else pre.request(indices)

    # ------------------------------------------------------------------ prompts
    def predict(
        self,
        index: int,
        *,
        points: Sequence[Sequence[float]] | np.ndarray | None = None,
        point_labels: Sequence[int] | np.ndarray | None = None,
        box: Sequence[float] | np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask: bool = True,
    ) -> Prediction:
        """Run SAM's decoder for one prompt set on slice ``index``.

        Parameters
        ----------
        index : int
            Slice index (see :meth:`napari_sam.Stack.position`).
        points : array-like, shape (N, 2), optional
            Point prompts as (y, x) pixel coordinates of the slice.
        point_labels : array-like of {0, 1}, shape (N,), optional
            1 for a positive (object) point, 0 for a negative (background) point.
            Default: all positive.
        box : array-like, shape (4,), optional
            A box as (y0, x0, y1, x1); the corners may be given in any order.
        mask_input : numpy.ndarray, shape (1, 256, 256) or (256, 256), optional
            (256 for the official models: four times the embedding size.)
            Logits of a previous prediction (``Prediction.logits[best]``) to refine.
        multimask : bool
            Return SAM's three candidate masks (best for a single click); False returns one.

        Returns
        -------
        Prediction
        """
        shape = self.stack.slice_shape
        pts, labels = _check_points(points, point_labels, shape)
        box_arr = _check_box(box, shape)
        if pts is None and box_arr is None and mask_input is None:
            raise InvalidInputError(
                "no prompt given: pass points=[[y, x], ...] with point_labels, a box "
                "[y0, x0, y1, x1], or mask_input"
            )
        mask_t = _check_mask_input(mask_input, 4 * self.model.architecture.embedding_size)
        emb = self.cache.get(index)
        low_res, scores = self._decode(emb, pts, labels, None if box_arr is None else box_arr[None],
                                       mask_t, multimask)
        logits = low_res[0].numpy()
        scores_np = scores[0].numpy()
        return Prediction(scores=scores_np, logits=logits, best=int(np.argmax(scores_np)),
                          _upsample=lambda lg: self._upsample(emb, lg))

    def segment(self, index: int, **prompts: Any) -> np.ndarray:
        """The best mask for the prompts, (Y, X) bool; arguments as :meth:`predict`."""
        return self.predict(index, **prompts).mask

    def segment_boxes(self, index: int, boxes: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
        """One mask per box in a single batched decoder call.

        Parameters
        ----------
        boxes : array-like, shape (N, 4)
            Boxes as (y0, x0, y1, x1).

        Returns
        -------
        numpy.ndarray of bool, shape (N, Y, X)
        """
        boxes = np.asarray(boxes, dtype=np.float64)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise InvalidInputError(
                f"boxes must have shape (N, 4) as (y0, x0, y1, x1), got shape {boxes.shape}"
            )
        shape = self.stack.slice_shape
        if len(boxes) == 0:
            return np.zeros((0, *shape), dtype=bool)
        boxes = np.stack([_check_box(b, shape) for b in boxes])
        emb = self.cache.get(index)
        low_res, _ = self._decode(emb, None, None, boxes, None, multimask=False)
        return self._upsample(emb, low_res[:, 0].numpy())

    # ------------------------------------------------------------------ SAM calls
    def _decode(self, emb: Embedding, points, labels, boxes, mask_input, multimask: bool):
        """One object's points and mask (and B boxes): :func:`decode` with a batch of one."""
        return decode(
            self.model, emb,
            points=None if points is None else np.asarray(points)[None],
            point_labels=None if labels is None else np.asarray(labels)[None],
            boxes=boxes,
            mask_input=None if mask_input is None else np.asarray(mask_input)[None],
            multimask=multimask,
            speed=self.cache.speed,
        )

    def _upsample(self, emb: Embedding, logits: np.ndarray) -> np.ndarray:
        """(K, 256, 256) logits -> (K, Y, X) bool masks at the slice's resolution."""
        import torch

        sam = self.model.sam
        with torch.inference_mode():
            full = sam.postprocess_masks(
                torch.as_tensor(logits)[None], emb.input_size, emb.original_size
            )
        return (full[0] > sam.mask_threshold).numpy()


def decode(model: "SamModel", emb: Embedding, *, points=None, point_labels=None, boxes=None,
           mask_input=None, multimask: bool, speed: "SpeedConfig | None" = None):
    """SAM's prompt encoder + mask decoder for B prompt sets on one embedding.

    The same calls as ``SamPredictor.predict_torch``; the one place where prompts meet SAM.
    With ``speed.fast_decoder`` the mask decoder runs as :class:`napari_sam._decoder.FastDecoder`
    (slice-level reuse, matrix-product upscaling, image side in ``speed.autocast``).

    Parameters
    ----------
    points : array, shape (B, N, 2), optional
        (y, x) pixel coordinates of the slice.
    point_labels : array, shape (B, N), optional
        1 positive, 0 negative, -1 padding (ignored by SAM).
    boxes : array, shape (B, 4), optional
        (y0, x0, y1, x1).
    mask_input : array, shape (B, 1, h, w), optional
        Low-resolution logits of earlier predictions.
    speed : SpeedConfig, optional
        Default :func:`napari_sam.fast.speed_config` for the model's device; ``fast.OFF``
        runs ``sam.mask_decoder`` itself.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        Low-resolution logits (B, K, h, w) and predicted IoU (B, K), float32 on the CPU.
    """
    import torch
    from segment_anything.utils.transforms import ResizeLongestSide

    from .fast import decoder_dtype, speed_config

    sam, device = model.sam, model.device
    cfg = speed_config(device) if speed is None else speed
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    point_t = box_t = mask_t = None
    if points is not None:
        coords = transform.apply_coords(_to_sam_xy(points), emb.original_size)
        point_t = (torch.as_tensor(coords, dtype=torch.float, device=device),
                   torch.as_tensor(point_labels, dtype=torch.int, device=device))
    if boxes is not None:
        sam_boxes = transform.apply_boxes(_to_sam_xy(boxes), emb.original_size)
        box_t = torch.as_tensor(sam_boxes, dtype=torch.float, device=device)
    if mask_input is not None:
        mask_t = torch.as_tensor(mask_input, dtype=torch.float, device=device)
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(points=point_t, boxes=box_t, masks=mask_t)
        if cfg.fast_decoder:
            from ._decoder import decoder_for

            fast = decoder_for(sam, decoder_dtype(device, cfg))
            low_res, iou = fast(emb.features, sparse, dense, multimask=multimask,
                                dense_is_constant=mask_t is None)
        else:
            low_res, iou = sam.mask_decoder(
                image_embeddings=emb.features,
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
    return low_res.float().cpu(), iou.float().cpu()


# ---------------------------------------------------------------------- validation
def _check_points(points, point_labels, shape: tuple[int, int]):
    if points is None:
        if point_labels is not None:
            raise InvalidInputError("point_labels given without points")
        return None, None
    pts = np.asarray(points, dtype=np.float64)
    if pts.size == 0:
        if point_labels is not None and np.asarray(point_labels).size:
            raise InvalidInputError("point_labels given for an empty list of points")
        return None, None
    if pts.ndim == 1 and pts.shape[0] == 2:
        pts = pts[None]
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise InvalidInputError(
            f"points must have shape (N, 2) as (y, x) pixel coordinates of the slice, got "
            f"shape {pts.shape}; for points of an nD layer pass only the last two columns"
        )
    if not np.isfinite(pts).all():
        raise InvalidInputError(f"points must be finite numbers, got {pts.tolist()}")
    labels = np.ones(len(pts), dtype=np.int64) if point_labels is None else np.asarray(point_labels)
    if labels.shape != (len(pts),):
        raise InvalidInputError(
            f"point_labels must have one entry per point ({len(pts)}), got shape {labels.shape}"
        )
    if not np.isin(labels, (0, 1)).all():
        raise InvalidInputError(
            f"point_labels must be 1 (positive) or 0 (negative), got {np.unique(labels).tolist()}"
        )
    outside = ~((pts >= -0.5) & (pts <= np.asarray(shape) - 0.5)).all(axis=1)
    if outside.any():
        raise InvalidInputError(
            f"points {pts[outside].tolist()} (y, x) lie outside the slice of shape {shape}"
        )
    return pts, labels.astype(np.int64)


def _check_box(box, shape: tuple[int, int]):
    if box is None:
        return None
    b = np.asarray(box, dtype=np.float64)
    if b.shape != (4,):
        raise InvalidInputError(f"box must be 4 numbers (y0, x0, y1, x1), got shape {b.shape}")
    if not np.isfinite(b).all():
        raise InvalidInputError(f"box must be finite numbers, got {b.tolist()}")
    y0, y1 = sorted(b[[0, 2]])
    x0, x1 = sorted(b[[1, 3]])
    if y1 - y0 < 1 or x1 - x0 < 1:
        raise InvalidInputError(
            f"box {b.tolist()} (y0, x0, y1, x1) has no area: it must span at least one pixel "
            "along y and x"
        )
    h, w = shape
    if y1 < 0 or x1 < 0 or y0 > h or x0 > w:
        raise InvalidInputError(f"box {b.tolist()} (y0, x0, y1, x1) lies outside the slice of shape {shape}")
    return np.array([max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)])


def _check_mask_input(mask_input, size: int):
    if mask_input is None:
        return None
    m = np.asarray(mask_input, dtype=np.float32)
    if m.ndim == 2:
        m = m[None]
    if m.shape != (1, size, size):
        raise InvalidInputError(
            f"mask_input must be SAM logits of shape (1, {size}, {size}) or ({size}, {size}) "
            f"(Prediction.logits[k]), got shape {np.asarray(mask_input).shape}"
        )
    return m
