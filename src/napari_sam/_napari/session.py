"""The engine behind the widget: which model, which image, which store; built off the GUI thread.

:class:`EngineSettings` is a plain, immutable description of what the user chose (taken on
the GUI thread); :class:`Session` turns it into a loaded model and a
:class:`napari_sam.Segmenter` (or a :class:`napari_sam.TiledSegmenter` for slices larger
than the tiling threshold, :func:`napari_sam.workflows.tiling.segmenter_for`).
:meth:`Session.engine` may run in any thread: it reads only
the settings it is given and the arrays they hold.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..io.places import embedding_store_for, find_embedding_store
from ..models.loading import load_model_cached
from ..workflows.tiling import DEFAULT_TILE_ABOVE, segmenter_for

__all__ = ["EngineSettings", "Session"]
CACHE_AUTO, CACHE_MEMORY, CACHE_NEXT_TO_IMAGE, CACHE_PATH = "auto", "memory", "next to image", "path"


@dataclass(frozen=True)
class EngineSettings:
    """Everything the engine depends on, captured on the GUI thread.

    Attributes
    ----------
    data : array-like
        The image data the stack is opened on (a layer's level 0, or a lazy composite).
    data_id : int
        Identity of ``data`` (a new array means a new engine).
    axes : str
        Axis letters for :func:`napari_sam.open_stack`.
    channel : int, tuple of 3 int or None
        Channel(s) read (see :func:`napari_sam.open_stack`).
    source_path : str or None
        The image's file, where it has one (for the "next to the image" store).
    model : str
        Registry name or checkpoint path.
    device : str or None
        None: automatic.
    cache_mode : {"auto", "memory", "next to image", "path"}
        "auto": the store beside the image when there is one (``napari-sam embed``
        wrote it, or an earlier session), else memory only.
    cache_path : str or None
        The store for ``cache_mode == "path"``.
    tile_above : int
        Tile slices whose longest side exceeds this (0: never).
    """

    data: Any
    data_id: int
    axes: str
    channel: Any
    source_path: str | None
    model: str
    device: str | None
    cache_mode: str = CACHE_AUTO
    cache_path: str | None = None
    tile_above: int = DEFAULT_TILE_ABOVE

    def store(self) -> str | None:
        """The embedding store for these settings, or None (memory only)."""
        if self.cache_mode == CACHE_PATH and self.cache_path:
            return str(self.cache_path)
        if self.cache_mode == CACHE_NEXT_TO_IMAGE and self.source_path:
            return str(embedding_store_for(self.source_path))
        if self.cache_mode == CACHE_AUTO:
            found = find_embedding_store(self.source_path)
            return None if found is None else str(found)
        return None

    def key(self) -> tuple:
        return (self.data_id, self.axes, str(self.channel), self.model, self.device,
                self.store(), self.tile_above)


class Session:
    """Holds the current segmenter; builds a new one when the settings change.

    Parameters
    ----------
    status : callable(str), optional
        Receives progress messages ("Loading model ...") from whatever thread builds.
    """

    def __init__(self, *, status: Callable[[str], None] | None = None) -> None:
        self.status = status or (lambda msg: None)
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._seg: Any = None

    def current(self, settings: EngineSettings | None) -> Any:
        """The segmenter for ``settings`` if it is built, else None (never builds)."""
        if settings is None:
            return None
        with self._lock:
            return self._seg if self._key == settings.key() else None

    def engine(self, settings: EngineSettings) -> Any:
        """The segmenter for ``settings``, loading the model and opening the stack if needed."""
        import napari_sam as ns

        key = settings.key()
        with self._lock:
            if self._seg is not None and self._key == key:
                return self._seg
            spec = settings.model
            self.status(f"Loading model {Path(spec).name if Path(spec).suffix else spec} ...")
            model = load_model_cached(spec, device=settings.device)
            stack = ns.open_stack(settings.data, axes=settings.axes, channel=settings.channel)
            old = self._seg
            if old is not None:  # the old engine's queued prefetches are no use now
                old.cancel_prefetch()
            seg = _same_embeddings(old, self._key, key, model)
            if seg is None:
                seg = segmenter_for(model, stack, cache=settings.store(),
                                    tile_above=settings.tile_above)
            self._seg, self._key = seg, key
            return seg

    def close(self) -> None:
        """Stop background work of the current engine."""
        with self._lock:
            seg, self._seg, self._key = self._seg, None, None
        if seg is not None:
            seg.cancel_prefetch()


def _same_embeddings(old: Any, old_key: tuple | None, key: tuple, model: Any) -> Any:
    """A segmenter for ``model`` that keeps ``old``'s embeddings (memory and store), when
    only the model changed and its image encoder is the old one's (an adapted decoder);
    else None."""
    from ..engine.segment import Segmenter

    if old is None or old_key is None or not isinstance(old, Segmenter):
        return None
    model_field = 3  # EngineSettings.key(): (data_id, axes, channel, model, ...)
    if old_key[:model_field] + old_key[model_field + 1:] != key[:model_field] + key[model_field + 1:]:
        return None
    if model.embedding_signature() != old.model.embedding_signature():
        return None
    return Segmenter.from_cache(old.cache.for_model(model))
