"""Run a Python module of this package in a child process, where a native crash (SIGILL,
SIGABRT from a GGML_ASSERT, SIGSEGV) can only end the child, and report how it ended.

The child starts isolated (``python -I``: no PYTHON* variables, no user site, no working
directory on ``sys.path``), with the parent's import path made absolute, minus the working
directory, led by the directory this ``edge_lora`` package was imported from: an ``edge_lora``
or ``llama_cpp`` directory in the user's cwd (a cloned model repo) cannot be picked up, and the
child runs the same code as the parent.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

from edge_lora.core.child_process import isolated_python


def python_module_command(module: str, args: Sequence[str] = ()) -> list[str]:
    """argv that runs ``python -m module args`` isolated (see core.child_process)."""
    return isolated_python("import runpy; runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)",
                           module, *map(str, args))


_CRASH_LINE = re.compile(r"GGML_ASSERT|GGML_ABORT|fatal error|what\(\)|terminate called|Assertion")
# ggml's abort handler attaches gdb to print a backtrace: seconds per crash and pages of output.
_CHILD_ENV = {"GGML_NO_BACKTRACE": "1"}


@dataclass(frozen=True)
class ChildResult:
    command: tuple[str, ...]
    returncode: int | None  # None: killed after the timeout
    stdout: str
    stderr: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    @property
    def signal(self) -> int | None:
        """The signal that ended the child, or None when it exited (or timed out)."""
        return -self.returncode if self.returncode is not None and self.returncode < 0 else None

    @property
    def signal_name(self) -> str | None:
        if self.signal is None:
            return None
        try:
            return signal.Signals(self.signal).name
        except ValueError:
            return f"signal {self.signal}"

    def last_stderr_line(self) -> str:
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def crash_line(self) -> str:
        """The line that says why a native crash happened (ggml's "file.cpp:N: GGML_ASSERT(...)
        failed", a C++ "what():"), directories dropped; else the last line of stderr."""
        lines = [line.strip() for line in self.stderr.splitlines() if _CRASH_LINE.search(line)]
        if not lines:
            return self.last_stderr_line()
        return re.sub(r"(?:[^\s:]*/)+([^/\s:]+:\d+:)", r"\1", lines[-1])

    def describe_failure(self) -> str:
        """How the child ended, in a few words ("died by SIGILL", "timed out after 60 s")."""
        if self.timed_out:
            return f"timed out after {self.seconds:.0f} s"
        if self.signal is not None:
            return f"died by {self.signal_name}"
        return f"exited with code {self.returncode}"


def run_child(command: Sequence[str], *, timeout: float, pass_fds: Sequence[int] = ()) -> ChildResult:
    """Run ``command`` (stdin closed, output captured) in its own session, killing the whole
    session after ``timeout`` seconds. Never raises for how the child ended; OSError (the
    interpreter cannot be started) propagates."""
    start = time.monotonic()
    process = subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True, pass_fds=tuple(pass_fds),
                               env={**os.environ, **_CHILD_ENV})
    try:
        out, err = process.communicate(timeout=timeout)
        code: int | None = process.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        code = None
    except BaseException:  # KeyboardInterrupt: take the child down with us
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    return ChildResult(command=tuple(command), returncode=code,
                       stdout=out.decode("utf-8", errors="replace"), stderr=err.decode("utf-8", errors="replace"),
                       seconds=time.monotonic() - start)
