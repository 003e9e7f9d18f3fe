"""The one reader of an output directory (edge_lora.core.output_dir): what a conversion wrote,
read by its manifest or, without one, by file names; the adapter file-name convention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_lora.core.errors import InputError, InputNotFoundError
from edge_lora.core.output_dir import OutputDir, adapter_file_name, adapter_name
from edge_lora.workflows.convert_model import convert_model
from tests.support.model_fixtures import make_checkpoint, make_peft_adapter


def _write(directory: Path, rows: list[dict], files: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in files:
        (directory / name).write_bytes(b"GGUF")  # never parsed: the reader opens no GGUF
    filled = [{"bytes": 4, "bpw": 1.0, "sha256": "", **row} for row in rows]
    (directory / "manifest.json").write_text(json.dumps({"name": "m", "files": filled}))


def test_adapter_file_names() -> None:
    assert adapter_file_name("legal") == "adapter-legal.gguf"
    assert adapter_name(Path("/x") / adapter_file_name("legal")) == "legal"
    assert adapter_name("gemma-Q4_K_M.gguf") is None and adapter_name("adapter-.gguf") is None


def test_manifest_says_which_files_belong(tmp_path: Path) -> None:
    # base-F16 / base-Q4_K_M belong; old-Q8_0 is an earlier conversion's file left on disk.
    _write(tmp_path, [{"path": "base-Q4_K_M.gguf", "format": "Q4_K_M", "kind": "merged"},
                      {"path": "base-F16.gguf", "format": "F16", "kind": "merged"},
                      {"path": "adapter-ad.gguf", "format": "F32", "kind": "adapter"},
                      {"path": "base-Q2_K.gguf", "format": "Q2_K", "kind": "merged"}],
           ["base-Q4_K_M.gguf", "base-F16.gguf", "adapter-ad.gguf", "old-Q8_0.gguf"])
    output = OutputDir.read(tmp_path)
    assert [(m.path.name, m.format_name, m.kind) for m in output.models] == [
        ("base-Q4_K_M.gguf", "Q4_K_M", "merged"), ("base-F16.gguf", "F16", "merged")]
    assert [(a.name, a.path.name) for a in output.adapters] == [("ad", "adapter-ad.gguf")]
    assert output.missing == ("base-Q2_K.gguf",) and output.has_manifest
    assert output.kind == "merged" and output.name == "m"
    assert output.reference is not None and output.reference.path.name == "base-F16.gguf"
    assert sorted(output.by_format()) == ["F16", "Q4_K_M"]
    assert output.models[0].row is not None and output.models[0].row.bytes == 4


def test_without_a_manifest_file_names_say(tmp_path: Path) -> None:
    for name in ("m-Q8_0.gguf", "m-BF16.gguf", "m-F32.gguf", "adapter-x.gguf", "notes.gguf",
                 "m.imatrix.gguf", "imatrix.gguf"):  # importance matrices are not models
        (tmp_path / name).write_bytes(b"GGUF")
    output = OutputDir.read(tmp_path)
    assert not output.has_manifest and output.kind == "model" and output.missing == ()
    assert {m.path.name: m.format_name for m in output.models} == {
        "m-Q8_0.gguf": "Q8_0", "m-BF16.gguf": "BF16", "m-F32.gguf": "F32", "notes.gguf": None}
    assert [a.name for a in output.adapters] == ["x"]
    assert output.reference is not None and output.reference.format_name == "F32"  # best full precision
    assert sorted(output.by_format()) == ["BF16", "F32", "Q8_0"]  # a file of unknown format is not "by format"


def test_bad_directories(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError):
        OutputDir.read(tmp_path / "missing")
    (tmp_path / "manifest.json").write_text(json.dumps({"files": [{"path": "../x.gguf", "format": "F16",
                                                                    "kind": "model", "bytes": 1, "bpw": 1, "sha256": ""}]}))
    with pytest.raises(InputError, match="outside the directory"):
        OutputDir.read(tmp_path)
    assert OutputDir.by_file_names(tmp_path).models == ()  # the fallback fit uses for a damaged manifest


def test_reads_what_convert_wrote(tmp_path: Path) -> None:
    base = make_checkpoint("llama", tmp_path / "base")
    adapter = make_peft_adapter(base, tmp_path / "ad")
    out = tmp_path / "out"
    convert_model(base, out, adapter=adapter, quants="Q8_0")
    output = OutputDir.read(out)
    assert sorted((m.path.name, m.kind) for m in output.models) == [("base-ad-F16.gguf", "merged"),
                                                                    ("base-ad-Q8_0.gguf", "merged")]
    assert [(a.name, a.path.name) for a in output.adapters] == [("ad", adapter_file_name("ad"))]
    assert output.reference is not None and output.reference.path == out / "base-ad-F16.gguf"
    assert output.by_format()["Q8_0"].row is not None
