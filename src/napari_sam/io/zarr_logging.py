"""zarr's failed writes, reported once: a filter for asyncio's stray tracebacks."""

from __future__ import annotations

import logging

__all__ = ["quiet_sibling_write_errors"]


class _SiblingWriteErrors(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" records about an OSError."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, OSError) and "never retrieved" in str(record.msg))


def quiet_sibling_write_errors() -> None:
    """Keep a failed zarr write to one error instead of one error plus stray tracebacks.

    zarr writes a node's metadata files concurrently (``asyncio.gather`` in its I/O thread).
    On a full or read-only disk several of them fail: the first is raised, and napari-sam
    reports it (a warning, or the CLI's one-line error). When the process exits right after
    the report, zarr stops its event loop before ``gather`` has looked at the others, and
    asyncio logs each of them with a traceback ("Task exception was never retrieved"; seen
    in CI, 1 run in many). Only such records about an ``OSError`` are dropped; idempotent.
    """
    log = logging.getLogger("asyncio")
    if not any(isinstance(f, _SiblingWriteErrors) for f in log.filters):
        log.addFilter(_SiblingWriteErrors())
