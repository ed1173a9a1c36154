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
per slice for all objects that are on that slice. Automatic segmentation and the 3D merge
of per-slice objects are in :mod:`napari_sam._auto` and re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ._auto import SliceLinker, auto_segment_slice, decode_raw, merge_slices
from ._errors import InvalidInputError

if TYPE_CHECKING:  # pragma: no cover
    from .segment import Segmenter

__all__ = ["Seed", "SliceStep", "PropagationResult", "propagate", "propagate_many",
           "z_line", "auto_segment_slice", "merge_slices", "SliceLinker", "STRATEGIES", "DEFAULT_STRATEGY"]

STRATEGIES = ("box", "points", "mask")
DEFAULT_STRATEGY = "box"
_MASK_LOGIT = float(np.log((1 - 1e-3) / 1e-3))  # +-6.9: a binary mask as SAM logits


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


def z_line(stack, index: int) -> tuple[list[int], int]:
    """Slice indices along Z through slice ``index`` (other slice axes fixed), and the
    position of ``index`` on that line. Uses the last slice axis when there is no Z."""
    axes = stack.slice_axes
    if not axes:
        return [0], 0
    pos = list(stack.position(index))
    k = axes.index("Z") if "Z" in axes else len(axes) - 1
    n = stack.shape[stack.axes.index(axes[k])]
    line = []
    for z in range(n):
        pos[k] = z
        line.append(stack.index(pos))
    return line, int(stack.position(index)[k])


# ------------------------------------------------------------------ prompt derivation
def _bbox(mask: np.ndarray) -> np.ndarray:
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


