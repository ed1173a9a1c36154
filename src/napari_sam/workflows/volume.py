"""Following objects through a volume: propagation from one slice to its neighbours.

:func:`propagate` starts from a mask or prompts on one slice and walks along the stack's
Z axis (the ``Z`` slice axis, else the last slice axis; other slice axes such as ``T`` stay
fixed) in both directions. On every new slice the prompt comes from the previous slice's
accepted mask, by ``strategy``:

``"box"``     the bounding box of the previous mask (the default: best on the benchmark,
              see ``benchmarks/bench_propagation.py``, and one batched call for many objects);
``"points"``  up to three interior points of the previous mask, picked on its distance
              transform (the deepest point first);
``"mask"``    the previous prediction's low-resolution logits as ``mask_input``, plus its
              bounding box.

A direction stops at the first slice whose mask is empty (``"empty"``), whose predicted IoU
is below ``min_score`` (``"score"``), or whose IoU with the previous slice's mask is below
``min_iou`` (``"overlap"``); the rejected slice is recorded but not part of the result. It
also stops at the end of the stack (``"end"``) or after ``max_slices`` (``"max_slices"``).

:func:`propagate_many` advances several objects together, with one batched decoder call
per slice for all objects that are on that slice (:meth:`napari_sam.Segmenter.predict_many`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .._errors import InvalidInputError
from ..engine.prompt import Prompt

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.segment import Segmenter

__all__ = ["DEFAULT_STRATEGY", "STRATEGIES", "PropagationResult", "Seed", "SliceStep", "mask_box",
           "interior_points", "propagate", "propagate_many", "z_line"]

STRATEGIES = ("box", "points", "mask")
DEFAULT_STRATEGY = "box"


@dataclass
class Seed:
    """Where an object starts: a mask, or prompts, on slice ``index``.

    Exactly one of ``mask`` or (``points`` and/or ``box``) is used; a mask wins.
    """

    index: int
    mask: np.ndarray | None = None
    points: Any = None
    point_labels: Any = None
    box: Any = None


@dataclass
class SliceStep:
    """One visited slice: ``z`` along the line, its predicted IoU, IoU with the previous
    accepted mask (1.0 on the seed slice), area, and whether it was accepted."""

    z: int
    index: int
    score: float
    overlap: float
    area: int
    accepted: bool


@dataclass
class PropagationResult:
    """An object followed through the slices of one Z line.

    Attributes
    ----------
    mask : numpy.ndarray of bool, shape (Z, Y, X)
        The object on every slice of the line (False off the accepted slices).
    indices : list of int
        Stack slice index of each z.
    seed_z : int
        Position of the seed slice on the line.
    steps : list of SliceStep
        Every slice visited, in visiting order (accepted or not).
    stop : dict
        Why each direction stopped: ``{"down": reason, "up": reason}``.
    """

    mask: np.ndarray
    indices: list[int]
    seed_z: int
    steps: list[SliceStep] = field(default_factory=list)
    stop: dict[str, str] = field(default_factory=dict)

    @property
    def accepted(self) -> list[int]:
        """Sorted z of the slices that are part of the object."""
        return sorted(s.z for s in self.steps if s.accepted)

    @property
    def visited(self) -> list[int]:
        """Sorted z of every slice a prediction was made on."""
        return sorted(s.z for s in self.steps)


def z_line(stack, index: int, axis: int | str | None = None) -> tuple[list[int], int]:
    """Slice indices along one slice axis through slice ``index`` (the other slice axes
    fixed), and the position of ``index`` on that line.

    ``axis``: a letter of ``stack.slice_axes`` ("Z", "T"), a position in it, or None for
    Z (the last slice axis when there is no Z).
    """
    axes = stack.slice_axes
    if not axes:
        return [0], 0
    pos = list(stack.position(index))
    if axis is None:
        k = axes.index("Z") if "Z" in axes else len(axes) - 1
    elif isinstance(axis, str):
        if axis not in axes:
            raise InvalidInputError(f"axis {axis!r} is not a slice axis of this stack "
                                    f"(slice axes {axes!r})")
        k = axes.index(axis)
    else:
        k = int(axis)
        if not 0 <= k < len(axes):
            raise InvalidInputError(f"axis {axis} is out of range for slice axes {axes!r}")
    n = stack.shape[stack.axes.index(axes[k])]
    line = []
    for z in range(n):
        pos[k] = z
        line.append(stack.index(pos))
    return line, int(stack.position(index)[k])


# ------------------------------------------------------------------ prompt derivation
def mask_box(mask: np.ndarray) -> np.ndarray:
    """The box (y0, x0, y1, x1) around a non-empty 2D mask, as SAM's box prompt (float)."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return np.array([ys[0], xs[0], ys[-1] + 1, xs[-1] + 1], float)


