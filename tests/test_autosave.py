"""Labels saved as you go: a napari killed with kill -9 loses nothing that was committed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile

pytestmark = pytest.mark.gui

_SESSION = """
import json, os, signal, sys, time
import numpy as np
import napari
from qtpy.QtWidgets import QApplication

path, kill = sys.argv[1], sys.argv[2] == "kill"
viewer = napari.Viewer(show=True)
viewer.open(path, plugin="napari-sam")
_, w = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
w.prefetch.value = False
app = QApplication.instance()

def settle():
    end = time.time() + 120
    while time.time() < end:
        app.processEvents(); time.sleep(0.01)
        if not w.busy and not w._timer.isActive():
            app.processEvents(); return
    raise TimeoutError

settle()
labels = viewer.layers["SAM labels"] if "SAM labels" in viewer.layers else None
if kill:
    pts = viewer.layers["SAM points"]
    for z, y, x in [(0, 20, 25), (1, 38, 14), (3, 20, 25)]:
        viewer.dims.set_point(0, z)
        pts.add([z, y, x]); settle()
        w.commit(); settle()
    viewer.dims.set_point(0, 2)
    pts.add([2, 30, 30])  # the object in progress
    settle()
    data = np.asarray(viewer.layers["SAM labels"].data)
    print(json.dumps({"ids": np.unique(data).tolist(),
                      "counts": [int((data == i).sum()) for i in (1, 2, 3)]}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
data = np.asarray(labels.data)
print(json.dumps({"ids": np.unique(data).tolist(), "counts": [int((data == i).sum()) for i in (1, 2, 3)],
                  "records": len(labels.metadata.get("napari_sam_provenance", [])),
                  "lazy": type(labels.data).__name__, "status": w.messages.last_status,
                  "points": np.asarray(viewer.layers["SAM points"].data).tolist()}), flush=True)
viewer.close()  # as a user closes napari (an unclosed viewer can crash Qt's teardown at exit)
app.processEvents()
"""


def test_kill_9_after_three_commits_loses_nothing(tmp_path, tiny_checkpoint):
    rng = np.random.default_rng(3)
    img = rng.normal(100, 5, (4, 48, 56))
    img[:, 10:30, 12:40] += 600
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, img.astype(np.uint16), metadata={"axes": "ZYX"}, photometric="minisblack")
    env = dict(os.environ, NAPARI_SAM_MODEL=str(tiny_checkpoint),
               NAPARI_APPLICATION_IPY_INTERACTIVE="false")
    script = textwrap.dedent(_SESSION)
    first = subprocess.run([sys.executable, "-c", script, str(path), "kill"], capture_output=True,
                           text=True, timeout=300, env=env)
    assert first.returncode == -9, first.stderr[-3000:]
    before = json.loads(first.stdout.strip().splitlines()[-1])
    assert before["ids"] == [0, 1, 2, 3] and all(before["counts"])
    saved = tmp_path / "cells.labels.ome.zarr"
    assert (saved / "0").is_dir()
    again = subprocess.run([sys.executable, "-c", script, str(path), "reopen"], capture_output=True,
                           text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    after = json.loads(again.stdout.strip().splitlines()[-1])
    assert after["ids"] == before["ids"] and after["counts"] == before["counts"]
    assert after["records"] == 3 and after["lazy"] == "Array"  # zarr: never loaded whole
    assert after["points"] == [[2.0, 30.0, 30.0]] and "Restored" in after["status"]
    import napari_sam as ns

    table = ns.read_provenance(saved)
    assert list(table["label_id"]) == [1, 2, 3] and list(table["source"]) == ["click"] * 3
