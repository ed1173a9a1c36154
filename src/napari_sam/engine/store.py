"""The zarr embedding store: one group per signature, one chunk and one record per slice.

Layout (a zarr v3 group)::

    cells.embeddings.zarr/            attrs: {"napari_sam": {"kind": "embedding-store", ...}}
      <key>/                          one group per signature; attrs: {"signature": {...}}
        features   (N, C, h, w)       int8 (default), float16 or float32, chunks (1, C, h, w)
        scales     (N, C)             float32, chunks (1, C): int8 only, one scale per channel
        records    (N, 8)             int64, chunks (1, 8): see ``REC_*`` below

``<key>`` is a hash of the signature (format version, model architecture and checkpoint
hash, stack fingerprint, normalisation, stored dtype, encoder precision). Embeddings of
another model or normalisation therefore go to their own group: nothing is overwritten,
nothing stale is served, and one store can hold several models. A record is written after
its chunk and holds the slice's fingerprint and a digest of the stored features, so a
changed slice, a half-written or a corrupt chunk is detected and recomputed instead of
served. Chunk writes are atomic (zarr's local store writes a temporary file and renames
it), so two processes can share a store. A folder that is not a napari-sam embedding
store (the user's data) is never written into.

The stored dtype is part of the signature. A store written before int8 became the default
holds float16 groups: their slices are still read (:attr:`EmbeddingStore.older`), new
slices go to the int8 group of the same signature.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._errors import InvalidInputError
from .._hashing import digest64, json_digest
from ..io.zarr_logging import quiet_sibling_write_errors
from ..models.base import Embedding

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["EmbeddingStore", "EmbeddingStoreWarning", "FORMAT_VERSION", "STORE_KIND",
           "open_signature_group", "signature_key", "slice_digest", "store_contents"]

FORMAT_VERSION = 1
STORE_KIND = "embedding-store"
# columns of the per-slice record
REC_VALID, REC_IN_H, REC_IN_W, REC_ORIG_H, REC_ORIG_W, REC_SLICE_FP, REC_DIGEST, REC_VERSION = range(8)


class EmbeddingStoreWarning(UserWarning):
    """Something about an embedding store was not usable; the embedding was recomputed."""


def signature_key(signature: dict[str, Any]) -> str:
    """Short stable hash of a signature, used as the store's group name."""
    return json_digest(signature)


