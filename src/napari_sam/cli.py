"""The ``napari-sam`` command: batch embedding and segmentation of stacks (thin: parses
arguments and calls :mod:`napari_sam.workflows.batch`).

::

    napari-sam embed STACK [--cache NAME.embeddings.zarr]
    napari-sam segment [STACK] --prompts POINTS.csv [SHAPES.csv ...] --out OUT
    napari-sam propagate [STACK] --prompts POINTS.csv --out OUT [--strategy box]
    napari-sam auto STACK --out OUT

STACK is a TIFF, zarr or OME-Zarr image, or a folder of them (then OUT is a folder and
``--prompts`` a folder of ``<image name>.csv``). OUT's extension chooses the format:
``.ome.zarr`` / ``.zarr`` (OME-Zarr labels) or ``.tif`` / ``.tiff``. Without STACK,
``segment`` and ``propagate`` run on a generated sample stack (written next to OUT with its
ground truth) prompted at every nucleus, and report the IoU with the ground truth.

Jobs resume when started again with the same arguments; an existing output from another
job is refused unless ``--overwrite``. User errors exit with status 2 and one line; a file
system error (disk full, read-only folder) exits with status 1 and one line, the finished
part kept for the resume.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser"]


def _common(p: argparse.ArgumentParser, *, workers: bool = True) -> None:
    g = p.add_argument_group("model and compute")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--model", help="registry name (vit_b, vit_l, vit_h, vit_b_lm, ...) or "
                   "checkpoint path; default $NAPARI_SAM_MODEL, else vit_b")
    m.add_argument("--checkpoint", help="a SAM checkpoint file (architecture inferred)")
    g.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    i = p.add_argument_group("image")
    i.add_argument("--axes", help="axes of STACK, one letter per dimension (e.g. CZYX, TZCYX); "
                   "default from the file's metadata, else from the shape")
    i.add_argument("--channel", type=_channel, metavar="K[,K,K]",
                   help="the channel SAM sees (K), or three channels as RGB (0,1,2); default: RGB "
                   "for RGB samples, else channel 0 (said on stderr when there are more)")
    g.add_argument("--tile-above", type=int, default=2048, metavar="PX",
                   help="segment slices whose longest side exceeds PX on 1024 px tiles at full "
                   "resolution (default 2048; 0: never)")
    if workers:
        w = g.add_mutually_exclusive_group()
        w.add_argument("--workers", type=int, metavar="N",
                       help="run on a local dask cluster of N single-threaded worker processes")
        w.add_argument("--scheduler", metavar="ADDRESS",
                       help="run on the dask.distributed scheduler at ADDRESS")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def _channel(text: str) -> int | tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--channel takes a channel index (1) or three indices for RGB (0,1,2), got {text!r}"
        ) from None
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"--channel takes 1 or 3 indices, got {len(values)}")
    return values[0] if len(values) == 1 else values


def _open(path: str, args) -> Any:
    """STACK opened with --axes / --channel; a note when channel 0 of several is used."""
    from .io.stacks import open_stack

    stack = open_stack(path, axes=args.axes, channel=args.channel)
    if args.channel is None and "C" in stack.axes and not stack.rgb_input:
        n = stack.shape[stack.axes.index("C")]
        if n > 1:
            print(f"napari-sam: note: {path} has {n} channels (axes {stack.axes}); SAM sees "
                  "channel 0. Pass --channel K for another one, or --channel 0,1,2 for RGB.",
                  file=sys.stderr)
    return stack


def _job_options(p: argparse.ArgumentParser, *, prompts: bool) -> None:
    p.add_argument("--out", "-o", help="output labels: .ome.zarr, .zarr, .tif or .tiff "
                   "(a folder for a folder of images)")
    if prompts:
        p.add_argument("--prompts", "-p", nargs="+", metavar="CSV",
                       help="napari Points / Shapes layer CSV exports (a folder of <name>.csv "
                       "for a folder of images)")
        p.add_argument("--scale-prompts", action="store_true",
                       help="prompt coordinates are world coordinates: divide by the image scale")
    p.add_argument("--cache", help="embedding store (.zarr) to read and fill; default: none "
                   "(embeddings kept in memory for the run)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output that this job did not write")
    p.add_argument("--format", default=".ome.zarr", dest="suffix",
                   help="output extension for a folder of images (default .ome.zarr)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .workflows.volume import DEFAULT_STRATEGY, STRATEGIES

    parser = argparse.ArgumentParser(
        prog="napari-sam", description="Segment Anything on microscopy stacks, in batch.",
        epilog="Prompts: napari CSV exports in pixel coordinates; see 'napari-sam segment -h'.")
    parser.add_argument("--version", action="version", version=f"napari-sam {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("embed", help="compute and store the embeddings of every slice",
                       description="Fill an embedding store; resumable.")
    p.add_argument("stack", metavar="STACK")
    p.add_argument("--cache", help="the store (default: <name>.embeddings.zarr beside STACK, "
                   "where the widget and the API look for it)")
    _common(p)

    conv = ("Points CSV: index, axis-0..axis-(D-1) [, label | positive] [, object | object_id]; "
            "the last two axes are y, x in pixels, the leading ones the slice. Each positive "
            "point is an object (negative points apply to every object on their slice) unless "
            "an object column groups points. Shapes CSV: each rectangle is a box, one object. "
            "Object k (in file order) gets label id k.")
    for name, helptext in (("segment", "segment prompted objects on their slices"),
                           ("propagate", "follow prompted objects through Z")):
        p = sub.add_parser(name, help=helptext, description=f"{helptext}. {conv} Without STACK: "
                           "a demo on a generated sample stack.")
        p.add_argument("stack", metavar="STACK", nargs="?")
        _job_options(p, prompts=True)
        if name == "propagate":
            p.add_argument("--strategy", choices=STRATEGIES, default=DEFAULT_STRATEGY,
                           help=f"prompt for the next slice (default {DEFAULT_STRATEGY})")
            p.add_argument("--min-score", type=float, default=0.5, help="stop below this predicted IoU")
            p.add_argument("--min-iou", type=float, default=0.3,
                           help="stop below this IoU with the previous slice")
            p.add_argument("--max-slices", type=int, help="at most this many slices each way")
        p.add_argument("--sample-shape", default="16,256,256", help=argparse.SUPPRESS)
        p.add_argument("--sample-nuclei", type=int, default=30, help=argparse.SUPPRESS)
        _common(p)

    p = sub.add_parser("replay", help="run every object's recorded prompts again",
                       description="Replay the provenance of a labels file: with the same model "
                       "it reproduces the labels; with another one it writes new labels and a "
                       "per-object report (IoU old vs new) as OUT.report.csv.")
    p.add_argument("labels", metavar="LABELS", help="labels written by napari-sam")
    p.add_argument("--out", "-o", help="new labels (default LABELS.replay with its extension)")
    p.add_argument("--image", help="the image, if it moved since the labels were made")
    _common(p, workers=False)

    p = sub.add_parser("auto", help="segment everything (grid of points) and merge in 3D",
                       description="Automatic segmentation of every slice, merged across slices.")
    p.add_argument("stack", metavar="STACK")
    _job_options(p, prompts=False)
    p.add_argument("--points-per-side", type=int, default=16)
    p.add_argument("--pred-iou-thresh", type=float, default=0.88)
    p.add_argument("--stability-thresh", type=float, default=0.95)
    p.add_argument("--min-area", type=int, default=16)
    p.add_argument("--merge-iou", type=float, default=0.3,
                   help="IoU with the previous slice's object to share its id")
    _common(p)
    return parser


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
            from ._errors import InvalidInputError

            raise InvalidInputError(f"--workers must be >= 1, got {args.workers}")
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        return Client(cluster), cluster
    return None, None


def _is_folder_of_images(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and not any((p / n).exists() for n in ("zarr.json", ".zgroup", ".zarray"))


def _sample(args) -> tuple[str, list[str], Any]:
    """Write the sample stack, its truth and napari-style prompts next to --out."""
    import numpy as np
    import tifffile
    from scipy import ndimage

    from ._errors import InvalidInputError
    from .io.prompt_files import write_points_csv
    from .synthetic import make_nuclei_stack

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


def _report_sample(out: Path, truth_info, kind: str) -> None:
    import numpy as np

    from .io.stacks import open_stack

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


def _run(args) -> int:
    from .workflows import batch

    bar = _Bar(args.quiet, args.command)
    options: dict[str, Any] = {"model": args.model, "checkpoint": args.checkpoint,
                               "device": args.device, "tile_above": args.tile_above}
    if args.command == "replay":
        from .workflows.replay import replay

        try:
            res = replay(args.labels, model=args.model, checkpoint=args.checkpoint,
                         device=args.device, out=args.out, image=args.image, progress=bar)
        finally:
            bar.close()
        print(res.summary())
        return 0
    if args.command == "embed":
        from .io.places import embedding_store_for

        cache = args.cache or str(embedding_store_for(args.stack))
        client, cluster = _client(args)
        try:
            res = batch.embed_stack(_open(args.stack, args), cache, progress=bar, client=client,
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
        stack, args.prompts, sample = _sample(args)
    if not args.out:
        from ._errors import InvalidInputError

        raise InvalidInputError("--out is required (.ome.zarr, .zarr, .tif or .tiff)")
    options.update(cache=args.cache, overwrite=args.overwrite)
    if args.command in ("segment", "propagate"):
        if not args.prompts:
            from ._errors import InvalidInputError

            raise InvalidInputError(f"{args.command} needs --prompts (napari Points/Shapes CSV)")
        options["scale_prompts"] = args.scale_prompts
    if args.command == "propagate":
        options.update(strategy=args.strategy, min_score=args.min_score, min_iou=args.min_iou,
                       max_slices=args.max_slices)
    if args.command == "auto":
        options.update(points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh,
                       stability_score_thresh=args.stability_thresh, min_area=args.min_area,
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
            opened = _open(stack, args) if sample is None else stack
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
        _report_sample(Path(args.out), sample, args.command)
    return 0


def _close(client, cluster) -> None:
    if client is not None:
        client.close()
    if cluster is not None:
        cluster.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``napari-sam``; returns the exit status."""
    from ._errors import NapariSamError
    from .io.zarr_logging import quiet_sibling_write_errors

    quiet_sibling_write_errors()  # a full disk is reported once, below
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (NapariSamError, FileNotFoundError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"napari-sam: error: {msg}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, read-only or vanished output folder, ...
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"napari-sam: error: could not read or write a file ({type(err).__name__}: {msg}); "
              "the work done so far is kept: fix the cause (free disk space, permissions) and "
              "run the same command again to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("napari-sam: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
