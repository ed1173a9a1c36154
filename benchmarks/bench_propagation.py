"""Compare propagation strategies (box, points, mask) on ../shared/data/synthetic3d.

Every ground-truth object of ``mask3d.tif`` is seeded with its own mask on its central
slice and followed through Z with :func:`napari_sam.workflows.volume.propagate_many` (batched). For
each strategy we report the mean per-object 3D IoU against the ground truth, the slices
visited and accepted, why directions stopped, decoder time, and the error in Z extent.

HONEST CAVEAT: without ``--checkpoint`` (no real SAM weights can be downloaded on the build
machines) the model is a tiny SAM with RANDOM weights. Its masks and predicted IoUs are
meaningless, so the IoU columns then say nothing about which strategy segments better;
only the mechanics (slices visited, stopping, speed) are measured. Rerun with
``--checkpoint sam_vit_b_01ec64.pth`` (or a micro-sam model) to rank the strategies on
quality.

    python benchmarks/bench_propagation.py [--checkpoint FILE] [--min-score S] [--min-iou I]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "synthetic3d"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="real SAM weights (default: tiny random-weight model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--min-score", type=float, default=0.5)
    ap.add_argument("--min-iou", type=float, default=0.3)
    ap.add_argument("--objects", type=int, default=0, help="use only the first N objects (0: all)")
    ap.add_argument("--out", default=str(HERE / "results" / "propagation.json"))
    args = ap.parse_args()

    import tifffile

    import napari_sam as ns
    from napari_sam.workflows import volume as V

    img = tifffile.imread(Path(args.data) / "img3d.tif")
    gt = tifffile.imread(Path(args.data) / "mask3d.tif")
    if args.checkpoint:
        model = ns.load_model(checkpoint=args.checkpoint, device=args.device)
        weights = f"checkpoint {args.checkpoint}"
    else:
        from napari_sam.testing import make_tiny_sam

        model = ns.load_model(make_tiny_sam(seed=0), device=args.device)
        weights = "TINY RANDOM-WEIGHT model (IoU numbers are meaningless)"
    seg = ns.Segmenter(model, img, memory_bytes=2**31)
    t0 = time.perf_counter()
    seg.embed()
    t_embed = time.perf_counter() - t0
    ids = [int(i) for i in np.unique(gt) if i]
    if args.objects:
        ids = ids[: args.objects]
    seeds, truth_z = [], []
    for i in ids:
        zs = np.flatnonzero((gt == i).any(axis=(1, 2)))
        z = int(zs[len(zs) // 2])
        seeds.append(V.Seed(z, mask=gt[z] == i))
        truth_z.append(set(zs.tolist()))
    rows = {}
    for strategy in V.STRATEGIES:
        t0 = time.perf_counter()
        results = V.propagate_many(seg, seeds, strategy=strategy, min_score=args.min_score,
                                   min_iou=args.min_iou)
        dt = time.perf_counter() - t0
        ious, extent_err, visited, accepted, stops = [], [], [], [], Counter()
        for i, r, tz in zip(ids, results, truth_z):
            g = gt == i
            ious.append(float((r.mask & g).sum() / max((r.mask | g).sum(), 1)))
            extent_err.append(len(set(r.accepted) ^ tz))
            visited.append(len(r.visited))
            accepted.append(len(r.accepted))
            stops.update(r.stop.values())
        rows[strategy] = {"mean_iou": float(np.mean(ious)), "median_iou": float(np.median(ious)),
                          "mean_slices_visited": float(np.mean(visited)),
                          "mean_slices_accepted": float(np.mean(accepted)),
                          "mean_z_extent_error": float(np.mean(extent_err)),
                          "stops": dict(stops), "seconds": dt,
                          "ms_per_object_slice": 1000 * dt / max(sum(visited), 1)}
    truth_slices = float(np.mean([len(t) for t in truth_z]))
    print(f"weights: {weights}")
    print(f"{len(ids)} objects, {len(img)} slices; embedding all slices {t_embed:.1f} s; "
          f"true mean Z extent {truth_slices:.1f} slices; min_score {args.min_score}, "
          f"min_iou {args.min_iou}")
    print(f"{'strategy':9} {'meanIoU':>8} {'medIoU':>7} {'visited':>8} {'accepted':>9} "
          f"{'Zerr':>5} {'s':>7} {'ms/obj-slice':>12}  stops")
    for s, r in rows.items():
        print(f"{s:9} {r['mean_iou']:8.3f} {r['median_iou']:7.3f} {r['mean_slices_visited']:8.2f} "
              f"{r['mean_slices_accepted']:9.2f} {r['mean_z_extent_error']:5.2f} {r['seconds']:7.1f} "
              f"{r['ms_per_object_slice']:12.1f}  {r['stops']}")
    if not args.checkpoint:
        print("NOTE: random weights - the IoU columns do not rank the strategies; rerun with "
              "--checkpoint for that. Mechanics (visits, stops, speed) are real.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"weights": weights, "embed_seconds": t_embed, "objects": len(ids),
                               "min_score": args.min_score, "min_iou": args.min_iou,
                               "strategies": rows}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