def interior_points(mask: np.ndarray, k: int = 3) -> np.ndarray:
    """Up to ``k`` well-separated interior points (y, x) of ``mask``, deepest first."""
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    top = dist.max()
    yy, xx = np.indices(mask.shape)
    pts = []
    d = dist.copy()
    for _ in range(k):
        i = int(np.argmax(d))
        y, x = divmod(i, mask.shape[1])
        if d[y, x] <= 0 or (pts and d[y, x] < 0.5 * top):
            break
        pts.append((float(y), float(x)))
        d[(yy - y) ** 2 + (xx - x) ** 2 <= max(top, 1.0) ** 2] = 0
    return np.array(pts, float).reshape(-1, 2)


def _prompt(strategy: str, prev_mask: np.ndarray, prev_logits: np.ndarray | None,
            seg: "Segmenter", index: int) -> Prompt:
    """The prompt for the next slice from the previous accepted mask."""
    if strategy == "box":
        return Prompt.of(box=mask_box(prev_mask))
    if strategy == "points":
        pts = interior_points(prev_mask)
        return Prompt.of(points=pts, point_labels=np.ones(len(pts), np.int64))
    if prev_logits is None:
        return seg.prompt_from_mask(index, prev_mask)
    return Prompt.of(box=mask_box(prev_mask), mask_input=prev_logits)


# ------------------------------------------------------------------ decoding
def _predict(seg: "Segmenter", index: int, prompts: list[Prompt], batch: bool):
    """(mask, score, logits) per prompt: one batched call, or one call each."""
    if batch:
        preds = seg.predict_many(index, prompts)
    else:
        preds = [seg.predict_many(index, [p])[0] for p in prompts]
    return [(np.asarray(p.mask, bool), p.score, p.logits[p.best]) for p in preds]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 0.0


# ------------------------------------------------------------------ propagation
@dataclass
class _Track:
    result: PropagationResult
    line: list[int]
    fronts: dict[int, tuple]  # direction -> (z, prev mask, prev logits, slices so far)


