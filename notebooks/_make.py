"""Write the notebooks from these cell lists (outputs stripped). Run: python notebooks/_make.py"""

from __future__ import annotations

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent


def notebook(name: str, cells: list[tuple[str, str]]) -> None:
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src)
                for kind, src in cells]
    nbf.write(nb, HERE / name)


QUICKSTART = [
    ("md", """# napari-sam quickstart

Open a stack, load a model, segment with points, boxes and both, paint labels, look at the
result. Everything here is numpy in, numpy out; napari is optional (last cell).

The model is the one `NAPARI_SAM_MODEL` names (a registry name such as `vit_b`, or a
checkpoint path); without it, `vit_b` is downloaded once (375 MB, hash-verified)."""),
    ("code", """import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import tifffile

import napari_sam as ns
from napari_sam.synthetic import make_nuclei_stack

print("model:", ns.default_model_name())"""),
    ("md", """## 1. A stack on disk

We generate a synthetic nuclei stack and write it as a TIFF and as a zarr array. Replace
`tif_path` with your own file: TIFF (also BigTIFF, ImageJ, OME-TIFF), zarr or OME-Zarr."""),
    ("code", """workdir = Path(tempfile.mkdtemp(prefix="napari-sam-"))
image, truth = make_nuclei_stack((8, 256, 256), n_nuclei=20, seed=1)
tif_path = workdir / "nuclei.tif"
tifffile.imwrite(tif_path, image, imagej=True, resolution=(1.0, 1.0), metadata={"axes": "ZYX", "spacing": 4.0})

import zarr
zarr_path = workdir / "nuclei.zarr"
zarr.open_array(zarr_path, mode="w", shape=image.shape, chunks=(1, 256, 256), dtype=image.dtype)[:] = image

stack = ns.open_stack(tif_path)          # lazy: nothing read yet
print(stack)
print("axes", stack.axes, "shape", stack.shape, "slices", len(stack), "scale", stack.scale)
assert ns.open_stack(zarr_path).shape == stack.shape"""),
    ("md", "## 2. Load a model and make a segmenter"),
    ("code", """model = ns.load_model()                 # NAPARI_SAM_MODEL, else vit_b
print(model.name, model.architecture.name, model.device)
seg = ns.Segmenter(model, stack, cache=workdir / "nuclei.embeddings.zarr")"""),
    ("md", """## 3. Prompts

Coordinates are (y, x) pixels of the slice, as in napari. We prompt the nucleus that covers
the middle of slice `z` of the ground truth."""),
    ("code", """z = 4
ids, counts = np.unique(truth[z][truth[z] > 0], return_counts=True)
target = ids[np.argmax(counts)]                     # the biggest nucleus on this slice
yy, xx = np.nonzero(truth[z] == target)
point = [yy.mean(), xx.mean()]
box = [yy.min() - 2, xx.min() - 2, yy.max() + 2, xx.max() + 2]   # (y0, x0, y1, x1)

by_point = seg.segment(z, points=[point], point_labels=[1])
by_box = seg.segment(z, box=box)
by_both = seg.segment(z, box=box, points=[point, [box[0] + 1, box[1] + 1]], point_labels=[1, 0])

pred = seg.predict(z, points=[point])                # all three SAM masks and their scores
print("scores", pred.scores.round(3), "best", pred.best)
for name, m in [("point", by_point), ("box", by_box), ("both", by_both)]:
    assert m.shape == stack.slice_shape and m.dtype == bool
    iou = (m & (truth[z] == target)).sum() / max((m | (truth[z] == target)).sum(), 1)
    print(f"{name:6s} area {m.sum():6d}  IoU with ground truth {iou:.2f}")"""),
    ("md", """## 4. Paint labels

`paint` takes the next free id and never overwrites existing labels unless asked. It returns
an undo record."""),
    ("code", """labels = np.zeros(stack.shape, np.uint16)
first = ns.paint(labels, by_box, index=z)
second = ns.paint(first.labels, by_point, index=z)       # keeps object 1 where they overlap
labels = second.labels
print("ids", first.label_id, second.label_id, "pixels painted", first.n_pixels, second.n_pixels)
ns.undo(labels, second.record)
assert (labels[z] == second.label_id).sum() == 0
ns.redo(labels, second.record)"""),
    ("md", "## 5. Look at it"),
    ("code", """fig, axes = plt.subplots(1, 4, figsize=(14, 4))
axes[0].imshow(stack[z], cmap="gray"); axes[0].set_title(f"slice {z}")
for ax, (name, m) in zip(axes[1:], [("point", by_point), ("box", by_box), ("both", by_both)]):
    ax.imshow(stack[z], cmap="gray")
    ax.imshow(np.ma.masked_where(~m, m), alpha=0.5, cmap="autumn")
    ax.plot(point[1], point[0], "g+", ms=12)
    ax.set_title(name)
for ax in axes: ax.axis("off")
plt.show()"""),
    ("md", """## 6. Optionally, in napari

Set `SHOW_NAPARI = True` to open a viewer with the image and the labels (needs a display
and the `[qt]` extra)."""),
    ("code", """SHOW_NAPARI = False
if SHOW_NAPARI:
    import napari
    viewer = napari.Viewer()
    viewer.add_image(stack.data, scale=stack.scale, name="nuclei")
    viewer.add_labels(labels, scale=stack.scale, name="napari-sam labels")"""),
]

if __name__ == "__main__":
    notebook("01_quickstart.ipynb", QUICKSTART)
