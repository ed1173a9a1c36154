"""Lazy image stacks: one 2D slice at a time, normalised to SAM's uint8 RGB input.

:func:`open_stack` opens a TIFF file (incl. BigTIFF, ImageJ hyperstacks, OME-TIFF and
pyramids), a zarr v2 / v3 store, an OME-Zarr image, or a numpy / dask / zarr array as a
:class:`Stack`: a sequence of 2D slices along every axis except Y, X and C. Nothing is read
until a slice is asked for, and then only that slice (TIFF files through tifffile's zarr
interface: one page per slice, never the whole file).

Axes
----
Taken from the metadata when there is any (tifffile series axes, OME-TIFF, ImageJ,
OME-Zarr ``axes``, zarr v3 ``dimension_names``). Without metadata they follow from the
shape (:func:`infer_axes`):

* 2D: ``YX``.
* A trailing dimension of 3 or 4 (3D or more) is an RGB(A) channel axis, as in napari:
  3D ``YXC``, 4D ``ZYXC``, 5D ``TZYXC``.
* Otherwise 3D: ``ZYX`` (even when the first dimension is small, e.g. (3, 512, 512):
  pass ``axes="CYX"`` for a channel stack), 4D: ``ZCYX`` when the second dimension is
  <= 4 (ImageJ order) else ``TZYX``, 5D: ``TZCYX``.
* More than 5 dimensions: :class:`~napari_sam.StackError`, pass ``axes=``.

Channels
--------
The channel / RGB-sample axis is always called ``C``. By default a C axis of 3 or 4 is read
as RGB (alpha dropped) when it is a TIFF sample axis, the last axis, or the data are uint8;
any other C axis is read as channel 0. ``channel=k`` reads one channel, ``channel=(r, g, b)``
maps three channels to RGB.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._errors import StackError
from .._hashing import array_digest
from .channels import choose_channel
from .formats import SourceInfo, check_axes, from_array, infer_axes
from .normalise import check_limits, to_uint8_rgb
from .source import SliceSource

__all__ = ["SliceSource", "Stack", "infer_axes", "open_stack"]

_PLANE = "YXC"
_N_SAMPLES = 8  # slices sampled for contrast limits
_SAMPLE_PIXELS = 1_000_000  # each sampled slice is strided down to about this many pixels
_NORMALISATION_VERSION = 1
_DEFAULT_PERCENTILES = (1.0, 99.8)


class Stack:
    """A lazy sequence of 2D slices of an image, normalised on demand for SAM.

    Create one with :func:`open_stack`. ``stack[i]`` reads slice ``i`` (C order over
    :attr:`slice_axes`) in the source dtype as ``(Y, X)``, or ``(Y, X, 3)`` when
    :attr:`rgb_input`; :meth:`rgb` gives SAM's ``(Y, X, 3)`` uint8 input.

    Attributes
    ----------
    axes : str
        All axes of :attr:`data`, e.g. ``"ZYX"``, ``"TZCYX"``, ``"YXC"``; ``C`` is the
        channel / RGB-sample axis.
    shape : tuple of int
        Shape of :attr:`data`.
    dtype : numpy.dtype
        Dtype of the slices.
    scale, units : tuple
        Physical pixel size and its unit per axis (1.0 / None where unknown).
    translate : tuple
        Physical position of the first pixel per axis (OME-Zarr translation; else 0.0).
    slice_axes : str
        Axes enumerated by the slice index: all but Y, X, C in source order (``""`` for
        a single 2D image).
    slice_shape : tuple of int
        ``(Y, X)``.
    channel : int or tuple of 3 int or None
        The channel read, the three read as RGB, or None without a C axis.
    rgb_input : bool
        Whether slices are read as RGB.
    source : str
        The path, or ``"numpy"``, ``"dask"``, ``"zarr"``, ``"array"``.
    data : array-like
        The lazy array (zarr.Array, dask or numpy) with :attr:`axes`.
    """

    def __init__(
        self,
        info: SourceInfo,
        *,
        axes: str | None = None,
        channel: int | Sequence[int] | None = None,
        contrast_limits: tuple[float, float] | None = None,
        percentiles: tuple[float, float] = (1.0, 99.8),
    ) -> None:
        data = info.data
        shape = tuple(int(s) for s in data.shape)
        dtype = np.dtype(data.dtype)
        if dtype.kind not in "biuf":
            raise StackError(
                f"image dtype {dtype} is not supported; expected bool, integer or float data"
            )
        if axes is None:
            axes = info.axes if info.axes is not None else infer_axes(shape)
        axes = check_axes(axes, shape)
        if 0 in shape:
            raise StackError(f"image of shape {shape} (axes {axes!r}) is empty")
        self.data = data
        self.axes = axes
        self.shape = shape
        self.dtype = dtype
        self.source = info.source
        n = len(shape)
        self.scale = tuple(float(s) for s in info.scale) if info.scale else (1.0,) * n
        self.units = tuple(info.units) if info.units else (None,) * n
        self.translate = tuple(float(t) for t in info.translate) if info.translate else (0.0,) * n
        self.slice_axes = "".join(a for a in axes if a not in _PLANE)
        self._slice_dims = tuple(shape[axes.index(a)] for a in self.slice_axes)
        self.slice_shape = (shape[axes.index("Y")], shape[axes.index("X")])
        self._info = info
        self.channel, self._c_key, self._c_take, self.rgb_input = choose_channel(
            axes, shape, dtype, channel, info.rgb_hint)

        p = tuple(float(v) for v in percentiles)
        if len(p) != 2 or not 0.0 <= p[0] < p[1] <= 100.0:
            raise StackError(f"percentiles must be (low, high) with 0 <= low < high <= 100; "
                             f"got {percentiles!r}")
        self._percentiles = p
        self._user_limits = None if contrast_limits is None else check_limits(contrast_limits)
        self._fixed = self._user_limits
        if self._fixed is None and dtype == np.bool_:
            self._fixed = (0.0, 1.0)  # bool: False -> 0, True -> 255
        self._passthrough = self._fixed is None and self.rgb_input and dtype == np.uint8
        self._computed: tuple[float, float] | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ sequence
    def __len__(self) -> int:
        return math.prod(self._slice_dims)

    def _check_index(self, index: Any) -> int:
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(f"stack index must be an int; got {type(index).__name__}") from None
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"slice index {index} out of range for a stack of len {n}")
        return i % n

    def position(self, index: int) -> tuple[int, ...]:
        """Coordinates along :attr:`slice_axes` of slice `index` (C order)."""
        i = self._check_index(index)
        if not self._slice_dims:
            return ()
        return tuple(int(v) for v in np.unravel_index(i, self._slice_dims))

    def index(self, position: Sequence[int]) -> int:
        """Slice index of a position along :attr:`slice_axes`; inverse of :meth:`position`."""
        pos = tuple(operator.index(p) for p in position)
        if len(pos) != len(self._slice_dims) or any(
            not 0 <= p < d for p, d in zip(pos, self._slice_dims)
        ):
            raise IndexError(
                f"position {tuple(position)} does not fit slice axes {self.slice_axes!r} "
                f"of sizes {self._slice_dims}"
            )
        if not pos:
            return 0
        return int(np.ravel_multi_index(pos, self._slice_dims))

    def __getitem__(self, index: int) -> np.ndarray:
        """Slice `index`, raw dtype: ``(Y, X)``, or ``(Y, X, 3)`` when :attr:`rgb_input`."""
        i = self._check_index(index)
        pos = iter(self.position(i))
        key: list[Any] = []
        kept = []
        for a in self.axes:
            if a == "C":
                key.append(self._c_key)
                if isinstance(self._c_key, slice):
                    kept.append(a)
            elif a in "YX":
                key.append(slice(None))
                kept.append(a)
            else:
                key.append(next(pos))
        try:
            out = self.data[tuple(key)]
            if hasattr(out, "compute"):  # dask
                out = out.compute()
            out = np.asarray(out)
        except Exception as exc:
            if self._info.path is None:
                raise
            raise StackError(f"cannot read slice {i} of {self.source!r} "
                             f"({type(exc).__name__}: {exc})") from exc
        target = [a for a in "YXC" if a in kept]
        if kept != target:
            out = np.transpose(out, [kept.index(a) for a in target])
        if self._c_take is not None:
            out = out[..., self._c_take]
        if isinstance(self.data, np.ndarray) and np.shares_memory(out, self.data):
            out = out.copy()  # never hand out a view of the caller's array
        return np.ascontiguousarray(out)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    # ------------------------------------------------------------------ normalisation
    @property
    def contrast_limits(self) -> tuple[float, float] | None:
        """``(low, high)`` mapped to 0 and 255 by :meth:`rgb`.

        The limits given to :func:`open_stack` when there are; None for uint8 RGB
        passthrough; (0, 1) for bool; otherwise the ``percentiles`` of finite values in a
        sample of the stack (at most 8 evenly spaced slices, each strided down to about
        1M pixels), computed once and shared by every slice. When the percentiles are
        equal (e.g. a sparse image) the sample's min and max are used instead.
        """
        if self._fixed is not None:
            return self._fixed
        if self._passthrough:
            return None
        with self._lock:
            if self._computed is None:
                self._computed = self._compute_limits()
        return self._computed

    def _compute_limits(self) -> tuple[float, float]:
        n = len(self)
        picks = np.unique(np.linspace(0, n - 1, min(n, _N_SAMPLES)).round().astype(int))
        y, x = self.slice_shape
        step = max(1, math.ceil(math.sqrt(y * x / _SAMPLE_PIXELS)))
        values = []
        for i in picks:
            v = self[int(i)][::step, ::step].ravel()
            if v.dtype.kind == "f":
                v = v[np.isfinite(v)]
            values.append(v)
        v = np.concatenate(values)
        if v.size == 0:
            return (0.0, 0.0)
        lo, hi = (float(q) for q in np.percentile(v, self._percentiles))
        if not hi > lo:
            lo, hi = float(v.min()), float(v.max())
        return (lo, hi)

    def rgb(self, index: int) -> np.ndarray:
        """SAM's input for slice `index`: ``(Y, X, 3)`` uint8.

        uint8 RGB passes through unchanged. Anything else is mapped by
        ``clip((x - low) / (high - low), 0, 1) * 255`` rounded, with ``(low, high)`` =
        :attr:`contrast_limits`; NaN and -inf give 0, +inf 255; when ``high == low``
        pixels above ``low`` give 255 and the rest 0 (a constant image gives zeros).
        Gray slices are replicated to 3 channels.
        """
        s = self[index]
        if self._passthrough:
            return s
        limits = self.contrast_limits
        assert limits is not None
        return to_uint8_rgb(s, *limits)

    def normalisation(self) -> dict:
        """JSON-able description of how :meth:`rgb` maps raw values, for cache signatures.

        Returns
        -------
        dict
            ``method`` ("percentile", "fixed" or "passthrough"), ``contrast_limits``
            (``[low, high]`` or None), ``percentiles`` (``[p_low, p_high]`` for
            "percentile", else None), ``channel``, ``rgb_input`` and ``version`` of the
            mapping.
        """
        limits = self.contrast_limits
        method = "passthrough" if self._passthrough else (
            "fixed" if self._fixed is not None else "percentile")
        channel = list(self.channel) if isinstance(self.channel, tuple) else self.channel
        return {
            "method": method,
            "contrast_limits": None if limits is None else [float(limits[0]), float(limits[1])],
            "percentiles": list(self._percentiles) if method == "percentile" else None,
            "channel": channel,
            "rgb_input": self.rgb_input,
            "version": _NORMALISATION_VERSION,
        }

    # ------------------------------------------------------------------ identity
    def slice_fingerprint(self, index: int) -> str:
        """blake2b (16 bytes, hex) of slice `index`'s raw bytes, shape and dtype."""
        return array_digest(self[index])

    def fingerprint(self) -> str:
        """Cheap identity of the stack (hex).

        Hashes shape, dtype, axes, channel and the raw bytes of the first, middle and last
        slices; never reads the whole stack. A change in other slices goes unnoticed: use
        :meth:`slice_fingerprint` per slice where that matters.
        """
        n = len(self)
        h = hashlib.blake2b(digest_size=16)
        head = {"shape": list(self.shape), "dtype": self.dtype.str, "axes": self.axes,
                "channel": self.normalisation()["channel"]}
        h.update(json.dumps(head, sort_keys=True).encode())
        for i in sorted({0, n // 2, n - 1}):
            h.update(self.slice_fingerprint(i).encode())
        return h.hexdigest()

    # ------------------------------------------------------------------ misc
    @property
    def path(self) -> str | None:
        """The file or folder the stack was read from (None for arrays)."""
        return self._info.path

    def _options(self) -> dict:
        return {"axes": self.axes, "channel": self.channel,
                "contrast_limits": self._user_limits, "percentiles": self._percentiles}

    def close(self) -> None:
        """Close the file behind the stack (TIFF sources); further reads fail."""
        handle = self._info.handle
        if handle is not None:
            handle.close()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __reduce__(self):
        # file sources reopen from their path (open TIFF handles do not pickle); the
        # computed contrast limits travel along so every worker normalises identically
        info = self._info
        if info.path is not None:
            payload: Any = info.path
        else:
            payload = SourceInfo(data=info.data, axes=info.axes, scale=info.scale,
                                 units=info.units, translate=info.translate,
                                 rgb_hint=info.rgb_hint, source=info.source)
        return (_restore, (payload, self._options(), self._computed))

    def __repr__(self) -> str:
        return (f"Stack(source={self.source!r}, axes={self.axes!r}, shape={self.shape}, "
                f"dtype={self.dtype}, len={len(self)}, channel={self.channel}, "
                f"rgb_input={self.rgb_input})")


def _restore(payload: Any, options: dict, computed: tuple[float, float] | None) -> Stack:
    stack = open_stack(payload, **options) if isinstance(payload, str) else Stack(
        payload, **options)
    stack._computed = computed
    return stack


def open_stack(
    source: Any,
    *,
    axes: str | None = None,
    channel: int | Sequence[int] | None = None,
    contrast_limits: tuple[float, float] | None = None,
    percentiles: tuple[float, float] = (1.0, 99.8),
) -> Stack:
    """Open an image as a lazy stack of 2D slices.

    Parameters
    ----------
    source : str, os.PathLike, numpy.ndarray, dask.array.Array, zarr.Array, zarr.Group or Stack
        A TIFF file (``.tif``, ``.tiff``, ``.ome.tif``, ``.btf``; BigTIFF, ImageJ
        hyperstack, OME-TIFF; pyramids give level 0), a zarr v2 / v3 folder or OME-Zarr
        image (level 0 of its multiscales), an array, or a Stack (returned as is unless
        other options are given, which reopen its data with them).
    axes : str, optional
        One letter per dimension of the source, e.g. ``"TZCYX"``; Y and X once each, C for
        the channel / RGB-sample axis (``S`` is accepted for it), any other letter a slice
        axis. Default: from the metadata, else from the shape (see the module docs).
    channel : int or sequence of 3 int, optional
        The channel to read, or three channels to read as RGB. Default: RGB when the C
        axis holds 3 or 4 RGB(A) samples (TIFF sample axis, last axis, or uint8 data),
        else channel 0.
    contrast_limits : (float, float), optional
        Raw values mapped to 0 and 255 by :meth:`Stack.rgb`; default: percentiles of a
        sample of the stack (uint8 RGB passes through).
    percentiles : (float, float)
        Percentiles used for the default contrast limits.

    Returns
    -------
    Stack

    Raises
    ------
    FileNotFoundError
        When a path does not exist.
    StackError
        When the file cannot be read (the message names the path and the reason), the
        axes or channel do not fit the shape, or the data are not 2D or more.
    """
    options = {"axes": axes, "channel": channel, "contrast_limits": contrast_limits,
               "percentiles": percentiles}
    if isinstance(source, Stack):
        # options left at their defaults keep the stack's own; the new Stack shares the
        # source (and its open file) with the old one
        given = {k: v for k, v in options.items() if v is not None}
        if tuple(float(p) for p in percentiles) == _DEFAULT_PERCENTILES:
            del given["percentiles"]
        if not given:
            return source
        merged = source._options()
        if axes is not None and axes != source.axes:
            merged["channel"] = None  # the old channel may not fit the new axes
        merged.update(given)
        return Stack(source._info, **merged)
    if isinstance(source, (str, os.PathLike)):
        from .formats import open_path

        info = open_path(source)
    else:
        info = from_array(source)
    try:
        return Stack(info, **options)
    except Exception:
        if info.handle is not None:
            info.handle.close()
        raise
