"""Opening the zarr embedding store: one group per signature, never a foreign zarr."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from ._errors import InvalidInputError

STORE_KIND = "embedding-store"


class _SiblingWriteErrors(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" records about an OSError."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, OSError) and "never retrieved" in str(record.msg))


def quiet_sibling_write_errors() -> None:
    """Keep a failed zarr write to one error instead of one error plus stray tracebacks.

    zarr writes a node's metadata files concurrently (``asyncio.gather`` in its I/O thread).
    On a full or read-only disk several of them fail: the first is raised, and napari-sam
    reports it (a warning, or the CLI's one-line error). When the process exits right after
    the report, zarr stops its event loop before ``gather`` has looked at the others, and
    asyncio logs each of them with a traceback ("Task exception was never retrieved"; seen
    in CI, 1 run in many). Only such records about an ``OSError`` are dropped; idempotent.
    """
    log = logging.getLogger("asyncio")
    if not any(isinstance(f, _SiblingWriteErrors) for f in log.filters):
        log.addFilter(_SiblingWriteErrors())


def _differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    names = {"model": "model", "stack": "image stack", "normalisation": "normalisation",
             "format_version": "format version", "store_dtype": "stored dtype",
             "encoder": "encoder precision"}
    return [names.get(k, k) for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]


def open_signature_group(
    path: Path, signature: dict[str, Any], *, feature_shape: tuple[int, int, int], n_slices: int,
    dtype: str,
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

    from .embeddings import EmbeddingStoreWarning, signature_key

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
    if others:
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
    for name, shape, chunks, dt in (
        ("features", (n_slices, c, h, w), (1, c, h, w), dtype),
        ("records", (n_slices, 8), (1, 8), "int64"),
    ):
        if name not in group:
            try:
                group.create_array(name, shape=shape, chunks=chunks, dtype=dt,
                                   compressors=None, fill_value=0)
            except Exception:
                if name not in zarr.open_group(path / key, mode="r"):
                    raise
    return zarr.open_group(path / key, mode="a"), True
