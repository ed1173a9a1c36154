"""Exceptions raised by napari-sam.

Every error a user can cause is a subclass of :class:`NapariSamError`; errors about
argument values also subclass :class:`ValueError`, so ``except ValueError`` keeps working.
Messages name what was wrong, what was received, and what is accepted.
"""

from __future__ import annotations

__all__ = [
    "NapariSamError",
    "InvalidInputError",
    "CheckpointError",
    "ChecksumError",
    "DownloadError",
    "StackError",
]


class NapariSamError(Exception):
    """Base class of every error napari-sam raises on purpose."""


class InvalidInputError(NapariSamError, ValueError):
    """An argument has the wrong shape, type or value.

    The message names the argument, what it got and what would be accepted.
    """


class CheckpointError(NapariSamError, ValueError):
    """A checkpoint cannot be used: unreadable, not a SAM model, or another architecture."""


class ChecksumError(CheckpointError):
    """A checkpoint's SHA-256 does not match the one published for its model name."""


class DownloadError(NapariSamError, OSError):
    """A checkpoint could not be downloaded (offline, server error).

    The message names the URL and the exact path where the file can be put by hand.
    """


class StackError(NapariSamError, ValueError):
    """An image source cannot be opened as a stack of 2D slices (format, axes, channel)."""
