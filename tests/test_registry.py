"""Adapter registry and state: names, atomic writes, missing files, resolve by name or path."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from edge_lora import state
from edge_lora.core.errors import AdapterError, InputError, InputNotFoundError, InvalidGGUFError, RegistryError
from edge_lora.serving.registry import AdapterRegistry


def make_adapter(path: Path, arch: str = "llama") -> Path:
    w = gguf.GGUFWriter(path, arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 32), np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((64, 4), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


def test_add_list_resolve_remove(tmp_path: Path, isolated_home: Path) -> None:
    a = make_adapter(tmp_path / "adapter-legal.gguf")
    reg = AdapterRegistry()
    entry = reg.add("legal", a, scale=0.5)
    assert entry.scale == 0.5 and entry.architecture == "llama"
    stored = json.loads((isolated_home / "adapters.json").read_text())
    assert stored["adapters"]["legal"]["path"] == str(a.resolve())
    assert [e.name for e in AdapterRegistry().list()] == ["legal"]
    assert reg.resolve("legal").path == a.resolve()
    by_path = reg.resolve(str(a))
    assert by_path.name == "legal" and by_path.scale == 1.0
    reg.remove("legal")
    assert reg.list() == []
    with pytest.raises(RegistryError, match="no adapter named"):
        reg.remove("legal")
    assert not list(isolated_home.glob("*.partial"))


@pytest.mark.parametrize("name", ["", "-x", ".hidden", "a/b", "..", "a\\b", "x" * 65, "sp ace", "ü", "name\n"])
def test_bad_names_refused(tmp_path: Path, name: str) -> None:
    a = make_adapter(tmp_path / "a.gguf")
    with pytest.raises(RegistryError, match="invalid adapter name"):
        AdapterRegistry().add(name, a)


def test_add_validates_file(tmp_path: Path) -> None:
    reg = AdapterRegistry()
    with pytest.raises(InputNotFoundError):
        reg.add("x", tmp_path / "missing.gguf")
    with pytest.raises(InputError, match="is a directory"):
        reg.add("x", tmp_path)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\xff" * 100)
    with pytest.raises(InvalidGGUFError):
        reg.add("x", junk)
    model = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(model, "llama")
    w.add_tensor("t", np.zeros(32, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(AdapterError, match="not a GGUF LoRA adapter"):
        reg.add("x", model)
    with pytest.raises(RegistryError, match="scale"):
        reg.add("x", make_adapter(tmp_path / "a.gguf"), scale=float("nan"))
    assert reg.list() == []


def test_duplicate_name_needs_replace(tmp_path: Path) -> None:
    reg = AdapterRegistry()
    a, b = make_adapter(tmp_path / "a.gguf"), make_adapter(tmp_path / "b.gguf")
    reg.add("x", a)
    with pytest.raises(RegistryError, match="already registered"):
        reg.add("x", b)
    reg.add("x", b, replace=True)
    assert reg.resolve("x").path == b.resolve()


def test_missing_file_is_listed_not_crashed(tmp_path: Path) -> None:
    reg = AdapterRegistry()
    a = make_adapter(tmp_path / "a.gguf")
    reg.add("gone", a)
    a.unlink()
    [entry] = reg.list()
    assert entry.name == "gone" and not entry.exists
    with pytest.raises(InputNotFoundError, match="no longer exists"):
        reg.resolve("gone")


def test_unknown_name_and_corrupt_registry(isolated_home: Path) -> None:
    reg = AdapterRegistry()
    with pytest.raises(InputNotFoundError, match="neither a registered adapter"):
        reg.resolve("nothing")
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "adapters.json").write_text("{not json")
    with pytest.raises(RegistryError, match="unreadable"):
        reg.list()
    (isolated_home / "adapters.json").write_text('{"adapters": [1, 2]}')
    with pytest.raises(RegistryError, match="unreadable"):
        reg.list()


def test_state_remembers_last_output_dir(tmp_path: Path, isolated_home: Path) -> None:
    assert state.last_output_dir() is None
    out = tmp_path / "out"
    out.mkdir()
    state.remember_output_dir(out)
    assert state.last_output_dir() == out.resolve()
    (isolated_home / "state.json").write_text("garbage")
    assert state.last_output_dir() is None  # damaged state = nothing remembered
    state.remember_output_dir(out)
    out.rmdir()
    assert state.last_output_dir() is None
