"""Screenshot of the napari-sam widget docked next to a segmented stack.

Opens napari with the synthetic nuclei sample (scale (4, 1, 1)), the model from
``$NAPARI_SAM_MODEL`` (default: a tiny random-weight SAM written to a temporary folder,
so the masks are meaningless but every code path is the real one), places points on a
slice, commits a few objects, and saves the whole window to ``docs/screenshot.png``.

Run headless with::

    xvfb-run -a .venv/bin/python scripts/screenshot.py [output.png]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main(out: str | os.PathLike = REPO / "docs" / "screenshot.png") -> Path:
    """Build the scene and write the screenshot; returns its path."""
    if not os.environ.get("NAPARI_SAM_MODEL"):
        from napari_sam.testing import make_tiny_checkpoint

        ckpt = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny_sam.pth")
        os.environ["NAPARI_SAM_MODEL"] = str(ckpt)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_sam._napari.sample_data import synthetic_nuclei
    from napari_sam._napari.widget import SamWidget

    viewer = napari.Viewer(title="napari-sam", show=True)
    (image, image_kw, _), (gt, _, _) = synthetic_nuclei()
    layer = viewer.add_image(image, **image_kw)
    widget = SamWidget(viewer, synchronous=True)
    widget.prefetch_check.setChecked(False)
    viewer.window.add_dock_widget(widget, name="Segment Anything", area="right")
    viewer.window.resize(1400, 900)

    z = 8
    viewer.dims.set_point(0, layer.data_to_world([z, 0, 0])[0])
    points = widget.ctrl.points_layer()
    # seed points at the centres of a few ground-truth nuclei on slice z
    ids = [i for i in np.unique(gt[z]) if i][:4]
    centres = [np.argwhere(gt[z] == i).mean(axis=0) for i in ids]
    for yx in centres[:3]:
        points.add([z, *yx])
        widget.commit()
    # leave one object in preview: a positive and a negative point
    if len(centres) > 3:
        points.add([z, *centres[3]])
        widget.toggle_polarity()
        points.add([z, centres[3][0] + 20, centres[3][1]])
        widget.toggle_polarity()
    viewer.layers.selection.active = points
    for _ in range(5):
        QApplication.processEvents()
    shot = viewer.screenshot(canvas_only=False, flash=False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from skimage.io import imsave

    imsave(out, shot, check_contrast=False)
    viewer.close()
    return out


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
