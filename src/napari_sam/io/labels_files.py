"""Labels files, the one writer and reader for the widget, batch jobs and the napari reader.

OME-Zarr (``.zarr`` / ``.ome.zarr``)
    NGFF 0.4 labels: a zarr v2 group with ``multiscales`` (one level, path ``"0"``, the
    axes, scale and translation of the image) and ``image-label`` metadata, written and
    validated with ome-zarr-models. When the target is an OME-Zarr *image*, the labels go
    into its ``labels/<name>`` group and are listed in ``labels/.zattrs``, as NGFF asks.
    The array ``0`` (uint32 unless given) is chunked one (Y, X) slice per chunk, so a
    commit rewrites only the slices it touched (each chunk write is atomic).
    ``attrs["napari_sam"]`` holds our record: ``kind: "labels"``, the format ``version``,
    the largest id written (``max_id``) and, for batch jobs, the job's signature and
    whether it is ``complete``. Provenance lives beside it (:mod:`.provenance`).
OME-TIFF (``.tif`` / ``.tiff``)
    Written whole, to a temporary file renamed into place, with the physical pixel sizes of
    Z, Y and X; our record (with the translation, which OME-TIFF cannot hold) in a private
    TIFF tag.

:func:`open_labels` reads both (and NGFF labels written by other tools) lazily, with the
scale and translation napari needs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .._errors import InvalidInputError

__all__ = ["LABELS_KIND", "LabelsGeometry", "create_zarr_labels", "is_labels", "labels_format",
           "labels_group_path", "ngff_labels_attrs", "open_labels", "read_record", "update_record",
           "write_ome_tiff"]

LABELS_KIND = "labels"
FORMAT_VERSION = 2
_KINDS = ("labels", "batch-labels")  # "batch-labels": batch outputs before version 2
TIFF_TAG = 65421  # private tag holding our record in TIFF outputs
_AXIS_TYPES = {"T": "time", "C": "channel", "Z": "space", "Y": "space", "X": "space"}
# NGFF 0.4 wants UDUNITS names; what the readers find in files
_UNITS = {"µm": "micrometer", "μm": "micrometer", "um": "micrometer", "micron": "micrometer",
          "nm": "nanometer", "mm": "millimeter", "m": "meter", "s": "second", "ms": "millisecond",
          "min": "minute", "h": "hour"}


def labels_format(path: str | os.PathLike) -> str:
    """``"zarr"`` for .zarr / .ome.zarr (and zarr folders such as an image's
    ``labels/<name>``), ``"tiff"`` for .tif / .tiff."""
    name = str(path).rstrip("/\\").lower()
    if name.endswith(".zarr") or (Path(path) / ".zgroup").is_file():
        return "zarr"
    if name.endswith((".tif", ".tiff")):
        return "tiff"
    raise InvalidInputError(
        f"labels file {str(path)!r} must end in .ome.zarr, .zarr, .tif or .tiff (the extension "
        "chooses the format)")


@dataclass
class LabelsGeometry:
    """Shape and physical placement of a labels array (one entry per axis of ``axes``)."""

    shape: tuple[int, ...]
    axes: str
    scale: list[float] = field(default_factory=list)
    translate: list[float] = field(default_factory=list)
    units: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.shape)
        if len(self.axes) != n:
            raise InvalidInputError(f"axes {self.axes!r} do not fit a labels shape {self.shape}")
        self.shape = tuple(int(s) for s in self.shape)
        self.scale = [float(s) for s in (self.scale or [1.0] * n)]
        self.translate = [float(t) for t in (self.translate or [0.0] * n)]
        self.units = list(self.units or [None] * n)

    @classmethod
    def of_stack(cls, stack: Any) -> "LabelsGeometry":
        """One channel's geometry of a :class:`~napari_sam.Stack` (its slice axes, Y, X)."""
        axes = stack.slice_axes + "YX"
        pick = [stack.axes.index(a) for a in axes]
        return cls(tuple(stack.shape[i] for i in pick), axes, [stack.scale[i] for i in pick],
                   [getattr(stack, "translate", (0.0,) * len(stack.axes))[i] for i in pick],
                   [stack.units[i] for i in pick])


