"""Adapting the mask decoder: a learning curve on real data, and the time per epoch.

For each dataset (DSB2018 nuclei: one 512 x 512 image, 124 objects; the synthetic 3D
nuclei: 31 slices of 61 x 57, every label on every slice an object) and each model (the
tiny test model; vit_b-shaped random weights), a fixed set of held-out objects is kept
aside; the decoder is adapted (``adapt_objects``, default settings unless given) on the
first 10, 20, 50 and 100 of the other objects, and the mean single-click IoU on the
held-out set (one click at each object's deepest point, the best of SAM's three masks by
predicted IoU) is measured with the base decoder and with each adapted one.

Random weights know nothing: the base IoU is low, and the curve shows that learning
happens and how fast, which is what can be measured here without real weights. Seconds
per epoch count the training steps and the validation pass (not the embeddings, which
are computed once, before, and timed on their own).

    python benchmarks/bench_adapt.py                     # both models, both datasets
    python benchmarks/bench_adapt.py --models tiny --sizes 10,20 --epochs 3   # quick
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"


def _objects(name: str, min_area: int):
    import tifffile

    import napari_sam as ns
    from napari_sam.workflows.adapt import objects_from_labels

    if name == "dsb2018":
        img = tifffile.imread(DATA / "dsb2018" / "img2d.tif")[None]
        gt = tifffile.imread(DATA / "dsb2018" / "mask2d.tif")[None]
    else:
        img = tifffile.imread(DATA / "synthetic3d" / "img3d.tif")
        gt = tifffile.imread(DATA / "synthetic3d" / "mask3d.tif")
    stack = ns.open_stack(img, axes="ZYX")
    objs = objects_from_labels(stack, gt, min_area=min_area)
    order = np.random.default_rng(0).permutation(len(objs))
    return stack, [objs[i] for i in order]


def run(model_name: str, data: str, args) -> dict:
    import torch

    import napari_sam as ns
    from napari_sam.testing import make_tiny_checkpoint
    from napari_sam.workflows.adapt import AdaptSettings, adapt_objects
    from napari_sam.workflows.training import single_click_iou

    sys.path.insert(0, str(HERE))
    from bench_engine import VIT_B

    tmp = Path(tempfile.mkdtemp())
    ckpt = make_tiny_checkpoint(tmp / "m.pth", **({} if model_name == "tiny" else VIT_B))
    model = ns.load_model(checkpoint=ckpt, device="cpu")
    stack, objs = _objects(data, args.min_area)
    held_out, pool = objs[:args.held_out], objs[args.held_out:]
    seg = ns.Segmenter(model, stack)
    t0 = time.perf_counter()
    seg.embed(sorted({o.index for o in objs}))
    embed_s = time.perf_counter() - t0
    base = float(np.mean(single_click_iou(model, seg, held_out)))
    print(f"{model_name} {data}: {len(objs)} objects, {len(held_out)} held out, base IoU "
          f"{base:.3f}; embeddings {embed_s:.1f} s", flush=True)
    curve = []
    for n in args.sizes:
        if n > len(pool):
            print(f"  {n}: only {len(pool)} objects, skipped")
            continue
        settings = AdaptSettings(epochs=args.epochs, rounds=args.rounds, lr=args.lr,
                                 patience=args.patience, loss=args.loss)
        torch.set_num_threads(args.threads)
        res = adapt_objects(seg, pool[:n], settings=settings)
        after = float(np.mean(single_click_iou(res.model, seg, held_out)))
        epochs = res.record["history"][1:]
        per_epoch = float(np.median([e["seconds"] for e in epochs]))
        row = {"objects": n, "train": res.record["objects"]["train"],
               "val": res.record["objects"]["val"], "held_out_iou_before": base,
               "held_out_iou_after": after, "val_iou_before": res.iou_before,
               "val_iou_after": res.iou_after, "epochs_run": len(epochs),
               "best_epoch": res.record["best_epoch"], "seconds_per_epoch": per_epoch,
               "seconds_per_object_epoch": per_epoch / n, "seconds": res.record["seconds"]}
        curve.append(row)
        print(f"  {n:4d} objects: held-out IoU {base:.3f} -> {after:.3f}  ({len(epochs)} epochs, "
              f"best {row['best_epoch']}, {per_epoch:.1f} s/epoch, "
              f"{per_epoch / n:.2f} s per object-epoch)", flush=True)
    return {"model": model_name, "data": data, "objects": len(objs), "held_out": len(held_out),
            "embed_seconds": embed_s, "base_iou": base, "curve": curve}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,vit_b")
    ap.add_argument("--data", default="dsb2018,synthetic3d")
    ap.add_argument("--sizes", default="10,20,50,100")
    ap.add_argument("--held-out", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--patience", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--loss", default="balanced")
    ap.add_argument("--min-area", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "adapt.json")
    args = ap.parse_args(argv)
    args.sizes = [int(v) for v in args.sizes.split(",")]
    if not (DATA / "dsb2018" / "img2d.tif").exists():
        print(f"real data not found at {DATA}; nothing to measure", file=sys.stderr)
        return 0
    results = [run(m, d, args) for m in args.models.split(",") for d in args.data.split(",")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                    "settings": settings, "results": results}, indent=1))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
