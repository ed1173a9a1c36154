"""Which channel(s) a stack reads: one channel, or three shown to SAM as RGB."""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import numpy as np

from .._errors import StackError

__all__ = ["ChannelChoice", "choose_channel"]


class ChannelChoice(NamedTuple):
    """The channel read (int), the three read as RGB (tuple), or None without a C axis;
    ``key`` indexes the C axis, ``take`` reorders what it returns, ``rgb`` is True for three."""

    channel: int | tuple[int, ...] | None
    key: int | slice | None
    take: list[int] | None
    rgb: bool


def choose_channel(axes: str, shape: tuple[int, ...], dtype: np.dtype, channel: Any,
                   rgb_hint: bool) -> ChannelChoice:
    """Which channel(s) of the C axis a stack reads (see :func:`napari_sam.open_stack`).

    Raises
    ------
    StackError
        A channel is given without a C axis, is out of range, or is neither one int nor
        three.
    """
    if "C" not in axes:
        if channel is not None:
            raise StackError(
                f"channel={channel!r} given but the image (axes {axes!r}, shape "
                f"{shape}) has no C axis; pass axes= with a C to name one"
            )
        return ChannelChoice(None, None, None, False)
    n = shape[axes.index("C")]
    accepted = (f"an int in [0, {n - 1}], or 3 ints in that range for RGB"
                f" (the C axis has {n} channels)")
    if channel is None:
        rgb = n in (3, 4) and (rgb_hint or axes[-1] == "C" or dtype == np.uint8)
        chosen: Any = (0, 1, 2) if rgb else 0
    elif isinstance(channel, (bool, np.bool_)):
        raise StackError(f"channel must be {accepted}; got {channel!r}")
    elif isinstance(channel, (int, np.integer)):
        chosen = int(channel)
    else:
        try:
            chosen = tuple(operator.index(c) for c in channel)
        except TypeError:
            raise StackError(f"channel must be {accepted}; got {channel!r}") from None
        if len(chosen) == 1:
            chosen = chosen[0]
        elif len(chosen) != 3:
            raise StackError(f"channel must be {accepted}; got {len(chosen)} channels "
                             f"{channel!r}")
    picks = [chosen] if isinstance(chosen, int) else list(chosen)
    if any(not -n <= c < n for c in picks):
        raise StackError(f"channel {channel!r} is out of range: channel must be {accepted}")
    picks = [c % n for c in picks]
    if len(picks) == 1:
        return ChannelChoice(picks[0], picks[0], None, False)
    lo = min(picks)
    take = [c - lo for c in picks]
    return ChannelChoice(tuple(picks), slice(lo, max(picks) + 1),
                         None if take == list(range(max(picks) - lo + 1)) else take, True)
