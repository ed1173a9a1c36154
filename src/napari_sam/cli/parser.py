"""The argument parser of ``napari-sam``: every subcommand and its options."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["build_parser", "open_input"]


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


def open_input(path: str, args) -> Any:
    """STACK opened with --axes / --channel; a note when channel 0 of several is used."""
    from ..io.stacks import open_stack

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


def _ids(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ids takes label ids such as 3,7,12, got {text!r}") from None


def _propagation(p: argparse.ArgumentParser) -> None:
    from ..workflows.volume import DEFAULT_STRATEGY, STRATEGIES

    p.add_argument("--strategy", choices=STRATEGIES, default=DEFAULT_STRATEGY,
                   help=f"prompt for the next slice (default {DEFAULT_STRATEGY})")
    p.add_argument("--min-score", type=float, default=0.5, help="stop below this predicted IoU")
    p.add_argument("--min-iou", type=float, default=0.3,
                   help="stop below this IoU with the previous slice")
    p.add_argument("--max-slices", type=int, help="at most this many slices each way")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
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
            _propagation(p)
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

    p = sub.add_parser("refine", help="existing labels (any tool) as prompts: refine or propagate them",
                       description="Every label of LABELS becomes SAM's prompt (its box and its "
                       "mask) on each slice where it appears, and SAM's mask replaces it. With "
                       "--propagate-from K, the labels of slice K are followed through Z instead "
                       "and added to LABELS where it is 0.")
    p.add_argument("labels", metavar="LABELS", help="labels of the image's shape (OME-Zarr or TIFF)")
    p.add_argument("stack", metavar="STACK", help="the image the labels belong to")
    _job_options(p, prompts=False)
    p.add_argument("--ids", type=_ids, metavar="K[,K...]", help="only these labels")
    p.add_argument("--propagate-from", type=int, metavar="K",
                   help="follow the labels of slice K (the Z position of a ZYX stack) through Z")
    _propagation(p)
    _common(p)

    p = sub.add_parser("adapt", help="fine-tune the mask decoder on your labels",
                       description="Every label of LABELS (on every slice where it appears) "
                       "is a training object: the mask decoder is trained on prompts sampled "
                       "from them, on the cached embeddings (the image encoder is not trained, "
                       "so the embedding store of the base model stays valid). Some objects are "
                       "held out: their single-click IoU before and after is printed. OUT is "
                       "a checkpoint for --checkpoint, the widget's Model, or load_model.")
    p.add_argument("labels", metavar="LABELS", help="labels of the image's shape (OME-Zarr or TIFF)")
    p.add_argument("stack", metavar="STACK", help="the image the labels belong to")
    p.add_argument("--out", "-o", required=True, help="the adapted model (.pth)")
    p.add_argument("--cache", help="embedding store to read and fill (default: the one beside "
                   "STACK if it exists, else embeddings in memory)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--slices", type=_ids, metavar="K[,K...]", help="only the labels of these "
                   "slices (stack indices)")
    from ..workflows.adapt import AdaptSettings
    from ..workflows.training import LOSSES

    d = AdaptSettings()
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=d.epochs,
                   help=f"at most this many epochs (default {d.epochs})")
    t.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr:g})")
    t.add_argument("--loss", choices=LOSSES, default=d.loss,
                   help="mask loss: class-balanced cross-entropy + dice (default), or SAM's "
                   "20 x focal + dice")
    t.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help=f"share of objects held out (default {d.val_fraction:g})")
    t.add_argument("--patience", type=int, default=d.patience,
                   help=f"stop after this many epochs without a better validation loss "
                   f"(default {d.patience})")
    t.add_argument("--rounds", type=int, default=d.rounds,
                   help=f"prompts per object: a first one and corrections (default {d.rounds})")
    t.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"objects per step (default {d.batch_size})")
    t.add_argument("--seed", type=int, default=d.seed, help="seed of the split and the prompts")
    t.add_argument("--min-area", type=int, default=16, help="skip labels smaller than this (px)")
    _common(p, workers=False)

    p = sub.add_parser("info", help="what napari-sam sees in a stack and what it has stored",
                       description="Axes, shape, slices, channel, contrast limits, the embedding "
                       "store napari-sam would use and how many slices it already holds.")
    p.add_argument("stack", metavar="STACK")
    p.add_argument("--cache", help="the embedding store (default: the one beside STACK)")
    p.add_argument("--axes", help="axes of STACK (default from the file)")
    p.add_argument("--channel", type=_channel, metavar="K[,K,K]", help="the channel SAM sees")
    p.add_argument("--tile-above", type=int, default=2048, metavar="PX",
                   help="the tiling threshold to report on (default 2048)")

    p = sub.add_parser("auto", help="segment everything (grid of points) and merge in 3D",
                       description="Automatic segmentation of every slice, merged across slices.")
    p.add_argument("stack", metavar="STACK")
    _job_options(p, prompts=False)
    p.add_argument("--points-per-side", type=int, default=16)
    p.add_argument("--pred-iou-thresh", type=float, default=0.88)
    p.add_argument("--stability-thresh", type=float, default=0.95)
    p.add_argument("--min-area", type=int, default=16)
    p.add_argument("--min-region-area", type=int, default=0, metavar="PX",
                   help="remove holes and islands smaller than PX from each mask (SAM's "
                   "min_mask_region_area; default 0: off)")
    p.add_argument("--merge-iou", type=float, default=0.3,
                   help="IoU with the previous slice's object to share its id")
    _common(p)
    return parser


