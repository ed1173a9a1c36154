"""Models: loading (registry, verified download, checkpoint files), the SAM family, speed paths.

:class:`~napari_sam.models.base.PromptableModel` is what the engine needs from a model;
:class:`~napari_sam.models.sam.SamModel` implements it for SAM.
"""

from .architecture import OFFICIAL_ARCHITECTURES, Architecture, build_sam, infer_architecture
from .base import Embedding, PromptableModel
from .loading import (
    cache_dir,
    choose_device,
    default_model_name,
    list_models,
    load_model,
    load_model_cached,
    resolve_checkpoint,
)
from .registry import REGISTRY, ModelSpec
from .sam import SamModel

__all__ = [
    "OFFICIAL_ARCHITECTURES",
    "REGISTRY",
    "Architecture",
    "Embedding",
    "ModelSpec",
    "PromptableModel",
    "SamModel",
    "build_sam",
    "cache_dir",
    "choose_device",
    "default_model_name",
    "infer_architecture",
    "list_models",
    "load_model",
    "load_model_cached",
    "resolve_checkpoint",
]
