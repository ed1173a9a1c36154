"""Prompts to masks on the slices of a stack: :class:`Segmenter` and :class:`Prediction`.

Coordinates are napari's (row, col) = (y, x) in the slice's pixel grid everywhere in the
public API (the flip to SAM's (x, y) happens in :meth:`napari_sam.models.sam.SamModel.decode`).
:meth:`Segmenter.predict_many` is the one batched path from prompts to masks: it groups
prompts of one kind into one decoder call, applies SAM's three-mask rule, and hands back
predictions whose masks are upsampled on first use. Everything that decodes uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from .._errors import InvalidInputError
from .cache import DEFAULT_MEMORY_BYTES, Embedding, EmbeddingCache
from .prompt import Prompt

if TYPE_CHECKING:  # pragma: no cover
    from ..io.stacks import SliceSource
    from ..models.base import PromptableModel
    from .prefetch import Prefetcher

__all__ = ["Prediction", "Segmenter", "mask_to_logits", "resolve_store"]

_MASK_LOGIT = float(np.log((1 - 1e-3) / 1e-3))  # +-6.9: a binary mask as SAM logits


@dataclass
class Prediction:
    """The model's masks for one prompt on one slice.

    Attributes
    ----------
    scores : numpy.ndarray, shape (K,)
        Predicted IoU of each mask (K = 3 for a lone click, else 1).
    logits : numpy.ndarray, shape (K, s, s)
        Low-resolution logits; ``logits[best]`` refines the next prediction as
        ``mask_input``.
    best : int
        Index of the mask with the highest predicted IoU.
    prompt : Prompt or None
        The prompt that was decoded.
    """

    scores: np.ndarray
    logits: np.ndarray
    best: int
    _upsample: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    prompt: Prompt | None = None
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
    def score(self) -> float:
        """The best mask's predicted IoU."""
        return float(self.scores[self.best])

    @property
    def masks(self) -> np.ndarray:
        """All K masks, (K, Y, X) bool, ordered as ``scores``."""
        return np.stack([self.mask_at(k) for k in range(len(self))])


def mask_to_logits(mask: np.ndarray, image_size: int = 1024, mask_size: int | None = None) -> np.ndarray:
    """A binary (Y, X) mask as ``mask_input`` logits (s, s) in SAM's padded frame."""
    import torch
    import torch.nn.functional as F

    size = image_size // 4 if mask_size is None else mask_size
    h, w = mask.shape
    s = image_size / max(h, w)
    nh, nw = int(h * s + 0.5), int(w * s + 0.5)
    m = torch.as_tensor(np.asarray(mask), dtype=torch.float32)[None, None]
    m = F.interpolate(m, (nh, nw), mode="bilinear", align_corners=False)
    m = F.pad(m, (0, image_size - nw, 0, image_size - nh))
    m = F.interpolate(m, (size, size), mode="area")[0, 0].numpy()
    return np.where(m > 0.5, _MASK_LOGIT, -_MASK_LOGIT).astype(np.float32)