def mask_to_logits(mask: np.ndarray, image_size: int = 1024) -> np.ndarray:
    """A binary (Y, X) mask as SAM ``mask_input`` logits (256, 256) in SAM's padded frame."""
    import torch
    import torch.nn.functional as F

    h, w = mask.shape
    s = image_size / max(h, w)
    nh, nw = int(h * s + 0.5), int(w * s + 0.5)
    m = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    m = F.interpolate(m, (nh, nw), mode="bilinear", align_corners=False)
    m = F.pad(m, (0, image_size - nw, 0, image_size - nh))
    m = F.interpolate(m, (image_size // 4, image_size // 4), mode="area")[0, 0].numpy()
    return np.where(m > 0.5, _MASK_LOGIT, -_MASK_LOGIT).astype(np.float32)


def _prompt(strategy: str, prev_mask: np.ndarray, prev_logits: np.ndarray | None, size: int):
    """Prompts for the next slice from the previous accepted mask."""
    if strategy == "box":
        return {"box": _bbox(prev_mask)}
    if strategy == "points":
        pts = interior_points(prev_mask)
        return {"points": pts, "point_labels": np.ones(len(pts), np.int64)}
    logits = prev_logits if prev_logits is not None else mask_to_logits(prev_mask, size)
    return {"box": _bbox(prev_mask), "mask_input": logits}


# ------------------------------------------------------------------ decoding
def decode_batch(seg: "Segmenter", index: int, prompts: list[dict], *, multimask: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Several objects' prompts on one slice in ONE decoder call.

    ``prompts`` as :func:`napari_sam._auto.decode_raw`. Returns the best mask of each
    object (B, Y, X) bool, its predicted IoU (B,), and its logits (B, 256, 256).
    """
    emb = seg.embedding(index)
    low, iou = decode_raw(seg, emb, prompts, multimask=multimask)
    best = iou.argmax(axis=1)
    rows = np.arange(len(prompts))
    logits, scores = low[rows, best], iou[rows, best]
    return seg._upsample(emb, logits), scores, logits


def _multimask(p: dict) -> bool:
    """SAM's advice: three candidates for a lone click, one mask for anything richer."""
    n = len(p["points"]) if p.get("points") is not None else 0
    return p.get("box") is None and p.get("mask_input") is None and n <= 1


def _predict(seg, index: int, prompts: list[dict], batch: bool):
    """(mask, score, logits) for each prompt dict; batched or one ``seg.predict`` each."""
    if batch and len(prompts) > 1:
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(prompts):  # one call per kind of prompt (and point count)
            n = len(p["points"]) if p.get("points") is not None else 0
            key = (tuple(sorted(k for k, v in p.items() if v is not None)), n)
            groups.setdefault(key, []).append(i)
        out: list[Any] = [None] * len(prompts)
        for idx in groups.values():
            m, s, lg = decode_batch(seg, index, [prompts[i] for i in idx],
                                    multimask=_multimask(prompts[idx[0]]))
            for j, i in enumerate(idx):
                out[i] = (m[j], float(s[j]), lg[j])
        return out
    out = []
    for p in prompts:
        pred = seg.predict(index, multimask=_multimask(p), **p)
        out.append((np.asarray(pred.mask, bool), float(pred.scores[pred.best]),
                    pred.logits[pred.best]))
    return out


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
    batch: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> list[PropagationResult]:
    """Propagate several objects through their Z lines, slice by slice, together.

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
    batch : bool
        One decoder call per slice for all objects on it (else one ``seg.predict`` each).
    progress : callable(done, total), optional
        Called after each round; ``total`` is an upper bound (slices left on every front).

    Returns
    -------
    list of PropagationResult, in the order of ``seeds``.
    """
    if strategy not in STRATEGIES:
        raise InvalidInputError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    shape = seg.stack.slice_shape
    size = seg.model.architecture.image_size
    tracks: list[_Track] = []
    seed_prompts: dict[int, list[tuple[int, dict]]] = {}
    for k, s in enumerate(seeds):
        line, z0 = z_line(seg.stack, int(s.index))
        res = PropagationResult(np.zeros((len(line), *shape), bool), line, z0)
        tracks.append(_Track(res, line, {}))
        if s.mask is not None:
            m = np.asarray(s.mask, bool)
            if m.shape != tuple(shape):
                raise InvalidInputError(f"seed {k}: mask of shape {m.shape}, expected {shape}")
            seed_prompts.setdefault(-1, []).append((k, {"_mask": m}))
        else:
            p = {"points": s.points, "point_labels": s.point_labels, "box": s.box}
            if p["points"] is not None:
                p["points"] = np.asarray(p["points"], float).reshape(-1, 2)
                p["point_labels"] = (np.ones(len(p["points"]), np.int64) if s.point_labels is None
                                     else np.asarray(s.point_labels, np.int64))
            seed_prompts.setdefault(int(s.index), []).append((k, {a: v for a, v in p.items()
                                                                  if v is not None}))
    # seed slices
    for index, items in sorted(seed_prompts.items()):
        if index == -1:
            outs = [(it[1]["_mask"], 1.0, None) for it in items]
        else:
            outs = _predict(seg, index, [it[1] for it in items], batch)
        for (k, _), (mask, score, logits) in zip(items, outs):
            t = tracks[k]
            z0 = t.result.seed_z
            ok = bool(mask.any())
            t.result.steps.append(SliceStep(z0, t.line[z0], score, 1.0, int(mask.sum()), ok))
            if not ok:
                t.result.stop = {"down": "empty", "up": "empty"}
                continue
            t.result.mask[z0] = mask
            for d, name in ((-1, "down"), (1, "up")):
                t.fronts[d] = (z0, mask, logits, 0)
    limit = max_slices if max_slices is not None else 10**9
    done = 0
    while True:
        todo: dict[int, list[tuple[int, int, dict]]] = {}
        for k, t in enumerate(tracks):
            for d in list(t.fronts):
                z, prev, logits, count = t.fronts[d]
                name = "down" if d < 0 else "up"
                nz = z + d
                if not 0 <= nz < len(t.line):
                    t.result.stop[name] = "end"
                    del t.fronts[d]
                elif count >= limit:
                    t.result.stop[name] = "max_slices"
                    del t.fronts[d]
                else:
                    todo.setdefault(t.line[nz], []).append((k, d, _prompt(strategy, prev, logits, size)))
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
                t.result.steps.append(SliceStep(nz, index, score, overlap, int(mask.sum()), reason is None))
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
