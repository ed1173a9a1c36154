"""What readers return (:class:`SourceInfo`) and what the engine reads slices from (:class:`SliceSource`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["MICRON", "UNKNOWN_FIRST", "SliceSource", "SourceInfo", "fill_unknown", "unit_of"]

# letters given to slice axes whose meaning is unknown, in order of preference
UNKNOWN_FIRST = "ZT"
_POOL = "ABDEFGHJKLMNOPQRUVW"
MICRON = "µm"
_UNIT_ALIASES = {
    "micron": MICRON,
    "microns": MICRON,
    "um": MICRON,
    "\\u00b5m": MICRON,
    "micrometer": MICRON,
    "micrometre": MICRON,
    "µm": MICRON,
    "μm": MICRON,  # greek mu
    "pixel": None,
    "pixels": None,
    "": None,
}


@runtime_checkable
class SliceSource(Protocol):
    """What the engine reads slices from: :class:`Stack`, and
    :class:`napari_sam.TiledStack` (whose "slices" are tiles).

    Attributes
    ----------
    shape, axes : tuple of int, str
        Of the underlying image (part of the embedding store's signature).
    slice_shape : (int, int)
        (Y, X) of every slice.
    """

    shape: tuple[int, ...]
    axes: str
    slice_shape: tuple[int, int]

    def __len__(self) -> int: ...

    def rgb(self, index: int) -> np.ndarray:
        """SAM's (Y, X, 3) uint8 input for slice ``index``."""

    def slice_fingerprint(self, index: int) -> str:
        """A digest of slice ``index``'s raw pixels (hex)."""

    def fingerprint(self) -> str:
        """A cheap identity of the whole source (hex)."""

    def normalisation(self) -> dict:
        """How :meth:`rgb` maps raw values (JSON-able)."""

_PLANE = "YXC"
_N_SAMPLES = 8  # slices sampled for contrast limits
_SAMPLE_PIXELS = 1_000_000  # each sampled slice is strided down to about this many pixels
_NORMALISATION_VERSION = 1
_DEFAULT_PERCENTILES = (1.0, 99.8)


@dataclass
class SourceInfo:
    """What a reader found: the lazy array and its metadata (one entry per axis)."""

    data: Any
    axes: str | None
    scale: tuple[float, ...] | None = None
    units: tuple[str | None, ...] | None = None
    translate: tuple[float, ...] | None = None  # physical origin per axis (OME-Zarr translation)
    rgb_hint: bool = False  # the file says its C axis holds RGB(A) samples
    source: str = "array"
    path: str | None = None  # set for file sources: used to reopen after pickling
    handle: Any = field(default=None, repr=False)  # open file to close with the stack


def unit_of(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return _UNIT_ALIASES.get(text.lower(), text)


def fill_unknown(letters: list[str | None], prefer: list[str]) -> str:
    """Give a unique slice-axis letter to every ``None`` in `letters`.

    `prefer` holds, per position, the pool to draw from first ("ZT" for unknown axes,
    "" for axes that must not be mistaken for Z or T).
    """
    used = {a for a in letters if a is not None}
    out = []
    for a, first in zip(letters, prefer):
        if a is None:
            a = next(c for c in first + _POOL if c not in used)
            used.add(a)
        out.append(a)
    return "".join(out)
