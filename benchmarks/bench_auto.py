"""Segment everything per slice: napari-sam's decoder path against segment-anything's.

One slice (DSB2018 ``img2d.tif``, 512 x 512, or a synthetic one), its embedding computed
once; then, interleaved for ``--rounds`` rounds, the automatic masks of a
``--points-per-side`` grid (SAM's default 32: 1024 prompts) by

* ``segment-anything``: ``SamAutomaticMaskGenerator(crop_n_layers=0)`` with its predictor
  already holding the embedding (``set_image`` is skipped, so only decoding is timed);
* ``napari-sam reference decoder``: ``auto_masks`` with ``speed="off"``
  (``sam.mask_decoder`` itself; same masks as the generator, tested);
* ``napari-sam``: ``auto_masks`` with the speed paths batch jobs use (fast decoder in
  float32, early rejection) and with the widget's ("auto").

The mask decoder has the same size in every SAM (vit_b, vit_l, vit_h), so a small random
encoder gives the decoder's real cost. Random weights predict low IoUs: the threshold
``--iou`` decides how many prompts pass (and get upscaled); the run prints how many.
Min and median of each side; the ratio is best against best.

Run::

    python benchmarks/bench_auto.py                      # 1024 prompts, 3 rounds
    python benchmarks/bench_auto.py --iou 0.0 --rounds 2 # every prompt upscaled
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DSB = HERE.parent.parent / "shared" / "data" / "dsb2018" / "img2d.tif"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--iou", type=float, default=0.88, help="pred_iou_thresh")
    ap.add_argument("--stability", type=float, default=0.95)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image", type=Path, default=DSB)
    ap.add_argument("--skip-generator", action="store_true",
                    help="leave out segment-anything's generator (the slowest side)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "auto.json")
    args = ap.parse_args(argv)

    import torch
    from segment_anything import SamAutomaticMaskGenerator

    import napari_sam as ns
    from napari_sam.testing import make_tiny_sam
    from napari_sam.workflows.auto import auto_masks

    if args.image.exists():
        stack = ns.open_stack(args.image)
    else:
        from napari_sam.synthetic import make_nuclei_stack

        img, _ = make_nuclei_stack((1, 512, 512), n_nuclei=12, seed=0)
        stack = ns.open_stack(img)
    model = ns.load_model(make_tiny_sam(embed_dim=32, depth=2, num_heads=2,
                                        global_attn_indexes=(1,)), device="cpu")
    segs = {"napari-sam reference decoder": ns.Segmenter(model, stack, speed="off"),
            "napari-sam (batch: fp32)": ns.Segmenter(model, stack, speed="fused"),
            "napari-sam (widget: auto)": ns.Segmenter(model, stack, speed="auto")}
    for seg in segs.values():
        seg.embedding(0)
    opts = dict(points_per_side=args.points_per_side, pred_iou_thresh=args.iou,
                stability_score_thresh=args.stability)

    gen = SamAutomaticMaskGenerator(model.sam, points_per_side=args.points_per_side,
                                    pred_iou_thresh=args.iou, stability_score_thresh=args.stability,
                                    crop_n_layers=0)
    rgb = stack.rgb(0)
    gen.predictor.set_image(rgb)
    # keep the embedding (the generator sets and resets it per crop): time decoding only
    gen.predictor.set_image = lambda *a, **k: None
    gen.predictor.reset_image = lambda: None

    sides = {name: (lambda s=seg: auto_masks(s, 0, **opts)) for name, seg in segs.items()}
    if not args.skip_generator:
        sides = {"segment-anything generator": lambda: gen.generate(rgb), **sides}
    counts = {name: len(fn()) for name, fn in sides.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, fn in sides.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)

    ref = segs["napari-sam reference decoder"]
    from segment_anything.utils.amg import build_point_grid

    from napari_sam.engine.prompt import Prompt

    h, w = stack.slice_shape
    grid = build_point_grid(args.points_per_side)[:, ::-1] * np.array([h, w])
    preds = ref.predict_many(0, [Prompt.of(points=p[None]) for p in grid], multimask=True)
    passing = sum(1 for p in preds if p.scores.max() > args.iou)

    base = "segment-anything generator" if not args.skip_generator else "napari-sam reference decoder"
    print(f"segment everything, {len(grid)} prompts on a {h} x {w} slice; {passing} have a mask "
          f"with predicted IoU > {args.iou}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'side':32s} {'min s':>7s} {'median s':>9s} {'x best':>7s} {'x median':>9s} {'masks':>6s}")
    rows = {}
    for name, ts in times.items():
        rows[name] = {"min_s": min(ts), "median_s": float(np.median(ts)), "runs_s": ts,
                      "masks": counts[name],
                      "speedup_best": min(times[base]) / min(ts),
                      "speedup_median": float(np.median(times[base]) / np.median(ts))}
        r = rows[name]
        print(f"{name:32s} {r['min_s']:7.2f} {r['median_s']:9.2f} {r['speedup_best']:7.2f} "
              f"{r['speedup_median']:9.2f} {r['masks']:6d}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "prompts": len(grid),
                                    "passing": passing, "baseline": base, "rows": rows,
                                    "options": opts}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
