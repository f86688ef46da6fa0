"""Run engine calls in a napari thread worker and bridge their progress callback to the GUI.

The engine reports progress through ``progress(done, total, message)`` from the worker thread.
:class:`Task` turns those calls into a Qt signal (queued to the GUI thread) that drives a
:class:`napari.utils.progress` bar, so nothing outside the GUI thread touches Qt widgets or
napari layers. The wrapped function never raises inside the worker: its exception is caught
and delivered, with the result, to ``on_done`` on the GUI thread as a :class:`Outcome`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qtpy.QtCore import QEventLoop, QObject, QTimer, Signal

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What a task produced: ``value`` on success, else the exception in ``error``."""

    value: Any = None
    error: BaseException | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the function returned normally."""
        return self.error is None


class _Bridge(QObject):
    """Lives on the GUI thread; signals emitted from the worker thread are queued to it."""

    progressed = Signal(int, int, str)
    done = Signal()


class Task:
    """One engine call running in a napari ``FunctionWorker``.

    Args:
        func: called as ``func(progress=callback, cancel=event)`` in the worker thread.
        on_done: called on the GUI thread with the :class:`Outcome` when the call ends.
        desc: description of the napari progress bar (``None``: no progress bar).
        on_progress: called on the GUI thread as ``on_progress(done, total, message)`` for each
            progress report (e.g. to drive a progress bar inside a widget).
        start: start the worker immediately.

    Attributes:
        cancel_event: set by :meth:`cancel`; the function is expected to check it.
        outcome: the :class:`Outcome` once finished, else ``None``.
    """

    def __init__(
        self,
        func: Callable[..., Any],
        *,
        on_done: Callable[[Outcome], None] | None = None,
        desc: str | None = None,
        start: bool = True,
        on_progress: Callable[[int, int, str], None] | None = None,
    ) -> None:
        from napari.qt.threading import create_worker

        self.cancel_event = threading.Event()
        self.outcome: Outcome | None = None
        self.messages: list[str] = []
        self._on_done = on_done
        self._on_progress_cb = on_progress
        self._pbar = None
        self._bridge = _Bridge()
        self._bridge.progressed.connect(self._on_progress)
        if desc is not None:
            from napari.utils import progress

            self._pbar = progress(total=0, desc=desc)
        self._finished = False
        self.worker = create_worker(self._run, func)
        self.worker.returned.connect(self._on_returned)
        self.worker.finished.connect(self._on_finished)
        if start:
            self.worker.start()

    # worker thread --------------------------------------------------------------------
    def _run(self, func: Callable[..., Any]) -> Outcome:
        t0 = time.perf_counter()
        try:
            value = func(progress=self._report, cancel=self.cancel_event)
        except BaseException as exc:  # delivered to the GUI thread, never raised there
            logger.debug("task failed: %r", exc, exc_info=True)
            return Outcome(error=exc, seconds=time.perf_counter() - t0)
        return Outcome(value=value, seconds=time.perf_counter() - t0)

    def _report(self, done: int, total: int, message: str) -> None:
        self._bridge.progressed.emit(int(done), int(total), str(message))

    # GUI thread -----------------------------------------------------------------------
    def _on_progress(self, done: int, total: int, message: str) -> None:
        self.messages.append(message)
        if self._on_progress_cb is not None and not self._finished:
            self._on_progress_cb(done, total, message)
        pbar = self._pbar  # updating the bar may process events, and finish the task, re-entrantly
        if pbar is None or self._finished:
            return
        if total > 0 and pbar.total != total:
            pbar.total = total
        pbar.set_description(message)
        if total > 0 and self._pbar is pbar and min(done, total) > pbar.n:
            pbar.update(min(done, total) - pbar.n)

    def _on_returned(self, outcome: Outcome) -> None:
        self.outcome = outcome

    def _on_finished(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self._finished = True
        outcome = self.outcome or Outcome(error=RuntimeError("worker ended without a result"))
        self.outcome = outcome
        try:
            if self._on_done is not None:
                self._on_done(outcome)
        finally:
            self._bridge.done.emit()

    # public ------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        """True once the worker ended and ``on_done`` ran."""
        return self._finished

    def cancel(self) -> None:
        """Ask the running function to stop (it raises its cancellation error)."""
        self.cancel_event.set()

    def wait(self, *, timeout: float | None = None) -> Outcome:
        """Block, running a Qt event loop so signals are delivered, until the task ends.

        Raises:
            TimeoutError: if ``timeout`` seconds pass first (the task keeps running).
        """
        if not self._finished:
            loop = QEventLoop()
            self._bridge.done.connect(loop.quit)
            if timeout is not None:
                timer = QTimer(loop)
                timer.setSingleShot(True)
                timer.timeout.connect(loop.quit)
                timer.start(int(timeout * 1000))
            if not self._finished:  # it may have ended while we connected
                loop.exec()
            self._bridge.done.disconnect(loop.quit)
        if not self._finished or self.outcome is None:
            raise TimeoutError(f"task still running after {timeout} s")
        return self.outcome
