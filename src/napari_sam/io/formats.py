"""Readers behind :func:`napari_sam.open_stack`: paths, zarr / OME-Zarr, arrays; axes rules.

Each reader returns a :class:`SourceInfo`: a lazy array plus the axes, pixel spacing and
units found in the file's metadata. Nothing here reads pixel data: TIFF files are opened
through tifffile's zarr interface, so a later ``data[index]`` decodes only the pages (and
strips / tiles) that the index touches. zarr and tifffile are imported inside functions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._errors import StackError
from .source import UNKNOWN_FIRST, SourceInfo, fill_unknown, unit_of
from .tiff import open_tiff

__all__ = [
    "SourceInfo",
    "infer_axes",
    "check_axes",
    "from_array",
    "open_path",
    "open_zarr_path",
    "from_zarr_node",
    "axes_from_names",
]

def axes_from_names(names: list[Any], types: list[Any] | None = None) -> str | None:
    """Axes letters from dimension names (OME-Zarr, zarr v3 ``dimension_names``, xarray).

    ``x``/``y``/``z``/``t``/``c`` (or ``time``/``channel``) map to their letters; an OME
    axis type of ``channel``/``time``/``space`` is used when the name is unknown; anything
    else becomes a slice axis. Returns None when the names do not give one Y and one X.
    """
    known = {"x": "X", "y": "Y", "z": "Z", "t": "T", "time": "T", "c": "C", "ch": "C",
             "channel": "C", "channels": "C"}
    by_type = {"channel": "C", "time": "T", "space": "Z"}
    letters: list[str | None] = []
    for i, name in enumerate(names):
        a = known.get(str(name).lower()) if name is not None else None
        if a is None and types is not None and types[i] is not None:
            a = by_type.get(str(types[i]).lower())
        letters.append(a if a not in letters else None)
    axes = fill_unknown(letters, [UNKNOWN_FIRST] * len(letters))
    if axes.count("Y") != 1 or axes.count("X") != 1:
        return None
    return axes


# --------------------------------------------------------------------------- TIFF


def _ome_attrs(attrs: Any) -> dict | None:
    attrs = dict(attrs)
    if "ome" in attrs and isinstance(attrs["ome"], dict):  # OME-Zarr 0.5 (zarr v3)
        attrs = attrs["ome"]
    multiscales = attrs.get("multiscales")
    if isinstance(multiscales, list) and multiscales:
        return multiscales[0]
    return None


def _scale_of(transforms: Any, ndim: int) -> list[float] | None:
    for t in transforms or []:
        if isinstance(t, dict) and t.get("type") == "scale" and len(t.get("scale", [])) == ndim:
            return [float(s) for s in t["scale"]]
    return None


def _translation_of(transforms: Any, ndim: int) -> list[float] | None:
    for t in transforms or []:
        if isinstance(t, dict) and t.get("type") == "translation" \
                and len(t.get("translation", [])) == ndim:
            return [float(v) for v in t["translation"]]
    return None


def _from_multiscales(group: Any, ms: dict, source: str, path: str | None) -> SourceInfo:
    datasets = ms.get("datasets") or []
    if not datasets:
        raise StackError(f"OME-Zarr {source!r} lists no datasets in its multiscales metadata")
    level0 = datasets[0]
    try:
        data = group[level0["path"]]
    except Exception as exc:
        raise StackError(
            f"OME-Zarr {source!r}: level 0 array {level0.get('path')!r} cannot be opened ({exc})"
        ) from exc
    ndim = len(data.shape)
    raw = ms.get("axes")
    axes = None
    units: list[str | None] = [None] * ndim
    if isinstance(raw, list) and len(raw) == ndim:
        names = [a.get("name") if isinstance(a, dict) else a for a in raw]
        types = [a.get("type") if isinstance(a, dict) else None for a in raw]
        axes = axes_from_names(names, types)
        units = [unit_of(a.get("unit")) if isinstance(a, dict) else None for a in raw]
    elif raw is None and ndim == 5:  # OME-Zarr 0.1 / 0.2: always TCZYX
        axes = "TCZYX"
    scale = _scale_of(level0.get("coordinateTransformations"), ndim) or [1.0] * ndim
    outer = _scale_of(ms.get("coordinateTransformations"), ndim)
    if outer is not None:
        scale = [a * b for a, b in zip(scale, outer)]
    scale = [s if math.isfinite(s) and s > 0 else 1.0 for s in scale]
    # NGFF: the dataset's translation, then the multiscale's (applied after its scale)
    translate = _translation_of(level0.get("coordinateTransformations"), ndim) or [0.0] * ndim
    outer_t = _translation_of(ms.get("coordinateTransformations"), ndim)
    if outer is not None:
        translate = [t * o for t, o in zip(translate, outer)]
    if outer_t is not None:
        translate = [t + o for t, o in zip(translate, outer_t)]
    translate = [t if math.isfinite(t) else 0.0 for t in translate]
    return SourceInfo(data=data, axes=axes, scale=tuple(scale), units=tuple(units),
                      translate=tuple(translate), source=source, path=path)


def from_zarr_node(node: Any, *, source: str = "zarr", path: str | None = None) -> SourceInfo:
    """A zarr Array or Group as a source.

    A group with OME-Zarr ``multiscales`` metadata (0.1-0.5) gives level 0 with the axes
    names and the ``scale`` of its coordinateTransformations; a bioformats2raw layout gives
    its image ``0``; any other group must hold exactly one array.
    """
    import zarr

    if isinstance(node, zarr.Array):
        names = getattr(node.metadata, "dimension_names", None) or node.attrs.get(
            "_ARRAY_DIMENSIONS"
        )
        axes = None
        if names is not None and len(names) == node.ndim and all(n is not None for n in names):
            axes = axes_from_names(list(names))
        return SourceInfo(data=node, axes=axes, source=source, path=path)
    ms = _ome_attrs(node.attrs)
    if ms is not None:
        return _from_multiscales(node, ms, source, path)
    members = dict(node.members())
    child = members.get("0")
    if isinstance(child, zarr.Group) and _ome_attrs(child.attrs) is not None:
        return from_zarr_node(child, source=source, path=path)  # bioformats2raw layout
    arrays = [k for k, v in members.items() if isinstance(v, zarr.Array)]
    if len(arrays) == 1:
        return from_zarr_node(members[arrays[0]], source=source, path=path)
    raise StackError(
        f"zarr group {source!r} has no OME-Zarr multiscales metadata and holds "
        f"{len(arrays)} arrays {sorted(arrays)[:10]}; pass one array (e.g. group['name']) "
        "or its path"
    )


def open_zarr_path(path: str) -> SourceInfo:
    """Open a zarr v2 / v3 store or an OME-Zarr image read-only."""
    import zarr

    try:
        node = zarr.open(path, mode="r")
    except Exception as exc:
        raise StackError(
            f"cannot open {path!r} as a zarr store ({type(exc).__name__}: {exc}); "
            "open_stack reads TIFF files and zarr / OME-Zarr folders"
        ) from exc
    return from_zarr_node(node, source=path, path=path)


def open_path(path: str | os.PathLike) -> SourceInfo:
    """Open a file or folder: folders (and URLs) as zarr, every file as TIFF."""
    p = os.fspath(path)
    if "://" in p:
        return open_zarr_path(p)
    if not os.path.exists(p):
        raise FileNotFoundError(2, "image source not found", p)
    if os.path.isdir(p):
        return open_zarr_path(p)
    return open_tiff(p)


# --------------------------------------------------------------------------- axes, arrays


def infer_axes(shape: Sequence[int]) -> str:
    """Axes of an array without metadata, from its shape alone.

    Parameters
    ----------
    shape : sequence of int
        The array's shape.

    Returns
    -------
    str
        ``YX`` for 2D; ``YXC`` / ``ZYXC`` / ``TZYXC`` when the last dimension is 3 or 4
        (RGB(A)); else ``ZYX`` (3D), ``ZCYX`` (4D with ``shape[1] <= 4``) or ``TZYX``
        (other 4D), ``TZCYX`` (5D).

    Raises
    ------
    StackError
        For fewer than 2 or more than 5 dimensions.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if ndim < 2:
        raise StackError(
            f"an image stack needs at least 2 dimensions (Y, X); got shape {shape}"
        )
    if ndim >= 3 and shape[-1] in (3, 4) and ndim <= 5:
        return {3: "YXC", 4: "ZYXC", 5: "TZYXC"}[ndim]
    if ndim == 4:
        return "ZCYX" if shape[1] <= 4 else "TZYX"
    if ndim > 5:
        raise StackError(
            f"cannot guess the axes of a {ndim}D array of shape {shape}; pass axes= with "
            f"{ndim} letters, e.g. axes='{'ABDEFG'[: ndim - 5]}TZCYX'"
        )
    return {2: "YX", 3: "ZYX", 5: "TZCYX"}[ndim]


