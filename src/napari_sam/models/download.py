"""Checkpoint hashing, hash-verification cache and verified downloads.

Private helpers of :mod:`napari_sam.models`. Only the standard library, ``tqdm`` and
(optionally) ``xxhash`` are used; no torch.

Hashing a 2.5 GB checkpoint takes seconds, so the digests of every file hashed once are
kept in a small JSON index (``hashes.json`` in the checkpoint cache folder), keyed by the
file's absolute path and valid while its size and modification time are unchanged.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .._errors import ChecksumError, DownloadError

__all__ = ["file_digests", "verify_file", "download"]

_CHUNK = 1 << 20
_INDEX_NAME = "hashes.json"
_TIMEOUT_S = 60.0


def _new_hasher(algorithm: str) -> Any:
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "xxh128":
        try:
            import xxhash
        except ImportError:
            raise ChecksumError(
                "this checkpoint's published checksum is an xxh128 hash, and verifying it "
                "needs the 'xxhash' package, which is not installed: run "
                "'pip install xxhash' (or pass the file with checkpoint=... to skip the "
                "registry's checksum)"
            ) from None
        return xxhash.xxh128()
    raise ValueError(f"unknown hash algorithm {algorithm!r}; expected 'sha256' or 'xxh128'")


def _hash_stream(chunks: Iterable[bytes], algorithms: Iterable[str]) -> dict[str, str]:
    hashers = {name: _new_hasher(name) for name in algorithms}
    for chunk in chunks:
        for hasher in hashers.values():
            hasher.update(chunk)
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


def _read_chunks(path: Path) -> Iterable[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def _hash_file(path: Path, algorithms: Iterable[str]) -> dict[str, str]:
    """Hash ``path`` with every algorithm in one pass (no cache)."""
    return _hash_stream(_read_chunks(path), algorithms)


def _load_index(index_path: Path) -> dict[str, Any]:
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_index(index_path: Path, data: dict[str, Any]) -> None:
    """Write the index atomically; a read-only or missing folder only costs a re-hash."""
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_path.with_name(f"{index_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, index_path)
    except OSError:
        pass


def file_digests(
    path: str | os.PathLike, *, algorithms: Iterable[str] = ("sha256",), index_dir: Path
) -> dict[str, str]:
    """Return ``{algorithm: hex digest}`` of a file, using the cached result when valid.

    Parameters
    ----------
    path : str or os.PathLike
        The file to hash.
    algorithms : iterable of str, optional
        ``"sha256"`` and/or ``"xxh128"``.
    index_dir : Path
        Folder of the JSON index that caches digests by (absolute path, size, mtime).
    """
    path = Path(path).resolve()
    algorithms = tuple(dict.fromkeys(algorithms))
    stat = path.stat()
    index_path = index_dir / _INDEX_NAME
    index = _load_index(index_path)
    entry = index.get(str(path))
    if (
        isinstance(entry, dict)
        and entry.get("size") == stat.st_size
        and entry.get("mtime_ns") == stat.st_mtime_ns
    ):
        digests = entry.get("digests", {})
        if all(isinstance(digests.get(a), str) for a in algorithms):
            return {a: digests[a] for a in algorithms}
    else:
        entry = None
    digests = dict(entry.get("digests", {})) if entry else {}
    digests.update(_hash_file(path, [a for a in algorithms if a not in digests]))
    index = _load_index(index_path)  # re-read: another process may have written meanwhile
    index[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "digests": digests}
    _save_index(index_path, index)
    return {a: digests[a] for a in algorithms}


def _mismatch_message(label: str, algorithm: str, expected: str, actual: str, what: str) -> str:
    return (
        f"{label} does not match the published {algorithm} of "
        f"{what}: expected {expected}, got {actual}. The file is corrupt, incomplete or a "
        f"different model: delete it and load the model again to download a fresh copy, "
        f"or pass your own file with checkpoint=... if it is meant to differ"
    )


def verify_file(
    path: str | os.PathLike,
    *,
    algorithm: str,
    expected: str,
    what: str,
    index_dir: Path,
) -> dict[str, str]:
    """Check a file against its published digest; return its digests (sha256 always).

    Raises
    ------
    ChecksumError
        The digest differs; the message names the file, both digests and what to do.
    """
    path = Path(path)
    digests = file_digests(path, algorithms=("sha256", algorithm), index_dir=index_dir)
    if digests[algorithm].lower() != expected.lower():
        raise ChecksumError(
            _mismatch_message(f"checkpoint file {str(path)!r}", algorithm, expected, digests[algorithm], what)
        )
    return digests


def download(
    url: str,
    dest: Path,
    *,
    algorithm: str,
    expected: str,
    what: str,
    progress: bool = True,
    index_dir: Path,
    hint: str = "",
) -> dict[str, str]:
    """Download ``url`` to ``dest`` through a ``.part`` file, verify it, then rename it.

    Nothing is left at ``dest`` unless the digest matched. Returns the file's digests.

    Raises
    ------
    DownloadError
        The URL could not be fetched (offline, HTTP error, timeout).
    ChecksumError
        The downloaded bytes do not match ``expected``.
    """
    from tqdm.auto import tqdm

    _new_hasher(algorithm)  # fail before downloading when xxhash is missing
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    where = f"put the file at {str(dest)!r} by hand"
    if hint:
        where += f" ({hint})"
    try:
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "napari-sam"})
            with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
                total = response.headers.get("Content-Length")
                bar = tqdm(
                    total=int(total) if total and total.isdigit() else None,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=f"Downloading {dest.name}",
                    disable=not progress,
                )
                with bar, open(part, "wb") as out:

                    def chunks() -> Iterable[bytes]:
                        while chunk := response.read(_CHUNK):
                            out.write(chunk)
                            bar.update(len(chunk))
                            yield chunk

                    digests = _hash_stream(chunks(), ("sha256", algorithm))
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise DownloadError(
                f"could not download the checkpoint of {what} from {url!r}: {reason}. "
                f"Check your internet connection, or download it yourself and {where}"
            ) from exc
        if digests[algorithm].lower() != expected.lower():
            raise ChecksumError(
                _mismatch_message(
                    f"the file downloaded from {url!r} (discarded, not saved to {str(dest)!r})",
                    algorithm, expected, digests[algorithm], what,
                )
            )
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    stat = dest.stat()
    index_path = index_dir / _INDEX_NAME
    index = _load_index(index_path)
    index[str(dest.resolve())] = {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "digests": digests,
    }
    _save_index(index_path, index)
    return digests