class Segmenter:
    """Segment objects on the slices of a stack from point and box prompts.

    Parameters
    ----------
    model : PromptableModel, str, path or segment_anything Sam
        A loaded model, or anything :func:`napari_sam.load_model` accepts.
    stack : SliceSource, array or path
        A stack (or any :class:`~napari_sam.io.stacks.SliceSource`), or anything
        :func:`napari_sam.open_stack` accepts.
    cache : None, "auto", str or Path
        None: embeddings in memory only. A path: a zarr embedding store, created if
        missing, reused across sessions and processes. "auto": the store beside the
        image file (:func:`napari_sam.io.places.embedding_store_for`, where
        ``napari-sam embed`` and the widget put it) when there is one, else memory only.
        (To share an existing :class:`EmbeddingCache`, use :meth:`from_cache`.)
    memory_bytes : int
        Bound of the in-memory embedding cache.
    store_dtype : {"int8", "float16", "float32"}
        Precision of stored embeddings (see :class:`EmbeddingCache`; int8 by default).
    speed : str or SpeedConfig
        Speed paths of the encoder and the mask decoder (see :class:`EmbeddingCache`);
        "auto" picks per device, "off" gives the reference paths, bit-identical to
        ``SamPredictor``.

    Examples
    --------
    >>> seg = Segmenter(model, stack, cache="cells.embeddings.zarr")   # doctest: +SKIP
    >>> mask = seg.segment(12, points=[[40, 52]], point_labels=[1])    # doctest: +SKIP
    """

    def __init__(
        self,
        model: "PromptableModel | str | Path | Any",
        stack: "SliceSource | Any",
        *,
        cache: "str | Path | None" = None,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        store_dtype: str = "int8",
        speed: Any = "auto",
    ) -> None:
        from ..io.stacks import SliceSource, open_stack
        from ..models.base import PromptableModel
        from ..models.loading import load_model

        if isinstance(cache, EmbeddingCache):
            raise InvalidInputError(
                "cache= takes a store path or None; to share an EmbeddingCache use "
                "Segmenter.from_cache(cache) (its model and stack are used)")
        model = model if isinstance(model, PromptableModel) else load_model(model)
        stack = stack if isinstance(stack, SliceSource) else open_stack(stack)
        cache = resolve_store(cache, stack)
        self._init(EmbeddingCache(model, stack, store=cache, memory_bytes=memory_bytes,
                                  store_dtype=store_dtype, speed=speed))

    @classmethod
    def from_cache(cls, cache: EmbeddingCache) -> "Segmenter":
        """A segmenter over an existing cache (its model, stack, store and speed)."""
        self = cls.__new__(cls)
        self._init(cache)
        return self

    def _init(self, cache: EmbeddingCache) -> None:
        self.cache = cache
        self.model, self.stack = cache.model, cache.stack
        self._prefetcher: "Prefetcher | None" = None

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

    def is_stored(self, index: int) -> bool:
        """True when slice ``index`` is in memory or in the store (no encoder call needed)."""
        return self.cache.is_cached(index)

    def is_embedded(self, index: int, prompts: Sequence[Prompt] | None = None) -> bool:
        """True when predicting on slice ``index`` needs no encoder call (a memory hit)."""
        return self.cache.in_memory(index)

    @property
    def prefetcher(self) -> "Prefetcher":
        """This segmenter's :class:`~napari_sam.engine.prefetch.Prefetcher` (made on first use)."""
        if self._prefetcher is None:
            from .prefetch import Prefetcher

            self._prefetcher = Prefetcher(self.cache)
        return self._prefetcher

    def prefetch(self, indices: Iterable[int] | None = None, *, around: int | None = None) -> list[int]:
        """Embed slices in the background (lower CPU priority); returns the queued indices.

        Parameters
        ----------
        indices : iterable of int, optional
            Slices to embed, in order; replaces the earlier request.
        around : int, optional
            Instead of ``indices``: the slice the user is on; it and its next slices in
            the direction of travel are queued (:meth:`Prefetcher.follow`).
        """
        if (indices is None) == (around is None):
            raise InvalidInputError("pass either indices=[...] or around=<slice index>")
        pre = self.prefetcher
        return pre.follow(around) if around is not None else pre.request(indices)

    def cancel_prefetch(self) -> None:
        """Drop the prefetcher's queue, if there is one (the slice in work finishes)."""
        if self._prefetcher is not None:
            self._prefetcher.cancel()

    # ------------------------------------------------------------------ prompts
    def predict_many(self, index: int, prompts: Sequence[Prompt], *,
                     multimask: bool | None = None,
                     min_score: float | None = None) -> list[Prediction]:
        """Decode several objects' prompts on slice ``index``, batched.

        Prompts of one kind (number of points, box or not, mask input or not) go through
        the decoder in one call; no padding is added (it changes the model's output), so
        each prediction equals decoding its prompt alone.

        Parameters
        ----------
        index : int
            Slice index (see :meth:`napari_sam.Stack.position`).
        prompts : sequence of Prompt
            One per object (:meth:`Prompt.of`), checked against the slice here.
        multimask : bool, optional
            Three candidate masks (True) or one (False) for every prompt; default SAM's
            rule per prompt (:attr:`Prompt.multimask`: three for a lone click).
        min_score : float, optional
            Early rejection for callers that drop low-scored masks anyway (segment
            everything): a prediction none of whose scores is above it may have NaN
            logits (it was not upscaled); its scores are exact.

        Returns
        -------
        list of Prediction
            In the order of ``prompts``.
        """
        shape = self.stack.slice_shape
        size = self.model.mask_input_size
        checked = [p.check(shape, mask_size=size) for p in prompts]
        if not checked:
            return []
        emb = self.cache.get(index)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(checked):
            mm = p.multimask if multimask is None else bool(multimask)
            groups.setdefault((*p.kind, mm), []).append(i)
        out: list[Prediction | None] = [None] * len(checked)
        for (n, has_box, has_mask, mm), members in groups.items():
            group = [checked[i] for i in members]
            low, iou = self.model.decode(
                emb,
                points=np.stack([p.points for p in group]) if n else None,
                point_labels=np.stack([p.labels for p in group]) if n else None,
                boxes=np.stack([p.box for p in group]) if has_box else None,
                mask_input=np.stack([p.mask_input for p in group]) if has_mask else None,
                multimask=mm, speed=self.cache.speed, min_score=min_score)
            logits, scores = low.numpy(), iou.numpy()
            for j, i in enumerate(members):
                out[i] = Prediction(scores=scores[j], logits=logits[j],
                                    best=int(np.argmax(scores[j])),
                                    _upsample=lambda lg: self.model.upsample(emb, lg),
                                    prompt=checked[i])
        return out  # type: ignore[return-value]

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
        """Run the decoder for one prompt set on slice ``index``.

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
            Return the three candidate masks (best for a single click); False returns one.

        Returns
        -------
        Prediction
        """
        prompt = Prompt.of(points=points, point_labels=point_labels, box=box, mask_input=mask_input)
        return self.predict_many(index, [prompt], multimask=multimask)[0]

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
                f"boxes must have shape (N, 4) as (y0, x0, y1, x1), got shape {boxes.shape}")
        if len(boxes) == 0:
            return np.zeros((0, *self.stack.slice_shape), dtype=bool)
        preds = self.predict_many(index, [Prompt.of(box=b) for b in boxes], multimask=False)
        return best_masks(preds)

    def prompt_from_mask(self, index: int, mask: np.ndarray) -> Prompt:
        """A (Y, X) bool mask on slice ``index`` as a prompt: its box and its mask as logits."""
        mask = np.asarray(mask, bool)
        if mask.shape != tuple(self.stack.slice_shape) or not mask.any():
            raise InvalidInputError(
                f"mask must be a non-empty (Y, X) bool array of the slice's shape "
                f"{tuple(self.stack.slice_shape)}, got shape {mask.shape}")
        ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        box = [ys[0], xs[0], ys[-1] + 1, xs[-1] + 1]
        size = self.model.mask_input_size
        return Prompt.of(box=box, mask_input=mask_to_logits(mask, 4 * size, size))


def resolve_store(cache: "str | Path | None", stack: Any) -> "str | Path | None":
    """``cache="auto"``: the existing store beside the stack's file, else None."""
    if isinstance(cache, str) and cache == "auto":
        from ..io.places import find_embedding_store

        return find_embedding_store(getattr(stack, "path", None))
    return cache


def best_masks(preds: Sequence[Prediction]) -> np.ndarray:
    """The best mask of each prediction, (N, Y, X) bool, upsampled together per embedding."""
    if not preds:
        raise InvalidInputError("no predictions")
    return np.stack([p.mask for p in preds])
