"""core.child_run: children start isolated from the working directory, a death by signal or a
hang is a result (never an exception), and a ggml abort is reported by its assert line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from edge_lora.core.child_process import child_import_path
from edge_lora.core.child_run import ChildResult, python_module_command, run_child


def test_a_package_in_the_working_directory_is_not_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    planted = tmp_path / "edge_lora" / "converters"
    planted.mkdir(parents=True)
    (tmp_path / "edge_lora" / "__init__.py").write_text("raise SystemExit('planted edge_lora imported')\n")
    (planted / "__init__.py").write_text("")
    (planted / "load_check.py").write_text("raise SystemExit('planted load_check imported')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # as `python -m` from that directory would
    assert str(tmp_path) not in child_import_path()
    result = run_child(python_module_command("edge_lora.converters.load_check", []), timeout=120)
    assert result.returncode == 2 and "usage:" in result.stderr, result.stderr  # the real module ran


def test_a_death_by_signal_is_a_result() -> None:
    result = run_child([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"], timeout=60)
    assert result.signal_name == "SIGSEGV" and result.describe_failure() == "died by SIGSEGV"


def test_a_hang_is_killed_with_its_children() -> None:
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print('started', flush=True); time.sleep(60)")
    result = run_child([sys.executable, "-c", code], timeout=2)
    assert result.timed_out and "timed out after" in result.describe_failure()
    assert result.seconds < 30


def test_the_crash_line_is_the_ggml_assert() -> None:
    stderr = ("llama_model_loader: loaded meta data\n/home/runner/work/llama.cpp/src/llama-model.cpp:1330: "
              "GGML_ASSERT(hparams.n_layer_nextn <= hparams.n_layer_all) failed\n[New LWP 123]\n")
    result = ChildResult(command=("x",), returncode=-6, stdout="", stderr=stderr, seconds=0.1)
    assert result.crash_line() == "llama-model.cpp:1330: GGML_ASSERT(hparams.n_layer_nextn <= hparams.n_layer_all) failed"
    assert ChildResult(("x",), 1, "", "first\nlast line\n", 0.1).crash_line() == "last line"


def test_ggml_backtraces_are_off_in_children() -> None:
    result = run_child([sys.executable, "-c", "import os; print(os.environ.get('GGML_NO_BACKTRACE'))"], timeout=60)
    assert result.stdout.strip() == "1"
    assert "GGML_NO_BACKTRACE" not in os.environ or os.environ["GGML_NO_BACKTRACE"] == "1"
