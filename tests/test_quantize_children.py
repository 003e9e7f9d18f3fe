"""Quantize children: they write into the partial file the parent created, start with an import
path that ignores the working directory, and die with their parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_lora.converters.hf_to_gguf import convert_checkpoint
from edge_lora.converters.quantize import CHILD_ORPHANED, _child_command, quantize_ladder
from edge_lora.core.gguf_check import validate_gguf
from tests.support.model_fixtures import make_checkpoint

MALICIOUS = """import pathlib, sys
pathlib.Path({marker!r}).write_text("ran " + __name__)
sys.exit(0)
"""


@pytest.fixture(scope="module")
def f16_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("children")
    return convert_checkpoint(make_checkpoint("llama", root / "llama", n_layers=1), root / "tiny-F16.gguf")


def _plant(directory: Path, marker: Path) -> None:
    """A cloned model repo with its own `edge_lora` and `llama_cpp` packages: importing either runs it."""
    for module in ("edge_lora/__init__.py", "converters/__init__.py", "converters/quantize.py",
                   "llama_cpp/__init__.py", "llama_cpp/llama_cpp.py"):
        path = directory / module
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(MALICIOUS.format(marker=str(marker)))


def test_children_do_not_import_from_the_working_directory(f16_model: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "cloned-model-repo"
    marker = tmp_path / "pwned"
    _plant(repo, marker)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PYTHONPATH", ".")  # a common developer setting: still not imported
    # What the old child command (`python -m edge_lora.converters.quantize` from here) ran:
    subprocess.run([sys.executable, "-m", "edge_lora.converters.quantize"], check=False, capture_output=True)
    assert marker.read_text().startswith("ran ")
    marker.unlink()
    [result] = quantize_ladder(f16_model, tmp_path / "out", ["Q8_0"])
    assert result.ok, result.error
    assert not marker.exists()
    assert validate_gguf(tmp_path / "out" / "tiny-Q8_0.gguf").file_type == 7


def test_a_child_whose_parent_is_gone_exits_at_once(f16_model: Path, tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    command = _child_command(f16_model, str(tmp_path / "x.gguf"), 7, 1)
    command[command.index(str(os.getpid()))] = str(gone.pid)  # as if started by a parent now dead
    done = subprocess.run(command, capture_output=True, timeout=60)
    assert done.returncode == CHILD_ORPHANED and not (tmp_path / "x.gguf").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_children_die_with_their_parent_even_by_sigkill(tmp_path: Path) -> None:
    """The parent starts a child the way quantize does (same bootstrap, same _die_with_parent),
    then is killed with SIGKILL: the child follows within seconds instead of running on."""
    parent = (
        "import subprocess, sys, os, time\n"
        "from edge_lora.converters import quantize\n"
        "command = quantize._child_command(__import__('pathlib').Path('unused'), 'unused', 0, 1)\n"
        "boot = command.index('-c') + 1\n"
        "command[boot] = command[boot].replace('sys.exit(_child_main(sys.argv[1:]))', "
        "'_die_with_parent(int(sys.argv[1])); print(\"ready\", flush=True); __import__(\"time\").sleep(120)')"
        ".replace('import _child_main', 'import _die_with_parent')\n"
        "child = subprocess.Popen(command)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n")
    process = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    child_pid = int(process.stdout.readline())
    assert process.stdout.readline().strip() == "ready"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(child_pid, signal.SIGKILL)
    pytest.fail("the child outlived its SIGKILLed parent")


def test_isolated_python_imports_the_parents_packages_not_the_working_directorys(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The helper every child uses (quantize, fit's measurement)."""
    import edge_lora
    from edge_lora.core.child_process import isolated_python

    repo = tmp_path / "cloned-model-repo"
    marker = tmp_path / "pwned"
    _plant(repo, marker)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PYTHONPATH", ".")
    code = "import edge_lora, llama_cpp, sys; print(edge_lora.__file__); print(llama_cpp.__file__); print(sys.argv[1:])"
    done = subprocess.run(isolated_python(code, "a", "b"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    package, llama, argv = done.stdout.splitlines()
    assert Path(package) == Path(edge_lora.__file__) and str(repo) not in llama
    assert argv == "['a', 'b']" and not marker.exists()
