"""Per-slice SAM image embeddings: computed on first use, kept in memory and on disk.

:class:`EmbeddingCache` serves the embedding of one 2D slice of a stack. Lookup order:

1. a memory LRU bounded in bytes;
2. an optional zarr store (one chunk per slice, float16 by default), checked slice by
   slice: a record written after each chunk holds the slice's fingerprint and a digest of
   the stored features, so a changed slice, a half-written or a corrupt chunk is detected
   and recomputed instead of served;
3. the image encoder.

Store layout (a zarr v3 group)::

    cells.embeddings.zarr/            attrs: {"napari_sam": {"kind": "embedding-store", ...}}
      <key>/                          one group per signature; attrs: {"signature": {...}}
        features   (N, C, h, w)       float16, chunks (1, C, h, w)
        records    (N, 8)             int64, chunks (1, 8): see ``_REC_*`` below

``<key>`` is a hash of the signature (format version, model architecture and checkpoint
hash, stack fingerprint, normalisation, stored dtype). Embeddings of another model or
normalisation therefore go to their own group: nothing is overwritten, nothing stale is
served, and one store can hold several models. Every chunk write is atomic (zarr's local
store writes a temporary file and renames it), so a killed writer leaves either the old
chunk or the new one, and a chunk without a matching record is simply recomputed. Two
processes writing the same store write identical, atomically replaced chunks.
"""

from __future__ import annotations

import hashlib
import json
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from ._errors import InvalidInputError
from ._memory import release_free_memory

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .fast import SpeedConfig
    from .models import SamModel
    from .prefetch import Prefetcher
    from .stacks import Stack

__all__ = ["Embedding", "EmbeddingCache", "EmbeddingStoreWarning", "FORMAT_VERSION"]

FORMAT_VERSION = 1
DEFAULT_MEMORY_BYTES = 64 * 256 * 64 * 64 * 4  # 64 vit-sized float32 slices = 256 MiB

# columns of the per-slice record
_REC_VALID, _REC_IN_H, _REC_IN_W, _REC_ORIG_H, _REC_ORIG_W, _REC_SLICE_FP, _REC_DIGEST, _REC_VERSION = range(8)


class EmbeddingStoreWarning(UserWarning):
    """Something about an embedding store was not usable; the embedding was recomputed."""


@dataclass(frozen=True)
class Embedding:
    """The image embedding of one slice, with the sizes SAM's decoder needs.

    Attributes
    ----------
    features : torch.Tensor, shape (1, C, h, w)
        Image-encoder output (C = 256, h = w = 64 for the official models), float32, on
        the model's device.
    input_size : (int, int)
        (height, width) of the slice after resizing its longest side to the model's input
        size, before padding.
    original_size : (int, int)
        (Y, X) of the slice.
    """

    features: "torch.Tensor"
    input_size: tuple[int, int]
    original_size: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return int(self.features.element_size() * self.features.nelement())


