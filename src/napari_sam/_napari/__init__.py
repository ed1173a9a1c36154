"""napari entry points: the only package of napari-sam that imports napari, magicgui or Qt."""
