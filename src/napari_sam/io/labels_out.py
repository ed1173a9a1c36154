"""Outputs of batch jobs: OME-Zarr or TIFF labels, the job's work folder, resumption.

Layout
------
``OUT.ome.zarr`` / ``OUT.zarr``
    NGFF 0.4 labels written by :mod:`.labels_files` (the widget's writer too): ``0`` is a
    uint32 label array of shape (slice axes..., Y, X), one slice per chunk, with the
    input's axes, scale and translation. An OME-Zarr *image* as OUT gets its labels in
    ``labels/napari-sam``. The record ``napari_sam = {"kind": "labels", "job":
    <signature>, "complete": bool, ...}`` says which job wrote it.
``OUT.tif`` / ``OUT.tiff``
    OME-TIFF, written once at the end (a temporary file, then ``os.replace``) from the
    labels array in the work folder.
``OUT.partial.zarr`` (the work folder, removed when the job completes)
    ``done`` (one flag per slice, one chunk each, written after the slice's label chunk),
    the job's intermediates (per-object masks, per-slice automatic labels) and, for TIFF
    outputs, ``labels``. Every chunk write is atomic, so a job killed at any moment and
    started again with the same arguments redoes only unfinished slices.

An existing output (or work folder) that was not written by the same job is never
touched unless ``overwrite=True``: :class:`OutputExistsError`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

from .._errors import NapariSamError
from .labels_files import (
    LabelsGeometry,
    create_zarr_labels,
    labels_format,
    labels_group_path,
    read_record,
    update_record,
    write_ome_tiff,
)

__all__ = ["OutputExistsError", "Output", "output_format"]

output_format = labels_format


class OutputExistsError(NapariSamError, FileExistsError):
    """The output exists and was not written by this job; pass overwrite to replace it."""


def _canon(sig: dict) -> dict:
    return json.loads(json.dumps(sig, sort_keys=True, default=str))


def _rm(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _tiff_meta(path: Path) -> dict | None:
    return read_record(path)


def _group_meta(path: Path) -> dict | None:
    """Our record in a labels group, or in a work folder (zarr v3, same record)."""
    import zarr

    try:
        meta = zarr.open_group(path, mode="r").attrs.get("napari_sam")
    except Exception:  # noqa: BLE001 - any unreadable folder is simply not one of ours
        return None
    return meta if isinstance(meta, dict) and meta.get("kind") in ("labels", "batch-labels") else None


class Output:
    """The output of one job and its work folder.

    Parameters
    ----------
    path : path
        OUT (.ome.zarr, .zarr, .tif, .tiff).
    signature : dict
        What the result depends on; an output with another signature is not resumed.
    shape : tuple
        Label array shape, (slice axes..., Y, X).
    axes : str
        Its axes, e.g. ``"ZYX"``.
    scale, units, translate : sequence
        Per axis of ``axes``.
    overwrite : bool
        Replace an output that this job did not write.
    """

    def __init__(self, path, signature: dict, *, shape: tuple[int, ...], axes: str,
                 scale, units, translate=None, overwrite: bool = False) -> None:
        self.format = output_format(path)
        self.path = labels_group_path(path) if self.format == "zarr" else Path(path)
        self.work = Path(str(self.path).rstrip("/\\") + ".partial.zarr")
        self.signature = _canon(signature)
        self.geometry = LabelsGeometry(tuple(int(s) for s in shape), axes, list(scale),
                                       list(translate or []), list(units))
        self.shape, self.axes = self.geometry.shape, axes
        self.scale, self.units = self.geometry.scale, self.geometry.units
        self.complete = False
        self._prepare(overwrite)

    # ------------------------------------------------------------------ setup
    def _work_meta(self) -> dict | None:
        return _group_meta(self.work) if self.work.exists() else None

    def _refuse(self, path: Path, why: str) -> None:
        raise OutputExistsError(f"{str(path)!r} exists and {why}; pass --overwrite "
                                "(overwrite=True) to replace it, or choose another output")

    def _prepare(self, overwrite: bool) -> None:
        work_meta = self._work_meta()
        same_work = work_meta is not None and work_meta.get("job") == self.signature
        if self.format == "zarr":
            if self.path.exists():
                meta = _group_meta(self.path)
                if meta is not None and meta.get("job") == self.signature:
                    if meta.get("complete"):
                        self.complete = True
                        _rm(self.work)
                        return
                    if not same_work:  # no record of what is done: start over inside it
                        _rm(self.work)
                elif meta is None and same_work:
                    # our own output, interrupted (killed, disk full) while being created,
                    # before its attrs were written: the work folder, created first, has
                    # this job's record. _create() below finishes it.
                    pass
                elif overwrite:
                    _rm(self.path)
                    _rm(self.work)
                elif meta is not None:
                    self._refuse(self.path, "was written by a different napari-sam job "
                                 "(other input, model, prompts or options)")
                else:
                    self._refuse(self.path, "was not written by napari-sam")
            elif self.work.exists():
                _rm(self.work)  # a work folder without its output is useless
        else:
            if self.path.exists():
                meta = _tiff_meta(self.path)
                if meta is not None and meta.get("job") == self.signature:
                    self.complete = True  # done before (or killed before the cleanup)
                    _rm(self.work)
                    return
                if not overwrite:
                    self._refuse(self.path, "was written by a different napari-sam job (other "
                                 "input, model, prompts or options)" if meta is not None
                                 else "was not written by napari-sam")
            if self.work.exists() and not same_work:
                if not overwrite and work_meta is not None:
                    self._refuse(self.work, "holds the unfinished work of a different job")
                _rm(self.work)
        self._create()

    def _create(self) -> None:
        import zarr

        from .zarr_logging import quiet_sibling_write_errors

        quiet_sibling_write_errors()
        work = zarr.open_group(self.work, mode="a", zarr_format=3)
        if "napari_sam" not in work.attrs:
            work.attrs["napari_sam"] = {"kind": "labels", "job": self.signature, "complete": False}
        n = int(np.prod(self.shape[:-2])) if len(self.shape) > 2 else 1
        self.require(work, "done", (n,), (1,), "uint8")
        if self.format == "zarr":
            self._create_ome()
        else:
            self.require(work, "labels", self.shape, (1,) * (len(self.shape) - 2) + self.shape[-2:],
                         "uint32")

    @staticmethod
    def require(group, name: str, shape, chunks, dtype, **kw):
        if name not in group:
            group.create_array(name, shape=tuple(shape), chunks=tuple(chunks), dtype=dtype,
                               fill_value=0, **kw)
        return group[name]

    def _create_ome(self) -> None:
        create_zarr_labels(self.path, self.geometry, name=self.path.name.split(".")[0],
                           record={"job": self.signature, "complete": False})

    # ------------------------------------------------------------------ access
    @property
    def work_group(self):
        import zarr

        return zarr.open_group(self.work, mode="a")

    @property
    def labels_path(self) -> Path:
        return self.path / "0" if self.format == "zarr" else self.work / "labels"

    def done(self) -> np.ndarray:
        """Per-slice done flags (bool)."""
        import zarr

        return np.asarray(zarr.open_array(self.work / "done", mode="r")[:]).astype(bool)

    def finish(self) -> None:
        """Mark the job complete (zarr) or write the TIFF; then drop the work folder."""
        import zarr

        if self.format == "zarr":
            top = int(np.asarray(zarr.open_array(self.labels_path, mode="r")[...]).max()) \
                if np.prod(self.shape) <= 2**28 else None
            update_record(self.path, complete=True, **({} if top is None else {"max_id": top}))
        else:
            self._write_tiff()
            work = zarr.open_group(self.work, mode="a")
            meta = dict(work.attrs["napari_sam"])
            meta["complete"] = True
            work.attrs["napari_sam"] = meta
        _rm(self.work)
        self.complete = True

    def _write_tiff(self) -> None:
        import zarr

        arr = zarr.open_array(self.labels_path, mode="r")
        n = int(np.prod(self.shape[:-2])) if len(self.shape) > 2 else 1

        def pages() -> Iterator[np.ndarray]:
            for i in range(n):
                pos = np.unravel_index(i, self.shape[:-2]) if len(self.shape) > 2 else ()
                yield np.asarray(arr[tuple(int(p) for p in pos)])

        write_ome_tiff(self.path, pages(), self.geometry,
                       record={"job": self.signature, "complete": True})
