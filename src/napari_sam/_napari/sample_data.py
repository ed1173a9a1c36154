"""Sample data: a synthetic nuclei stack and its ground truth (generated, nothing downloaded)."""

from __future__ import annotations

from ..synthetic import make_nuclei_stack

# physical voxel size of the synthetic stack: Z spacing four times the Y/X spacing
SCALE = (4.0, 1.0, 1.0)


def synthetic_nuclei() -> list[tuple]:
    """Return napari layer data tuples: the image and its ground-truth labels."""
    image, labels = make_nuclei_stack()
    return [
        (image, {"name": "nuclei", "scale": SCALE, "axis_labels": ("z", "y", "x")}, "image"),
        (labels, {"name": "nuclei ground truth", "scale": SCALE, "opacity": 0.4}, "labels"),
    ]
