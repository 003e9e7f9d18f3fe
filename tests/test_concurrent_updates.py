"""Registry and manifest updates from two processes at once lose nothing: each read-modify-write
holds a file lock beside the file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from edge_lora.core.manifest import Manifest
from edge_lora.serving.registry import AdapterRegistry

PER_PROCESS = 50

REGISTRY_WORKER = """
import sys, time
from pathlib import Path
from edge_lora.serving.registry import AdapterRegistry
worker, adapter, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
registry = AdapterRegistry()
for i in range({n}):
    registry.add(f"w{{worker}}-{{i}}", adapter)
"""

MANIFEST_WORKER = """
import sys, time
from pathlib import Path
from edge_lora.core.manifest import Manifest
worker, directory, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
for i in range({n}):
    manifest = Manifest.load(directory)
    manifest.add_file(f"w{{worker}}-{{i}}.gguf", format="F16", kind="model")
    manifest.save()
"""


def _tiny_gguf(path: Path, general_type: str) -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_string("general.type", general_type)
    if general_type == "adapter":
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", 8.0)
        writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 32), np.float32))
        writer.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((64, 4), np.float32))
    else:
        writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _run_two(script: str, args: list[str], go: Path) -> None:
    workers = [subprocess.Popen([sys.executable, "-c", script, str(w), *args, str(go)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in (1, 2)]
    for worker in workers:  # both interpreters started (imports done) and waiting, however slow
        assert worker.stdout is not None and worker.stdout.readline() == "ready\n"
    go.touch()
    for worker in workers:
        _out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err


def test_two_processes_adding_adapters_lose_none(tmp_path: Path, isolated_home: Path) -> None:
    adapter = _tiny_gguf(tmp_path / "adapter.gguf", "adapter")
    _run_two(REGISTRY_WORKER.format(n=PER_PROCESS), [str(adapter)], tmp_path / "go")
    names = {entry.name for entry in AdapterRegistry().list()}
    assert len(names) == 2 * PER_PROCESS
    assert names == {f"w{w}-{i}" for w in (1, 2) for i in range(PER_PROCESS)}
    stored = json.loads((isolated_home / "adapters.json").read_text())
    assert len(stored["adapters"]) == 2 * PER_PROCESS


def test_two_processes_adding_manifest_rows_lose_none(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for w in (1, 2):
        for i in range(PER_PROCESS):
            _tiny_gguf(out / f"w{w}-{i}.gguf", "model")
    _run_two(MANIFEST_WORKER.format(n=PER_PROCESS), [str(out)], tmp_path / "go")
    rows = {row.path for row in Manifest.load(out).files}
    assert rows == {f"w{w}-{i}.gguf" for w in (1, 2) for i in range(PER_PROCESS)}
    assert not list(out.glob("*.partial"))


@pytest.mark.parametrize("target", ["registry", "manifest"])
def test_the_lock_file_is_beside_the_file(tmp_path: Path, isolated_home: Path, target: str) -> None:
    if target == "registry":
        AdapterRegistry().add("a", _tiny_gguf(tmp_path / "adapter.gguf", "adapter"))
        assert (isolated_home / ".adapters.json.lock").is_file()
    else:
        _tiny_gguf(tmp_path / "m.gguf", "model")
        manifest = Manifest.load(tmp_path)
        manifest.add_file("m.gguf", format="F16", kind="model")
        manifest.save()
        assert (tmp_path / ".manifest.json.lock").is_file()
