"""Embed the slices a user is about to visit, in the background: :class:`Prefetcher`.

A user stepping through a stack waits for the encoder on every new slice. The prefetcher
computes the next slices in the direction of travel while the user works on the current
one, so that the step itself finds the embedding in memory.

* One background thread per cache, running only while there is work; the newest request
  replaces the queue (a user who jumps away does not wait for slices left behind).
* The thread runs at a lower CPU priority (``nice``, Linux): prompts on the slice in view
  run at normal priority and keep their speed while the encoder works beside them.
* A slice being prefetched is never encoded twice: ``EmbeddingCache.get`` on it waits for
  the prefetch to finish (per-slice locks in the cache).

Examples
--------
>>> pre = seg.prefetcher                            # doctest: +SKIP
>>> pre.follow(12)          # user arrived at slice 12: embed 12, 13, 14 (and 11) in the background
>>> seg.embedding(13)       # later: a memory hit once the prefetch finished
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from .cache import EmbeddingCache

__all__ = ["Prefetcher", "neighbours"]

DEFAULT_NICE = 10
_LIVE: "weakref.WeakSet[Prefetcher]" = weakref.WeakSet()


@atexit.register
def _drain_at_exit() -> None:
    """At interpreter exit: drop queued slices and let a running one finish (<= 60 s)."""
    for pre in list(_LIVE):
        pre.cancel()
        pre.wait(timeout=60)


def neighbours(index: int, n: int, *, previous: int | None = None, ahead: int = 2,
               behind: int = 1) -> list[int]:
    """Slices to prefetch around ``index``, nearest first, in the direction of travel.

    Parameters
    ----------
    index : int
        The slice in view.
    n : int
        Number of slices.
    previous : int, optional
        The slice viewed before; ``index < previous`` means the user walks backwards.
    ahead, behind : int
        How many slices in and against the direction of travel.

    Returns
    -------
    list of int
        ``ahead`` slices forward (nearest first), then ``behind`` slices back, clipped to
        ``[0, n)``.

    Examples
    --------
    >>> neighbours(5, 10)
    [6, 7, 4]
    >>> neighbours(5, 10, previous=6)
    [4, 3, 6]
    """
    step = -1 if previous is not None and index < previous else 1
    out = [index + step * k for k in range(1, ahead + 1)]
    out += [index - step * k for k in range(1, behind + 1)]
    return [i for i in out if 0 <= i < n]


def _lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value by ``nice`` (Linux: per thread)."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (OSError, AttributeError):  # not permitted / not available: run at normal priority
        pass


class Prefetcher:
    """Background embedding of slices for one :class:`~napari_sam.EmbeddingCache`.

    Parameters
    ----------
    cache : EmbeddingCache
        Where embeddings come from and go to (memory LRU, and the store if it has one).
    nice : int
        How much lower the background thread's CPU priority is (0: same priority).
    ahead, behind : int
        Defaults for :meth:`follow`.

    Attributes
    ----------
    stats : dict
        ``requested``, ``embedded`` (slices the prefetcher encoded or loaded),
        ``dropped`` (queued slices a newer request replaced), ``errors``.
    last_error : BaseException or None
        The last exception the background thread caught (it keeps going).
    """

    def __init__(self, cache: "EmbeddingCache", *, nice: int = DEFAULT_NICE, ahead: int = 2,
                 behind: int = 1) -> None:
        self.cache = cache
        self.nice = int(nice)
        self.ahead, self.behind = int(ahead), int(behind)
        self.stats = {"requested": 0, "embedded": 0, "dropped": 0, "errors": 0}
        self.last_error: BaseException | None = None
        self._cond = threading.Condition()
        self._queue: list[int] = []
        self._busy: int | None = None
        self._thread: threading.Thread | None = None
        self._previous: int | None = None  # the slice before the current one
        self._at: int | None = None
        _LIVE.add(self)

    def __repr__(self) -> str:
        return f"Prefetcher(queue={self._queue}, busy={self._busy}, stats={self.stats})"

    # ------------------------------------------------------------------ requests
    def request(self, indices: Iterable[int]) -> list[int]:
        """Embed ``indices`` in the background, in order; replaces the earlier queue.

        Slices already in memory are skipped. Returns the queued indices.
        """
        wanted: list[int] = []
        for i in indices:
            i = self.cache.check_index(i)
            if i not in wanted and not self.cache.in_memory(i):
                wanted.append(i)
        with self._cond:
            self.stats["dropped"] += sum(1 for i in self._queue if i not in wanted)
            self._queue = [i for i in wanted if i != self._busy]
            self.stats["requested"] += len(self._queue)
            if self._queue and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._run, name="napari-sam-prefetch", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            return list(self._queue)

    def follow(self, index: int, *, ahead: int | None = None, behind: int | None = None) -> list[int]:
        """The user is on slice ``index``: embed it, then its neighbours in the direction
        of travel (:func:`neighbours`); slices in memory are skipped.

        The direction comes from the previous call's ``index``. Returns the queued indices.
        """
        index = self.cache.check_index(index)
        if index != self._at:  # repeated calls on one slice keep the direction
            self._previous, self._at = self._at, index
        todo = [index] + neighbours(index, len(self.cache), previous=self._previous,
                                    ahead=self.ahead if ahead is None else ahead,
                                    behind=self.behind if behind is None else behind)
        return self.request(todo)

    def cancel(self) -> None:
        """Drop every queued slice (the one being embedded finishes)."""
        self.request(())

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the queue is empty and nothing is being embedded; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and self._busy is None, timeout)

    def wait_working_on(self, index: int, timeout: float | None = None) -> bool:
        """Block until the background thread is embedding slice ``index`` (True), or
        ``timeout`` passes (False). For callers that must know a slice is in work."""
        with self._cond:
            return self._cond.wait_for(lambda: self._busy == index, timeout)

    @property
    def busy(self) -> bool:
        """True while a slice is being embedded or waiting in the queue."""
        with self._cond:
            return bool(self._queue) or self._busy is not None

    @property
    def queue(self) -> Sequence[int]:
        """The slices waiting to be embedded, next first."""
        with self._cond:
            return tuple(self._queue)

    # -------------------------------------------------------------------- thread
    def _run(self) -> None:
        _lower_priority(self.nice)
        while True:
            with self._cond:
                if not self._queue:  # no work: the thread ends (a new request starts one)
                    self._thread = None
                    self._cond.notify_all()
                    return
                index = self._queue.pop(0)
                self._busy = index
                self._cond.notify_all()
            try:
                if not self.cache.in_memory(index):
                    self.cache.get(index)
                    self.stats["embedded"] += 1
            except BaseException as err:  # noqa: BLE001 - reported via last_error, never lost
                self.last_error = err
                self.stats["errors"] += 1
            finally:
                with self._cond:
                    self._busy = None
                    done = not self._queue
                    if done:  # end now, not on the next turn: wait() may return at once
                        self._thread = None
                    self._cond.notify_all()
            if done:
                return
