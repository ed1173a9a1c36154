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

import sys
from typing import Sequence

from .parser import build_parser

__all__ = ["main", "build_parser"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``napari-sam``; returns the exit status."""
    from .._errors import NapariSamError
    from ..io.zarr_logging import quiet_sibling_write_errors

    quiet_sibling_write_errors()  # a full disk is reported once, below
    args = build_parser().parse_args(argv)
    try:
        from .run import run

        return run(args)
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

