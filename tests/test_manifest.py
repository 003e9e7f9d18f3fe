"""manifest.json across runs: a conversion describes what it wrote (never an earlier model's
adapter or files), while rows another tool adds, other formats of the same model, the hot-apply
adapter and quality figures of unchanged files are kept; quantize records the right kind
whichever way its source path is spelled."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge_lora.core.manifest import Manifest
from edge_lora.workflows.convert_model import convert_model
from edge_lora.cli import main
from tests.support.model_fixtures import make_checkpoint, make_peft_adapter


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("manifest")
    base = make_checkpoint("llama", root / "base")
    return base, make_peft_adapter(base, root / "ad")


def _rows(out: Path) -> dict[str, str]:
    return {f["path"]: f["kind"] for f in json.loads((out / "manifest.json").read_text())["files"]}


def test_plain_base_after_a_merge_describes_the_base(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = inputs
    out = tmp_path / "out"
    convert_model(base, out, adapter=adapter, quants="none")
    manifest = convert_model(base, out, quants="none")
    on_disk = Manifest.load(out)
    for m in (manifest, on_disk):
        assert m.name == "base" and m.adapter is None and m.base == str(base)
    # The merged model is another model: unlisted (its file stays); the adapter GGUF hot-applies
    # on this base, the layout the pipeline documents.
    assert _rows(out) == {"base-F16.gguf": "model", "adapter-ad.gguf": "adapter"}
    assert (out / "base-ad-F16.gguf").is_file()
    from_lines = [line for line in (out / "Modelfile").read_text().splitlines() if line.startswith("FROM")]
    assert from_lines == ["FROM ./base-F16.gguf"]


def test_merge_after_another_base_drops_that_base(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = inputs
    other = make_checkpoint("qwen2", tmp_path / "other")
    out = tmp_path / "out"
    convert_model(base, out, adapter=adapter, quants="none")
    convert_model(other, out, quants="none")  # the adapter was made for `base`, not for `other`
    assert _rows(out) == {"other-F16.gguf": "model"}
    manifest = Manifest.load(out)
    assert manifest.architecture == "qwen2" and manifest.adapter is None


def test_rerun_keeps_same_model_rows_and_quality_of_unchanged_files(inputs: tuple[Path, Path],
                                                                    tmp_path: Path) -> None:
    base, adapter = inputs
    out = tmp_path / "out"
    convert_model(base, out, adapter=adapter, quants="none")
    measured = Manifest.load(out)
    measured.record_quality("base-ad-F16.gguf", ppl=12.5, kld=0.01)
    measured.save()
    manifest = convert_model(base, out, adapter=adapter, quants="none", outtype="bf16")
    assert manifest.adapter == str(adapter)
    assert _rows(out) == {"base-ad-F16.gguf": "merged", "base-ad-BF16.gguf": "merged",
                          "adapter-ad.gguf": "adapter"}
    convert_model(base, out, adapter=adapter, quants="none")  # rewrites the same F16 bytes
    row = Manifest.load(out).file("base-ad-F16.gguf")
    assert row is not None and (row.ppl, row.kld) == (12.5, 0.01)


def test_save_keeps_rows_added_meanwhile_but_not_rows_dropped(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = inputs
    out = tmp_path / "out"
    convert_model(base, out, adapter=adapter, quants="none")
    ours = Manifest.load(out)
    ours.files = [f for f in ours.files if f.kind != "adapter"]
    ours.adapter = None
    shutil.copy(out / "base-ad-F16.gguf", out / "copy-F16.gguf")
    other_tool = Manifest.load(out)  # e.g. quantize, adding a row between our load and our save
    other_tool.add_file("copy-F16.gguf", format="F16", kind="merged")
    other_tool.save()
    ours.save()
    assert _rows(out) == {"base-ad-F16.gguf": "merged", "copy-F16.gguf": "merged"}
    assert Manifest.load(out).adapter is None  # loaded from disk, None says "no adapter"


def test_bare_manifest_keeps_the_description_on_disk(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = inputs
    out = tmp_path / "out"
    convert_model(base, out, adapter=adapter, quants="none")
    bare = Manifest(out)  # built without loading: its empty fields are unknown, not "none"
    bare.add_file("adapter-ad.gguf", format="F32", kind="adapter")
    bare.save()
    manifest = Manifest.load(out)
    assert manifest.name == "base-ad" and manifest.adapter == str(adapter)
    assert _rows(out) == {"base-ad-F16.gguf": "merged", "adapter-ad.gguf": "adapter"}


def test_quantize_relative_source_records_merged_kind(inputs: tuple[Path, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter = inputs
    convert_model(base, tmp_path / "out", adapter=adapter, quants="none")
    monkeypatch.chdir(tmp_path)  # the source is relative to the working directory, not to out/
    assert main(["quantize", "out/base-ad-F16.gguf", "--quant", "Q8_0"]) == 0
    capsys.readouterr()
    assert _rows(tmp_path / "out")["base-ad-Q8_0.gguf"] == "merged"


def test_absolute_path_of_a_symlinked_file_finds_its_row(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    base, _adapter = inputs
    elsewhere = tmp_path / "elsewhere"
    convert_model(base, elsewhere, quants="none")
    out = tmp_path / "out"
    out.mkdir()
    (out / "linked-F16.gguf").symlink_to(elsewhere / "base-F16.gguf")
    manifest = Manifest.load(out)
    manifest.add_file("linked-F16.gguf", format="F16", kind="model")
    assert manifest.file(out.absolute() / "linked-F16.gguf") is manifest.file("linked-F16.gguf") is not None


@pytest.mark.parametrize("row_path", ["../elsewhere/x-Q4_K_M.gguf", "/etc/passwd", "sub/../../x.gguf"])
def test_a_row_outside_the_directory_is_refused_on_load(tmp_path: Path, row_path: str) -> None:
    from edge_lora.core.errors import InputError

    row = {"path": row_path, "format": "Q4_K_M", "kind": "model", "bytes": 1, "bpw": 4.5, "sha256": "0" * 64}
    (tmp_path / "manifest.json").write_text(json.dumps({"files": [row]}))
    with pytest.raises(InputError, match="outside the directory"):
        Manifest.load(tmp_path)
