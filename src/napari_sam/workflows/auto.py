"""Automatic segmentation of a slice from a grid of points, and the 3D merge of slices.

:func:`auto_segment_slice` is SAM's automatic mask generation (``SamAutomaticMaskGenerator``
without crops) run against the slice's cached embedding: a regular grid of single-point
prompts goes through the decoder in batches (never the encoder again), candidates are
kept when their predicted IoU and stability score are high enough, duplicates are removed
by box NMS, and the survivors are painted largest first without overwriting.

:func:`merge_slices` (and :class:`SliceLinker`, its streaming form) links per-slice objects
into 3D objects: an object takes the id of the object on the previous slice it overlaps
best: the one-to-one matching of largest total IoU among pairs with IoU >= ``min_iou``
(:func:`scipy.optimize.linear_sum_assignment` on the IoU table), else a new id. Ids are given in order
of first appearance (slice, then the 2D id), so the result does not depend on scheduling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .._errors import InvalidInputError
from ..engine.prompt import Prompt

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.segment import Segmenter

__all__ = ["AutoMask", "SliceLinker", "auto_masks", "auto_segment_slice", "merge_slices"]


@dataclass
class AutoMask:
    """One mask of the automatic mode: ``crop`` (bool) is the mask inside its inclusive
    ``box`` (x0, y0, x1, y1) of the slice; ``score`` SAM's predicted IoU."""

    crop: np.ndarray
    box: tuple[int, int, int, int]
    score: float
    area: int

    def full(self, shape: tuple[int, int]) -> np.ndarray:
        """The mask at the slice's size."""
        out = np.zeros(shape, bool)
        x0, y0, x1, y1 = self.box
        out[y0:y1 + 1, x0:x1 + 1] = self.crop
        return out


def auto_masks(
    seg: "Segmenter",
    index: int,
    *,
    points_per_side: int = 16,
    points_per_batch: int = 64,
    pred_iou_thresh: float = 0.88,
    stability_score_thresh: float = 0.95,
    stability_score_offset: float = 1.0,
    box_nms_thresh: float = 0.7,
    min_area: int = 1,
    max_area_fraction: float = 1.0,
    min_region_area: int = 0,
) -> list[AutoMask]:
    """The masks of ``segment_anything.SamAutomaticMaskGenerator`` (no crops) on slice
    ``index``, from its cached embedding: the same grid, batches, filters (predicted IoU,
    stability score) and box NMS, in the generator's order; plus ``min_area`` /
    ``max_area_fraction`` (pixels; share of the slice) and ``min_region_area`` (the
    generator's ``min_mask_region_area``, applied to each mask before the NMS).
    """
    import torch
    from segment_anything.utils.amg import batched_mask_to_box, build_point_grid, calculate_stability_score
    from torchvision.ops import batched_nms

    if points_per_side < 1 or points_per_batch < 1:
        raise InvalidInputError("points_per_side and points_per_batch must be >= 1, got "
                                f"{points_per_side} and {points_per_batch}")
    h, w = seg.stack.slice_shape
    emb = seg.embedding(index)
    model = seg.model
    grid = build_point_grid(points_per_side)  # (n, 2) as (x, y) in [0, 1]
    points = grid[:, ::-1] * np.array([h, w])  # (y, x) pixels
    found: list[AutoMask] = []
    for start in range(0, len(points), points_per_batch):
        chunk = points[start:start + points_per_batch]
        # early rejection: prompts with no mask above the threshold are never upscaled
        preds = seg.predict_many(index, [Prompt.of(points=p[None]) for p in chunk], multimask=True,
                                 min_score=pred_iou_thresh)
        low = np.concatenate([p.logits for p in preds])
        iou = np.concatenate([p.scores for p in preds])
        keep = np.flatnonzero(iou > pred_iou_thresh)
        # upsampled four masks at a time: 16 at 1024 x 1024 float32 (64 MB) was fresh,
        # page-faulting memory per group (segment everything with every prompt kept: 3-4 %)
        for s in range(0, len(keep), 4):
            sel = keep[s:s + 4]
            with torch.inference_mode():
                full = model.upsample_logits(emb, low[sel])
                stab = calculate_stability_score(full, model.mask_threshold, stability_score_offset)
                masks = full > model.mask_threshold
                bxs = batched_mask_to_box(masks)  # (x0, y0, x1, y1), inclusive
            for j in np.flatnonzero(stab.numpy() >= stability_score_thresh):
                m = masks[j].numpy()
                if min_region_area > 0:
                    m = _clean(m, min_region_area)
                area = int(m.sum())
                if area < max(min_area, 1) or area > max_area_fraction * h * w:
                    continue
                x0, y0, x1, y1 = (int(v) for v in bxs[j]) if min_region_area <= 0 else _box(m)
                found.append(AutoMask(m[y0:y1 + 1, x0:x1 + 1], (x0, y0, x1, y1),
                                      float(iou[sel[j]]), area))
    if not found:
        return []
    keep = batched_nms(torch.as_tensor([f.box for f in found], dtype=torch.float),
                       torch.as_tensor([f.score for f in found]),
                       torch.zeros(len(found), dtype=torch.int64), box_nms_thresh).numpy()
    return [found[i] for i in keep.tolist()]


