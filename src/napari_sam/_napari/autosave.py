"""Labels saved as you go: the widget's labels layer lives in a file, and survives a crash.

For an image read from a file, the widget's "SAM labels" layer is the zarr array of
``cells.labels.ome.zarr`` beside the image (or the image's own ``labels/napari-sam`` group
when it is OME-Zarr; :func:`napari_sam.io.places.labels_file_for`), created at the first
commit. napari paints into zarr arrays: a commit writes only the (Y, X) chunks it touches,
each write atomic, before the next click is taken; the provenance record of the commit and
the largest id follow. The prompts of the object in progress are kept in the file's record
as they change. Reopening the image restores the labels, their provenance and those
prompts. The labels never sit whole in memory (a 1000 x 2048 x 2048 stack stays on disk).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..io.labels_files import LabelsGeometry, create_zarr_labels, read_record, update_record
from ..io.places import labels_file_for
from ..io.provenance import append_records, load_records
from . import sam_layers as L
from .geometry import same_layer

if TYPE_CHECKING:  # pragma: no cover
    from .controller import SamController

__all__ = ["Autosave"]

KEY = "napari_sam_provenance"


class Autosave:
    """The labels file of the widget's image (see the module docs).

    Attributes
    ----------
    enabled : bool
        Save as you go (the widget's setting).
    path : Path or None
        The labels group in use, once opened.
    """

    def __init__(self, ctrl: "SamController") -> None:
        self.ctrl = ctrl
        self.enabled = True
        self.path: Path | None = None
        self.layer: Any = None

    def target(self) -> Path | None:
        """Where the labels of the image in the widget are saved (None: no file image)."""
        settings = self.ctrl.settings()
        if not self.enabled or settings is None or not settings.source_path:
            return None
        return labels_file_for(settings.source_path)

    def active(self, layer: Any) -> bool:
        """True when ``layer`` is the layer saved as you go."""
        return self.path is not None and same_layer(layer, self.layer) and any(
            same_layer(layer, lyr) for lyr in self.ctrl.viewer.layers)

    def open(self, *, create: bool) -> Any:
        """The "SAM labels" layer over the labels file (opened or, with ``create``, made),
        with its provenance and ids; None when there is no file to use."""
        ctrl = self.ctrl
        target = self.target()
        if target is None or (not create and not (target / "0").exists()):
            return None
        geo = ctrl.geometry()
        settings = ctrl.settings()
        image_geo = _labels_geometry(geo)
        arr = create_zarr_labels(target, image_geo, name="napari-sam",
                                 record={"image": settings.source_path})
        if tuple(arr.shape) != geo.labels_shape:
            raise ValueError(f"the labels saved at {str(target)!r} have shape {tuple(arr.shape)}, "
                             f"the image needs {geo.labels_shape}: move that folder away")
        self.path = target
        layer = L.new_labels_layer(ctrl.viewer, geo, data=arr)
        layer.metadata[KEY] = load_records(self.path)
        record = read_record(self.path) or {}
        ctrl.ids.start_from(layer, int(record.get("max_id", 0)) + 1)
        self.layer = layer
        self._restore_prompts(record.get("session") or {})
        return layer

    # ------------------------------------------------------------------ writes
    def records_added(self, records: Sequence[dict]) -> None:
        """A commit or tool run was painted: its records and the largest id reach the file."""
        if self.path is None or not self.active(self.layer):
            return
        append_records(self.path, records)
        top = max(int(i) for r in records for i in r["label_ids"])
        known = (read_record(self.path) or {}).get("max_id", 0)
        update_record(self.path, max_id=max(int(known), top))

    def save_prompts(self) -> None:
        """Keep the prompts of the object in progress in the file's record."""
        if self.path is None or not self.active(self.layer):
            return
        pts = self.ctrl.points_layer(create=False)
        boxes = self.ctrl.boxes_layer(create=False)
        session = {
            "points": [] if pts is None else np.asarray(pts.data).tolist(),
            "positive": [] if pts is None or "positive" not in pts.features else
            [bool(v) for v in pts.features["positive"]],
            "boxes": [] if boxes is None else [np.asarray(v).tolist() for v, kind in
                                               zip(boxes.data, boxes.shape_type)
                                               if kind == "rectangle"],
        }
        update_record(self.path, session=session)

    def _restore_prompts(self, session: dict) -> None:
        pts = self.ctrl.points_layer(create=True)
        if session.get("points") and pts is not None and not len(pts.data):
            data = np.asarray(session["points"], float)
            if data.ndim == 2 and data.shape[1] == pts.ndim:
                pts.add(data)
                positive = session.get("positive") or [True] * len(data)
                pts.features.loc[:, "positive"] = np.asarray(positive[: len(data)], bool)
                pts.refresh_colors()
        boxes = self.ctrl.boxes_layer(create=True)
        if session.get("boxes") and boxes is not None and not len(boxes.data):
            for verts in session["boxes"]:
                v = np.asarray(verts, float)
                if v.ndim == 2 and v.shape[1] == boxes.ndim:
                    boxes.add_rectangles(v)


def _labels_geometry(geo: Any) -> LabelsGeometry:
    """The labels file's geometry: one channel's axes, scale and translate of the image."""
    keep = [a for a in range(geo.ndim) if a != geo.channel_axis]
    letters = [c for c in geo.axes() if c != "C"][: len(keep)]
    layer = geo.layer
    return LabelsGeometry(geo.labels_shape, "".join(letters),
                          [float(layer.scale[a]) for a in keep],
                          [float(layer.translate[a]) for a in keep])
