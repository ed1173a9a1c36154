"""TIFF sources (BigTIFF, ImageJ hyperstacks, OME-TIFF, pyramids): lazy, through tifffile's zarr store.

Nothing here reads pixel data: a later ``data[index]`` decodes only the pages (and strips
or tiles) that the index touches.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from typing import Any

from .._errors import StackError
from .source import MICRON, UNKNOWN_FIRST, SourceInfo, fill_unknown, unit_of

__all__ = ["map_tiff_axes", "open_tiff"]


def map_tiff_axes(axes: str) -> tuple[str, bool]:
    """Map tifffile's axes letters to napari-sam's.

    ``S`` (samples: RGB(A)) becomes ``C``; a tifffile ``C`` next to an ``S`` becomes a
    slice axis with a letter outside ``Z``/``T``; ``Q`` (unknown), ``I`` (image sequence)
    and repeated letters become the first unused of ``Z``, ``T``, then other letters.
    Returns the axes and whether the file has an RGB(A) sample axis.
    """
    has_s = "S" in axes
    letters: list[str | None] = []
    prefer: list[str] = []
    for a in axes:
        if a == "S":
            letters.append("C")
            prefer.append("")
        elif a == "C" and has_s:
            letters.append(None)
            prefer.append("")
        elif a in "QI" or a in letters:
            letters.append(None)
            prefer.append(UNKNOWN_FIRST)
        else:
            letters.append(a)
            prefer.append("")
    return fill_unknown(letters, prefer), has_s


def _ome_scale(tif: Any, axes: str) -> tuple[list[float], list[str | None]]:
    scale = [1.0] * len(axes)
    units: list[str | None] = [None] * len(axes)
    try:
        root = ET.fromstring(tif.ome_metadata)
    except ET.ParseError:
        return scale, units
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return scale, units
    for letter, key, default_unit in (
        ("X", "PhysicalSizeX", MICRON),
        ("Y", "PhysicalSizeY", MICRON),
        ("Z", "PhysicalSizeZ", MICRON),
        ("T", "TimeIncrement", "s"),
    ):
        value = pixels.get(key)
        if value is None or letter not in axes:
            continue
        try:
            size = float(value)
        except ValueError:
            continue
        if math.isfinite(size) and size > 0:
            i = axes.index(letter)
            scale[i] = size
            units[i] = unit_of(pixels.get(key + "Unit", default_unit))
    return scale, units


def _imagej_scale(tif: Any, axes: str) -> tuple[list[float], list[str | None]]:
    scale = [1.0] * len(axes)
    units: list[str | None] = [None] * len(axes)
    meta = tif.imagej_metadata or {}
    unit = unit_of(meta.get("unit"))
    page = tif.pages.first
    for letter, tag in (("X", "XResolution"), ("Y", "YResolution")):
        res = page.tags.get(tag)
        if res is None or letter not in axes:
            continue
        num, den = res.value
        if num > 0 and den > 0 and (num, den) != (1, 1):
            scale[axes.index(letter)] = den / num
        units[axes.index(letter)] = unit
    for letter, key, u in (("Z", "spacing", unit), ("T", "finterval", "s")):
        value = meta.get(key)
        if letter in axes and value is not None:
            try:
                size = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(size) and size > 0:
                scale[axes.index(letter)] = size
                units[axes.index(letter)] = u
    return scale, units


def _check_compression(series: Any, path: str) -> None:
    """Refuse up front a TIFF whose compression cannot be decoded here (instead of failing
    on the first slice read with tifffile's bare message)."""
    import tifffile

    page = series.keyframe if getattr(series, "keyframe", None) is not None else series.pages[0]
    if page is None or not hasattr(page, "tags"):
        return
    value = page.tags.valueof(259, 1)
    try:
        tifffile.TIFF.DECOMPRESSORS[value]
        return
    except Exception as exc:  # noqa: BLE001 - KeyError: unknown code; others: codec missing
        why = type(exc).__name__
    try:
        name = tifffile.COMPRESSION(value).name
    except ValueError:
        name = "unknown"
    raise StackError(
        f"TIFF file {path!r} uses compression {value} ({name}), which cannot be decoded "
        f"here ({why}); readable: uncompressed, LZW, deflate/zlib, PackBits, JPEG, zstd, "
        "LZMA and the other codecs of tifffile + imagecodecs; re-save the file with one"
    )


def open_tiff(path: str) -> SourceInfo:
    """Open the first series of a TIFF file (level 0 of a pyramid) as a lazy zarr array.

    Parameters
    ----------
    path : str
        A TIFF, BigTIFF, ImageJ hyperstack or OME-TIFF file.

    Returns
    -------
    SourceInfo
        ``data`` is a read-only ``zarr.Array`` backed by tifffile's ``ZarrTiffStore``
        (one chunk per page or smaller); the file stays open in ``handle``.

    Raises
    ------
    StackError
        When the file is not a readable TIFF; the message names the path and the reason.
    """
    import tifffile
    import zarr

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises TiffFileError, struct.error, ValueError...
        raise StackError(
            f"cannot read {path!r} as a TIFF file ({type(exc).__name__}: {exc}); "
            "open_stack reads TIFF files and zarr / OME-Zarr folders"
        ) from exc
    try:
        if not tif.series:
            raise StackError(f"TIFF file {path!r} contains no image series")
        series = tif.series[0]
        _check_compression(series, path)
        node = zarr.open(series.aszarr(level=0), mode="r")
        if not hasattr(node, "shape"):  # a group of levels: take level 0
            node = node["0"]
        raw_axes = series.axes
        axes: str | None
        axes, rgb_hint = map_tiff_axes(raw_axes)
        if set(raw_axes) <= set("QIYX") and len(raw_axes) <= 5:
            axes = None  # no axes metadata (only unknowns): the shape rule decides
        if tif.is_ome and tif.ome_metadata:
            scale, units = _ome_scale(tif, raw_axes.replace("S", "_"))
        elif tif.is_imagej:
            scale, units = _imagej_scale(tif, raw_axes.replace("S", "_"))
        else:
            scale, units = [1.0] * len(raw_axes), [None] * len(raw_axes)
    except StackError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise StackError(
            f"cannot read {path!r} as a TIFF image ({type(exc).__name__}: {exc})"
        ) from exc
    return SourceInfo(
        data=node,
        axes=axes,
        scale=tuple(scale),
        units=tuple(units),
        rgb_hint=rgb_hint,
        source=path,
        path=path,
        handle=tif,
    )


# --------------------------------------------------------------------------- zarr
