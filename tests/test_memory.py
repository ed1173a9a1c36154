"""Heap trimming after encoded slices (napari_sam._memory)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from napari_sam import _memory

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or _memory._glibc() is None,
                                reason="glibc only")


@glibc_only
def test_trims_only_past_the_margin(monkeypatch):
    monkeypatch.delenv("NAPARI_SAM_KEEP_MALLOC", raising=False)
    free = _memory.free_heap_bytes()
    if free is None:
        pytest.skip("glibc without mallinfo2")
    assert free >= 0
    assert _memory.release_free_memory(keep=2**62) is False  # far below the margin
    assert _memory.release_free_memory(keep=0) is True


@glibc_only
def test_trim_returns_freed_heap_pages(monkeypatch):
    monkeypatch.delenv("NAPARI_SAM_KEEP_MALLOC", raising=False)
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    # mid-sized blocks (below glibc's mmap threshold) freed in a checkerboard: holes in the
    # heap that the top-of-heap trim inside free() cannot hand back
    blocks = [np.ones(64 * 1024 // 8) for _ in range(4000)]  # 4000 x 64 KiB = 250 MiB
    del blocks[::2]
    before = proc.memory_info().rss
    assert _memory.release_free_memory(keep=0)
    released = before - proc.memory_info().rss
    assert released > 50 * 2**20, f"trim released only {released / 2**20:.0f} MiB"
    del blocks


def test_env_var_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv("NAPARI_SAM_KEEP_MALLOC", "1")
    assert _memory.release_free_memory(keep=0) is False


TUNE_SCRIPT = """
import resource, sys
import numpy as np
from napari_sam import _memory
tuned = _memory.tune_allocator() if sys.argv[1] == "tune" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def slice_():  # an encoder's activations: a few blocks of tens of MB, all freed
    bufs = [np.ones(20 * 2**20 // 8) for _ in range(4)]
    del bufs
slice_()
f0 = faults()
for _ in range(10):
    slice_()
print(tuned, faults() - f0)
"""


def _faults(mode: str, **env) -> tuple[str, int]:
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "NAPARI_SAM_KEEP_MALLOC"} | env
    out = subprocess.run([sys.executable, "-c", TUNE_SCRIPT, mode], capture_output=True,
                         text=True, env=env, timeout=120, check=True).stdout.split()
    return out[0], int(out[1])


@glibc_only
def test_tuned_allocator_keeps_large_buffers_resident():
    """Default glibc hands part of the freed blocks back each round and faults them in
    again (~2,000 faults per round here); tuned, they stay in the heap (see _memory.py)."""
    tuned, faults = _faults("tune")
    assert tuned == "True" and faults < 500, faults
    untouched, faults = _faults("default")
    assert untouched == "None" and faults > 5000, faults
    off, faults = _faults("tune", NAPARI_SAM_KEEP_MALLOC="1")
    assert off == "False" and faults > 5000, faults
