"""Native libraries that must be loaded a particular way: triton's private LLVM.

segment_anything imports torchvision, torchvision imports ``torch._dynamo``, and that
imports triton, whose ``triton/_C/libtriton.so`` carries its own copy of LLVM and exports
its symbols. A napari viewer creates an OpenGL context first; with Mesa's drivers
(llvmpipe under Xvfb, in virtual machines, remote desktops and cluster VNC sessions;
radeonsi and iris on AMD and Intel GPUs) that loads Mesa's ``libLLVM`` into the global
symbol scope. When triton loads afterwards, the dynamic linker binds libtriton's LLVM
references to Mesa's copy (another LLVM version) and the process dies with a segmentation
fault: napari crashed on the first click that loaded the model.

:func:`install` adds a one-shot import hook: when anything imports ``triton`` for the
first time, ``libtriton.so`` is opened with ``RTLD_DEEPBIND`` before Python's own import
of it, so the library binds to its own symbols first; Python's import then finds it
already loaded. Triton stays fully usable (``torch.compile`` on GPUs), the hook costs
nothing until triton is imported, and it does nothing where ``RTLD_DEEPBIND`` does not
exist (macOS, Windows), where triton is not installed, or where it is already loaded.

Why not keep triton out of the process? That avoids the crash too, but takes
``torch.compile``'s GPU kernels away from users whose desktop happens to run on Mesa.
The measurements are in ``benchmarks/RESULTS.md``; ``tests/test_user_order.py`` runs the
reproduction in fresh processes.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from pathlib import Path

__all__ = ["install", "triton_library", "preload_triton"]

_loaded: list = []  # keeps the ctypes handle (and so the library) alive


def triton_library() -> Path | None:
    """Path of triton's LLVM-carrying extension, without importing triton (None if absent)."""
    spec = importlib.machinery.PathFinder.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        lib = Path(root) / "_C" / "libtriton.so"
        if lib.is_file():
            return lib
    return None


def preload_triton() -> bool:
    """Open ``libtriton.so`` with ``RTLD_DEEPBIND``; True when it was opened that way."""
    deepbind = getattr(os, "RTLD_DEEPBIND", None)
    if deepbind is None or "triton" in sys.modules or _loaded:
        return False
    lib = triton_library()
    if lib is None:
        return False
    import ctypes

    _loaded.append(ctypes.CDLL(str(lib), mode=os.RTLD_NOW | deepbind))
    return True


class _TritonHook(importlib.abc.MetaPathFinder):
    """Preloads libtriton the first time ``triton`` is imported, then steps aside."""

    def find_spec(self, fullname, path, target=None):  # noqa: ARG002 - finder protocol
        if fullname == "triton":
            _remove_hook()
            try:
                preload_triton()
            except OSError:  # an unloadable library: let triton's own import report it
                pass
        return None  # the normal finders import the module


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TritonHook)]


def install() -> None:
    """Install the hook (idempotent; a no-op without ``RTLD_DEEPBIND`` or once triton is loaded)."""
    if getattr(os, "RTLD_DEEPBIND", None) is None or "triton" in sys.modules:
        return
    if not any(isinstance(f, _TritonHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TritonHook())