def ngff_labels_attrs(geo: LabelsGeometry, *, name: str, source: str | None = None) -> dict:
    """NGFF 0.4 ``multiscales`` + ``image-label`` attributes, built by ome-zarr-models."""
    from ome_zarr_models.v04.axes import Axis
    from ome_zarr_models.v04.image_label import ImageLabelAttrs, Label
    from ome_zarr_models.v04.multiscales import Dataset, Multiscale

    axes = []
    for a, u in zip(geo.axes, geo.units):
        unit = _UNITS.get(str(u), None) if u else None
        kind = _AXIS_TYPES.get(a)
        axes.append(Axis(name=a.lower(), type=kind, unit=unit if kind in ("space", "time") else None))
    translation = geo.translate if any(geo.translate) else None
    multiscale = Multiscale(axes=axes, version="0.4", name=name,
                            datasets=[Dataset.build(path="0", scale=geo.scale,
                                                    translation=translation)])
    label = Label(version="0.4", source={"image": source} if source else None)
    attrs = ImageLabelAttrs(image_label=label, multiscales=[multiscale])
    return attrs.model_dump(by_alias=True, exclude_none=True, mode="json")


def _is_ngff_image(path: Path) -> bool:
    try:
        attrs = json.loads((path / ".zattrs").read_text())
    except (OSError, ValueError):
        try:
            attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
            attrs = attrs.get("ome", attrs)
        except (OSError, ValueError):
            return False
    return "multiscales" in attrs and "image-label" not in attrs


def labels_group_path(target: str | os.PathLike, name: str = "napari-sam") -> Path:
    """Where labels for ``target`` go: ``target`` itself, or ``target/labels/<name>`` when
    ``target`` is an existing OME-Zarr image."""
    target = Path(target)
    if target.is_dir() and _is_ngff_image(target):
        return target / "labels" / name
    return target


def create_zarr_labels(path: str | os.PathLike, geo: LabelsGeometry, *, record: dict,
                       name: str | None = None, dtype: str = "uint32", source: str | None = None):
    """Create (or reopen, when it exists with our record) OME-Zarr labels; returns the array.

    ``path`` may be an OME-Zarr image: the labels then go to ``labels/<name>`` inside it.
    """
    import zarr

    from .zarr_logging import quiet_sibling_write_errors

    quiet_sibling_write_errors()
    target = Path(path)
    group_path = labels_group_path(target, name or "napari-sam")
    name = name or group_path.name.split(".")[0] or "labels"
    root = zarr.open_group(group_path, mode="a", zarr_format=2)
    if "0" not in root:
        chunks = (1,) * (len(geo.shape) - 2) + geo.shape[-2:]
        root.create_array("0", shape=geo.shape, chunks=chunks, dtype=dtype, fill_value=0,
                          chunk_key_encoding={"name": "v2", "separator": "/"})
    if "multiscales" not in root.attrs:
        root.attrs.update(ngff_labels_attrs(geo, name=name, source=source))
    if "napari_sam" not in root.attrs:
        root.attrs["napari_sam"] = {"kind": LABELS_KIND, "version": FORMAT_VERSION, "max_id": 0,
                                    **record}
    if group_path.parent.name == "labels" and _is_ngff_image(group_path.parent.parent):
        # inside an OME-Zarr image: listed in its labels group, as NGFF asks
        labels = zarr.open_group(group_path.parent, mode="a", zarr_format=2)
        listed = list(labels.attrs.get("labels", []))
        if name not in listed:
            labels.attrs["labels"] = [*listed, name]
    return root["0"]


def read_record(path: str | os.PathLike) -> dict | None:
    """Our record of a labels file (zarr attrs or TIFF tag), or None if it is not ours."""
    path = Path(path)
    meta = None
    if labels_format(path) == "zarr":
        import zarr

        try:
            meta = zarr.open_group(path, mode="r").attrs.get("napari_sam")
        except Exception:  # noqa: BLE001 - any unreadable folder is simply not one of ours
            return None
    else:
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                tag = tif.pages[0].tags.get(TIFF_TAG)
                meta = json.loads(tag.value) if tag is not None else None
        except Exception:  # noqa: BLE001 - any unreadable TIFF is simply not one of ours
            return None
    return meta if isinstance(meta, dict) and meta.get("kind") in _KINDS else None