def auto_segment_slice(
    seg: "Segmenter",
    index: int,
    *,
    points_per_side: int = 16,
    points_per_batch: int = 64,
    pred_iou_thresh: float = 0.88,
    stability_score_thresh: float = 0.95,
    stability_score_offset: float = 1.0,
    box_nms_thresh: float = 0.7,
    min_area: int = 16,
    max_area_fraction: float = 0.5,
    min_region_area: int = 0,
) -> np.ndarray:
    """Segment everything on slice ``index`` from a grid of points, reusing its embedding.

    The masks of :func:`auto_masks` (parameters as there; ``min_area`` is also the least
    area an object keeps after painting), painted largest first without overwriting.

    Returns
    -------
    numpy.ndarray of uint32, shape (Y, X)
        Object ids 1..n, numbered largest first; 0 background.
    """
    options = dict(points_per_side=points_per_side, points_per_batch=points_per_batch,
                   pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
                   stability_score_offset=stability_score_offset, box_nms_thresh=box_nms_thresh,
                   min_area=min_area, max_area_fraction=max_area_fraction,
                   min_region_area=min_region_area)
    if getattr(seg, "tiles", None) is not None:  # a TiledSegmenter: tile by tile
        return _auto_tiled(seg, index, **options)
    h, w = seg.stack.slice_shape
    labels = np.zeros((h, w), np.uint32)
    next_id = 1
    for f in sorted(auto_masks(seg, index, **options), key=lambda f: (-f.area, -f.score)):
        x0, y0, x1, y1 = f.box
        region = labels[y0:y1 + 1, x0:x1 + 1]
        free = f.crop & (region == 0)
        if free.sum() >= max(min_area, 1):
            region[free] = next_id
            next_id += 1
    return labels


def _clean(mask: np.ndarray, min_region_area: int) -> np.ndarray:
    """SAM's small-region clean-up: fill holes, then drop islands, below the area."""
    from skimage.morphology import remove_small_holes, remove_small_objects

    small = int(min_region_area) - 1  # regions of at most this many pixels go
    return remove_small_objects(remove_small_holes(mask, max_size=small), max_size=small)


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) inclusive, as segment-anything's ``batched_mask_to_box``."""
    ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(ys):
        return 0, 0, 0, 0
    return int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1])


def _auto_tiled(seg, index: int, *, min_area: int, max_area_fraction: float, **kw) -> np.ndarray:
    """Segment everything tile by tile on a large slice; stitch without duplicates.

    An object that touches a tile's edge inside the slice is cut there and skipped: the
    neighbouring tile, which overlaps by ``seg.tiles.overlap`` px, sees it whole (objects
    up to the overlap across). An object mostly (over half) on pixels already labelled by
    an earlier tile is a duplicate and skipped.
    """
    from scipy import ndimage

    tiles = seg.tiles
    h, w = seg.stack.slice_shape
    out = np.zeros((h, w), np.uint32)
    next_id = 1
    for t in tiles.tiles:
        local = auto_segment_slice(seg.inner, tiles.view_index(index, t.index), min_area=min_area,
                                   max_area_fraction=max_area_fraction, **kw)
        inner = (t.y0 > 0, t.x0 > 0, t.y1 < h, t.x1 < w)  # edges inside the slice
        for k, sl in enumerate(ndimage.find_objects(local), start=1):
            if sl is None:
                continue
            ys, xs = sl
            if ((inner[0] and ys.start == 0) or (inner[1] and xs.start == 0)
                    or (inner[2] and ys.stop == t.y1 - t.y0) or (inner[3] and xs.stop == t.x1 - t.x0)):
                continue
            m = local[sl] == k
            region = out[t.y0 + ys.start:t.y0 + ys.stop, t.x0 + xs.start:t.x0 + xs.stop]
            free = m & (region == 0)
            if free.sum() < max(min_area, 1) or free.sum() < 0.5 * m.sum():
                continue
            region[free] = next_id
            next_id += 1
    return out


