"""napari-sam: Segment Anything on microscopy stacks.

The public API is imported lazily: ``import napari_sam`` loads neither torch, napari nor
Qt. The first access to a name below imports only the module that defines it.

Examples
--------
>>> import napari_sam as ns
>>> stack = ns.open_stack("cells.tif")                  # doctest: +SKIP
>>> model = ns.load_model("vit_b")                      # doctest: +SKIP
>>> seg = ns.Segmenter(model, stack, cache="cells.embeddings.zarr")  # doctest: +SKIP
>>> mask = seg.segment(12, points=[[120, 80]], point_labels=[1])     # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._native import install as _install_triton_guard

# before anything imports torchvision (and so triton): see _native for the crash it avoids
_install_triton_guard()

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    # models
    "load_model": "models",
    "SamModel": "models",
    "Architecture": "models",
    "REGISTRY": "models",
    "list_models": "models",
    "default_model_name": "models",
    # stacks
    "open_stack": "io.stacks",
    "Stack": "io.stacks",
    # engine
    "Prompt": "engine.prompt",
    "EmbeddingCache": "engine.cache",
    "Embedding": "models.base",
    "Segmenter": "engine.segment",
    "Prediction": "engine.segment",
    "TiledSegmenter": "workflows.tiling",
    "TiledStack": "workflows.tiling",
    # labels
    "paint": "labels",
    "undo": "labels",
    "redo": "labels",
    "PaintResult": "labels",
    "UndoRecord": "labels",
    "LabelHistory": "labels",
    # errors
    "NapariSamError": "_errors",
    "InvalidInputError": "_errors",
    "CheckpointError": "_errors",
    "ChecksumError": "_errors",
    "DownloadError": "_errors",
    "StackError": "_errors",
    # provenance
    "read_provenance": "io.provenance",
    # adaptation
    "adapt": "workflows.adapt",
    "AdaptResult": "workflows.adapt",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'napari_sam' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"napari_sam.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ._errors import (
        CheckpointError,
        ChecksumError,
        DownloadError,
        InvalidInputError,
        NapariSamError,
        StackError,
    )
    from .engine.cache import EmbeddingCache
    from .engine.prompt import Prompt
    from .engine.segment import Prediction, Segmenter
    from .io.provenance import read_provenance
    from .io.stacks import Stack, open_stack
    from .labels import LabelHistory, PaintResult, UndoRecord, paint, redo, undo
    from .models import REGISTRY, Architecture, SamModel, default_model_name, list_models, load_model
    from .models.base import Embedding
    from .workflows.adapt import AdaptResult, adapt
    from .workflows.tiling import TiledSegmenter, TiledStack
