"""npe2 writer: a Labels layer to an OME-TIFF file or an OME-Zarr-style zarr folder.

* ``.tif`` / ``.tiff``: OME-TIFF (any integer dtype, uint32 included) with the physical
  pixel size of the Y, X (and Z) axes from the layer's ``scale``.
* ``.zarr``: a zarr v2 group holding the labels as array ``0`` (chunks of one Y, X plane)
  with OME-Zarr 0.4 ``multiscales`` metadata (axes, scale, translation) and a
  ``napari_sam`` marker, so the folder opens again as labels with its scale.

napari's save dialog asks before replacing a file. On top of that, the writer refuses to
write over a zarr folder (or any folder) that is not a labels folder written here, so an
image or an embedding store can never be destroyed by a "save labels".
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["LabelsWriteError", "read_labels_zarr", "write_labels"]

_OME_AXES = "TCZYX"


class LabelsWriteError(ValueError):
    """The labels cannot be written to the given path (the message says why)."""


def _axes(ndim: int, axis_labels: Sequence[str] | None) -> str:
    if axis_labels is not None and len(axis_labels) == ndim:
        letters = "".join(str(a).upper() for a in axis_labels)
        if (all(len(str(a)) == 1 for a in axis_labels) and letters.endswith("YX")
                and set(letters) <= set(_OME_AXES) and len(set(letters)) == ndim):
            return letters
    if ndim > 5 or ndim < 2:
        raise LabelsWriteError(f"labels must have 2 to 5 dimensions to be written, got {ndim}")
    return {2: "YX", 3: "ZYX", 4: "TZYX", 5: "TCZYX"}[ndim]


def _is_labels_zarr(path: str) -> bool:
    import zarr

    try:
        group = zarr.open_group(path, mode="r")
        meta = dict(group.attrs).get("napari_sam")
    except Exception:  # noqa: BLE001 - not a zarr group: not ours
        return False
    return isinstance(meta, dict) and meta.get("kind") == "labels"


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Write a Labels layer (npe2 single-layer writer).

    Parameters
    ----------
    path : str
        Target ending in ``.tif``, ``.tiff`` or ``.zarr``.
    data : array-like of int, shape (..., Y, X)
        The labels.
    meta : dict
        The layer's attributes (``scale``, ``translate``, ``axis_labels``, ``name``).

    Returns
    -------
    list of str
        The path written.

    Raises
    ------
    LabelsWriteError
        Unsupported extension or dtype, or ``path`` is an existing folder that is not a
        labels zarr written by napari-sam.
    """
    path = os.fspath(path)
    data = np.asarray(data)
    if data.dtype.kind not in "iub":
        raise LabelsWriteError(f"labels must be integers, got dtype {data.dtype}")
    if data.dtype == bool:
        data = data.astype(np.uint8)
    ndim = data.ndim
    scale = [float(s) for s in (meta.get("scale") if meta.get("scale") is not None
                                else [1.0] * ndim)][-ndim:]
    translate = [float(t) for t in (meta.get("translate") if meta.get("translate") is not None
                                    else [0.0] * ndim)][-ndim:]
    axes = _axes(ndim, meta.get("axis_labels"))
    lower = path.rstrip("/\\").lower()
    if lower.endswith((".tif", ".tiff")):
        if os.path.isdir(path):
            raise LabelsWriteError(f"{path!r} is a folder; refusing to replace it with a TIFF")
        _write_tiff(path, data, axes, scale)
    elif lower.endswith(".zarr"):
        if os.path.exists(path) and not _is_labels_zarr(path):
            raise LabelsWriteError(
                f"{path!r} exists and is not a labels folder written by napari-sam (an image "
                "or an embedding store?); refusing to overwrite it: choose a new name")
        _write_zarr(path, data, axes, scale, translate, meta.get("name"))
    else:
        raise LabelsWriteError(f"cannot write labels to {path!r}: use .tif, .tiff or .zarr")
    return [path]


def _write_tiff(path: str, data: np.ndarray, axes: str, scale: list[float]) -> None:
    import tifffile

    metadata: dict[str, Any] = {"axes": axes}
    for letter, key in (("X", "PhysicalSizeX"), ("Y", "PhysicalSizeY"), ("Z", "PhysicalSizeZ")):
        if letter in axes:
            metadata[key] = scale[axes.index(letter)]
            metadata[key + "Unit"] = "µm"
    tmp = path + ".partial.tif"
    tifffile.imwrite(tmp, data, ome=True, metadata=metadata, compression="zlib")
    os.replace(tmp, path)  # a failed write never leaves a half-written target


def _write_zarr(path: str, data: np.ndarray, axes: str, scale: list[float],
                translate: list[float], name: Any) -> None:
    import zarr

    if os.path.exists(path):
        shutil.rmtree(path)  # checked above: a labels folder written by napari-sam
    group = zarr.open_group(path, mode="w", zarr_format=2)
    chunks = (1,) * (data.ndim - 2) + data.shape[-2:]
    arr = group.create_array("0", shape=data.shape, dtype=data.dtype, chunks=chunks,
                             fill_value=0, chunk_key_encoding={"name": "v2", "separator": "/"})
    arr[...] = data
    kinds = {"T": "time", "C": "channel"}
    group.attrs.update({
        "napari_sam": {"kind": "labels", "version": 1},
        "image-label": {"version": "0.4"},
        "multiscales": [{
            "version": "0.4",
            "name": str(name or "labels"),
            "axes": [{"name": a.lower(), "type": kinds.get(a, "space")} for a in axes],
            "datasets": [{"path": "0", "coordinateTransformations": [
                {"type": "scale", "scale": scale},
                {"type": "translation", "translation": translate},
            ]}],
        }],
    })


def read_labels_zarr(path: str) -> tuple[Any, dict]:
    """Open a labels folder written by :func:`write_labels` lazily.

    Returns
    -------
    data : zarr.Array
    kwargs : dict
        ``scale``, ``translate`` and ``axis_labels`` for napari.
    """
    import zarr

    group = zarr.open_group(path, mode="r")
    ms = dict(group.attrs)["multiscales"][0]
    ds = ms["datasets"][0]
    kwargs: dict[str, Any] = {"axis_labels": tuple(a["name"] for a in ms["axes"])}
    for t in ds.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            kwargs["scale"] = tuple(t["scale"])
        elif t.get("type") == "translation":
            kwargs["translate"] = tuple(t["translation"])
    return group[ds["path"]], kwargs
