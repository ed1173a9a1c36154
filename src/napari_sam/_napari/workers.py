"""Background work for the widget: the newest click wins; long jobs with progress and cancel.

:class:`LatestWorker` owns one thread that answers the newest request only: a click while
an older one is still decoding replaces the pending request instead of queueing behind
it, and results come back to the GUI thread through a Qt signal. :class:`Job` runs one
long function (propagation, segment everything, precompute) in a thread, with progress
and cancel reported through Qt signals. With ``synchronous=True`` both run inline
(scripts, and tests that do not test the threading itself). Nothing here touches a
layer from a worker thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QObject, Signal

__all__ = ["Job", "LatestWorker"]


class LatestWorker(QObject):
    """Runs ``fn(request)`` in one background thread, newest request first, older dropped.

    Parameters
    ----------
    fn : callable(request) -> result
        Runs in the worker thread; must not touch napari layers or Qt widgets.
    on_result : callable(request, result, error)
        Called on the GUI thread with the request, its result (or None) and the
        exception it raised (or None).
    synchronous : bool
        Run ``fn`` inline in :meth:`submit` (no thread).
    """

    _done = Signal(object, object, object)

    def __init__(self, fn: Callable[[Any], Any],
                 on_result: Callable[[Any, Any, BaseException | None], None], *,
                 synchronous: bool = False) -> None:
        super().__init__()
        self._fn = fn
        self._done.connect(on_result)
        self.synchronous = synchronous
        self._cond = threading.Condition()
        self._pending: Any = None
        self._has_pending = False
        self._busy = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self.threads: set[int] = set()  # ids of the threads fn ran in (tests)

    def submit(self, request: Any) -> None:
        """Answer ``request`` next; a request still waiting is dropped."""
        if self.synchronous:
            self._call(request)
            return
        with self._cond:
            self._pending, self._has_pending = request, True
            if self._thread is None or not self._thread.is_alive():
                self._stop = False
                self._thread = threading.Thread(target=self._loop, name="napari-sam-decode",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    @property
    def busy(self) -> bool:
        """True while a request is waiting or being answered."""
        with self._cond:
            return self._busy or self._has_pending

    @property
    def idle(self) -> bool:
        """True when nothing is waiting or running."""
        return not self.busy

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no request is waiting or running (True) or ``timeout`` passes."""
        with self._cond:
            return self._cond.wait_for(lambda: not (self._busy or self._has_pending), timeout)

    def stop(self) -> None:
        """Let the thread end after the request it is answering."""
        with self._cond:
            self._stop = True
            self._pending, self._has_pending = None, False
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._has_pending or self._stop)
                if self._stop:
                    self._cond.notify_all()
                    return
                request, self._pending, self._has_pending = self._pending, None, False
                self._busy = True
            try:
                self._call(request)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _call(self, request: Any) -> None:
        self.threads.add(threading.get_ident())
        try:
            result, error = self._fn(request), None
        except Exception as exc:  # reported on the GUI thread  # noqa: BLE001
            result, error = None, exc
        self._done.emit(request, result, error)


class Job(QObject):
    """A long job in a background thread, with progress, a result and cancel.

    ``fn(progress, should_stop)`` runs in the thread: it calls ``progress(done, total,
    message)`` now and then and polls ``should_stop()`` between units of work. Its return
    value goes to ``on_done`` on the GUI thread unless it was cancelled; an exception goes
    to ``on_error``; ``on_finished`` runs last in every case.
    """

    _progress = Signal(int, int, str)
    _result = Signal(object, object)

    def __init__(self, fn: Callable[[Callable[[int, int, str], None], Callable[[], bool]], Any], *,
                 on_progress: Callable[[int, int, str], None],
                 on_done: Callable[[Any], None],
                 on_error: Callable[[BaseException], None],
                 on_finished: Callable[[], None]) -> None:
        super().__init__()
        self._fn = fn
        self._cancel = threading.Event()
        self._progress.connect(on_progress)
        self._on_done, self._on_error, self._on_finished = on_done, on_error, on_finished
        self._result.connect(self._deliver)
        self._thread: threading.Thread | None = None
        self.running = False

    def start(self, *, synchronous: bool = False) -> "Job":
        self.running = True
        if synchronous:
            self._run()
        else:
            self._thread = threading.Thread(target=self._run, name="napari-sam-job", daemon=True)
            self._thread.start()
        return self

    def cancel(self) -> None:
        """Stop at the next unit of work; the partial result is dropped."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            value, error = self._fn(self._progress.emit, self._cancel.is_set), None
        except Exception as exc:  # reported on the GUI thread  # noqa: BLE001
            value, error = None, exc
        self._result.emit(value, error)

    def _deliver(self, value: Any, error: BaseException | None) -> None:
        self.running = False
        try:
            if error is not None:
                self._on_error(error)
            elif not self._cancel.is_set():
                self._on_done(value)
        finally:
            self._on_finished()