def _digest64(data: bytes) -> int:
    """A signed 64-bit digest (fits an int64 zarr cell)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def encode_slice(model: "SamModel", rgb: np.ndarray, *, speed: "SpeedConfig | None" = None) -> Embedding:
    """Run SAM's image encoder on one (Y, X, 3) uint8 image.

    Preprocessing is exactly ``SamPredictor.set_image``'s; the encoder is the reference
    module (``speed=fast.OFF``) or a fast path (see :mod:`napari_sam.fast`).

    Parameters
    ----------
    model : SamModel
        The model (see :func:`napari_sam.load_model`).
    rgb : numpy.ndarray of uint8, shape (Y, X, 3)
        The normalised slice (see :meth:`napari_sam.Stack.rgb`).
    speed : SpeedConfig, optional
        Default: :func:`napari_sam.fast.speed_config` for the model's device.
    """
    import torch
    from segment_anything.utils.transforms import ResizeLongestSide

    from .fast import encoder_for, preprocess

    size = model.sam.image_encoder.img_size
    yx = np.shape(rgb)[:2]
    short = ResizeLongestSide.get_preprocess_shape(yx[0], yx[1], size) if len(yx) == 2 else (1,)
    if min(short) < 1:
        raise InvalidInputError(
            f"a slice of shape {yx} is too elongated for SAM: resized so that its "
            f"longest side is {size} px, its short side would be {min(short)} px; crop it, or "
            "give slices whose aspect ratio is below 1:" + str(2 * size)
        )
    x, input_size = preprocess(model.sam, rgb, model.device)  # checks (Y, X, 3) uint8
    with torch.inference_mode():
        features = encoder_for(model, speed)(x)
    return Embedding(features, input_size, (int(rgb.shape[0]), int(rgb.shape[1])))


class EmbeddingCache:
    """Embeddings of the slices of one stack under one model, computed when first needed.

    Parameters
    ----------
    model : SamModel
        The loaded model.
    stack : Stack
        The image stack; slice ``i`` is ``stack.rgb(i)``.
    store : str or Path, optional
        Folder of a zarr embedding store to read from and write to (created if missing).
        None keeps embeddings in memory only.
    memory_bytes : int
        Bound of the in-memory LRU, in bytes (default 256 MiB: 64 slices of vit features).
        0 disables the memory cache.
    store_dtype : {"float16", "float32"}
        Precision of stored features. float16 halves the disk use (2 MiB per vit slice);
        float32 makes stored embeddings bit-identical to fresh ones.
    verify_slices : bool
        Check each stored slice's fingerprint against the stack before reuse (default).
        Costs one read of the slice per disk hit.
    speed : {"auto", "off", "fused", "bf16", "fp16", "compile"} or SpeedConfig
        Encoder speed paths (:func:`napari_sam.fast.speed_config`): "auto" picks per device
        (fused attention; bf16 on CUDA and on CPUs with native bf16), "off" is the
        reference float32 encoder, bit-identical to ``SamPredictor``. The choice is part of
        the store signature, so embeddings of different precision are never mixed. (The
        same config switches the fast mask decoder, :mod:`napari_sam._decoder`.)

    Notes
    -----
    Thread-safe: several threads may call :meth:`get`; a slice is encoded once even when
    asked for concurrently. ``stats`` counts encoder calls and hits.
    """

    def __init__(
        self,
        model: "SamModel",
        stack: "Stack",
        *,
        store: str | Path | None = None,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        store_dtype: str = "float16",
        verify_slices: bool = True,
        speed: "str | SpeedConfig" = "auto",
    ) -> None:
        from .fast import SpeedConfig, speed_config

        if store_dtype not in ("float16", "float32"):
            raise InvalidInputError(
                f"store_dtype must be 'float16' or 'float32', got {store_dtype!r}"
            )
        if memory_bytes < 0:
            raise InvalidInputError(f"memory_bytes must be >= 0, got {memory_bytes}")
        self.model = model
        self.stack = stack
        self.memory_bytes = int(memory_bytes)
        self.store_dtype = store_dtype
        self.verify_slices = verify_slices
        self.speed = speed if isinstance(speed, SpeedConfig) else speed_config(model.device, mode=speed)
        self.stats = {"encoder_calls": 0, "memory_hits": 0, "store_hits": 0, "store_misses": 0}
        self._memory: OrderedDict[int, Embedding] = OrderedDict()
        self._memory_used = 0
        self._lock = threading.RLock()
        self._slice_locks: dict[int, threading.Lock] = {}
        self._prefetcher: "Prefetcher | None" = None
        self._group = None
        self._writable = False
        self.store_path = Path(store) if store is not None else None
        if self.store_path is not None:
            from ._store import open_signature_group

            arch = model.architecture
            self._group, self._writable = open_signature_group(
                self.store_path,
                self.signature(),
                feature_shape=(arch.prompt_embed_dim, arch.embedding_size, arch.embedding_size),
                n_slices=len(stack),
                dtype=store_dtype,
            )

    # ------------------------------------------------------------------ public
    def __len__(self) -> int:
        return len(self.stack)

    def signature(self) -> dict[str, Any]:
        """What a stored embedding depends on; stores are keyed by it."""
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model.signature(),
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
        return self._group

    def get(self, index: int) -> Embedding:
        """Return the embedding of slice ``index``, computing it on first use."""
        index = self._check_index(index)
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
        index = self._check_index(index)
        with self._lock:
            return index in self._memory

    @property
    def prefetcher(self) -> "Prefetcher":
        """This cache's :class:`napari_sam.prefetch.Prefetcher` (made on first use)."""
        with self._lock:
            if self._prefetcher is None:
                from .prefetch import Prefetcher

                self._prefetcher = Prefetcher(self)
            return self._prefetcher

    def cancel_prefetch(self) -> None:
        """Drop the prefetcher's queue, if there is one (the slice in work finishes)."""
        with self._lock:
            pre = self._prefetcher
        if pre is not None:
            pre.cancel()

    def is_cached(self, index: int) -> bool:
        """True if slice ``index`` is in memory or has a record in the store (not verified)."""
        index = self._check_index(index)
        with self._lock:
            if index in self._memory:
                return True
        return self._group is not None and bool(self._record(index)[_REC_VALID])

    def stored_indices(self) -> np.ndarray:
        """Indices of the slices with a record in the store (empty without a store)."""
        if self._group is None:
            return np.zeros(0, dtype=int)
        records = self._group["records"][:, _REC_VALID]
        return np.flatnonzero(records == 1)

    def embed(
        self,
        indices: Iterable[int] | None = None,
        *,
        progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> int:
        """Make sure the given slices (default: all) have embeddings; resumable.

        Slices already in the store are skipped without being read, so an interrupted
        run picks up where it stopped. Returns the number of slices encoded.

        Parameters
        ----------
        indices : iterable of int, optional
            Slices to embed; default every slice.
        progress : callable(done, total), optional
            Called after each slice.
        should_stop : callable() -> bool, optional
            Polled between slices; return True to stop early (cancel).
        """
        todo = [self._check_index(i) for i in (range(len(self)) if indices is None else indices)]
        if self.speed.batch_size > 1:
            return self._embed_batched(todo, progress, should_stop)
        encoded = 0
        for done, index in enumerate(todo, start=1):
            if should_stop is not None and should_stop():
                break
            if not self.is_cached(index):
                before = self.stats["encoder_calls"]
                if self._group is not None:
                    # precompute into the store without filling the memory LRU
                    if self._load(index) is None:
                        self._compute(index)
                else:
                    self.get(index)
                encoded += self.stats["encoder_calls"] - before
            if progress is not None:
                progress(done, len(todo))
        return encoded

    def _embed_batched(self, todo, progress, should_stop) -> int:
        """``embed`` with ``speed.batch_size`` slices per encoder call (GPU)."""
        from .fast import encode_batch

        encoded = done = 0
        step = self.speed.batch_size
        for start in range(0, len(todo), step):
            if should_stop is not None and should_stop():
                break
            chunk = todo[start : start + step]
            missing = [i for i in chunk if not self.is_cached(i) and self._load(i) is None]
            if missing:
                embs = encode_batch(self.model, [self.stack.rgb(i) for i in missing], config=self.speed)
                for index, emb in zip(missing, embs):
                    self.stats["encoder_calls"] += 1
                    self._save(index, emb)
                    if self._group is None:
                        with self._lock:
                            self._memory_put(index, emb)
                encoded += len(missing)
                release_free_memory()
            done += len(chunk)
            if progress is not None:
                progress(done, len(todo))
        return encoded

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
    def _record(self, index: int) -> np.ndarray:
        return np.asarray(self._group["records"][index])

    def _slice_fp(self, index: int) -> int:
        return _digest64(self.stack.slice_fingerprint(index).encode())

    def _load(self, index: int) -> Embedding | None:
        if self._group is None:
            return None
        import torch

        try:
            rec = self._record(index)
        except Exception as err:  # unreadable record chunk
            self._warn(index, f"its record is unreadable ({err})")
            return None
        if not rec[_REC_VALID]:
            self.stats["store_misses"] += 1
            return None
        if self.verify_slices and rec[_REC_SLICE_FP] != self._slice_fp(index):
            self._warn(index, "the slice's pixels changed since it was stored")
            return None
        try:
            data = np.asarray(self._group["features"][index])
        except Exception as err:  # truncated or corrupt chunk
            self._warn(index, f"its stored features are unreadable ({type(err).__name__}: {err})")
            return None
        if _digest64(np.ascontiguousarray(data).tobytes()) != rec[_REC_DIGEST]:
            self._warn(index, "its stored features do not match their checksum (partial or corrupt chunk)")
            return None
        features = torch.from_numpy(data.astype(np.float32, copy=False))[None].to(self.model.device)
        self.stats["store_hits"] += 1
        return Embedding(
            features,
            (int(rec[_REC_IN_H]), int(rec[_REC_IN_W])),
            (int(rec[_REC_ORIG_H]), int(rec[_REC_ORIG_W])),
        )

    def _save(self, index: int, emb: Embedding) -> None:
        if self._group is None or not self._writable:
            return
        data = emb.features[0].detach().to("cpu").numpy().astype(self.store_dtype)
        record = np.zeros(8, dtype=np.int64)
        record[_REC_VALID] = 1
        record[_REC_IN_H], record[_REC_IN_W] = emb.input_size
        record[_REC_ORIG_H], record[_REC_ORIG_W] = emb.original_size
        record[_REC_SLICE_FP] = self._slice_fp(index)
        record[_REC_DIGEST] = _digest64(np.ascontiguousarray(data).tobytes())
        record[_REC_VERSION] = FORMAT_VERSION
        try:
            # features first, record last: a record always describes a complete chunk
            self._group["features"][index] = data
            self._group["records"][index] = record
        except Exception as err:  # disk full, read-only, store removed under us
            warnings.warn(
                f"could not write slice {index} to embedding store {self.store_path} "
                f"({type(err).__name__}: {err}); stored slices are still read, new ones "
                "stay in memory only",
                EmbeddingStoreWarning,
                stacklevel=3,
            )
            self._writable = False

    def _warn(self, index: int, why: str) -> None:
        warnings.warn(
            f"embedding store {self.store_path}: recomputing slice {index} because {why}",
            EmbeddingStoreWarning,
            stacklevel=4,
        )

    # ---------------------------------------------------------------- compute
    def _compute(self, index: int) -> Embedding:
        emb = encode_slice(self.model, self.stack.rgb(index), speed=self.speed)
        self.stats["encoder_calls"] += 1
        self._save(index, emb)
        release_free_memory()  # resident memory stays flat over a stack walk (_memory.py)
        return emb

    def _check_index(self, index: int) -> int:
        n = len(self.stack)
        if not isinstance(index, (int, np.integer)) or not -n <= index < n:
            raise IndexError(f"slice index {index!r} out of range for a stack of {n} slices")
        return int(index) % n


def signature_key(signature: dict[str, Any]) -> str:
    """Short stable hash of a signature, used as the store's group name."""
    blob = json.dumps(signature, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
