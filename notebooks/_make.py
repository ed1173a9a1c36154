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

VOLUME = [
    ("md", """# Volumes: precompute, propagate, segment everything, export

1. precompute the embeddings of every slice into a zarr store, with a progress bar;
2. follow one object through the slices (propagation);
3. segment the whole volume automatically and merge the slices in 3D;
4. export OME-Zarr labels and read them back.

The model is the one `NAPARI_SAM_MODEL` names, else `vit_b`. With the tiny random-weight
model the test suite uses, the masks are noise: the mechanics run, the pictures mean nothing."""),
    ("code", """import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import tifffile
from tqdm.auto import tqdm

import napari_sam as ns
from napari_sam.workflows import batch, volume
from napari_sam.synthetic import make_nuclei_stack

workdir = Path(tempfile.mkdtemp(prefix="napari-sam-volume-"))
image, truth = make_nuclei_stack((8, 192, 192), n_nuclei=12, seed=2)
tifffile.imwrite(workdir / "nuclei.tif", image, photometric="minisblack", metadata={"axes": "ZYX"})
stack = ns.open_stack(workdir / "nuclei.tif")
model = ns.load_model()
print(stack, model.name)"""),
    ("md", """## 1. Precompute embeddings (resumable)

`embed` skips slices already in the store, so re-running this cell, or a job that was
interrupted, only computes what is missing."""),
    ("code", """store = workdir / "nuclei.embeddings.zarr"
seg = ns.Segmenter(model, stack, cache=store)
with tqdm(total=len(stack), desc="embeddings") as bar:
    seg.embed(progress=lambda done, total: bar.update(done - bar.n))
print("stored slices:", list(seg.cache.stored_indices()))
print("second run encodes", ns.Segmenter(model, stack, cache=store).embed(), "slices")"""),
    ("md", """## 2. Propagate one object through the slices

Seed the biggest nucleus with a point on its central slice. The next slice's prompt comes
from the previous slice's mask (`strategy="box"` by default; `"points"` and `"mask"` are
the alternatives). Each direction stops when SAM's predicted IoU or the overlap with the
previous slice drops below a threshold, or at the end of the stack."""),
    ("code", """ids, counts = np.unique(truth[truth > 0], return_counts=True)
target = ids[np.argmax(counts)]
zs = np.nonzero((truth == target).any(axis=(1, 2)))[0]
z = int(zs[len(zs) // 2])
yy, xx = np.nonzero(truth[z] == target)
result = volume.propagate(seg, z, points=[[yy.mean(), xx.mean()]], point_labels=[1])
print("visited slices", result.visited, "accepted", result.accepted, "stopped", result.stop)
assert result.mask.shape == stack.shape and result.mask.dtype == bool"""),
    ("md", """## 3. Segment everything, merge in 3D, export OME-Zarr

`batch.auto_segment` runs SAM's grid-of-points generation on every slice (reusing the
stored embeddings), links per-slice objects across slices by overlap, and writes OME-Zarr
labels with the stack's scale. It is resumable, like every batch job."""),
    ("code", """out = workdir / "nuclei_labels.ome.zarr"
res = batch.auto_segment(stack, out, model=model, cache=store, points_per_side=8)
print(res.summary())"""),
    ("code", """labels = ns.open_stack(out)                 # read the OME-Zarr back, lazily
print(labels)
lab = np.asarray(labels.data)
print("3D objects:", len(np.unique(lab)) - 1, "dtype", lab.dtype)
assert lab.shape == stack.shape
fig, axes = plt.subplots(1, 3, figsize=(12, 4))
axes[0].imshow(stack[z], cmap="gray"); axes[0].set_title(f"slice {z}")
axes[1].imshow(result.mask[z]); axes[1].set_title("propagated object")
axes[2].imshow(lab[z], cmap="nipy_spectral", interpolation="nearest"); axes[2].set_title("automatic, merged in 3D")
for ax in axes: ax.axis("off")
plt.show()"""),
]

SCALE_OUT = [
    ("md", """# Scale-out: the same batch job on a dask cluster

Every batch job (`embed_stack`, `segment_prompts`, `propagate_prompts`, `auto_segment`)
takes a `client=`: slices become tasks, each worker loads the model once, and each task
writes its own zarr chunks, so workers never contend and the result is identical to a
local run. Here a `LocalCluster` with two single-threaded worker processes stands in for a
real cluster."""),
    ("code", """import tempfile
from pathlib import Path

import numpy as np
import tifffile
from dask.distributed import Client, LocalCluster

import napari_sam as ns
from napari_sam.workflows import batch
from napari_sam.synthetic import make_nuclei_stack

workdir = Path(tempfile.mkdtemp(prefix="napari-sam-cluster-"))
image, truth = make_nuclei_stack((4, 128, 128), n_nuclei=8, seed=3)
tif = workdir / "nuclei.tif"
tifffile.imwrite(tif, image, photometric="minisblack", metadata={"axes": "ZYX"})

# one positive point per nucleus, on its central slice, as napari would export a Points layer
rows = ["index,axis-0,axis-1,axis-2,label"]
for k, i in enumerate(np.unique(truth[truth > 0])):
    zs = np.nonzero((truth == i).any(axis=(1, 2)))[0]
    z = int(zs[len(zs) // 2])
    yy, xx = np.nonzero(truth[z] == i)
    j = len(yy) // 2
    rows.append(f"{k},{z},{yy[j]},{xx[j]},1")
(workdir / "points.csv").write_text("\\n".join(rows) + "\\n")
model = ns.default_model_name()     # workers load it by name or path
print(model)"""),
    ("code", """local = batch.segment_prompts(tif, workdir / "points.csv", workdir / "local.ome.zarr", model=model)
print(local.summary())"""),
    ("code", """cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
client = Client(cluster)
remote = batch.segment_prompts(tif, workdir / "points.csv", workdir / "cluster.ome.zarr",
                               model=model, client=client)
print(remote.summary())
a = np.asarray(ns.open_stack(workdir / "local.ome.zarr").data)
b = np.asarray(ns.open_stack(workdir / "cluster.ome.zarr").data)
assert np.array_equal(a, b), "distributed and local runs differ"
print("identical:", a.shape, len(np.unique(a)) - 1, "objects")
client.close(); cluster.close()"""),
    ("md", """## On a real cluster

Point a `Client` at the scheduler instead of starting a `LocalCluster`; every worker needs
napari-sam installed (without the `[qt]` extra) and the checkpoint reachable (a registry
name downloads it once per machine into the cache, or set `NAPARI_SAM_CHECKPOINTS` to a
shared folder). Inputs and outputs must be on storage all workers see.

```python
from dask.distributed import Client
client = Client("tcp://scheduler:8786")
batch.auto_segment("/shared/stack.tif", "/shared/stack_labels.ome.zarr", model="vit_b", client=client)
```

From the shell: `napari-sam auto STACK --out OUT.ome.zarr --scheduler tcp://scheduler:8786`,
or `--workers 4` for a local cluster."""),
]

if __name__ == "__main__":
    notebook("01_quickstart.ipynb", QUICKSTART)
    notebook("02_volume.ipynb", VOLUME)
    notebook("03_scale_out.ipynb", SCALE_OUT)
