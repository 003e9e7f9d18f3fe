"""`edge-lora tui DIR` in a real terminal (tmux): the installed command starts, draws the formats
of a converted directory with the real fit estimator, and quits on `q`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

TMUX = shutil.which("tmux")
# CI installs tmux (.ci/run); a machine without it cannot run this check at all.
pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed (CI installs it)")


def _capture(session: str) -> str:
    return subprocess.run([TMUX, "capture-pane", "-p", "-t", session], capture_output=True, text=True,  # type: ignore[list-item]
                          check=False).stdout


def _wait_for(session: str, needles: tuple[str, ...], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = _capture(session)
        if all(n in screen for n in needles):
            return screen
        time.sleep(0.3)
    return screen


@pytest.mark.slow
def test_tui_in_tmux_shows_formats_and_quits(tmp_path: Path, gemma_q4_gguf: Path, gemma_f16_gguf: Path) -> None:
    from tests.support.tui_fakes import write_gemma_dir

    directory = write_gemma_dir(tmp_path, {"F16": gemma_f16_gguf, "Q4_K_M": gemma_q4_gguf})
    session = f"edge-lora-tui-{tmp_path.name}"
    exit_file = tmp_path / "exit-code"
    # `python -m edge_lora` is the same entry point as the `edge-lora` script, without relying on PATH.
    command = f"{sys.executable} -m edge_lora tui {directory} --ctx 4096; echo $? > {exit_file}"
    subprocess.run([TMUX, "new-session", "-d", "-s", session, "-x", "80", "-y", "24", command], check=True)  # type: ignore[list-item]
    try:
        screen = _wait_for(session, ("Q4_K_M", "F16", "RAM@4K", "fits"), timeout=60)
        assert "Q4_K_M" in screen and "F16" in screen, screen
        assert "RAM@4K" in screen and "fits" in screen, screen
        assert "RAM " in screen and "free of" in screen, screen  # the hardware panel's live reading
        assert "★" in screen, screen  # the recommended row
        assert "Traceback" not in screen
        subprocess.run([TMUX, "send-keys", "-t", session, "q"], check=True)  # type: ignore[list-item]
        deadline = time.monotonic() + 20
        while not exit_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert exit_file.read_text().strip() == "0"
    finally:
        subprocess.run([TMUX, "kill-session", "-t", session], capture_output=True, check=False)  # type: ignore[list-item]


def test_tui_bad_directory_is_one_line_exit_2(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "edge_lora", "tui", str(tmp_path / "missing")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("edge-lora: error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
