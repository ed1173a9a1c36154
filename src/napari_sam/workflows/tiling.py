"""Tiled segmentation of slices larger than SAM's input (1024 px for the official models).

SAM resizes every slice so that its longest side is 1024 px before the image encoder, whose
patches are 16 px: on a 4000 x 4000 slice a nucleus 10 px across becomes 2.6 px, a sixth of
one patch, and small objects vanish. Tiling keeps them at native resolution.

Design (nothing in the engine changes):

* :class:`TiledStack` is a view over a :class:`~napari_sam.Stack` whose "slices" are the
  overlapping tiles of every slice: tile ``k`` of slice ``s`` is view slice
  ``s * n_tiles + k``. It offers what :class:`~napari_sam.EmbeddingCache` uses
  (``len``, ``rgb``, ``slice_fingerprint``, ``fingerprint``, ``normalisation``, ``shape``,
  ``axes``, ``slice_shape``), so one ordinary EmbeddingCache - memory LRU and zarr store
  unchanged - computes and keeps tile embeddings on demand.
* Tiles are all ``tile x tile`` (or the whole side when the slice is smaller); the last
  tile along an axis is shifted back to end at the border instead of being padded.
  Neighbours overlap by at least ``overlap`` px, so any prompt set spanning at most
  ``overlap`` px along each axis fits in one tile.
* :class:`TiledSegmenter` maps the prompts of slice ``i`` to one tile (among the tiles
  that contain every prompt, the one whose centre is nearest the prompts' bounding-box
  centre), runs the ordinary :class:`~napari_sam.Segmenter` on that tile, and pastes the
  tile's mask into a full-size (Y, X) mask. Only prompted tiles are ever encoded.

Normalisation is the parent stack's (its contrast limits are shared by all tiles), so a
tile's SAM input is exactly ``stack.rgb(s)[tile]``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from .._errors import InvalidInputError
from .._hashing import array_digest
from ..engine.prompt import Prompt

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.cache import EmbeddingCache
    from ..engine.segment import Prediction
    from ..io.stacks import Stack

__all__ = ["DEFAULT_TILE_ABOVE", "Tile", "TiledSegmenter", "TiledStack", "segmenter_for",
           "tile_starts", "tiling_of"]

TILING_VERSION = 1
#: slices whose longest side exceeds this many pixels are segmented on tiles by default
#: (the widget and the ``napari-sam`` command; 0 switches tiling off)
DEFAULT_TILE_ABOVE = 2048


def tiling_of(slice_shape: Sequence[int], tile_above: int) -> dict | None:
    """The tile geometry used for slices of ``slice_shape`` (None: whole slices)."""
    if not tile_above or max(slice_shape) <= tile_above:
        return None
    return {"tile": 1024, "overlap": 256, "above": int(tile_above)}


def segmenter_for(model: Any, stack: Any, *, cache: str | Path | None = None,
                  tile_above: int = DEFAULT_TILE_ABOVE, speed: Any = "auto"):
    """A :class:`~napari_sam.Segmenter`, or a :class:`TiledSegmenter` for slices whose
    longest side exceeds ``tile_above`` pixels (0: never tiled)."""
    from ..engine.segment import Segmenter
    from ..io.stacks import Stack, open_stack

    stack = stack if isinstance(stack, Stack) else open_stack(stack)
    tiling = tiling_of(stack.slice_shape, tile_above)
    if tiling is None:
        return Segmenter(model, stack, cache=cache, speed=speed)
    return TiledSegmenter(model, stack, tile=tiling["tile"], overlap=tiling["overlap"],
                          cache=cache, speed=speed)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length ``min(tile, size)`` covering ``[0, size)``.

    Consecutive tiles overlap by at least ``overlap``; the last one ends at ``size``.
    """
    if tile < 1 or not 0 <= overlap < tile:
        raise InvalidInputError(f"tile must be >= 1 and 0 <= overlap < tile; got tile={tile}, "
                                f"overlap={overlap}")
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


@dataclass(frozen=True)
class Tile:
    """One tile of a slice: rows ``y0:y1`` and columns ``x0:x1``."""

    index: int  # tile number within its slice, row-major over the tile grid
    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def region(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.y0 + self.y1) / 2.0, (self.x0 + self.x1) / 2.0)

    def contains(self, y0: float, x0: float, y1: float, x1: float) -> bool:
        """Whether the (continuous) extent [y0, y1] x [x0, x1] lies inside the tile."""
        return self.y0 <= y0 and y1 <= self.y1 and self.x0 <= x0 and x1 <= self.x1


