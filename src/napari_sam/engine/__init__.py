"""The engine: prompts, the embedding store, the memory cache and prefetcher, the segmenter.

Layers, each depending only on those before it (and on :mod:`napari_sam.models` /
:mod:`napari_sam.io`): :mod:`.prompt` (the prompt type) -> :mod:`.store` (the zarr
embedding store) -> :mod:`.cache` (memory LRU, locks, encoder calls) ->
:mod:`.prefetch` -> :mod:`.segment` (:class:`Segmenter`, which owns the prefetcher).
"""

from .cache import EmbeddingCache
from .prompt import Prompt
from .segment import Prediction, Segmenter
from .store import EmbeddingStore, EmbeddingStoreWarning

__all__ = ["EmbeddingCache", "EmbeddingStore", "EmbeddingStoreWarning", "Prediction", "Prompt",
           "Segmenter"]
