"""A ProgressSink that a worker thread hands to library functions: it forwards progress to the
UI thread and turns a cancel request into an exception at the library's next progress tick."""

from __future__ import annotations

import threading
from collections.abc import Callable


class OperationCancelled(Exception):
    """Raised inside a worker when the user cancelled; caught by the worker, never shown as an error."""


ProgressCallback = Callable[[str, float | None, float], None]  # (task, total, completed)


class ThreadProgress:
    """Implements edge_lora.progress.ProgressSink. ``report`` is called on the worker thread;
    the caller wraps it with ``app.call_from_thread`` so widgets are touched on the UI thread."""

    def __init__(self, report: ProgressCallback, cancel: threading.Event, prefix: str = "") -> None:
        self._report = report
        self._cancel = cancel
        self._prefix = prefix
        self._task = ""
        self._total: float | None = None
        self._done = 0.0

    def _check(self) -> None:
        if self._cancel.is_set():
            raise OperationCancelled()

    def start(self, task: str, total: float | None) -> None:
        self._check()
        self._task, self._total, self._done = f"{self._prefix}{task}", total, 0.0
        self._report(self._task, self._total, self._done)

    def advance(self, amount: float = 1.0, *, description: str | None = None) -> None:
        self._check()
        self._done += amount
        if description:
            self._task = f"{self._prefix}{description}"
        self._report(self._task, self._total, self._done)

    def finish(self) -> None:
        if self._total is not None:
            self._report(self._task, self._total, self._total)