def update_record(path: str | os.PathLike, **changes: Any) -> dict:
    """Change fields of an OME-Zarr labels file's record (one small metadata write)."""
    import zarr

    root = zarr.open_group(labels_group_path(path), mode="a")
    meta = {**dict(root.attrs.get("napari_sam", {})), **changes}
    root.attrs["napari_sam"] = meta
    return meta


def is_labels(path: str | os.PathLike) -> bool:
    """True for our labels files and for any NGFF ``image-label`` group."""
    path = Path(path)
    try:
        fmt = labels_format(path)
    except InvalidInputError:
        return False
    if read_record(path) is not None:
        return True
    if fmt == "zarr" and path.is_dir():
        try:
            attrs = json.loads((path / ".zattrs").read_text())
        except (OSError, ValueError):
            return False
        return "image-label" in attrs
    return False


def write_ome_tiff(path: str | os.PathLike, pages: Iterable[np.ndarray] | np.ndarray,
                   geo: LabelsGeometry, *, record: dict, dtype: Any = np.uint32) -> None:
    """Write labels as OME-TIFF with physical pixel sizes (atomically: temp file, rename)."""
    import tifffile

    path = Path(path)
    if path.is_dir():
        raise InvalidInputError(f"{str(path)!r} is a folder; refusing to replace it with a TIFF")
    meta: dict[str, Any] = {"axes": geo.axes}
    ome = set(geo.axes) <= set("TZCYX")
    if ome:
        for a, s, u in zip(geo.axes, geo.scale, geo.units):
            if a in "ZYX":
                meta[f"PhysicalSize{a}"] = s
                meta[f"PhysicalSize{a}Unit"] = "µm" if u in (None, "µm", "micrometer") else u
    full = {"kind": LABELS_KIND, "version": FORMAT_VERSION, "translate": geo.translate,
            "scale": geo.scale, **record}
    tmp = path.with_name(path.name + ".tmp")
    data = pages if isinstance(pages, np.ndarray) else None
    kwargs: dict[str, Any] = {} if data is not None else {"shape": geo.shape, "dtype": dtype}
    tifffile.imwrite(tmp, data=pages if data is None else data, ome=ome, metadata=meta,
                     compression="zlib", photometric="minisblack",
                     extratags=[(TIFF_TAG, "s", 0, json.dumps(full, default=str), True)], **kwargs)
    os.replace(tmp, path)


def open_labels(path: str | os.PathLike) -> tuple[Any, dict]:
    """Open a labels file lazily (OME-Zarr) or whole (TIFF).

    Returns
    -------
    data : zarr.Array or numpy.ndarray
    meta : dict
        ``scale``, ``translate``, ``axis_labels`` and ``name`` (napari layer kwargs).
    """
    path = Path(path)
    if labels_format(path) == "zarr":
        import zarr

        group = zarr.open_group(labels_group_path(path), mode="r")
        ms = dict(group.attrs)["multiscales"][0]
        ds = ms["datasets"][0]
        meta: dict[str, Any] = {"axis_labels": tuple(
            a["name"] if isinstance(a, dict) else a for a in ms["axes"])}
        for t in ds.get("coordinateTransformations", []):
            if t.get("type") == "scale":
                meta["scale"] = tuple(t["scale"])
            elif t.get("type") == "translation":
                meta["translate"] = tuple(t["translation"])
        meta["name"] = ms.get("name") or path.name.split(".")[0]
        return group[ds["path"]], meta
    import tifffile

    data = tifffile.imread(path)
    record = read_record(path) or {}
    meta = {"name": path.name.split(".")[0]}
    if record.get("scale") and len(record["scale"]) == data.ndim:
        meta["scale"] = tuple(record["scale"])
        meta["translate"] = tuple(record.get("translate") or [0.0] * data.ndim)
    else:
        with tifffile.TiffFile(path) as tif:
            axes = tif.series[0].axes
            ome = tif.ome_metadata
        if ome and axes.endswith("YX"):
            import re

            scale = [1.0] * data.ndim
            for k, a in enumerate(axes[-data.ndim:]):
                m = re.search(rf'PhysicalSize{a}="([0-9.eE+-]+)"', ome)
                if m and a in "ZYX":
                    scale[k] = float(m.group(1))
            meta["scale"] = tuple(scale)
    return data, meta
