"""Helpers for the napari tests: wait for the widget, compare with the engine."""

from __future__ import annotations

import numpy as np

Z, YX = 3, (40.0, 70.0)


def settle(qtbot, w, timeout=120_000):
    """Until the widget's click worker, tool and refresh timer are all done."""
    qtbot.wait(1)
    qtbot.waitUntil(lambda: not w.busy and not w._timer.isActive(), timeout=timeout)
    qtbot.wait(5)  # deliver answers queued by the worker


def go_to(viewer, layer, z):
    """Show data slice ``z`` of ``layer`` (world step along axis 0)."""
    viewer.dims.set_point(0, layer.data_to_world([z, 0, 0])[0])


_SEGMENTERS: dict = {}


def engine(tiny_model, image, **open_kw):
    """A Segmenter on the same data, built directly (reused per image)."""
    import napari_sam as ns

    key = (id(image), tuple(sorted(open_kw.items())))
    if key not in _SEGMENTERS:
        _SEGMENTERS.clear()
        _SEGMENTERS[key] = (image, ns.Segmenter(tiny_model, ns.open_stack(image, **open_kw)))
    return _SEGMENTERS[key][1]


def preview(viewer):
    return np.asarray(viewer.layers["SAM preview"].data)
