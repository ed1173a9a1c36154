"""Reading prompts from napari's own CSV exports (File > Save Selected Layers... > .csv).

Conventions
-----------
Coordinates are the layer's **data (pixel) coordinates** of the image, as napari writes
them: the last two ``axis-*`` columns are (y, x) in the slice, the leading ones the slice
position along the stack's slice axes (e.g. ``axis-0`` = z for a ZYX stack, ``axis-0, axis-1``
= t, z for TZYX). Positions are rounded to the nearest slice. With ``scale=`` (the CLI's
``--scale-prompts``) the coordinates are world coordinates and are divided by the
stack's pixel size first.

Points layer CSV (``index, axis-0, ..., axis-(D-1), <feature columns>``):

* polarity: a ``label`` column (1 positive / 0 negative) or a ``positive`` column
  (True/False, 1/0); default positive;
* grouping: an ``object`` or ``object_id`` column groups points into one object (all its
  points must be on one slice). Without it, every positive point is its own object, and
  the negative points of a slice apply to every object on that slice.

Shapes layer CSV (``index, shape-type, vertex-index, axis-0, ...``): every rectangle is one
object prompted by a box, the bounding box of its vertices. Other shape types are refused.

Objects are numbered 1, 2, ... in the order they first appear in the files (files in the
order given, rows in file order); this number is the object's label id in the output, so
ids never depend on how the work was scheduled.
"""

from __future__ import annotations

import csv
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .._errors import InvalidInputError
from .._hashing import json_digest

__all__ = ["ObjectPrompt", "read_prompts", "write_points_csv", "prompts_digest"]

_TRUE = {"1", "1.0", "true", "t", "yes", "y", "positive", "+"}
_FALSE = {"0", "0.0", "false", "f", "no", "n", "negative", "-"}


@dataclass
class ObjectPrompt:
    """Prompts of one object on one slice.

    Attributes
    ----------
    index : int
        Slice index in the stack (see :meth:`napari_sam.Stack.index`).
    points : numpy.ndarray, shape (N, 2)
        (y, x) pixel coordinates (may be empty).
    point_labels : numpy.ndarray, shape (N,)
        1 positive, 0 negative.
    box : numpy.ndarray, shape (4,) or None
        (y0, x0, y1, x1).
    name : str
        Where it came from (file and object), for messages.
    """

    index: int
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    point_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    box: np.ndarray | None = None
    name: str = ""

    def as_dict(self) -> dict:
        return {"index": int(self.index), "points": np.asarray(self.points, float).tolist(),
                "point_labels": np.asarray(self.point_labels, int).tolist(),
                "box": None if self.box is None else np.asarray(self.box, float).tolist()}


def prompts_digest(objects: Sequence[ObjectPrompt]) -> str:
    """A stable hash of the prompts (for job signatures)."""
    return json_digest([o.as_dict() for o in objects])


def _bool(value: str, where: str) -> int:
    v = value.strip().lower()
    if v in _TRUE:
        return 1
    if v in _FALSE:
        return 0
    raise InvalidInputError(f"{where}: polarity value {value!r} is not one of 1/0, True/False")


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    return header, rows


def _axis_columns(header: list[str], path: Path) -> list[str]:
    axes = sorted((h for h in header if h.startswith("axis-")), key=lambda h: int(h[5:]))
    if len(axes) < 2 or axes != [f"axis-{i}" for i in range(len(axes))]:
        raise InvalidInputError(
            f"prompts file {str(path)!r} has columns {header}; expected napari's CSV export "
            "with columns axis-0, axis-1, ... (the last two are y, x)"
        )
    return axes


class _Locator:
    """Maps CSV coordinates to (slice index, y, x) of a stack."""

    def __init__(self, stack, scale: bool) -> None:
        self.stack = stack
        self.n_lead = len(stack.slice_axes)
        order = list(stack.slice_axes) + ["Y", "X"]
        self.scale = (np.array([stack.scale[stack.axes.index(a)] for a in order], float)
                      if scale else np.ones(len(order)))

    def locate(self, coords: np.ndarray, where: str) -> tuple[int, float, float]:
        n = self.n_lead + 2
        if coords.shape[0] != n:
            raise InvalidInputError(
                f"{where}: {coords.shape[0]} coordinates, but the stack (axes "
                f"{self.stack.axes!r}) needs {n}: its slice axes {self.stack.slice_axes!r} "
                "then y, x"
            )
        c = coords / self.scale
        pos = [int(round(v)) for v in c[: self.n_lead]]
        try:
            index = self.stack.index(pos)
        except IndexError:
            raise InvalidInputError(
                f"{where}: slice position {pos} is outside the stack (slice axes "
                f"{self.stack.slice_axes!r}, shape {self.stack.shape})"
            ) from None
        return index, float(c[-2]), float(c[-1])


