"""The widget's "Adapt to my annotations": fine-tune the mask decoder on the labels made so
far (:func:`napari_sam.workflows.adapt.adapt_objects`), then segment with the result.

The training objects are the labels on the slices where objects were committed or tools
wrote (the provenance records of the labels layer) and on the slice in view; they are
copied on the GUI thread (a few slices), the training runs as a :class:`~.workers.Job`
(progress with the live loss, Cancel), and the adapted model is saved beside the image
(``cells.adapted.pth``; never over an existing file) and chosen under Model. Only the
decoder changes, so the embeddings computed so far are kept (memory and store). More than
:data:`MAX_OBJECTS` objects (labels from segment everything, say) are sampled.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .provenance import KEY
from .tools import ToolError, ToolRun

if TYPE_CHECKING:  # pragma: no cover
    from .controller import SamController

__all__ = ["adapt", "adapted_model_path"]

MIN_OBJECTS = 4
#: more objects than this are sampled (seeded): an epoch stays under a minute or so
MAX_OBJECTS = 200


def adapted_model_path(image: str | None) -> Path:
    """Where an adapted model is saved: ``cells.adapted.pth`` beside ``cells.tif`` (then
    ``cells.adapted-2.pth`` ...), or in napari-sam's cache folder for an image without a
    file; never an existing file."""
    from ..io.places import image_stem
    from ..models.loading import cache_dir

    if image:
        folder, stem = Path(image).parent, image_stem(image)
    else:
        folder, stem = cache_dir().parent / "adapted", "image"
    path, n = folder / f"{stem}.adapted.pth", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}.adapted-{n}.pth"
    return path


def _positions(ctrl: "SamController", layer: Any) -> list[tuple[int, ...]]:
    """Slice positions with recorded objects, and the slice in view."""
    seen: dict[tuple[int, ...], None] = {}
    for r in layer.metadata.get(KEY, []):
        pos = r.get("position")
        if pos is not None:
            seen[tuple(int(v) for v in pos)] = None
    current = ctrl.current_position()
    if current is not None:
        seen[tuple(current)] = None
    return list(seen)


def adapt(ctrl: "SamController", *, use_model: Callable[[str], None],
          settings: Any = None) -> ToolRun:
    """Plan an adaptation on the labels made so far; ``use_model(path)`` chooses the
    adapted model once it is saved. ``settings``: an
    :class:`~napari_sam.workflows.adapt.AdaptSettings` (default: its defaults)."""
    from ..models.loading import keep_loaded
    from ..workflows.adapt import AdaptSettings, adapt_objects
    from ..workflows.from_labels import label_masks
    from ..workflows.training import TrainingObject

    layer = ctrl.target_labels(create=False)
    if layer is None:
        raise ToolError(f"There are no labels yet: commit at least {MIN_OBJECTS} objects "
                        "(Shift+C), then adapt.")
    geo, engine = ctrl.geometry(), ctrl.settings()
    objects = []
    for pos in _positions(ctrl, layer):
        page = np.array(layer.data[pos], copy=True)
        if page.any():
            index = geo.index(pos)
            objects += [TrainingObject(index, m, k) for k, m in label_masks(page, min_area=16)]
    if len(objects) < MIN_OBJECTS:
        raise ToolError(f"Adapting needs at least {MIN_OBJECTS} objects (some are held out to "
                        f"measure the result); the labels have {len(objects)} on the slices "
                        "where you committed: commit more.")
    found = len(objects)
    if found > MAX_OBJECTS:
        keep = np.random.default_rng(0).choice(found, MAX_OBJECTS, replace=False)
        objects = [objects[i] for i in sorted(keep)]
    settings = settings or AdaptSettings()
    out = adapted_model_path(engine.source_path)
    source = {"image": engine.source_path, "labels_layer": layer.name,
              "slices": sorted({o.index for o in objects}), "objects_found": found}

    def job(progress, should_stop):
        seg = ctrl.session.engine(engine)

        def report(done: int, total: int, info: dict) -> None:
            val = info.get("val_loss")
            text = (f"Adapting on {len(objects)} objects: epoch {info['epoch']}/{info['epochs']}, "
                    f"loss {info['loss']:.3f}" + (f" (held out {val:.3f})" if val is not None else ""))
            progress(done, total, text)

        res = adapt_objects(seg, objects, settings=settings, source=source, progress=report,
                            should_stop=should_stop)
        if not res.cancelled:
            res.save(out)
            keep_loaded(res.model, str(out), device=engine.device)  # no reload from the file
        return res

    def apply(res) -> str:
        if res is None or res.cancelled:
            return "Adaptation cancelled: the model is unchanged and nothing was saved."
        use_model(str(res.path))
        sampled = f" (a sample of the {found} found)" if found > len(objects) else ""
        return (f"Adapted on {res.record['objects']['train']} objects "
                f"({res.record['objects']['val']} held out){sampled}: single-click IoU "
                f"{res.iou_before:.2f} -> {res.iou_after:.2f}. Now segmenting with "
                f"{res.path.name} (saved in {res.path.parent}); the embeddings are kept. "
                "Choose the base model under Model to go back.")

    return ToolRun(f"Adapt to {len(objects)} annotations", job, apply)
