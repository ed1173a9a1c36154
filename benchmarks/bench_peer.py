"""Side by side with micro-sam, the leading tool: embedding, segment everything, peak
memory and store bytes, on the same stack with the same model.

micro-sam is installed for this benchmark only, never a dependency::

    pip install --no-deps micro-sam python-elf torch-em
    pip install xxhash pooch imageio natsort joblib kornia timm h5py imagecodecs \\
        bioimage-cpp threadpoolctl scikit-learn

Each side runs in its own process (so peak RSS is its own), interleaved, ``--rounds``
times; times are best against best (the minimum of the rounds), medians beside them.

* embedding: every slice of a (Z, Y, X) uint16 stack into a zarr store on disk
  (micro-sam: ``util.precompute_image_embeddings(predictor, stack, save_path, ndim=3)``
  with a ``SamPredictor`` on the same weights; napari-sam: ``Segmenter.embed()``);
* segment everything on ``--auto-slices`` slices from those stores, the same grid and
  thresholds (micro-sam: ``AutomaticMaskGenerator.initialize`` + ``generate``; napari-sam:
  ``auto_segment_slice``);
* peak RSS of the process; bytes of the store per slice.

Weights are random (``--model small`` or ``vit_b``-shaped): masks are meaningless, time,
memory and bytes carry over. Run::

    python benchmarks/bench_peer.py [--model small] [--slices 48] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SIDE = r"""
import json, resource, shutil, sys, time
import numpy as np, tifffile
side, ckpt, tif, store, n_auto, pps = sys.argv[1:7]
n_auto, pps = int(n_auto), int(pps)
import napari_sam as ns
model = ns.load_model(checkpoint=ckpt, device="cpu")
stack_np = tifffile.imread(tif)
shutil.rmtree(store, ignore_errors=True)
out = {}
if side == "micro_sam":
    from segment_anything import SamPredictor
    from micro_sam import util
    from micro_sam.instance_segmentation import AutomaticMaskGenerator
    predictor = SamPredictor(model.sam)
    predictor.model_type = predictor.model_name = "vit_b"  # micro-sam keys its store by these
    t = time.perf_counter()
    emb = util.precompute_image_embeddings(predictor, stack_np, save_path=store, ndim=3, verbose=False)
    out["embed_s"] = time.perf_counter() - t
    amg = AutomaticMaskGenerator(predictor, points_per_side=pps)
    t = time.perf_counter()
    for z in range(n_auto):
        amg.initialize(stack_np[z], image_embeddings=emb, i=z)
        seg = amg.generate(pred_iou_thresh=0.88, stability_score_thresh=0.95)
    out["auto_s"] = (time.perf_counter() - t) / max(n_auto, 1)
else:
    from napari_sam.workflows.auto import auto_segment_slice
    seg = ns.Segmenter(model, ns.open_stack(tif), cache=store)
    t = time.perf_counter()
    seg.embed()
    out["embed_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for z in range(n_auto):
        auto_segment_slice(seg, z, points_per_side=pps, pred_iou_thresh=0.88,
                           stability_score_thresh=0.95)
    out["auto_s"] = (time.perf_counter() - t) / max(n_auto, 1)
out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
from pathlib import Path
files = [f for f in Path(store).rglob("*") if f.is_file()]
out["store_bytes"] = sum(f.stat().st_size for f in files)
print(json.dumps(out))
"""


def run_side(side: str, ckpt: Path, tif: Path, store: Path, n_auto: int, pps: int) -> dict:
    r = subprocess.run([sys.executable, "-c", SIDE, side, str(ckpt), str(tif), str(store),
                        str(n_auto), str(pps)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{side} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["small", "vit_b"], default="small")
    ap.add_argument("--slices", type=int, default=48)
    ap.add_argument("--shape", type=int, nargs=2, default=(384, 512))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--auto-slices", type=int, default=2)
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "peer.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import tifffile
    from bench_engine import SMALL, VIT_B

    from napari_sam.synthetic import make_nuclei_stack
    from napari_sam.testing import make_tiny_checkpoint

    tmp = Path(tempfile.mkdtemp())
    ckpt = make_tiny_checkpoint(tmp / "model.pth", **(SMALL if args.model == "small" else VIT_B))
    image, _ = make_nuclei_stack((args.slices, *args.shape), n_nuclei=60, seed=4)
    tif = tmp / "stack.tif"
    tifffile.imwrite(tif, image, metadata={"axes": "ZYX"}, photometric="minisblack")
    runs: dict[str, list[dict]] = {"micro_sam": [], "napari_sam": []}
    for _ in range(args.rounds):  # interleaved
        for side in runs:
            runs[side].append(run_side(side, ckpt, tif, tmp / f"{side}.zarr", args.auto_slices,
                                       args.points_per_side))
    res = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d"), "model": args.model, "stack": [args.slices, *args.shape],
           "runs": runs}
    print(f"stack {res['stack']} uint16, model {args.model} (random weights), "
          f"{args.rounds} interleaved rounds, segment everything on {args.auto_slices} slices "
          f"({args.points_per_side}^2 points)")
    print(f"{'':28s} {'micro-sam':>14s} {'napari-sam':>14s} {'ratio (ours/theirs)':>20s}")
    for key, label, scale, unit in (("embed_s", "embedding, whole stack", 1, "s"),
                                    ("auto_s", "segment everything / slice", 1, "s"),
                                    ("peak_rss", "peak RSS", 1e-6, "MB"),
                                    ("store_bytes", "store bytes per slice", 1e-6 / args.slices, "MB")):
        a = [r[key] for r in runs["micro_sam"]]
        b = [r[key] for r in runs["napari_sam"]]
        best = min(b) / min(a)
        med = statistics.median(b) / statistics.median(a)
        res[key] = {"micro_sam_min": min(a), "napari_sam_min": min(b), "ratio_best": best,
                    "ratio_median": med}
        print(f"{label:28s} {min(a) * scale:12.2f}{unit:>2s} {min(b) * scale:12.2f}{unit:>2s} "
              f"{best:10.2f} (median {med:.2f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
