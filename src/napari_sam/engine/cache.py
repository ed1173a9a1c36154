"""Per-slice image embeddings: computed on first use, kept in memory and in a store.

:class:`EmbeddingCache` serves the embedding of one 2D slice of a stack. Lookup order:

1. a memory LRU bounded in bytes;
2. an optional :class:`~napari_sam.engine.store.EmbeddingStore` (zarr, one chunk per
   slice, checked slice by slice before reuse);
3. the model's image encoder (:meth:`napari_sam.models.base.PromptableModel.encode`).

Thread-safe: several threads may ask for slices at once (the widget's click worker, the
prefetcher, a tool); a slice is encoded once even when asked for concurrently.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from .._errors import InvalidInputError
from ..models.base import Embedding
from ._memory import release_free_memory
from .store import FORMAT_VERSION, EmbeddingStore, EmbeddingStoreWarning, slice_digest

if TYPE_CHECKING:  # pragma: no cover
    from ..io.stacks import SliceSource
    from ..models.base import PromptableModel
    from ..models.speed import SpeedConfig

__all__ = ["DEFAULT_MEMORY_BYTES", "Embedding", "EmbeddingCache", "EmbeddingStoreWarning",
           "encode_slice"]

DEFAULT_MEMORY_BYTES = 64 * 256 * 64 * 64 * 4  # 64 vit-sized float32 slices = 256 MiB


def encode_slice(model: "PromptableModel", rgb, *, speed: "SpeedConfig | None" = None) -> Embedding:
    """The embedding of one (Y, X, 3) uint8 image (``model.encode`` of one slice)."""
    return model.encode([rgb], speed=model.speed_config() if speed is None else speed)[0]


class EmbeddingCache:
    """Embeddings of the slices of one stack under one model, computed when first needed.

    Parameters
    ----------
    model : PromptableModel
        The loaded model (:func:`napari_sam.load_model`).
    stack : SliceSource
        The slices (a :class:`napari_sam.Stack`, or a :class:`napari_sam.TiledStack`);
        slice ``i`` is ``stack.rgb(i)``.
    store : str or Path, optional
        Folder of a zarr embedding store to read from and write to (created if missing).
        None keeps embeddings in memory only.
    memory_bytes : int
        Bound of the in-memory LRU, in bytes (default 256 MiB: 64 slices of vit features).
        0 disables the memory cache.
    store_dtype : {"int8", "float16", "float32"}
        Precision of stored features: int8 with a float32 scale per channel (the default:
        1 MiB per vit slice), float16 (2 MiB), or float32 (4 MiB), bit-identical to fresh
        embeddings. Slices of an older float16 store of the same signature are read.
    verify_slices : bool
        Check each stored slice's fingerprint against the stack before reuse (default).
        Costs one read of the slice per disk hit.
    speed : {"auto", "off", "fused", "bf16", "fp16", "compile"} or SpeedConfig
        Encoder speed paths (:func:`napari_sam.models.speed.speed_config`): "auto" picks per
        device, "off" is the reference float32 encoder, bit-identical to ``SamPredictor``.
        The choice is part of the store signature, so embeddings of different precision
        are never mixed. (The same config switches the fast mask decoder.)

    Attributes
    ----------
    stats : dict
        ``encoder_calls``, ``memory_hits``, ``store_hits``, ``store_misses``.
    """

    def __init__(
        self,
        model: "PromptableModel",
        stack: "SliceSource",
        *,
        store: str | Path | None = None,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        store_dtype: str = "int8",
        verify_slices: bool = True,
        speed: "str | SpeedConfig" = "auto",
    ) -> None:
        if store_dtype not in ("int8", "float16", "float32"):
            raise InvalidInputError(
                f"store_dtype must be 'int8', 'float16' or 'float32', got {store_dtype!r}")
        if memory_bytes < 0:
            raise InvalidInputError(f"memory_bytes must be >= 0, got {memory_bytes}")
        self.model = model
        self.stack = stack
        self.memory_bytes = int(memory_bytes)
        self.store_dtype = store_dtype
        self.verify_slices = verify_slices
        self.speed = model.speed_config(speed)
        self.stats = {"encoder_calls": 0, "memory_hits": 0, "store_hits": 0, "store_misses": 0}
        self._memory: OrderedDict[int, Embedding] = OrderedDict()
        self._memory_used = 0
        self._lock = threading.RLock()
        self._slice_locks: dict[int, threading.Lock] = {}
        self.store_path = Path(store) if store is not None else None
        self.store: EmbeddingStore | None = None
        if self.store_path is not None:
            store_ = EmbeddingStore(self.store_path, self.signature(),
                                    feature_shape=model.feature_shape, n_slices=len(stack),
                                    dtype=store_dtype)
            self.store = store_ if store_.usable else None

    # ------------------------------------------------------------------ public
    @property
    def memory_used(self) -> int:
        """Bytes of embeddings held in memory now (at most ``memory_bytes``)."""
        return self._memory_used

    def __len__(self) -> int:
        return len(self.stack)

    def signature(self) -> dict[str, Any]:
        """What a stored embedding depends on; stores are keyed by it."""
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model.embedding_signature(),
            "stack": {
                "fingerprint": self.stack.fingerprint(),
                "shape": list(self.stack.shape),
                "axes": self.stack.axes,
            },
            "normalisation": self.stack.normalisation(),
            "store_dtype": self.store_dtype,
            "encoder": {
                "fused_attention": self.speed.fused_attention,
                "autocast": self.speed.autocast,
            },
        }

    @property
    def store_group(self):
        """The zarr group holding this signature's embeddings, or None."""
        return None if self.store is None else self.store.group

    def check_index(self, index: int) -> int:
        """``index`` as a non-negative slice index; IndexError when out of range."""
        n = len(self.stack)
        if not isinstance(index, (int, np.integer)) or not -n <= index < n:
            raise IndexError(f"slice index {index!r} out of range for a stack of {n} slices")
        return int(index) % n

    def get(self, index: int) -> Embedding:
        """Return the embedding of slice ``index``, computing it on first use."""
        index = self.check_index(index)
        with self._lock:
            hit = self._memory_get(index)
            if hit is not None:
                return hit
            slice_lock = self._slice_locks.setdefault(index, threading.Lock())
        with slice_lock:  # one thread encodes, the others wait and then hit memory
            with self._lock:
                hit = self._memory_get(index)
                if hit is not None:
                    return hit
            emb = self._load(index)
            if emb is None:
                emb = self._compute(index)
            with self._lock:
                self._memory_put(index, emb)
            return emb

    def in_memory(self, index: int) -> bool:
        """True if slice ``index`` is in the memory cache (a :meth:`get` returns at once)."""
        index = self.check_index(index)
        with self._lock:
            return index in self._memory

    def is_cached(self, index: int) -> bool:
        """True if slice ``index`` is in memory or has a record in the store (not verified)."""
        index = self.check_index(index)
        with self._lock:
            if index in self._memory:
                return True
        return self.store is not None and self.store.has(index)

    def stored_indices(self):
        """Indices of the slices with a record in the store (empty without a store)."""
        return np.zeros(0, dtype=int) if self.store is None else self.store.stored_indices()

    def embed(
        self,
        indices: Iterable[int] | None = None,
        *,
        progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> int:
        """Make sure the given slices (default: all) have embeddings; resumable.

        Slices already in the store are skipped without being read, so an interrupted
        run picks up where it stopped. With a store, slices go to the store (not into the
        memory LRU); without one, into memory. ``speed.batch_size`` slices are encoded per
        call (4 on CUDA). Returns the number of slices encoded.

        Parameters
        ----------
        indices : iterable of int, optional
            Slices to embed; default every slice.
        progress : callable(done, total), optional
            Called after each batch of slices.
        should_stop : callable() -> bool, optional
            Polled between batches; return True to stop early (cancel).
        """
        todo = [self.check_index(i) for i in (range(len(self)) if indices is None else indices)]
        encoded = done = 0
        step = max(1, self.speed.batch_size)
        for start in range(0, len(todo), step):
            if should_stop is not None and should_stop():
                break
            chunk = todo[start : start + step]
            missing = [i for i in chunk if not self.is_cached(i) and self._load(i) is None]
            if missing:
                embs = self.model.encode([self.stack.rgb(i) for i in missing], speed=self.speed)
                for index, emb in zip(missing, embs):
                    self.stats["encoder_calls"] += 1
                    self._save(index, emb)
                    if self.store is None:
                        with self._lock:
                            self._memory_put(index, emb)
                encoded += len(missing)
                release_free_memory()
            done += len(chunk)
            if progress is not None:
                progress(done, len(todo))
        return encoded

    def for_model(self, model: "PromptableModel") -> "EmbeddingCache":
        """A cache for ``model`` over the same stack and store, starting with this one's
        in-memory embeddings (shared, not copied): for a model whose image encoder is this
        model's (an adapted mask decoder, :meth:`PromptableModel.embedding_signature`).

        Raises
        ------
        InvalidInputError
            If ``model``'s embeddings would differ from this cache's model's.
        """
        if model.embedding_signature() != self.model.embedding_signature():
            raise InvalidInputError(
                f"model {getattr(model, 'name', model)!r} has another image encoder than "
                f"{getattr(self.model, 'name', self.model)!r}: its embeddings differ, so it "
                "needs a cache of its own")
        new = EmbeddingCache(model, self.stack, store=self.store_path, memory_bytes=self.memory_bytes,
                             store_dtype=self.store_dtype, verify_slices=self.verify_slices,
                             speed=self.speed)
        with self._lock:
            for index, emb in self._memory.items():
                new._memory_put(index, emb)
        return new

    def clear_memory(self) -> None:
        """Drop every in-memory embedding (the store is kept)."""
        with self._lock:
            self._memory.clear()
            self._memory_used = 0

    # ----------------------------------------------------------------- memory
    def _memory_get(self, index: int) -> Embedding | None:
        emb = self._memory.get(index)
        if emb is not None:
            self._memory.move_to_end(index)
            self.stats["memory_hits"] += 1
        return emb

    def _memory_put(self, index: int, emb: Embedding) -> None:
        if self.memory_bytes == 0 or emb.nbytes > self.memory_bytes:
            return
        old = self._memory.pop(index, None)
        if old is not None:
            self._memory_used -= old.nbytes
        self._memory[index] = emb
        self._memory_used += emb.nbytes
        while self._memory_used > self.memory_bytes:
            _, evicted = self._memory.popitem(last=False)
            self._memory_used -= evicted.nbytes

    # ------------------------------------------------------------------ store
    def _slice_fp(self, index: int) -> int:
        return slice_digest(self.stack.slice_fingerprint(index))

    def _load(self, index: int) -> Embedding | None:
        if self.store is None:
            return None
        fp = self._slice_fp(index) if self.verify_slices else None
        emb = self.store.load(index, slice_fp=fp, device=self.model.device)
        self.stats["store_hits" if emb is not None else "store_misses"] += 1
        return emb

    def _save(self, index: int, emb: Embedding) -> None:
        if self.store is not None and self.store.writable:
            self.store.save(index, emb, slice_fp=self._slice_fp(index))

    def _compute(self, index: int) -> Embedding:
        emb = self.model.encode([self.stack.rgb(index)], speed=self.speed)[0]
        self.stats["encoder_calls"] += 1
        self._save(index, emb)
        release_free_memory()  # resident memory stays flat over a stack walk (_memory.py)
        return emb