class TiledStack:
    """Overlapping tiles of every slice of a stack, seen as a stack of small slices.

    Parameters
    ----------
    stack : Stack
        The parent stack.
    tile : int
        Tile side in pixels (default 1024, SAM's input size: tiles are encoded at their
        native resolution).
    overlap : int
        Minimum overlap of neighbouring tiles in pixels (default 256).

    Notes
    -----
    View slice ``i`` is tile ``i % n_tiles`` of parent slice ``i // n_tiles``.
    ``shape``, ``axes``, ``dtype`` and :meth:`normalisation` are the parent's;
    :meth:`fingerprint` adds the tile geometry, so embeddings of tiles and of whole slices
    never share a store group. The last parent slice read is kept (one slice) so the tiles
    of a slice are cut from one read.
    """

    def __init__(self, stack: "Stack", *, tile: int = 1024, overlap: int = 256) -> None:
        self.parent = stack
        self.tile = int(tile)
        self.overlap = int(overlap)
        h, w = stack.slice_shape
        ys = tile_starts(h, self.tile, self.overlap)
        xs = tile_starts(w, self.tile, self.overlap)
        th, tw = min(self.tile, h), min(self.tile, w)
        self.grid = (len(ys), len(xs))
        self.tiles = [Tile(k, y, x, y + th, x + tw)
                      for k, (y, x) in enumerate((y, x) for y in ys for x in xs)]
        self.n_tiles = len(self.tiles)
        self.slice_shape = (th, tw)
        self.shape = stack.shape
        self.axes = stack.axes
        self.dtype = stack.dtype
        self.rgb_input = stack.rgb_input
        self.source = stack.source
        self._lock = threading.Lock()
        self._raw: tuple[int, np.ndarray] | None = None
        self._rgb: tuple[int, np.ndarray] | None = None

    # ---------------------------------------------------------------- indexing
    def __len__(self) -> int:
        return len(self.parent) * self.n_tiles

    def view_index(self, slice_index: int, tile: int) -> int:
        """View index of tile ``tile`` of parent slice ``slice_index``."""
        s = self.parent.index(self.parent.position(slice_index))
        if not 0 <= tile < self.n_tiles:
            raise IndexError(f"tile {tile} out of range: slices have {self.n_tiles} tiles")
        return s * self.n_tiles + int(tile)

    def locate(self, index: int) -> tuple[int, Tile]:
        """(parent slice index, tile) of view slice ``index``."""
        n = len(self)
        if not isinstance(index, (int, np.integer)) or not -n <= index < n:
            raise IndexError(f"tile index {index!r} out of range for {n} tiles")
        s, k = divmod(int(index) % n, self.n_tiles)
        return s, self.tiles[k]

    # ---------------------------------------------------------------- pixels
    def _cached(self, attr: str, s: int, read: Callable[[int], np.ndarray]) -> np.ndarray:
        with self._lock:
            hit = getattr(self, attr)
            if hit is not None and hit[0] == s:
                return hit[1]
        data = read(s)
        with self._lock:
            setattr(self, attr, (s, data))
        return data

    def __getitem__(self, index: int) -> np.ndarray:
        """Raw pixels of view slice ``index`` (a crop of the parent slice)."""
        s, t = self.locate(index)
        return np.ascontiguousarray(self._cached("_raw", s, self.parent.__getitem__)[t.region])

    def rgb(self, index: int) -> np.ndarray:
        """SAM's (th, tw, 3) uint8 input for view slice ``index``: ``parent.rgb(s)[tile]``."""
        s, t = self.locate(index)
        return np.ascontiguousarray(self._cached("_rgb", s, self.parent.rgb)[t.region])

    @property
    def contrast_limits(self):
        return self.parent.contrast_limits

    def normalisation(self) -> dict:
        return self.parent.normalisation()

    def slice_fingerprint(self, index: int) -> str:
        """blake2b of the tile's raw bytes, shape, dtype and place in the slice."""
        s, t = self.locate(index)
        return array_digest(self[index], prefix=f"{t.y0},{t.x0}|")

    def fingerprint(self) -> str:
        """The parent's fingerprint combined with the tile geometry."""
        blob = json.dumps({"parent": self.parent.fingerprint(), "tile": self.tile,
                           "overlap": self.overlap, "version": TILING_VERSION})
        return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()

    def __repr__(self) -> str:
        return (f"TiledStack({self.parent!r}, tile={self.tile}, overlap={self.overlap}, "
                f"grid={self.grid}, len={len(self)})")

    # ---------------------------------------------------------------- prompts
    def tile_for(self, y0: float, x0: float, y1: float, x1: float) -> Tile:
        """The tile for prompts whose extent is [y0, y1] x [x0, x1] (slice pixels).

        Among the tiles containing the whole extent, the one whose centre is nearest the
        extent's centre.

        Raises
        ------
        InvalidInputError
            When no tile contains the extent.
        """
        cy, cx = (y0 + y1) / 2.0, (x0 + x1) / 2.0
        inside = [t for t in self.tiles if t.contains(y0, x0, y1, x1)]
        if not inside:
            raise InvalidInputError(
                f"prompts spanning y {y0:g}..{y1:g}, x {x0:g}..{x1:g} ({y1 - y0:g} x "
                f"{x1 - x0:g} px) do not fit in one {self.slice_shape[0]} x "
                f"{self.slice_shape[1]} tile; prompts spanning at most {self.overlap} px "
                "(the overlap) always fit: prompt each object separately, use a larger "
                "tile= / overlap=, or the untiled Segmenter"
            )
        return min(inside, key=lambda t: ((t.centre[0] - cy) ** 2 + (t.centre[1] - cx) ** 2,
                                          t.index))


