"""One rule for where an image's embedding store lives, for every front end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

import napari_sam as ns
from napari_sam.io.places import embedding_store_for, find_embedding_store, image_stem

NAPARI_SAM = str(Path(sys.executable).with_name("napari-sam"))  # the installed command


def test_the_rule(tmp_path):
    assert image_stem("a/cells.ome.tif") == "cells" and image_stem("b/cells.zarr/") == "cells"
    img = tmp_path / "cells.tif"
    assert embedding_store_for(img) == tmp_path / "cells.embeddings.zarr"
    assert embedding_store_for(img, folder=tmp_path / "out") == tmp_path / "out" / "cells.embeddings.zarr"
    assert find_embedding_store(img) is None and find_embedding_store(None) is None
    legacy = tmp_path / "cells.tif.embeddings.zarr"  # what `napari-sam embed` wrote before
    legacy.mkdir()
    assert embedding_store_for(img) == legacy and find_embedding_store(img) == legacy
    (tmp_path / "cells.embeddings.zarr").mkdir()  # the current name wins when both exist
    assert embedding_store_for(img) == tmp_path / "cells.embeddings.zarr"


@pytest.fixture
def cells(tmp_path):
    rng = np.random.default_rng(3)
    img = rng.normal(100, 5, (3, 48, 56))
    img[:, 10:30, 12:40] += 600
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, img.astype(np.uint16), metadata={"axes": "ZYX"}, photometric="minisblack")
    return path


def test_store_from_the_command_is_used_by_the_api(cells, tiny_checkpoint, tiny_model):
    done = subprocess.run([NAPARI_SAM, "embed", str(cells), "--checkpoint", str(tiny_checkpoint),
                           "--device", "cpu", "-q"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    store = cells.parent / "cells.embeddings.zarr"
    assert store.is_dir() and not (cells.parent / "cells.tif.embeddings.zarr").exists()
    seg = ns.Segmenter(tiny_model, cells, cache="auto")
    assert seg.cache.store_path == store
    mask = seg.segment(1, points=[[20, 25]])
    assert mask.shape == (48, 56)
    assert seg.cache.stats["encoder_calls"] == 0 and seg.cache.stats["store_hits"] == 1
    # a store under the older name is still found
    store.rename(cells.parent / "cells.tif.embeddings.zarr")
    again = ns.Segmenter(tiny_model, cells, cache="auto")
    again.segment(2, points=[[20, 25]])
    assert again.cache.stats["encoder_calls"] == 0
    # no store beside the image: "auto" means memory only
    other = ns.Segmenter(tiny_model, ns.open_stack(tifffile.imread(cells)), cache="auto")
    assert other.cache.store_path is None


@pytest.mark.gui
def test_store_from_the_command_is_used_by_the_widget(cells, tiny_checkpoint, make_napari_viewer,
                                                      monkeypatch, qtbot):
    from gui_helpers import settle

    done = subprocess.run([NAPARI_SAM, "embed", str(cells), "--checkpoint", str(tiny_checkpoint),
                           "--device", "cpu", "-q"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    monkeypatch.setenv("NAPARI_SAM_MODEL", str(tiny_checkpoint))
    viewer = make_napari_viewer()
    viewer.open(str(cells), plugin="napari-sam")
    _, w = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    w.prefetch.value = False
    settle(qtbot, w)
    assert w.cache.value == "auto"  # the default
    viewer.dims.set_point(0, 1)
    viewer.layers["SAM points"].add([1, 20.0, 25.0])
    settle(qtbot, w)
    seg = w.ctrl.segmenter
    assert seg.cache.store_path == cells.parent / "cells.embeddings.zarr"
    assert seg.cache.stats["encoder_calls"] == 0 and seg.cache.stats["store_hits"] >= 1
    assert np.asarray(viewer.layers["SAM preview"].data).any()
