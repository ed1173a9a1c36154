"""Screenshots of the napari-sam widget, made the way a user works.

The viewer first, the synthetic nuclei sample (scale (4, 1, 1)), then the widget from the
plugin menu (``add_plugin_dock_widget``), with the model from ``$NAPARI_SAM_MODEL``
(default: a tiny random-weight SAM written to a temporary folder: the masks are
meaningless, every code path is the real one). Writes four pictures into ``docs/``:

* ``widget_fresh.png``: the widget as it opens;
* ``widget_preview.png``: two committed objects and a preview from two clicks;
* ``widget_propagated.png``: an object propagated through Z, in napari's 3D view;
* ``widget_everything.png``: segment everything on the slice in view.

Run headless with::

    xvfb-run -a .venv/bin/python scripts/screenshot.py [output_folder]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _wait(app, widget, timeout: float = 600) -> None:
    end = time.time() + timeout
    while time.time() < end:
        app.processEvents()
        time.sleep(0.02)
        if not widget.busy and not widget._timer.isActive():
            app.processEvents()
            return
    raise TimeoutError("the widget did not finish")


def _shot(viewer, app, path: Path) -> Path:
    from skimage.io import imsave

    for _ in range(5):
        app.processEvents()
    imsave(path, viewer.screenshot(canvas_only=False, flash=False), check_contrast=False)
    return path


def main(out: str | os.PathLike = REPO / "docs") -> list[Path]:
    """Build the scenes and write the screenshots; returns their paths."""
    if not os.environ.get("NAPARI_SAM_MODEL"):
        from napari_sam.testing import make_tiny_checkpoint

        ckpt = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny_sam.pth")
        os.environ["NAPARI_SAM_MODEL"] = str(ckpt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_sam._napari.sample_data import synthetic_nuclei

    viewer = napari.Viewer(title="napari-sam", show=True)
    viewer.window.resize(1280, 860)
    (image, image_kw, _), (gt, _, _) = synthetic_nuclei()
    layer = viewer.add_image(image, **image_kw)
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    app = QApplication.instance()
    z = 8
    viewer.dims.set_point(0, layer.data_to_world([z, 0, 0])[0])
    _wait(app, widget)
    shots = [_shot(viewer, app, out / "widget_fresh.png")]

    points = viewer.layers["SAM points"]
    ids = [i for i in np.unique(gt[z]) if i][:4]
    centres = [np.argwhere(gt[z] == i).mean(axis=0) for i in ids]
    for yx in centres[:2]:
        points.add([z, *yx])
        _wait(app, widget)
        widget.commit()
    points.add([z, *centres[2]])  # an object in preview: a positive and a negative point
    _wait(app, widget)
    widget.toggle_polarity()
    points.add([z, centres[2][0] + 18, centres[2][1]])
    _wait(app, widget)
    widget.toggle_polarity()
    shots.append(_shot(viewer, app, out / "widget_preview.png"))

    widget.commit()
    widget.propagate_score.value, widget.propagate_iou.value = -1000.0, 0.0  # random weights
    job = widget.propagate()
    while job is not None and job.running:
        app.processEvents()
        time.sleep(0.02)
    viewer.dims.ndisplay = 3
    viewer.camera.angles = (0, -35, 60)
    viewer.layers["SAM points"].visible = viewer.layers["SAM boxes"].visible = False
    shots.append(_shot(viewer, app, out / "widget_propagated.png"))
    viewer.dims.ndisplay = 2
    viewer.layers["SAM points"].visible = viewer.layers["SAM boxes"].visible = True

    widget.everything_score.value, widget.everything_stability.value = 0.0, 0.0
    job = widget.segment_everything()
    while job is not None and job.running:
        app.processEvents()
        time.sleep(0.02)
    _wait(app, widget)
    shots.append(_shot(viewer, app, out / "widget_everything.png"))
    viewer.close()
    return shots


if __name__ == "__main__":
    for path in main(*sys.argv[1:]):
        print(path)