def _floats(row: dict[str, str], cols: list[str], where: str) -> np.ndarray:
    try:
        return np.array([float(row[c]) for c in cols])
    except ValueError:
        raise InvalidInputError(f"{where}: coordinates {[row[c] for c in cols]} are not numbers") from None


def _read_points(path: Path, header, rows, loc: _Locator) -> list[ObjectPrompt]:
    cols = _axis_columns(header, path)
    pol = "label" if "label" in header else ("positive" if "positive" in header else None)
    obj_col = "object" if "object" in header else ("object_id" if "object_id" in header else None)
    parsed = []
    for r, row in enumerate(rows, start=2):
        where = f"{path.name} line {r}"
        index, y, x = loc.locate(_floats(row, cols, where), where)
        label = 1 if pol is None or row.get(pol, "") == "" else _bool(row[pol], where)
        parsed.append((index, y, x, label, row.get(obj_col) if obj_col else None, where))
    objects: list[ObjectPrompt] = []
    if obj_col:
        groups: OrderedDict[str, list] = OrderedDict()
        for p in parsed:
            groups.setdefault(p[4], []).append(p)
        for key, pts in groups.items():
            slices = {p[0] for p in pts}
            if len(slices) > 1:
                raise InvalidInputError(
                    f"{path.name}: object {key!r} has points on slices {sorted(slices)}; the "
                    "points of one object must be on one slice"
                )
            if not any(p[3] for p in pts):
                raise InvalidInputError(f"{path.name}: object {key!r} has no positive point")
            objects.append(ObjectPrompt(pts[0][0], np.array([[p[1], p[2]] for p in pts]),
                                        np.array([p[3] for p in pts], np.int64),
                                        name=f"{path.name} object {key}"))
        return objects
    negatives: dict[int, list] = {}
    for p in parsed:
        if not p[3]:
            negatives.setdefault(p[0], []).append(p)
    for p in parsed:
        if p[3]:
            neg = negatives.get(p[0], [])
            objects.append(ObjectPrompt(
                p[0], np.array([[p[1], p[2]]] + [[n[1], n[2]] for n in neg]),
                np.array([1] + [0] * len(neg), np.int64), name=p[5]))
    return objects


def _read_shapes(path: Path, header, rows, loc: _Locator) -> list[ObjectPrompt]:
    cols = _axis_columns(header, path)
    shapes: OrderedDict[str, list] = OrderedDict()
    for r, row in enumerate(rows, start=2):
        shapes.setdefault(row["index"], []).append((r, row))
    objects = []
    for key, verts in shapes.items():
        where = f"{path.name} shape {key} (line {verts[0][0]})"
        kind = verts[0][1].get("shape-type", "").lower()
        if kind != "rectangle":
            raise InvalidInputError(
                f"{where} is a {kind!r}; only rectangles are used as prompts (boxes)"
            )
        located = [loc.locate(_floats(row, cols, where), where) for _, row in verts]
        if len({v[0] for v in located}) > 1:
            raise InvalidInputError(f"{where}: its vertices lie on different slices")
        ys = [v[1] for v in located]
        xs = [v[2] for v in located]
        objects.append(ObjectPrompt(located[0][0], box=np.array([min(ys), min(xs), max(ys), max(xs)]),
                                    name=where))
    return objects


def read_prompts(paths: str | Path | Sequence[str | Path], stack, *, scale: bool = False
                 ) -> list[ObjectPrompt]:
    """Read napari Points / Shapes CSV exports as one prompt set per object.

    Parameters
    ----------
    paths : path or sequence of paths
        CSV files written by napari (points or shapes layers; told apart by their columns).
    stack : Stack
        The stack the prompts belong to (for the slice position and bounds).
    scale : bool
        Coordinates are world coordinates: divide by the stack's scale first.

    Returns
    -------
    list of ObjectPrompt
        In object-id order: object ``k`` of the list gets label id ``k + 1``.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    loc = _Locator(stack, scale)
    objects: list[ObjectPrompt] = []
    for p in paths:
        path = Path(p)
        header, rows = _read_rows(path)
        if {"shape-type", "vertex-index"} <= set(header):
            objects += _read_shapes(path, header, rows, loc)
        else:
            objects += _read_points(path, header, rows, loc)
    return objects


def write_points_csv(path: str | Path, coords: np.ndarray, *, labels: Sequence[int] | None = None
                     ) -> Path:
    """Write points (N, D) as napari does (``index, axis-0.., label``)."""
    coords = np.asarray(coords, float)
    path = Path(path)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index"] + [f"axis-{i}" for i in range(coords.shape[1])] + ["label"])
        for i, c in enumerate(coords):
            lab = 1 if labels is None else int(labels[i])
            w.writerow([i, *[repr(float(v)) for v in c], lab])
    return path
