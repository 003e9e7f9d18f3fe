"""Every JSON input goes through core.bounded_json: a size cap per kind, and deep nesting, huge
integers, invalid UTF-8 or JSON are typed errors naming the file — through each real reader
(checkpoint, shard index, tokenizer files, adapter_config, manifest, registry, state, hub
cache, safetensors header) and at the CLI edge as one line with exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_lora.cli import main
from edge_lora.converters.checkpoint import HFCheckpoint
from edge_lora.converters.peft import PeftAdapter
from edge_lora.converters.safetensors_io import SafetensorsFile
from edge_lora.converters.tokenizer_export import read_tokenizer
from edge_lora.core import bounded_json
from edge_lora.core.bounded_json import LIMITS, MAX_DEPTH, JsonKind, loads_json, read_json, read_json_object
from edge_lora.core.errors import (AdapterError, EdgeLoraError, InputError, InvalidCheckpointError,
                                   RegistryError)
from edge_lora.core.manifest import Manifest
from edge_lora.serving.registry import AdapterRegistry
from tests.support.model_fixtures import make_checkpoint, make_peft_adapter

# json's own recursion gives up near 1000 levels (RecursionError); the depth walk at MAX_DEPTH.
DEEP_FOR_JSON = "[" * 100_000 + "]" * 100_000
DEEP_FOR_WALK = '{"a": ' + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5) + "}"
# Python 3.11 refuses int("9" * 5000) with ValueError; 3.10 converts it in quadratic time.
HUGE_INT = '{"a": ' + "9" * 5000 + "}"
HOSTILE = {"deep_for_json": (DEEP_FOR_JSON, "nested more than"), "deep_for_walk": (DEEP_FOR_WALK, "nested more than"),
           "huge_int": (HUGE_INT, "integer of 5000 digits"), "negative_huge_int": (HUGE_INT.replace("9", "-9", 1), "digits"),
           "bad_utf8": (b'{"a": "\xff"}', "not UTF-8"), "not_json": ("{not json", "not valid JSON")}


@pytest.mark.parametrize("kind", list(JsonKind))
@pytest.mark.parametrize("case", list(HOSTILE))
def test_every_kind_refuses_hostile_content_with_its_typed_error(tmp_path: Path, kind: JsonKind, case: str) -> None:
    content, needle = HOSTILE[case]
    path = tmp_path / "file.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(LIMITS[kind].error, match=needle) as info:
        read_json(path, kind)
    assert str(path) in info.value.message and info.value.fix == LIMITS[kind].fix


@pytest.mark.parametrize("kind", list(JsonKind))
def test_every_kind_has_a_size_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: JsonKind) -> None:
    cap = LIMITS[kind].max_bytes
    if cap > 16 * bounded_json.MiB:  # the big kinds: the same check with a smaller cap (no 256 MB file)
        cap = 1 * bounded_json.MiB
        monkeypatch.setitem(LIMITS, kind, bounded_json.JsonLimits(cap, LIMITS[kind].error, LIMITS[kind].fix))
    path = tmp_path / "big.json"
    path.write_bytes(b"{}" + b" " * (cap - 2))
    assert read_json(path, kind) == {}  # exactly the cap is allowed
    with path.open("ab") as fh:
        fh.write(b" ")
    with pytest.raises(LIMITS[kind].error, match="larger than"):
        read_json(path, kind)


def test_caps_follow_real_file_sizes() -> None:
    # Gemma 3's tokenizer.json is 33 MB and must read; a config.json of 100 MB must not.
    assert LIMITS[JsonKind.TOKENIZER].max_bytes >= 64 * bounded_json.MiB
    assert LIMITS[JsonKind.CONFIG].max_bytes <= 16 * bounded_json.MiB
    assert LIMITS[JsonKind.STATE].max_bytes <= 1 * bounded_json.MiB


def test_legitimate_content_reads(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer_config.json"
    # transformers writes model_max_length as int(1e30); BOMs come from Windows editors.
    path.write_text('\ufeff{"model_max_length": 1000000000000000019884624838656, "a": ' + "[" * 10 + "]" * 10 + "}")
    assert read_json_object(path, JsonKind.TOKENIZER_CONFIG) == {
        "model_max_length": 1000000000000000019884624838656, "a": [[[[[[[[[[]]]]]]]]]]}
    assert read_json(tmp_path / "absent.json", JsonKind.STATE, missing_ok=True) is None
    assert loads_json(b'{"x": [1, 2]}', JsonKind.SAFETENSORS_HEADER, "header") == {"x": [1, 2]}


def test_missing_directory_fifo_and_non_objects(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="has no absent.json"):
        read_json(tmp_path / "absent.json", JsonKind.MANIFEST)
    with pytest.raises(InputError, match="is a directory"):
        read_json(tmp_path, JsonKind.MANIFEST)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # no writer: a blocking open would hang here
    with pytest.raises(InputError, match="not a regular file"):
        read_json(fifo, JsonKind.MANIFEST)
    null = tmp_path / "null.json"
    null.write_text("null")
    with pytest.raises(InputError, match="not a JSON object"):
        read_json_object(null, JsonKind.MANIFEST, missing_ok=True)


# --- through each real reader ---------------------------------------------------------------

@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bounded")
    ckpt = make_checkpoint("llama", root / "tiny-llama", sharded=True)
    make_peft_adapter(ckpt, root / "adapter")
    return root


@pytest.fixture
def copies(tmp_path: Path, pristine: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "copy"))


def _checkpoint_config(root: Path) -> None:
    HFCheckpoint.open(root / "tiny-llama")


def _tokenizer(root: Path) -> None:
    ckpt = root / "tiny-llama"
    read_tokenizer(ckpt, json.loads((ckpt / "config.json").read_text()))


def _adapter(root: Path) -> None:
    PeftAdapter.open(root / "adapter")


READERS: dict[str, tuple[str, Callable[[Path], None], type[EdgeLoraError]]] = {
    "config.json": ("tiny-llama/config.json", _checkpoint_config, InvalidCheckpointError),
    "shard index": ("tiny-llama/model.safetensors.index.json", _checkpoint_config, InvalidCheckpointError),
    "tokenizer.json": ("tiny-llama/tokenizer.json", _tokenizer, InvalidCheckpointError),
    "tokenizer_config.json": ("tiny-llama/tokenizer_config.json", _tokenizer, InvalidCheckpointError),
    "special_tokens_map.json": ("tiny-llama/special_tokens_map.json", _tokenizer, InvalidCheckpointError),
    "generation_config.json": ("tiny-llama/generation_config.json", _tokenizer, InvalidCheckpointError),
    "adapter_config.json": ("adapter/adapter_config.json", _adapter, AdapterError),
}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("case", ["deep_for_json", "deep_for_walk", "huge_int"])
def test_model_file_readers(copies: Path, reader: str, case: str) -> None:
    relative, read, error = READERS[reader]
    content, needle = HOSTILE[case]
    (copies / relative).write_text(content)
    with pytest.raises(error, match=needle) as info:
        read(copies)
    assert relative.split("/")[-1] in info.value.message


@pytest.mark.parametrize("case", ["deep_for_json", "huge_int"])
def test_safetensors_header(tmp_path: Path, case: str) -> None:
    header = HOSTILE[case][0].encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(InvalidCheckpointError, match=HOSTILE[case][1]):
        SafetensorsFile(path)


@pytest.mark.parametrize("case", ["deep_for_json", "deep_for_walk", "huge_int"])
def test_manifest_and_registry(tmp_path: Path, isolated_home: Path, case: str) -> None:
    content, needle = HOSTILE[case]
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(InputError, match=needle):
        Manifest.load(tmp_path)
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "adapters.json").write_text(content)
    with pytest.raises(RegistryError, match=needle):
        AdapterRegistry().list()


def test_damaged_state_and_cache_only_forget(isolated_home: Path) -> None:
    from edge_lora import hub, state
    from edge_lora.core import constants

    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "state.json").write_text(DEEP_FOR_JSON)
    assert state.last_output_dir() is None
    constants.EDGE_LORA_CACHE.mkdir(parents=True, exist_ok=True)
    (constants.EDGE_LORA_CACHE / "verified-blobs.json").write_text(HUGE_INT)
    assert hub._load_verified() == {}


@pytest.mark.parametrize("relative, command", [
    ("tiny-llama/config.json", ["convert", "{root}/tiny-llama", "--out", "{root}/out", "--quant", "none"]),
    ("tiny-llama/tokenizer.json", ["convert", "{root}/tiny-llama", "--out", "{root}/out", "--quant", "none"]),
    ("adapter/adapter_config.json", ["adapter", "convert", "{root}/adapter", "--base", "{root}/tiny-llama",
                                     "--out", "{root}/out/a.gguf"]),
])
def test_cli_one_line_exit_2(copies: Path, capsys: pytest.CaptureFixture[str], relative: str,
                             command: list[str]) -> None:
    (copies / relative).write_text(DEEP_FOR_JSON)
    rc = main([part.format(root=copies) for part in command])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "nested more than" in err and relative.split("/")[-1] in err
