"""npe2 writer: a Labels layer to OME-TIFF or NGFF (OME-Zarr) labels.

The same writer as batch jobs and the widget's autosave (:mod:`napari_sam.io.labels_files`):
``.tif`` / ``.tiff`` give OME-TIFF with physical pixel sizes; ``.zarr`` gives NGFF 0.4
labels (``image-label``, scale and translation), inside ``labels/<name>`` when the target
is an OME-Zarr image. Everything written opens again as a Labels layer with its scale and
translation.

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

__all__ = ["LabelsWriteError", "write_labels"]

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


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Write a Labels layer (npe2 single-layer writer) with the project's one labels writer.

    Parameters
    ----------
    path : str
        Target ending in ``.tif``, ``.tiff`` or ``.zarr`` (an OME-Zarr image gets the
        labels in its ``labels/<layer name>`` group).
    data : array-like of int, shape (..., Y, X)
        The labels (read slice by slice: a zarr-backed layer is never loaded whole).
    meta : dict
        The layer's attributes (``scale``, ``translate``, ``axis_labels``, ``name``).

    Returns
    -------
    list of str
        The path written.

    Raises
    ------
    LabelsWriteError
        Unsupported extension or dtype, or ``path`` is an existing folder that is neither
        an OME-Zarr image nor labels written by napari-sam.
    """
    from ..io.labels_files import (
        LabelsGeometry,
        create_zarr_labels,
        is_labels,
        labels_group_path,
        write_ome_tiff,
    )

    path = os.fspath(path)
    dtype = np.dtype(getattr(data, "dtype", np.asarray(data).dtype))
    if dtype.kind not in "iub":
        raise LabelsWriteError(f"labels must be integers, got dtype {dtype}")
    if dtype.kind == "b":
        dtype = np.dtype(np.uint8)
    shape = tuple(int(n) for n in data.shape)
    ndim = len(shape)
    scale = [float(v) for v in (meta.get("scale") if meta.get("scale") is not None
                                else [1.0] * ndim)][-ndim:]
    translate = [float(v) for v in (meta.get("translate") if meta.get("translate") is not None
                                    else [0.0] * ndim)][-ndim:]
    geo = LabelsGeometry(shape, _axes(ndim, meta.get("axis_labels")), scale, translate)
    record = {"layer": str(meta.get("name") or "labels")}
    lower = path.rstrip("/\\").lower()

    def slices():
        lead = shape[:-2]
        for pos in np.ndindex(*lead) if lead else [()]:
            yield pos, np.asarray(data[pos]).astype(dtype, copy=False)

    if lower.endswith((".tif", ".tiff")):
        if os.path.isdir(path):
            raise LabelsWriteError(f"{path!r} is a folder; refusing to replace it with a TIFF")
        write_ome_tiff(path, (s for _, s in slices()), geo, record=record, dtype=dtype)
    elif lower.endswith(".zarr"):
        target = labels_group_path(path, _safe(meta.get("name")))
        if os.path.exists(target) and not is_labels(target):
            raise LabelsWriteError(
                f"{path!r} exists and is neither an OME-Zarr image nor labels written by "
                "napari-sam (an embedding store? your data?); refusing to overwrite it: choose a "
                "new name")
        if os.path.exists(target):
            shutil.rmtree(target)  # checked above: labels; napari asked before replacing
        arr = create_zarr_labels(path, geo, record=record, dtype=dtype.name,
                                 name=_safe(meta.get("name")))
        top = 0
        for pos, values in slices():
            arr[pos] = values
            top = max(top, int(values.max()) if values.size else 0)
        from ..io.labels_files import update_record

        update_record(target, max_id=top)
    else:
        raise LabelsWriteError(f"cannot write labels to {path!r}: use .tif, .tiff or .zarr")
    records = (meta.get("metadata") or {}).get("napari_sam_provenance")
    if records:  # how the widget made the objects: stored with them
        from ..io.provenance import append_records

        where = target if lower.endswith(".zarr") else path
        append_records(where, records, replace=True)
    return [path]


def _safe(name: Any) -> str:
    text = "".join(c if c.isalnum() or c in "-_" else "-" for c in str(name or "labels"))
    return text.strip("-") or "labels"
