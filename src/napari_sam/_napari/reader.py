"""npe2 reader: TIFF / OME-TIFF files and zarr / OME-Zarr folders as lazy napari layers.

The data handed to napari are the lazy arrays of :func:`napari_sam.open_stack` (a zarr
array over tifffile's page store, or the zarr array itself), so opening a large stack
reads only the slices napari displays. ``scale`` and ``axis_labels`` come from the file's
metadata (OME-Zarr translation included); a channel axis becomes napari's
``channel_axis`` unless it holds RGB(A) samples as the last axis. Labels files (the
widget's, batch jobs', any NGFF labels) open as Labels layers with their scale and
translation, and an OME-Zarr image brings the labels listed in its ``labels/`` group.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["get_reader", "layer_data", "read"]

_TIFF = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf")


def _readable_name(path: str) -> bool:
    p = path.rstrip("/\\").lower()
    return p.endswith(_TIFF) or p.endswith(".zarr")


def get_reader(path: str | list[str]) -> Callable[[Any], list[tuple]] | None:
    """Return a reader for ``path`` when napari-sam can read it, else None.

    Parameters
    ----------
    path : str or list of str
        One path (a list is accepted when it holds exactly one path).
    """
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    path = os.fspath(path)
    if not _readable_name(path) or not os.path.exists(path):
        return None
    try:
        layers = layer_data(path)
    except Exception:  # noqa: BLE001 - not a readable TIFF / zarr: let another reader try
        return None

    def reader(_path: Any) -> list[tuple]:
        return layers

    return reader


def read(path: str) -> list[tuple]:
    """Read ``path`` into napari layer data tuples (see :func:`layer_data`)."""
    return layer_data(path)


def _image_labels(path: str) -> list[tuple]:
    """The labels listed in an OME-Zarr image's ``labels/`` group, as Labels layers."""
    import json

    from ..io.labels_files import is_labels, open_labels

    out = []
    listing = Path(path) / "labels" / ".zattrs"
    if listing.is_file():
        try:
            names = json.loads(listing.read_text()).get("labels", [])
        except ValueError:
            names = []
        for name in names:
            sub = Path(path) / "labels" / name
            if is_labels(sub):
                data, kwargs = open_labels(sub)
                kwargs["name"] = name
                out.append((data, kwargs, "labels"))
    return out


def layer_data(path: str) -> list[tuple]:
    """Open ``path`` lazily as a napari layer data tuple.

    Returns
    -------
    list of (data, kwargs, layer_type)
        ``data`` is the lazy array; ``kwargs`` holds ``name``, ``scale``,
        ``axis_labels``, ``contrast_limits`` and ``channel_axis`` or ``rgb``.
    """
    import napari_sam as ns

    from ..io.labels_files import is_labels, open_labels

    if is_labels(path):  # a labels file (the widget's, a batch job's, any NGFF labels)
        data, kwargs = open_labels(path)
        return [(data, kwargs, "labels")]
    stack = ns.open_stack(path)
    axes = stack.axes
    scale, translate = list(stack.scale), list(stack.translate)
    labels = [a.lower() for a in axes]
    name = Path(path.rstrip("/\\")).name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".zarr", ".btf"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    kwargs: dict[str, Any] = {"name": name}
    if "C" in axes:
        c = axes.index("C")
        if stack.rgb_input and c == len(axes) - 1:
            kwargs["rgb"] = True
            del scale[c], labels[c], translate[c]
        else:
            kwargs["channel_axis"] = c
            del scale[c], labels[c], translate[c]
            kwargs["name"] = [f"{name} [c{i}]" for i in range(stack.shape[c])]
    kwargs["scale"] = tuple(scale)
    kwargs["translate"] = tuple(translate)
    kwargs["axis_labels"] = tuple(labels)
    if not kwargs.get("rgb") and "channel_axis" not in kwargs:
        limits = stack.contrast_limits  # a sample of slices: napari would read them all
        if limits is not None and limits[1] > limits[0]:
            kwargs["contrast_limits"] = list(limits)
    return [(stack.data, kwargs, "image")] + (_image_labels(path) if os.path.isdir(path) else [])
