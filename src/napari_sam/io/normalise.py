"""Raw slice values to SAM's uint8 RGB: contrast limits and the mapping itself."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._errors import StackError

__all__ = ["check_limits", "to_uint8_rgb"]


def check_limits(limits: Any, name: str = "contrast_limits") -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in limits)
    except (TypeError, ValueError):
        raise StackError(f"{name} must be two numbers (low, high); got {limits!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        raise StackError(f"{name} must be finite with low <= high; got {limits!r}")
    return lo, hi


def _map_block(s: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if not hi > lo:
        with np.errstate(invalid="ignore"):
            return np.where(s > lo, np.uint8(255), np.uint8(0))
    wide = s.dtype == np.float64 or (s.dtype.kind in "iu" and s.dtype.itemsize > 2)
    x = s.astype(np.float64 if wide else np.float32)
    x -= lo
    x /= hi - lo
    np.nan_to_num(x, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
    np.clip(x, 0.0, 1.0, out=x)
    x *= 255.0
    np.rint(x, out=x)
    return x.astype(np.uint8)


def to_uint8_rgb(s: np.ndarray, lo: float, hi: float) -> np.ndarray:
    # row blocks of about 1M values keep the float temporaries small on large slices
    out = np.empty(s.shape[:2] + (3,), np.uint8)
    target = out if s.ndim == 3 else out[..., 0]
    rows = max(1, (1 << 20) // max(1, s[0].size))
    for r in range(0, s.shape[0], rows):
        target[r : r + rows] = _map_block(s[r : r + rows], lo, hi)
    if s.ndim == 2:  # gray: replicate to 3 channels
        out[..., 1] = out[..., 0]
        out[..., 2] = out[..., 0]
    return out
