"""What each subcommand of ``napari-sam`` does: thin calls into :mod:`napari_sam.workflows`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from .parser import open_input
from .sample import report_sample, write_sample

__all__ = ["run"]


class _Bar:
    """A tqdm bar driven by progress(done, total) callbacks."""

    def __init__(self, quiet: bool, desc: str) -> None:
        self.quiet, self.desc, self.bar = quiet, desc, None

    def __call__(self, done: int, total: int, desc: str | None = None) -> None:
        if self.quiet:
            return
        from tqdm.auto import tqdm

        if self.bar is None or (desc and self.bar.desc != desc):
            self.close()
            self.bar = tqdm(total=total, desc=desc or self.desc, unit="unit", file=sys.stderr)
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _client(args):
    if getattr(args, "scheduler", None):
        from distributed import Client

        return Client(args.scheduler), None
    if getattr(args, "workers", None):
        from distributed import Client, LocalCluster

        if args.workers < 1:
            from .._errors import InvalidInputError

            raise InvalidInputError(f"--workers must be >= 1, got {args.workers}")
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        return Client(cluster), cluster
    return None, None


def _is_folder_of_images(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and not any((p / n).exists() for n in ("zarr.json", ".zgroup", ".zarray"))


def run(args) -> int:
    from ..workflows import batch

    if args.command == "info":
        from .info import describe

        print(describe(open_input(args.stack, args), store=args.cache, tile_above=args.tile_above))
        return 0
    bar = _Bar(args.quiet, args.command)
    options: dict[str, Any] = {"model": args.model, "checkpoint": args.checkpoint,
                               "device": args.device, "tile_above": args.tile_above}
    if args.command == "replay":
        from ..workflows.replay import replay

        try:
            res = replay(args.labels, model=args.model, checkpoint=args.checkpoint,
                         device=args.device, out=args.out, image=args.image, progress=bar)
        finally:
            bar.close()
        print(res.summary())
        return 0
    if args.command == "refine":
        return _refine(args, options, bar)
    if args.command == "adapt":
        return _adapt(args)
    if args.command == "embed":
        from ..io.places import embedding_store_for

        cache = args.cache or str(embedding_store_for(args.stack))
        client, cluster = _client(args)
        try:
            res = batch.embed_stack(open_input(args.stack, args), cache, progress=bar, client=client,
                                    **options)
        finally:
            bar.close()
            _close(client, cluster)
        print(res.summary())
        return 0

    sample = None
    stack = args.stack
    if stack is None:
        if args.command == "auto":
            raise AssertionError  # argparse requires STACK
        args.out = args.out or "sample_labels.tif"
        stack, args.prompts, sample = write_sample(args)
    if not args.out:
        from .._errors import InvalidInputError

        raise InvalidInputError("--out is required (.ome.zarr, .zarr, .tif or .tiff)")
    options.update(cache=args.cache, overwrite=args.overwrite)
    if args.command in ("segment", "propagate"):
        if not args.prompts:
            from .._errors import InvalidInputError

            raise InvalidInputError(f"{args.command} needs --prompts (napari Points/Shapes CSV)")
        options["scale_prompts"] = args.scale_prompts
    if args.command == "propagate":
        options.update(strategy=args.strategy, min_score=args.min_score, min_iou=args.min_iou,
                       max_slices=args.max_slices)
    if args.command == "auto":
        options.update(points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh,
                       stability_score_thresh=args.stability_thresh, min_area=args.min_area,
                       min_region_area=args.min_region_area,
                       merge_iou=args.merge_iou)
    client, cluster = _client(args)
    options["client"] = client
    t0 = time.perf_counter()
    try:
        if _is_folder_of_images(stack):
            if args.command != "auto":
                options["prompts_dir"] = args.prompts[0]
                options.pop("scale_prompts", None)
                options["scale_prompts"] = args.scale_prompts
            results = batch.run_folder(args.command, stack, args.out, suffix=args.suffix,
                                       progress=lambda n, d, t: bar(d, t, n),
                                       open_options={"axes": args.axes, "channel": args.channel},
                                       **options)
        else:
            fn = {"segment": batch.segment_prompts, "propagate": batch.propagate_prompts,
                  "auto": batch.auto_segment}[args.command]
            opened = open_input(stack, args) if sample is None else stack
            pos = ((opened, args.prompts, args.out) if args.command != "auto"
                   else (opened, args.out))
            results = [fn(*pos, progress=bar, **options)]
    finally:
        bar.close()
        _close(client, cluster)
    for res in results:
        print(res.summary())
    if sample is not None:
        print(f"total {time.perf_counter() - t0:.1f} s")
        report_sample(Path(args.out), sample, args.command)
    return 0


def _refine(args, options: dict, bar) -> int:
    from .._errors import InvalidInputError
    from ..workflows import label_jobs

    if not args.out:
        raise InvalidInputError("--out is required (.ome.zarr, .zarr, .tif or .tiff)")
    stack = open_input(args.stack, args)
    options.update(cache=args.cache, overwrite=args.overwrite, ids=args.ids)
    client, cluster = _client(args)
    try:
        if args.propagate_from is None:
            res = label_jobs.refine_labels_job(args.labels, stack, args.out, client=client,
                                               progress=bar, **options)
        else:
            res = label_jobs.propagate_labels_job(
                args.labels, stack, args.out, index=args.propagate_from, strategy=args.strategy,
                min_score=args.min_score, min_iou=args.min_iou, max_slices=args.max_slices,
                client=client, progress=bar, **options)
    finally:
        bar.close()
        _close(client, cluster)
    print(res.summary())
    return 0


def _adapt(args) -> int:
    from ..models.loading import load_model
    from ..workflows.adapt import adapt

    model = load_model(args.model, checkpoint=args.checkpoint, device=args.device)

    def progress(done: int, total: int, info: dict) -> None:
        if info["end_of_epoch"] and not args.quiet:
            print(f"epoch {info['epoch']}/{info['epochs']}: training loss {info['loss']:.4f}, "
                  f"validation loss {info['val_loss']:.4f}", file=sys.stderr, flush=True)

    stack = open_input(args.stack, args)
    if 0 < args.tile_above < max(stack.slice_shape):
        from .._errors import InvalidInputError

        raise InvalidInputError(
            f"the slices of {args.stack} are {max(stack.slice_shape)} px, above --tile-above "
            f"{args.tile_above}: they are segmented on tiles, and adapting needs whole slices; "
            "pass --tile-above 0 here and when segmenting with the adapted model")
    res = adapt(model, stack, args.labels, slices=args.slices,
                cache=args.cache or "auto", out=args.out, overwrite=args.overwrite,
                min_area=args.min_area, epochs=args.epochs, lr=args.lr, loss=args.loss,
                val_fraction=args.val_fraction, patience=args.patience, rounds=args.rounds,
                batch_size=args.batch_size, seed=args.seed, progress=progress)
    print(res.summary())
    print(f"use it: napari-sam segment ... --checkpoint {args.out}, or choose it under Model "
          "in the widget (the embeddings stored for the base model are reused)")
    return 0


def _close(client, cluster) -> None:
    if client is not None:
        client.close()
    if cluster is not None:
        cluster.close()


