"""Provenance: how every object of a labels file was made, stored with the labels.

Format ``napari-sam-provenance``, version 1: one JSON record per operation that made
objects, in the order they were made:

========================  =====================================================================
``label_ids``             the ids it made (one for a click or box object, several for a
                          segment-everything run)
``source``                ``"click"``, ``"box"``, ``"prompts"`` (a batch job's prompt file),
                          ``"propagation"`` (of label ``parent``), ``"automatic"``,
                          ``"refinement"`` (of label ``parent``)
``parent``                the label a propagation or refinement started from, else null
``position``              the slice (leading indices of the labels array) where it was made
``steps``                 the prompts in the order given: ``points`` [[y, x], ...] in image
                          pixels, ``point_labels`` (1 positive, 0 negative), ``box``
                          [y0, x0, y1, x1] or null, ``refine`` (the step started from the
                          previous step's logits), ``mask`` (the candidate mask kept)
``params``                the tool's settings (propagation, segment everything, overwrite)
``model``                 name, ``checkpoint_sha256``, and the ``speed`` path
``image``                 path, axes, channel, and ``normalisation`` (contrast limits)
``version``, ``time``     napari-sam's version; ISO time (UTC)
========================  =====================================================================

Where: in an OME-Zarr labels group, a 1D string array ``napari_sam_provenance`` beside the
labels (``attrs``: format and version), appended one row per operation (the row is
written before the array grows to include it, so a killed writer leaves no half row); next
to a TIFF, ``<file>.provenance.jsonl`` (a header line, then one record per line).
:func:`read_provenance` returns the records as a table (pandas).
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any, Iterable

from .._errors import InvalidInputError

__all__ = ["FORMAT", "VERSION", "append_records", "load_records", "read_provenance", "sidecar_path"]

FORMAT = "napari-sam-provenance"
VERSION = 1
ARRAY = "napari_sam_provenance"
_COLUMNS = ["label_ids", "source", "parent", "position", "steps", "params", "model", "image",
            "version", "time"]


def now() -> str:
    """The current UTC time, ISO 8601."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def sidecar_path(tiff: str | os.PathLike) -> Path:
    """``labels.tif`` -> ``labels.tif.provenance.jsonl``."""
    return Path(str(tiff) + ".provenance.jsonl")


def _is_zarr(path: Path) -> bool:
    return str(path).rstrip("/\\").lower().endswith(".zarr") or (path / ".zgroup").is_file()


def append_records(labels: str | os.PathLike, records: Iterable[dict], *,
                   replace: bool = False) -> int:
    """Append records to the provenance of a labels file (``replace``: write them as the
    whole provenance, as a batch job does when it finishes); returns how many it holds."""
    records = [dict(r) for r in records]
    labels = Path(labels)
    blobs = [json.dumps(r, sort_keys=True, default=str) for r in records]
    if _is_zarr(labels):
        import zarr

        group = zarr.open_group(labels, mode="a", zarr_format=2)
        if replace and ARRAY in group:
            del group[ARRAY]
        if ARRAY not in group:
            arr = group.create_array(ARRAY, shape=(0,), chunks=(256,), dtype=str)
            arr.attrs.update({"format": FORMAT, "version": VERSION})
        arr = group[ARRAY]
        n = arr.shape[0]
        if blobs:
            arr.resize((n + len(blobs),))
            arr[n:] = blobs
        return n + len(blobs)
    side = sidecar_path(labels)
    if replace:
        tmp = side.with_name(side.name + ".tmp")
        tmp.write_text("\n".join([json.dumps({"format": FORMAT, "version": VERSION}), *blobs]) + "\n",
                       encoding="utf-8")
        os.replace(tmp, side)
        return len(blobs)
    new = not side.exists()
    with open(side, "a", encoding="utf-8") as f:
        if new:
            f.write(json.dumps({"format": FORMAT, "version": VERSION}) + "\n")
        for blob in blobs:
            f.write(blob + "\n")
        f.flush()
        os.fsync(f.fileno())
    return len(load_records(labels))


def load_records(labels: str | os.PathLike) -> list[dict]:
    """The provenance records of a labels file, oldest first ([] when there are none)."""
    labels = Path(labels)
    if _is_zarr(labels):
        import zarr

        try:
            arr = zarr.open_array(labels / ARRAY, mode="r")
        except Exception:  # noqa: BLE001 - no provenance array: no records
            return []
        if arr.attrs.get("format") != FORMAT:
            raise InvalidInputError(f"{str(labels / ARRAY)!r} is not napari-sam provenance")
        _check_version(arr.attrs.get("version"), labels)
        return [json.loads(str(s)) for s in arr[:].tolist() if s]
    side = sidecar_path(labels)
    if not side.is_file():
        return []
    lines = side.read_text(encoding="utf-8").splitlines()
    head = json.loads(lines[0]) if lines else {}
    if head.get("format") != FORMAT:
        raise InvalidInputError(f"{str(side)!r} is not napari-sam provenance")
    _check_version(head.get("version"), side)
    out = []
    for line in lines[1:]:
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut short by a kill: the operation did not finish
            break
    return out


def _check_version(version: Any, where: Path) -> None:
    if not isinstance(version, int) or version > VERSION:
        raise InvalidInputError(f"provenance at {str(where)!r} has format version {version!r}; "
                                f"this napari-sam reads versions up to {VERSION}: update it")


def read_provenance(labels: str | os.PathLike):
    """How every object of a labels file was made, as a table.

    Parameters
    ----------
    labels : path
        An OME-Zarr labels group or a TIFF written by napari-sam.

    Returns
    -------
    pandas.DataFrame
        One row per object (an operation that made several objects gives several rows),
        in the order they were made: ``label_id``, ``source``, ``parent``, ``position``,
        ``points``, ``point_labels``, ``box`` (the last prompt step), ``n_steps``,
        ``model``, ``checkpoint_sha256``, ``speed``, ``contrast_limits``, ``image``,
        ``params``, ``version``, ``time``, and ``steps`` (every prompt step).
    """
    import pandas as pd

    rows = []
    for r in load_records(labels):
        steps = r.get("steps") or []
        last = steps[-1] if steps else {}
        model = r.get("model") or {}
        image = r.get("image") or {}
        for label_id in r.get("label_ids", []):
            rows.append({
                "label_id": int(label_id), "source": r.get("source"), "parent": r.get("parent"),
                "position": tuple(r.get("position") or ()), "points": last.get("points"),
                "point_labels": last.get("point_labels"), "box": last.get("box"),
                "n_steps": len(steps), "model": model.get("name"),
                "checkpoint_sha256": model.get("checkpoint_sha256"), "speed": model.get("speed"),
                "contrast_limits": (image.get("normalisation") or {}).get("contrast_limits"),
                "image": image.get("path"), "params": r.get("params"),
                "version": r.get("version"), "time": r.get("time"), "steps": steps,
            })
    return pd.DataFrame(rows, columns=["label_id", "source", "parent", "position", "points",
                                       "point_labels", "box", "n_steps", "model",
                                       "checkpoint_sha256", "speed", "contrast_limits", "image",
                                       "params", "version", "time", "steps"])
