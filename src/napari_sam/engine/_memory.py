"""Keep resident memory flat while slices stream through the encoder.

Encoding a slice allocates and frees buffers of tens of MB (the slice, its resized copy,
attention matrices). glibc serves them from the heap once it has seen such sizes freed;
over hundreds of slices the heap fragments and the process's resident memory creeps up
(measured: +1.4 MB per 2048 x 2048 slice over 1000 slices). After each encoded slice,
:func:`release_free_memory` looks at the heap's free bytes and, once they pass
``keep`` (256 MiB), hands the free pages back to the system (``malloc_trim(0)``, ~10 ms):
resident memory stays within the cache bound plus that margin.

Why a margin: the ~100-150 MB the encoder frees are what the next prompt's decoder
allocates from. Trimming them after every slice made the first click on each new slice
page-fault its way to 31-38 ms instead of 22-29 ms (vit_b, 512 x 512).

An earlier fix pinned glibc's mmap threshold at 128 KiB. That also kept memory flat, but
every tensor over 128 KiB then came from a fresh mapping whose pages fault in on first
touch: +1.1 ms per 4 MB tensor, which more than doubled the decoder's time (61 -> 141 ms).

Tried and dropped: glibc's mmap threshold at its 32 MiB maximum and its trim threshold at
512 MiB keep the encoder's activations in the heap (page faults per vit_b slice 190,000
-> ~0, 5-8 % faster), but the heap's free pool then sits above the 256 MiB margin, the
trim after each slice hands back pages the next clicks fault in again (decode p50 +2-10
ms), and a larger margin breaks the walk's bound (peak 344 MB over model + cache).

Set ``NAPARI_SAM_KEEP_MALLOC=1`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

KEEP_FREE_BYTES = 256 * 2**20


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
