"""Keep the heap from growing while slices stream through the encoder.

Walking a large stack allocates and frees many buffers of tens of MB (slices, resized
images, attention matrices). glibc raises its mmap threshold each time such a buffer is
freed, after which the next ones come from the heap, fragment it, and the process's
resident memory creeps up slice after slice (measured: +700 MB over 300 slices of
2048 x 2048 with a 256 MiB cache bound, flat at the bound with a fixed threshold). Fixing
the threshold keeps large buffers in their own mappings, returned to the system when freed.

Set ``NAPARI_SAM_KEEP_MALLOC=1`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_THRESHOLD = 128 * 1024
_done = False


def limit_heap_fragmentation() -> bool:
    """Fix glibc's mmap threshold at 128 KiB once per process; True if it was set."""
    global _done
    if _done:
        return True
    _done = True
    if not sys.platform.startswith("linux") or os.environ.get("NAPARI_SAM_KEEP_MALLOC"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to do
        return False
