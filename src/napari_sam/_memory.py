"""Keep resident memory flat while slices stream through the encoder.

Encoding a slice allocates and frees buffers of tens of MB (the slice, its resized copy,
attention matrices). glibc serves them from the heap once it has seen such sizes freed;
over hundreds of slices the heap fragments and the process's resident memory creeps up
(measured: +1.4 MB per 2048 x 2048 slice over 1000 slices). After each encoded slice,
:func:`release_free_memory` looks at the heap's free bytes and, once they pass
``keep`` (384 MiB), hands the free pages back to the system (``malloc_trim(0)``, ~10 ms):
resident memory stays within the cache bound plus that margin.

Why a margin: the ~100-150 MB the encoder frees are what the next prompt's decoder
allocates from. Trimming them after every slice made the first click on each new slice
page-fault its way to 31-38 ms instead of 22-29 ms (vit_b, 512 x 512).

An earlier fix pinned glibc's mmap threshold at 128 KiB. That also kept memory flat, but
every tensor over 128 KiB then came from a fresh mapping whose pages fault in on first
touch: +1.1 ms per 4 MB tensor, which more than doubled the decoder's time (61 -> 141 ms).

The other half, :func:`tune_allocator`, called once when a fast encoder is prepared: glibc
serves a request above its mmap threshold from a fresh mapping, and its default threshold
starts at 128 KiB and only grows as such blocks are freed, while its default trim
threshold hands the top of the heap back as soon as a few tens of MB lie free there. The
encoder's buffers (activations of 12-25 MB in bf16 for vit_b) were therefore page-faulted
in afresh, slice after slice: ~200,000 faults and ~0.4 s of a 4.2 s slice. With the mmap
threshold at glibc's maximum (32 MiB) and the trim threshold at ``2 * keep`` they stay in
the heap: ~0 faults per slice once warm, resident memory +~100 MB (the heap's free pool,
still capped by :func:`release_free_memory`).

Set ``NAPARI_SAM_KEEP_MALLOC=1`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

KEEP_FREE_BYTES = 384 * 2**20
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest accepted value on 64-bit
TRIM_THRESHOLD = 2 * KEEP_FREE_BYTES
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


_libc = None
_checked = False


def _glibc():
    global _libc, _checked
    if not _checked:
        _checked = True
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                if hasattr(lib, "malloc_trim"):
                    _libc = lib
                    if hasattr(lib, "mallinfo2"):  # glibc >= 2.33
                        lib.mallinfo2.restype = _MallInfo2
                    if hasattr(lib, "mallopt"):
                        lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                        lib.mallopt.restype = ctypes.c_int
            except OSError:  # not glibc (musl, ...): nothing to do
                _libc = None
    return _libc


def free_heap_bytes() -> int | None:
    """Bytes free inside glibc's heap arenas (``mallinfo2().fordblks``), or None."""
    lib = _glibc()
    if lib is None or not hasattr(lib, "mallinfo2"):
        return None
    return int(lib.mallinfo2().fordblks)


def release_free_memory(*, keep: int = KEEP_FREE_BYTES) -> bool:
    """Return the heap's free pages to the system once more than ``keep`` bytes are free.

    Returns True if it trimmed (glibc only; without ``mallinfo2`` it always trims).
    Does nothing when ``$NAPARI_SAM_KEEP_MALLOC`` is set.
    """
    if os.environ.get("NAPARI_SAM_KEEP_MALLOC"):
        return False
    lib = _glibc()
    if lib is None:
        return False
    free = free_heap_bytes()
    if free is not None and free <= keep:
        return False
    lib.malloc_trim(0)
    return True


_tuned: bool | None = None


def tune_allocator() -> bool:
    """Keep the encoder's large buffers in the heap between slices (once per process).

    Sets glibc's mmap threshold to :data:`MMAP_THRESHOLD` and its trim threshold to
    :data:`TRIM_THRESHOLD` (see the module docstring). Returns True if the allocator is
    tuned; False without glibc or when ``$NAPARI_SAM_KEEP_MALLOC`` is set.
    """
    global _tuned
    if _tuned is None:
        lib = _glibc()
        if os.environ.get("NAPARI_SAM_KEEP_MALLOC") or lib is None or not hasattr(lib, "mallopt"):
            return False  # the variable may be unset later: look again next time
        _tuned = bool(lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            lib.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _tuned