def propagate_many(
    seg: "Segmenter",
    seeds: Sequence[Seed],
    *,
    strategy: str = DEFAULT_STRATEGY,
    min_score: float = 0.5,
    min_iou: float = 0.3,
    max_slices: int | None = None,
    axis: int | str | None = None,
    limits: tuple[int, int] | None = None,
    batch: bool = True,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[PropagationResult]:
    """Propagate several objects through their lines of slices, slice by slice, together.

    Parameters
    ----------
    seg : Segmenter
    seeds : sequence of Seed
        One per object: a (Y, X) bool mask or prompts on the seed slice.
    strategy : {"box", "points", "mask"}
        How a slice's prompt is derived from the previous slice's mask (module docs).
    min_score : float
        Stop a direction when SAM's predicted IoU falls below this.
    min_iou : float
        Stop a direction when the IoU with the previous slice's mask falls below this.
    max_slices : int, optional
        At most this many slices on each side of the seed.
    axis : str or int, optional
        The slice axis to follow ("Z", "T", or its position in ``stack.slice_axes``);
        default Z (see :func:`z_line`).
    limits : (int, int), optional
        Only positions lo..hi (inclusive) along the axis (a direction stops with
        ``"limit"`` at the edge).
    batch : bool
        One decoder call per slice for all objects on it (else one call each).
    progress : callable(done, total), optional
        Called after each round; ``total`` is an upper bound (slices left on every front).
    should_stop : callable() -> bool, optional
        Polled between rounds; True stops every front (reason ``"cancelled"``).

    Returns
    -------
    list of PropagationResult, in the order of ``seeds``.
    """
    if strategy not in STRATEGIES:
        raise InvalidInputError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    shape = seg.stack.slice_shape
    tracks: list[_Track] = []
    seed_prompts: dict[int, list[tuple[int, Any]]] = {}
    for k, s in enumerate(seeds):
        line, z0 = z_line(seg.stack, int(s.index), axis)
        res = PropagationResult(np.zeros((len(line), *shape), bool), line, z0)
        tracks.append(_Track(res, line, {}))
        if s.mask is not None:
            m = np.asarray(s.mask, bool)
            if m.shape != tuple(shape):
                raise InvalidInputError(f"seed {k}: mask of shape {m.shape}, expected {shape}")
            seed_prompts.setdefault(-1, []).append((k, m))
        else:
            p = Prompt.of(points=s.points, point_labels=s.point_labels, box=s.box)
            seed_prompts.setdefault(int(s.index), []).append((k, p))
    lo, hi = (0, 10**9) if limits is None else (min(limits), max(limits))
    # seed slices
    for index, items in sorted(seed_prompts.items()):
        if index == -1:
            outs = [(m, 1.0, None) for _, m in items]
        else:
            outs = _predict(seg, index, [p for _, p in items], batch)
        for (k, _), (mask, score, logits) in zip(items, outs):
            t = tracks[k]
            z0 = t.result.seed_z
            ok = bool(mask.any())
            t.result.steps.append(SliceStep(z0, t.line[z0], score, 1.0, int(mask.sum()), ok))
            if not ok:
                t.result.stop = {"down": "empty", "up": "empty"}
                continue
            t.result.mask[z0] = mask
            for d in (-1, 1):
                t.fronts[d] = (z0, mask, logits, 0)
    limit = max_slices if max_slices is not None else 10**9
    done = 0
    while True:
        stop = should_stop is not None and should_stop()
        todo: dict[int, list[tuple[int, int, Prompt]]] = {}
        for k, t in enumerate(tracks):
            for d in list(t.fronts):
                z, prev, logits, count = t.fronts[d]
                name = "down" if d < 0 else "up"
                nz = z + d
                reason = ("cancelled" if stop else "end" if not 0 <= nz < len(t.line)
                          else "limit" if not lo <= nz <= hi
                          else "max_slices" if count >= limit else None)
                if reason is not None:
                    t.result.stop[name] = reason
                    del t.fronts[d]
                else:
                    todo.setdefault(t.line[nz], []).append(
                        (k, d, _prompt(strategy, prev, logits, seg, t.line[nz])))
        if not todo:
            break
        for index in sorted(todo):
            items = todo[index]
            outs = _predict(seg, index, [it[2] for it in items], batch)
            for (k, d, _), (mask, score, logits) in zip(items, outs):
                t = tracks[k]
                z, prev, _, count = t.fronts[d]
                nz = z + d
                overlap = _iou(mask, prev)
                reason = ("empty" if not mask.any() else "score" if score < min_score
                          else "overlap" if overlap < min_iou else None)
                t.result.steps.append(SliceStep(nz, index, score, overlap, int(mask.sum()),
                                                reason is None))
                if reason is not None:
                    t.result.stop["down" if d < 0 else "up"] = reason
                    del t.fronts[d]
                else:
                    t.result.mask[nz] = mask
                    t.fronts[d] = (nz, mask, logits, count + 1)
        done += 1
        if progress is not None:
            left = max((len(t.line) for t in tracks), default=0)
            progress(done, done + left)
    return [t.result for t in tracks]


def propagate(
    seg: "Segmenter",
    index: int,
    *,
    mask: np.ndarray | None = None,
    points: Any = None,
    point_labels: Any = None,
    box: Any = None,
    **options: Any,
) -> PropagationResult:
    """Follow one object from slice ``index`` through its neighbours in both directions.

    Give either ``mask`` ((Y, X) bool on slice ``index``) or prompts (``points`` as (y, x),
    ``point_labels``, ``box`` as (y0, x0, y1, x1)), which are segmented first. Options as
    :func:`propagate_many` (``strategy``, ``min_score``, ``min_iou``, ``max_slices``).
    Decoding goes through ``seg.predict`` (one object, nothing to batch).

    Returns
    -------
    PropagationResult
        ``.mask`` is (Z, Y, X) bool along the Z line through ``index``; ``.steps`` and
        ``.stop`` tell which slices were visited and why each direction stopped.
    """
    if mask is None and points is None and box is None:
        raise InvalidInputError("give a seed mask= or prompts (points= and/or box=)")
    options.setdefault("batch", False)
    seed = Seed(index, mask=mask, points=points, point_labels=point_labels, box=box)
    return propagate_many(seg, [seed], **options)[0]
