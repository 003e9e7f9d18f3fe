"""Progress bars on stderr (rich), silent when asked (``--json``) or when stderr is not a tty."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class ProgressSink(Protocol):
    """What long-running library functions report to; the CLI passes a rich bar, the TUI a
    message-posting adapter, tests a list-collecting fake."""

    def start(self, task: str, total: float | None) -> None: ...
    def advance(self, amount: float = 1.0, *, description: str | None = None) -> None: ...
    def finish(self) -> None: ...


class NullProgress:
    def start(self, task: str, total: float | None) -> None:
        pass

    def advance(self, amount: float = 1.0, *, description: str | None = None) -> None:
        pass

    def finish(self) -> None:
        pass


class RichProgress:
    """One bar at a time on stderr, with ETA."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
            transient=False)
        self._task: int | None = None
        self._progress.start()

    def start(self, task: str, total: float | None) -> None:
        self.finish()
        self._task = self._progress.add_task(task, total=total)

    def advance(self, amount: float = 1.0, *, description: str | None = None) -> None:
        if self._task is not None:
            self._progress.update(self._task, advance=amount,
                                  **({"description": description} if description else {}))

    def finish(self) -> None:
        if self._task is not None:
            self._progress.stop_task(self._task)
            self._task = None

    def close(self) -> None:
        self.finish()
        self._progress.stop()


@contextmanager
def cli_progress(quiet: bool = False) -> Iterator[ProgressSink]:
    if quiet or not sys.stderr.isatty():
        yield NullProgress()
        return
    bar = RichProgress()
    try:
        yield bar
    finally:
        bar.close()
