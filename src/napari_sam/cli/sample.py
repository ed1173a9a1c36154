"""The demo of ``segment`` and ``propagate`` without STACK: a generated sample stack,
prompted at every nucleus, and the IoU with its ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["write_sample", "report_sample"]


def write_sample(args) -> tuple[str, list[str], Any]:
    """Write the sample stack, its truth and napari-style prompts next to --out."""
    import numpy as np
    import tifffile
    from scipy import ndimage

    from .._errors import InvalidInputError
    from ..io.prompt_files import write_points_csv
    from ..synthetic import make_nuclei_stack

    if args.prompts:
        raise InvalidInputError("--prompts needs a STACK; without STACK the sample is prompted itself")
    shape = tuple(int(v) for v in args.sample_shape.split(","))
    image, truth = make_nuclei_stack(shape, n_nuclei=args.sample_nuclei)
    folder = Path(args.out).parent
    folder.mkdir(parents=True, exist_ok=True)
    img_path, truth_path = folder / "napari_sam_sample.tif", folder / "napari_sam_sample_truth.tif"
    tifffile.imwrite(img_path, image, metadata={"axes": "ZYX"}, photometric="minisblack")
    tifffile.imwrite(truth_path, truth, metadata={"axes": "ZYX"}, photometric="minisblack")
    coords, ids = [], []
    for gid in np.unique(truth[truth > 0]):
        zs = np.flatnonzero((truth == gid).any(axis=(1, 2)))
        z = int(zs[len(zs) // 2])
        m = truth[z] == gid
        cy, cx = ndimage.center_of_mass(m)
        y, x = int(round(cy)), int(round(cx))
        if not m[y, x]:  # centroid outside a non-convex piece: the deepest pixel instead
            y, x = np.unravel_index(np.argmax(ndimage.distance_transform_edt(m)), m.shape)
        coords.append((z, y, x))
        ids.append(int(gid))
    csv = write_points_csv(folder / "napari_sam_sample_points.csv", np.array(coords, float))
    print(f"sample: {img_path} {image.shape}, truth {truth_path}, {len(ids)} nuclei prompted "
          f"at their centroids ({csv})")
    return str(img_path), [str(csv)], (truth, coords, ids)


def report_sample(out: Path, truth_info, kind: str) -> None:
    import numpy as np

    from ..io.stacks import open_stack

    truth, coords, ids = truth_info
    labels = np.asarray(open_stack(out).data)
    if kind == "segment":  # 2D IoU on each prompted slice
        ious = []
        for k, ((z, _, _), gid) in enumerate(zip(coords, ids), start=1):
            a, b = labels[z] == k, truth[z] == gid
            ious.append((a & b).sum() / max((a | b).sum(), 1))
    else:
        ious = [((labels == k) & (truth == gid)).sum() / max(((labels == k) | (truth == gid)).sum(), 1)
                for k, gid in enumerate(ids, start=1)]
    print(f"mean IoU vs ground truth: {np.mean(ious):.3f} over {len(ious)} objects "
          "(meaningful only with real SAM weights; a random-weight test model gives noise)")


