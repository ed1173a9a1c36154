"""Prefetch benchmark: a user stepping through a stack at the encoder's pace.

The simulated user arrives on a slice, clicks once (one decode), looks at the result until
``pace x`` the encoder's time per slice has passed since arriving, and steps to the next
slice. On each arrival the engine's :class:`~napari_sam.engine.prefetch.Prefetcher` is told
(``Segmenter.prefetch(around=i)``), exactly as the napari widget does. Measured per step:

* **wait**: from the step to the embedding being available (``Segmenter.embedding``);
  the baseline is the same walk without prefetch, where every step waits for the encoder;
* **decode**: the click's latency while the prefetcher encodes beside it (at lower CPU
  priority), against the same click on an idle engine.

"Steady state": the walk starts after the prefetcher has had two encoder times to fill its
look-ahead of two slices (the user's first look at the stack); ``cold`` walks start without
it. Pace 1x means a dwell of exactly the idle encoder's time per slice; the click costs the
encoder some CPU, so at 1x the look-ahead shrinks by that much per step.

Target (issue "Speed"): at the encoder's pace, the embedding is ready within 10 ms of the
step in the steady state.

Run::

    python benchmarks/bench_prefetch.py            # vit_b-shaped random weights (minutes)
    python benchmarks/bench_prefetch.py --quick    # a smaller encoder
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
VIT_B = dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11))
MID = dict(embed_dim=256, depth=6, num_heads=8, global_attn_indexes=(2, 5))


def walk(model, stack, *, start: int, steps: int, dwell: float, prefetch: bool, warm: float,
         seed: int) -> dict:
    import napari_sam as ns

    seg = ns.Segmenter(model, stack)
    rng = np.random.default_rng(seed)
    h, w = seg.stack.slice_shape
    waits, decodes = [], []
    seg.embedding(start)
    if prefetch:
        seg.prefetch(around=start)
        time.sleep(warm)  # the user's first look: the look-ahead fills
    arrived = time.perf_counter()
    for k in range(1, steps + 1):
        t = time.perf_counter()
        seg.segment(start + k - 1, points=rng.uniform((0, 0), (h - 1, w - 1), (1, 2)))
        decodes.append(time.perf_counter() - t)
        time.sleep(max(0.0, dwell - (time.perf_counter() - arrived)))
        step = time.perf_counter()
        seg.embedding(start + k)
        arrived = time.perf_counter()
        waits.append(arrived - step)
        if prefetch:
            seg.prefetch(around=start + k)
    stats = seg.prefetcher.stats if prefetch else {}
    seg.prefetcher.cancel()
    seg.prefetcher.wait()
    ms = lambda v, q: float(np.percentile(v, q) * 1e3)  # noqa: E731
    return {
        "waits_ms": [x * 1e3 for x in waits],
        "wait_p50_ms": ms(waits, 50), "wait_p95_ms": ms(waits, 95), "wait_max_ms": ms(waits, 100),
        "ready_within_10ms": float(np.mean(np.asarray(waits) <= 0.010)),
        "decode_p50_ms": ms(decodes, 50),
        "prefetcher": dict(stats),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller encoder (about 1 s per slice)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--paces", type=float, nargs="+", default=[1.0, 1.1, 1.25])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "prefetch.json")
    args = ap.parse_args(argv)

    import torch

    import napari_sam as ns
    from napari_sam.synthetic import make_nuclei_stack
    from napari_sam.testing import make_tiny_sam

    model = ns.load_model(make_tiny_sam(**(MID if args.quick else VIT_B)), device="cpu")
    n = 2 + (args.steps + 2) * (2 * len(args.paces) + 1)
    stack, _ = make_nuclei_stack((n, args.size, args.size), n_nuclei=12, seed=0)
    stack = ns.open_stack(stack)

    # encoder time per slice (and the idle-engine decode) on fresh slices
    seg = ns.Segmenter(model, stack)
    enc = []
    for i in (0, 1, 2):
        t = time.perf_counter()
        seg.embedding(i)
        enc.append(time.perf_counter() - t)
    t_enc = float(np.median(enc))
    idle = []
    for k in range(20):
        t = time.perf_counter()
        seg.segment(0, points=[[10 + k, 20 + k]])
        idle.append(time.perf_counter() - t)
    del seg

    result = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "torch": torch.__version__,
              "model": "mid-size random" if args.quick else "vit_b-shaped random",
              "slice": [args.size, args.size], "encode_s": t_enc, "encode_runs_s": enc,
              "decode_idle_p50_ms": float(np.median(idle) * 1e3), "walks": {}}
    start = 3
    runs = [("no prefetch (baseline)", 1.0, False, 0.0)]
    for pace in args.paces:
        runs.append((f"prefetch, pace {pace:g}x, steady", pace, True, 2 * t_enc))
        runs.append((f"prefetch, pace {pace:g}x, cold", pace, True, 0.0))
    for seed, (name, pace, pre, warm) in enumerate(runs):
        r = walk(model, stack, start=start, steps=args.steps, dwell=pace * t_enc, prefetch=pre,
                 warm=warm, seed=seed)
        r.update(pace=pace, dwell_s=pace * t_enc)
        result["walks"][name] = r
        start += args.steps + 2
        print(f"{name:34s} wait p50 {r['wait_p50_ms']:8.1f} ms  p95 {r['wait_p95_ms']:8.1f}  "
              f"max {r['wait_max_ms']:8.1f}  <=10 ms: {100 * r['ready_within_10ms']:5.1f}%  "
              f"decode p50 {r['decode_p50_ms']:5.1f} ms", flush=True)
    print(f"encoder {t_enc:.2f} s per slice; idle decode p50 {result['decode_idle_p50_ms']:.1f} ms")
    steady = result["walks"]["prefetch, pace 1x, steady"] if 1.0 in args.paces else None
    if steady is not None:
        base = result["walks"]["no prefetch (baseline)"]["wait_p50_ms"]
        result["targets"] = {"steady wait p50 <= 10 ms at 1x": steady["wait_p50_ms"] <= 10,
                             "wait vs no prefetch (x shorter)": base / max(steady["wait_p50_ms"], 1e-3)}
        for k, v in result["targets"].items():
            print(f"{k}: {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
