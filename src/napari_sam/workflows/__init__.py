"""Workflows built on the engine: propagation through a volume, segment everything with the
3D merge, tiling of large slices, resumable batch jobs (locally or on dask)."""