class EmbeddingStore:
    """The embeddings of one signature in a zarr store folder.

    Parameters
    ----------
    path : str or Path
        The store folder (created if missing).
    signature : dict
        What the embeddings depend on (see :meth:`napari_sam.EmbeddingCache.signature`).
    feature_shape : (int, int, int)
        (C, h, w) of one slice's features.
    n_slices : int
    dtype : {"int8", "float16", "float32"}
        Precision of the stored features: int8 with one float32 scale per channel
        (1 MiB per vit slice), float16, or float32 (exact).

    Attributes
    ----------
    usable : bool
        False when the store could be neither opened nor created (memory only then).
    writable : bool
        False for a read-only store, or after a failed write (a full disk).
    """

    def __init__(self, path: str | Path, signature: dict[str, Any], *,
                 feature_shape: tuple[int, int, int], n_slices: int, dtype: str) -> None:
        self.path = Path(path)
        self.signature = signature
        self.dtype = dtype
        self.older = self._older_group(n_slices)
        self.group, self.writable = open_signature_group(
            self.path, signature, feature_shape=feature_shape, n_slices=n_slices, dtype=dtype,
            quiet=self.older is not None)

    def _older_group(self, n_slices: int):
        """The float16 group of the same signature (the store format before int8), read
        for the slices it holds; None when there is none."""
        if self.dtype == "float16" or not (self.path / "zarr.json").exists():
            return None
        import zarr

        key = signature_key({**self.signature, "store_dtype": "float16"})
        try:
            group = zarr.open_group(self.path / key, mode="r")
            ok = group["records"].shape[0] == n_slices
        except (OSError, ValueError, KeyError):
            return None
        return group if ok else None

    @property
    def usable(self) -> bool:
        return self.group is not None

    def record(self, index: int) -> np.ndarray:
        """The slice's record (int64, 8 columns; column ``REC_VALID`` is 1 once stored)."""
        return np.asarray(self.group["records"][index])

    def _in_older(self, index: int) -> bool:
        return self.older is not None and bool(self.older["records"][index][REC_VALID])

    def has(self, index: int) -> bool:
        """True when slice ``index`` has a record (the chunk is checked on :meth:`load`)."""
        return self.usable and (bool(self.record(index)[REC_VALID]) or self._in_older(index))

    def stored_indices(self) -> np.ndarray:
        """Indices of the slices with a record."""
        if not self.usable:
            return np.zeros(0, dtype=int)
        valid = np.asarray(self.group["records"][:, REC_VALID]) == 1
        if self.older is not None:
            valid |= np.asarray(self.older["records"][:, REC_VALID]) == 1
        return np.flatnonzero(valid)

    def load(self, index: int, *, slice_fp: "int | None", device: "torch.device | str") -> Embedding | None:
        """The stored embedding of slice ``index``, or None (never stored, or not usable:
        a warning says why and the caller recomputes).

        ``slice_fp`` (from :func:`slice_digest`) is compared with the one stored; None skips
        the check.
        """
        import torch

        group = self.group
        try:
            rec = self.record(index)
            if not rec[REC_VALID] and self._in_older(index):
                group = self.older
                rec = np.asarray(group["records"][index])
        except Exception as err:  # unreadable record chunk  # noqa: BLE001
            self._warn(index, f"its record is unreadable ({err})")
            return None
        if not rec[REC_VALID]:
            return None
        if slice_fp is not None and rec[REC_SLICE_FP] != slice_fp:
            self._warn(index, "the slice's pixels changed since it was stored")
            return None
        try:
            data = np.asarray(group["features"][index])
            scales = np.asarray(group["scales"][index]) if data.dtype == np.int8 else None
        except Exception as err:  # truncated or corrupt chunk  # noqa: BLE001
            self._warn(index, f"its stored features are unreadable ({type(err).__name__}: {err})")
            return None
        if _digest(data, scales) != rec[REC_DIGEST]:
            self._warn(index, "its stored features do not match their checksum (partial or "
                       "corrupt chunk)")
            return None
        values = data.astype(np.float32, copy=False)
        if scales is not None:
            values = values * scales.astype(np.float32)[:, None, None]
        features = torch.from_numpy(values)[None].to(device)
        return Embedding(features, (int(rec[REC_IN_H]), int(rec[REC_IN_W])),
                         (int(rec[REC_ORIG_H]), int(rec[REC_ORIG_W])))

    def save(self, index: int, emb: Embedding, *, slice_fp: int) -> bool:
        """Store an embedding (features first, record last); False when not written."""
        if not self.usable or not self.writable:
            return False
        values = emb.features[0].detach().to("cpu").float().numpy()
        scales = None
        if self.dtype == "int8":
            data, scales = quantise_int8(values)
        else:
            data = values.astype(self.dtype)
        record = np.zeros(8, dtype=np.int64)
        record[REC_VALID] = 1
        record[REC_IN_H], record[REC_IN_W] = emb.input_size
        record[REC_ORIG_H], record[REC_ORIG_W] = emb.original_size
        record[REC_SLICE_FP] = slice_fp
        record[REC_DIGEST] = _digest(data, scales)
        record[REC_VERSION] = FORMAT_VERSION
        try:
            # features first, record last: a record always describes a complete chunk
            if scales is not None:
                self.group["scales"][index] = scales
            self.group["features"][index] = data
            self.group["records"][index] = record
        except Exception as err:  # disk full, read-only, store removed under us  # noqa: BLE001
            warnings.warn(
                f"could not write slice {index} to embedding store {self.path} "
                f"({type(err).__name__}: {err}); stored slices are still read, new ones stay "
                "in memory only", EmbeddingStoreWarning, stacklevel=3)
            self.writable = False
            return False
        return True

    def _warn(self, index: int, why: str) -> None:
        warnings.warn(f"embedding store {self.path}: recomputing slice {index} because {why}",
                      EmbeddingStoreWarning, stacklevel=4)


