"""Shared fixtures: tiny SAM checkpoints with random weights, real data, synthetic stacks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from gui_helpers import settle

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    env = os.environ.get("NAPARI_SAM_TEST_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real test data folder (../shared/data); skips when it is absent."""
    path = _data_dir()
    if not (path / "dsb2018" / "img2d.tif").exists():
        pytest.skip(f"real test data not found at {path} (set NAPARI_SAM_TEST_DATA)")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A small SAM (embed dim 32, depth 2, image size 1024) saved as a state dict."""
    from napari_sam.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_sam.pth", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """The tiny SAM loaded through the user-facing loader, on the CPU."""
    import napari_sam as ns

    return ns.load_model(checkpoint=tiny_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def synthetic_stack() -> np.ndarray:
    """A (6, 96, 128) uint16 stack of bright blobs on a noisy background."""
    rng = np.random.default_rng(1)
    zz, yy, xx = np.mgrid[:6, :96, :128]
    img = rng.normal(100, 10, (6, 96, 128))
    for _ in range(8):
        cz, cy, cx = rng.uniform((0, 10, 10), (6, 86, 118))
        r = rng.uniform(6, 14)
        img += 800 * (((zz - cz) * 6) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 < r**2)
    return img.clip(0, 65535).astype(np.uint16)


# Runs ``napari_sam.cli`` with the batch tasks' done-marker wrapped: after ``stop_after``
# units are marked done the process stops itself (SIGSTOP), so the test kills it at exactly
# that point, without polling or timing.
_STOP_AFTER_UNITS = """
import os, signal, sys
from napari_sam.workflows import _tasks
stop_after, marked = int(sys.argv[1]), []
real = _tasks.mark_done
def mark_done(job, name, i):
    real(job, name, i)
    if name in ("done", "groups_done", "slices_done"):
        marked.append(i)
        if len(marked) == stop_after:
            os.kill(os.getpid(), signal.SIGSTOP)
_tasks.mark_done = mark_done
from napari_sam import cli
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.fixture
def kill_part_way():
    """``run(args, work, env=...)``: start a batch CLI job (``args`` as
    ``[python, "-m", "napari_sam.cli", ...]``), SIGKILL it right after it has marked
    ``min_done`` units done in its work store ``work``; returns how many were done."""
    import os
    import signal
    import subprocess

    import zarr

    def done(work: Path) -> int:
        return int(np.count_nonzero(zarr.open_array(work / "done", mode="r")[:]))

    def run(args, work: Path, *, env: dict, min_done: int = 2, timeout: float = 240) -> int:
        assert list(args[1:3]) == ["-m", "napari_sam.cli"], args
        cmd = [args[0], "-c", _STOP_AFTER_UNITS, str(min_done), *map(str, args[3:])]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        _, status = os.waitpid(proc.pid, os.WUNTRACED)  # until it stopped itself (or ended)
        if os.WIFSTOPPED(status):
            os.kill(proc.pid, signal.SIGKILL)
            os.waitpid(proc.pid, 0)
        proc.returncode = -9
        proc.stdout.close()
        proc.stderr.close()
        return done(work)

    return run


@pytest.fixture
def open_widget(make_napari_viewer, tiny_checkpoint, monkeypatch, qtbot):
    """A factory: viewer (first), image layer, then the widget from the plugin menu."""
    monkeypatch.setenv("NAPARI_SAM_MODEL", str(tiny_checkpoint))

    def make(image=None, *, prefetch=False, name="img", **layer_kwargs):
        viewer = make_napari_viewer()
        if image is not None:
            viewer.add_image(image, name=name, **layer_kwargs)
        _, w = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
        w.prefetch.value = prefetch
        settle(qtbot, w)
        return viewer, w

    return make
