"""Heap trimming after encoded slices (napari_sam._memory)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from napari_sam.engine import _memory

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
    freed = sum(b.nbytes for b in blocks[::2])
    del blocks[::2]
    before = proc.memory_info().rss
    assert _memory.release_free_memory(keep=0)
    released = before - proc.memory_info().rss
    assert released > 0.4 * freed, f"trim released {released / 2**20:.0f} of {freed / 2**20:.0f} MiB freed"
    del blocks


def test_env_var_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv("NAPARI_SAM_KEEP_MALLOC", "1")
    assert _memory.release_free_memory(keep=0) is False