def quantise_int8(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, h, w) float features as int8 with one float32 scale per channel (symmetric:
    ``values ~= q * scale[:, None, None]``, the largest magnitude of a channel at 127)."""
    top = np.abs(values).reshape(len(values), -1).max(axis=1)
    scales = np.where(top > 0, top / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(values / scales[:, None, None]), -127, 127).astype(np.int8)
    return q, scales


def _digest(data: np.ndarray, scales: np.ndarray | None) -> int:
    blob = np.ascontiguousarray(data).tobytes()
    if scales is not None:
        blob += np.ascontiguousarray(scales).tobytes()
    return digest64(blob)


def store_contents(path: str | Path) -> list[dict[str, Any]]:
    """What an embedding store holds, read only: one entry per signature group with its
    ``key``, ``signature`` and ``stored`` / ``n_slices`` (slices with a record). An absent
    path gives []; a folder that is not a napari-sam store raises InvalidInputError."""
    import zarr

    path = Path(path)
    if not path.exists():
        return []
    try:
        root = zarr.open_group(path, mode="r")
    except (OSError, ValueError, KeyError, TypeError) as err:  # not a zarr group at all
        raise InvalidInputError(f"{str(path)!r} is not a napari-sam embedding store ({err})") from None
    if (root.attrs.get("napari_sam") or {}).get("kind") != STORE_KIND:
        raise InvalidInputError(f"{str(path)!r} is not a napari-sam embedding store")
    out = []
    for key, group in root.groups():
        if "records" not in group:
            continue
        records = np.asarray(group["records"][:, REC_VALID])
        out.append({"key": key, "signature": dict(group.attrs.get("signature") or {}),
                    "stored": int(np.count_nonzero(records == 1)), "n_slices": len(records)})
    return out


def slice_digest(fingerprint: str) -> int:
    """A slice fingerprint (hex) as the int64 kept in its record."""
    return digest64(fingerprint.encode())


def _differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    names = {"model": "model", "stack": "image stack", "normalisation": "normalisation",
             "format_version": "format version", "store_dtype": "stored dtype",
             "encoder": "encoder precision"}
    return [names.get(k, k) for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]


def open_signature_group(
    path: Path, signature: dict[str, Any], *, feature_shape: tuple[int, int, int], n_slices: int,
    dtype: str, quiet: bool = False,
):
    """Open (or create) the group of ``path`` that holds embeddings for ``signature``.

    Returns ``(group, writable)``; ``group`` is None when the store can be neither opened
    nor created (a warning says why and the caller goes on with memory only).

    Raises
    ------
    InvalidInputError
        If ``path`` is an existing zarr (or folder) that is not a napari-sam embedding store:
        it may be the user's data and is never written into.
    """
    import zarr
    from zarr.errors import ContainsArrayError, ContainsGroupError

    quiet_sibling_write_errors()
    key = signature_key(signature)
    path = Path(path)
    exists = path.exists()
    if exists and not (path / "zarr.json").exists():
        if any(path.iterdir()):
            raise InvalidInputError(
                f"cache {str(path)!r} exists and is not a napari-sam embedding store "
                "(no zarr.json); choose a new path such as 'image.embeddings.zarr'"
            )
    foreign = InvalidInputError(
        f"cache {str(path)!r} is a zarr that napari-sam did not write (your data?); it is "
        "never written into: choose a new path such as 'image.embeddings.zarr'"
    )
    try:
        try:
            root = zarr.open_group(path, mode="a", zarr_format=3)
        except ContainsGroupError:  # another process created it between zarr's look and write
            root = zarr.open_group(path, mode="a", zarr_format=3)
        writable = True
    except ContainsArrayError:
        raise foreign from None
    except (PermissionError, OSError) as err:
        if not exists:
            warnings.warn(f"cannot create embedding store {path} ({err}); using memory only",
                          EmbeddingStoreWarning, stacklevel=3)
            return None, False
        root = zarr.open_group(path, mode="r")
        writable = False
    meta = root.attrs.get("napari_sam")
    if meta is None:
        if len(list(root.keys())) > 0:
            raise foreign
        if writable:
            root.attrs["napari_sam"] = {"kind": STORE_KIND, "format_version": signature["format_version"]}
    elif meta.get("kind") != STORE_KIND:
        raise InvalidInputError(f"cache {str(path)!r} is a napari-sam {meta.get('kind')!r}, not an embedding store")

    if key in root:
        group = root[key]
        return group, writable
    others = [root[k].attrs.get("signature", {}) for k in root.group_keys()]
    if others and not quiet:  # quiet: an older group of this signature is read
        why = ", ".join(sorted({d for o in others for d in _differences(signature, o)}))
        warnings.warn(
            f"embedding store {path} holds embeddings made with a different {why}; they are "
            f"kept, and embeddings for this one go to its group {key!r}",
            EmbeddingStoreWarning,
            stacklevel=3,
        )
    if not writable:
        warnings.warn(f"embedding store {path} is read-only and has no embeddings for this "
                      "model and stack; using memory only", EmbeddingStoreWarning, stacklevel=3)
        return None, False
    c, h, w = feature_shape
    try:
        group = root.require_group(key)
    except ContainsGroupError:  # another process created it between zarr's look and write
        group = zarr.open_group(path / key, mode="a")
    if "signature" not in group.attrs:
        group.attrs["signature"] = signature
    arrays = [("features", (n_slices, c, h, w), (1, c, h, w), dtype),
              ("records", (n_slices, 8), (1, 8), "int64")]
    if dtype == "int8":  # one scale per channel and slice
        arrays.append(("scales", (n_slices, c), (1, c), "float32"))
    for name, shape, chunks, dt in arrays:
        if name not in group:
            try:
                group.create_array(name, shape=shape, chunks=chunks, dtype=dt,
                                   compressors=None, fill_value=0)
            except Exception:
                if name not in zarr.open_group(path / key, mode="r"):
                    raise
    return zarr.open_group(path / key, mode="a"), True
