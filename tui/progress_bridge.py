"""A ProgressSink that a worker thread hands to library functions: it forwards progress to the
UI thread and turns a cancel request into an exception at the library's next progress tick."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class OperationCancelled(Exception):
    """Raised inside a worker when the user cancelled; caught by the worker, never shown as an error."""


ProgressCallback = Callable[[str, float | None, float], None]  # (task, total, completed)
# A progress bar cannot show more than ~20 updates a second; a quantizer ticks far more often.
MIN_REPORT_SECONDS = 0.05


class ThreadProgress:
    """Implements edge_lora.core.progress.ProgressSink. ``report`` is called on the worker thread, at
    most every ``min_interval`` seconds between a task's start and finish; the caller posts it to
    the UI thread without waiting (``post_message``), so a tick never stalls the worker."""

    def __init__(self, report: ProgressCallback, cancel: threading.Event, prefix: str = "",
                 min_interval: float = MIN_REPORT_SECONDS) -> None:
        self._report = report
        self._cancel = cancel
        self._prefix = prefix
        self._min_interval = min_interval
        self._last_report = float("-inf")
        self._task = ""
        self._total: float | None = None
        self._done = 0.0

    def _send(self) -> None:
        self._last_report = time.monotonic()
        self._report(self._task, self._total, self._done)

    def _check(self) -> None:
        if self._cancel.is_set():
            raise OperationCancelled()

    def start(self, task: str, total: float | None) -> None:
        self._check()
        self._task, self._total, self._done = f"{self._prefix}{task}", total, 0.0
        self._send()

    def advance(self, amount: float = 1.0, *, description: str | None = None) -> None:
        self._check()
        self._done += amount
        if description:
            self._task = f"{self._prefix}{description}"
        if description or time.monotonic() - self._last_report >= self._min_interval:
            self._send()  # a new description always shows: it names the step now running

    def finish(self) -> None:
        if self._total is not None:
            self._done = self._total
            self._send()