def check_axes(axes: str, shape: tuple[int, ...]) -> str:
    if not isinstance(axes, str):
        raise StackError(f"axes must be a string such as 'TZCYX'; got {axes!r}")
    given = axes
    axes = axes.upper()
    if "S" in axes and "C" not in axes:
        axes = axes.replace("S", "C")  # tifffile's sample axis
    problem = None
    if len(axes) != len(shape):
        problem = f"{len(axes)} letters for {len(shape)} dimensions"
    elif not axes.isalpha() or not axes.isascii():
        problem = "axes must be letters"
    elif len(set(axes)) != len(axes):
        problem = "repeated letters"
    elif "Y" not in axes or "X" not in axes:
        problem = "Y and X must both be present"
    if problem:
        raise StackError(
            f"axes {given!r} do not fit an array of shape {shape}: {problem}. Use one "
            "letter per dimension from T, Z, C (channel / RGB), Y, X, any other letter "
            "being a further slice axis; e.g. 'ZYX', 'TZCYX', 'YXC'"
        )
    return axes


def from_array(source: Any) -> SourceInfo:
    mod = type(source).__module__.split(".")[0]
    if isinstance(source, np.ndarray):
        return SourceInfo(data=source, axes=None, source="numpy")
    if mod == "dask":
        return SourceInfo(data=source, axes=None, source="dask")
    if mod == "zarr":
        return from_zarr_node(source, source="zarr")
    if hasattr(source, "shape") and hasattr(source, "dtype") and hasattr(source, "__getitem__"):
        return SourceInfo(data=source, axes=None, source="array")  # h5py, xarray, ...
    try:
        arr = np.asarray(source)
    except Exception as exc:
        raise StackError(f"cannot open {type(source).__name__} as an image stack: {exc}") from exc
    if arr.dtype == object:
        raise StackError(
            f"cannot open {type(source).__name__} as an image stack; pass a path, a numpy, "
            "dask or zarr array, or a zarr group"
        )
    return SourceInfo(data=arr, axes=None, source="numpy")
