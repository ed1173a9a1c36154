"""Where things live: the one rule for an image's embedding store (and its outputs' names).

Every front end (the widget's "next to the image", ``napari-sam embed``, ``run_folder``,
``Segmenter(..., cache="auto")``, the notebooks) asks :func:`embedding_store_for`, so a
store computed overnight by a batch job is the one the widget opens in the morning.

``cells.tif``, ``cells.ome.tif`` and ``cells.zarr`` -> ``cells.embeddings.zarr`` beside
the image (or in ``folder``). A store under the older name ``cells.tif.embeddings.zarr``
(what ``napari-sam embed`` wrote before) is still found and used when there is no store
under the new name.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["IMAGE_SUFFIXES", "LABELS_SUFFIX", "STORE_SUFFIX", "embedding_store_for",
           "find_embedding_store", "image_stem", "labels_file_for"]

#: image suffixes stripped from a file name to give its stem (longest first)
IMAGE_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".zarr", ".btf")
STORE_SUFFIX = ".embeddings.zarr"
LABELS_SUFFIX = ".labels.ome.zarr"


def image_stem(path: str | os.PathLike) -> str:
    """``cells.ome.tif`` -> ``cells`` (the name without a known image suffix)."""
    name = Path(os.fspath(path).rstrip("/\\")).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _legacy(image: Path, folder: Path) -> Path:
    return folder / (image.name + STORE_SUFFIX)


def embedding_store_for(image: str | os.PathLike, *, folder: str | os.PathLike | None = None) -> Path:
    """The embedding store of an image file.

    Parameters
    ----------
    image : path
        The image file or zarr folder.
    folder : path, optional
        Where stores are kept (default: beside the image).

    Returns
    -------
    Path
        ``<folder>/<stem>.embeddings.zarr``, or an existing store under the older name
        ``<folder>/<name>.embeddings.zarr`` when only that one exists.
    """
    image = Path(os.fspath(image).rstrip("/\\"))
    where = image.parent if folder is None else Path(folder)
    store = where / (image_stem(image) + STORE_SUFFIX)
    legacy = _legacy(image, where)
    if not store.exists() and legacy.exists():
        return legacy
    return store


def find_embedding_store(image: str | os.PathLike | None) -> Path | None:
    """The existing embedding store beside ``image`` (new or older name), or None."""
    if not image:
        return None
    store = embedding_store_for(image)
    return store if store.exists() else None


def labels_file_for(image: str | os.PathLike) -> Path:
    """Where the widget saves the labels of an image as you go: ``cells.tif`` ->
    ``cells.labels.ome.zarr`` beside it; an OME-Zarr image keeps them in its own
    ``labels/napari-sam`` group (NGFF)."""
    from .labels_files import labels_group_path

    image = Path(os.fspath(image).rstrip("/\\"))
    inside = labels_group_path(image, "napari-sam")
    if inside != image:
        return inside
    return image.parent / (image_stem(image) + LABELS_SUFFIX)