class TiledSegmenter:
    """A :class:`~napari_sam.Segmenter` for large slices: prompts are segmented on one tile.

    Parameters
    ----------
    model, stack
        As :class:`~napari_sam.Segmenter`.
    tile, overlap : int
        Tile geometry, see :class:`TiledStack`.
    cache : None, str or Path
        Embedding store (tile embeddings are stored like slices, in their own group).
    memory_bytes, store_dtype, speed
        As :class:`~napari_sam.Segmenter`.

    Notes
    -----
    Coordinates are the full slice's (y, x), as everywhere; masks are (Y, X) of the full
    slice, zero outside the chosen tile (an object must fit in a tile; with the default
    1024 px tiles and 256 px overlap every object up to 256 px across does). A
    ``mask_input`` from a previous prediction refers to that prediction's tile and is only
    meaningful when the new prompts map to the same tile (:meth:`tile_for` says which).
    """

    def __init__(self, model: Any, stack: Any, *, tile: int = 1024, overlap: int = 256,
                 cache: str | Path | None = None, memory_bytes: int | None = None,
                 store_dtype: str = "int8", speed: Any = "auto") -> None:
        from ..engine.cache import DEFAULT_MEMORY_BYTES, EmbeddingCache
        from ..engine.segment import Segmenter, resolve_store
        from ..io.stacks import Stack, open_stack
        from ..models.base import PromptableModel
        from ..models.loading import load_model

        self.model = model if isinstance(model, PromptableModel) else load_model(model)
        self.stack: Stack = stack if isinstance(stack, Stack) else open_stack(stack)
        cache = resolve_store(cache, self.stack)
        self.tiles = TiledStack(self.stack, tile=tile, overlap=overlap)
        self.cache: EmbeddingCache = EmbeddingCache(
            self.model, self.tiles, store=cache, store_dtype=store_dtype, speed=speed,
            memory_bytes=DEFAULT_MEMORY_BYTES if memory_bytes is None else memory_bytes)
        self.inner = Segmenter.from_cache(self.cache)

    def __repr__(self) -> str:
        return f"TiledSegmenter(model={self.model.name!r}, tiles={self.tiles!r})"

    # ---------------------------------------------------------------- embeddings
    def embed(self, indices: Iterable[int] | None = None, *,
              progress: Callable[[int, int], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> int:
        """Precompute every tile of the given slices (default: all); resumable."""
        slices = range(len(self.stack)) if indices is None else indices
        views = [self.tiles.view_index(s, k) for s in slices for k in range(self.tiles.n_tiles)]
        return self.cache.embed(views, progress=progress, should_stop=should_stop)

    def is_embedded(self, index: int, prompts: Sequence[Prompt] | None = None) -> bool:
        """True when the tiles these prompts map to are in memory (all tiles without prompts)."""
        if prompts:
            tiles = {self.tile_for(index, p).index for p in prompts if not p.empty}
        else:
            tiles = set(range(self.tiles.n_tiles))
        return all(self.cache.in_memory(self.tiles.view_index(index, k)) for k in tiles)

    def is_stored(self, index: int) -> bool:
        """True when every tile of slice ``index`` is in memory or in the store."""
        return all(self.cache.is_cached(self.tiles.view_index(index, k))
                   for k in range(self.tiles.n_tiles))

    def prefetch(self, indices: Iterable[int] | None = None, *, around: int | None = None) -> list[int]:
        """Nothing is prefetched on tiled slices (a slice has many tiles); returns []."""
        return []

    def cancel_prefetch(self) -> None:
        """Stop the inner segmenter's background work, if any."""
        self.inner.cancel_prefetch()

    # ---------------------------------------------------------------- prompts
    def tile_for(self, index: int, prompt: Prompt | None = None, **prompts: Any) -> Tile:
        """The tile that a prompt on slice ``index`` is segmented on (see TiledStack.tile_for).

        Give a :class:`Prompt`, or ``points=``, ``point_labels=``, ``box=`` as
        :meth:`Segmenter.predict`.
        """
        self.stack.index(self.stack.position(index))  # range check
        if prompt is None:
            prompt = Prompt.of(**prompts)
        if prompt.n_points == 0 and prompt.box is None:
            raise InvalidInputError(
                "no prompt given: pass points=[[y, x], ...] with point_labels, or a box "
                "[y0, x0, y1, x1] (a tiled segmenter needs a point or box to choose a tile)")
        prompt = prompt.check(self.stack.slice_shape)
        return self.tiles.tile_for(*prompt.extent())

    def predict_many(self, index: int, prompts: Sequence[Prompt], *,
                     multimask: bool | None = None,
                     min_score: float | None = None) -> "list[Prediction]":
        """As :meth:`Segmenter.predict_many`; masks are full-slice (Y, X), logits the tile's.
        One batched call per tile used."""
        from ..engine.segment import Prediction

        by_tile: dict[int, list[int]] = {}
        for n, p in enumerate(prompts):
            by_tile.setdefault(self.tile_for(index, p).index, []).append(n)
        out: list[Any] = [None] * len(prompts)
        for k, members in by_tile.items():
            t = self.tiles.tiles[k]
            local = [prompts[n].shifted(t.y0, t.x0) for n in members]
            preds = self.inner.predict_many(self.tiles.view_index(index, k), local,
                                            multimask=multimask, min_score=min_score)
            for n, p in zip(members, preds):
                out[n] = Prediction(scores=p.scores, logits=p.logits, best=p.best,
                                    _upsample=lambda lg, p=p, t=t: self._paste(p._upsample(lg), t),
                                    prompt=prompts[n])
        return out

    def predict(self, index: int, *, points=None, point_labels=None, box=None,
                mask_input: np.ndarray | None = None, multimask: bool = True) -> "Prediction":
        """As :meth:`Segmenter.predict`; masks are full-slice (Y, X), logits the tile's."""
        prompt = Prompt.of(points=points, point_labels=point_labels, box=box, mask_input=mask_input)
        return self.predict_many(index, [prompt], multimask=multimask)[0]

    def segment(self, index: int, **prompts: Any) -> np.ndarray:
        """The best mask for the prompts, (Y, X) bool of the full slice."""
        return self.predict(index, **prompts).mask

    def segment_boxes(self, index: int, boxes: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
        """One full-slice mask per box, (N, Y, X) bool; one batched call per tile used."""
        boxes = np.asarray(boxes, dtype=np.float64)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise InvalidInputError(
                f"boxes must have shape (N, 4) as (y0, x0, y1, x1), got shape {boxes.shape}")
        if len(boxes) == 0:
            return np.zeros((0, *self.stack.slice_shape), dtype=bool)
        preds = self.predict_many(index, [Prompt.of(box=b) for b in boxes], multimask=False)
        return np.stack([p.mask for p in preds])

    def prompt_from_mask(self, index: int, mask: np.ndarray) -> Prompt:
        """A full-slice (Y, X) mask as a prompt (its box, and its mask as logits in the frame
        of the tile its box maps to)."""
        mask = np.asarray(mask, bool)
        ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if not len(ys):
            raise InvalidInputError("the mask is empty: nothing to prompt with")
        box = [ys[0], xs[0], ys[-1] + 1, xs[-1] + 1]
        t = self.tile_for(index, Prompt.of(box=box))
        local = self.inner.prompt_from_mask(self.tiles.view_index(index, t.index), mask[t.region])
        return Prompt.of(box=box, mask_input=local.mask_input)

    def _paste(self, tile_masks: np.ndarray, t: Tile) -> np.ndarray:
        full = np.zeros((len(tile_masks), *self.stack.slice_shape), dtype=bool)
        full[(slice(None), *t.region)] = tile_masks
        return full
