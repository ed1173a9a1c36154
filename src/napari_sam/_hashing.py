"""Stable digests used for signatures, fingerprints and checksums (one place for all)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

__all__ = ["array_digest", "digest64", "json_digest"]


def json_digest(obj: Any, *, length: int = 16) -> str:
    """Hex SHA-256 (first ``length`` characters) of ``obj`` as canonical JSON.

    Keys are sorted; objects JSON does not know are written with ``str``.
    """
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def array_digest(a: np.ndarray, *, prefix: str = "") -> str:
    """blake2b (16 bytes, hex) of an array's shape, dtype and bytes (and ``prefix``)."""
    a = np.ascontiguousarray(a)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{a.shape}|{a.dtype.str}|{prefix}".encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def digest64(data: bytes) -> int:
    """A signed 64-bit blake2b digest (fits an int64 zarr cell)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)
