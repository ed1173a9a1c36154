"""Keep resident memory flat while slices stream through the encoder.

Encoding a slice allocates and frees buffers of tens of MB (the slice, its resized copy,
attention matrices). glibc serves them from the heap once it has seen such sizes freed;
over hundreds of slices the heap fragments and the process's resident memory creeps up.
After each encoded slice, :func:`release_free_memory` looks at the heap's free bytes and,
once they pass ``keep`` (256 MiB), hands the free pages back to the system
(``malloc_trim(0)``, ~10 ms): resident memory stays within the cache bound plus that
margin. The margin keeps the pages the next clicks' decoder allocates from (trimming
them all made the first click on each slice page-fault). What was measured, and the
alternatives tried and dropped, are in ``benchmarks/RESULTS.md`` ("Memory").

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