class SliceLinker:
    """Streaming 3D merge: feed 2D label slices in Z order, get them back with 3D ids.

    Parameters
    ----------
    min_iou : float
        An object joins the previous slice's object it overlaps with IoU >= ``min_iou``.
    start_id : int
        First 3D id handed out.
    """

    def __init__(self, *, min_iou: float = 0.3, start_id: int = 1) -> None:
        if not 0 < min_iou <= 1:
            raise InvalidInputError(f"min_iou must be in (0, 1], got {min_iou}")
        self.min_iou = float(min_iou)
        self.next_id = int(start_id)
        self._prev: np.ndarray | None = None

    def link(self, labels2d: np.ndarray) -> np.ndarray:
        """Relabel one (Y, X) slice; returns a new uint32 array with 3D ids."""
        cur = np.asarray(labels2d)
        if cur.ndim != 2:
            raise InvalidInputError(f"label slices must be 2D (Y, X), got shape {cur.shape}")
        out = np.zeros(cur.shape, np.uint32)
        ids = np.unique(cur[cur > 0])
        mapping: dict[int, int] = {}
        prev = self._prev
        if prev is not None and ids.size and prev.any():
            a, b = cur.ravel().astype(np.int64), prev.ravel().astype(np.int64)
            both = (a > 0) & (b > 0)
            pairs, inter = np.unique(np.stack([a[both], b[both]]), axis=1, return_counts=True)
            area_a = dict(zip(*np.unique(a[a > 0], return_counts=True)))
            area_b = dict(zip(*np.unique(b[b > 0], return_counts=True)))
            # optimal one-to-one matching: the largest total IoU over pairs >= min_iou
            from scipy.optimize import linear_sum_assignment

            a_ids, b_ids = sorted(area_a), sorted(area_b)
            ra = {v: k for k, v in enumerate(a_ids)}
            rb = {v: k for k, v in enumerate(b_ids)}
            table = np.zeros((len(a_ids), len(b_ids)))
            for (ia, ib), n in zip(pairs.T.tolist(), inter.tolist()):
                iou = n / (area_a[ia] + area_b[ib] - n)
                if iou >= self.min_iou:
                    table[ra[ia], rb[ib]] = iou
            rows, cols = linear_sum_assignment(table, maximize=True)
            for r, c in zip(rows.tolist(), cols.tolist()):
                if table[r, c] > 0:
                    mapping[a_ids[r]] = b_ids[c]
        for ia in ids.tolist():
            if ia not in mapping:
                mapping[ia] = self.next_id
                self.next_id += 1
        if ids.size:
            lut = np.zeros(int(ids.max()) + 1, np.uint32)
            for ia, i3 in mapping.items():
                lut[ia] = i3
            pos = cur > 0
            out[pos] = lut[cur[pos]]
        self._prev = out
        return out

    def reset(self) -> None:
        """Start a new Z line (ids keep counting up)."""
        self._prev = None


def merge_slices(slices: np.ndarray, *, min_iou: float = 0.3) -> np.ndarray:
    """Link per-slice 2D objects of a (Z, Y, X) label stack into 3D objects.

    Parameters
    ----------
    slices : array-like of int, shape (Z, Y, X)
        Independent 2D label images (ids need not agree between slices).
    min_iou : float
        Overlap (IoU) with an object on the previous slice needed to share its id.

    Returns
    -------
    numpy.ndarray of uint32, shape (Z, Y, X)
        3D ids 1..n in order of first appearance (slice, then 2D id).
    """
    slices = np.asarray(slices)
    if slices.ndim != 3:
        raise InvalidInputError(f"slices must be (Z, Y, X), got shape {slices.shape}")
    linker = SliceLinker(min_iou=min_iou)
    return np.stack([linker.link(s) for s in slices]) if len(slices) else slices.astype(np.uint32)
