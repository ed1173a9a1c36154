"""A synthetic nuclei stack with ground truth, for demos, sample data and tests."""

from __future__ import annotations

import numpy as np

from ._errors import InvalidInputError

__all__ = ["make_nuclei_stack"]


def make_nuclei_stack(
    shape: tuple[int, int, int] = (16, 256, 256),
    *,
    n_nuclei: int = 30,
    radius: tuple[float, float] = (8.0, 16.0),
    z_anisotropy: float = 4.0,
    noise: float = 0.05,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate a (Z, Y, X) uint16 fluorescence-like stack of ellipsoidal nuclei.

    Nuclei do not overlap: a voxel belongs to the nearest centre's ellipsoid only, so the
    ground truth is a proper instance segmentation.

    Parameters
    ----------
    shape : (int, int, int)
        (Z, Y, X) size.
    n_nuclei : int
        Number of nuclei placed (ids 1..n_nuclei in the ground truth).
    radius : (float, float)
        Range of nucleus radii in pixels (in Y/X; Z radii are divided by ``z_anisotropy``).
    z_anisotropy : float
        Ratio of Z spacing to Y/X spacing.
    noise : float
        Standard deviation of Gaussian noise, relative to the nuclei's brightness.
    seed : int
        Random seed: the same arguments always give the same stack.

    Returns
    -------
    image : numpy.ndarray of uint16, shape (Z, Y, X)
    labels : numpy.ndarray of uint16, shape (Z, Y, X)
        Ground-truth instance ids, 0 for background.
    """
    if len(shape) != 3 or min(shape) < 1:
        raise InvalidInputError(f"shape must be three positive sizes (Z, Y, X), got {shape}")
    if n_nuclei < 0 or n_nuclei > 65535:
        raise InvalidInputError(f"n_nuclei must be between 0 and 65535, got {n_nuclei}")
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    centres = rng.uniform((0, 0, 0), (nz, ny, nx), size=(n_nuclei, 3))
    radii = rng.uniform(radius[0], radius[1], size=n_nuclei)
    brightness = rng.uniform(0.5, 1.0, size=n_nuclei)
    labels = np.zeros(shape, np.uint16)
    best = np.full(shape, np.inf, np.float32)
    zz, yy, xx = np.ogrid[:nz, :ny, :nx]
    for i, ((cz, cy, cx), r) in enumerate(zip(centres, radii), start=1):
        d = ((zz - cz) * z_anisotropy / r) ** 2 + ((yy - cy) / r) ** 2 + ((xx - cx) / r) ** 2
        inside = (d <= 1.0) & (d < best)
        labels[inside] = i
        best[inside] = d[inside]
    signal = np.zeros(shape, np.float32)
    for i in range(1, n_nuclei + 1):
        signal[labels == i] = brightness[i - 1]
    texture = ndimage.gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), 2.0)
    image = ndimage.gaussian_filter(signal * (1 + 0.15 * texture), (0.5, 1.5, 1.5))
    image += 0.05 + rng.normal(0, noise, shape).astype(np.float32)
    image = np.clip(image * 2000 + 100, 0, 65535).astype(np.uint16)
    return image, labels
