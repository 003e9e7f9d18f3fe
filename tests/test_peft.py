"""PEFT adapter reading: PEFT's scale and pattern rules, and every kind of bad adapter refused
with a typed error (CLI: one stderr line, exit 2, nothing written)."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from edge_lora.converters.peft import LoraConfig, PeftAdapter, pattern_key
from edge_lora.converters.safetensors_io import SafetensorsFile, write_safetensors
from edge_lora.cli import main
from edge_lora.core.errors import AdapterError, AdapterMismatchError, UnsafeFormatError
from tests.support.model_fixtures import make_checkpoint, make_peft_adapter


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("llama", tmp_path_factory.mktemp("peft") / "llama")


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("qwen2", tmp_path_factory.mktemp("peft") / "qwen2", n_layers=3)


def _edit_config(adapter: Path, **changes: object) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _rewrite_tensors(adapter: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = adapter / "adapter_model.safetensors"
    with SafetensorsFile(path) as st:
        tensors = {n: np.array(st.read(n)) for n in st.names()}
    edit(tensors)
    write_safetensors(path, tensors)


# --- PEFT semantics --------------------------------------------------------------------------

def test_pattern_key_follows_peft() -> None:
    patterns = {"q_proj": 1, r"layers\.1\.mlp\.up_proj": 2, "proj": 3}
    assert pattern_key(patterns, "model.layers.0.self_attn.q_proj") == "q_proj"
    assert pattern_key(patterns, "model.layers.1.mlp.up_proj") == r"layers\.1\.mlp\.up_proj"
    assert pattern_key(patterns, "model.layers.0.mlp.up_proj") is None  # "proj" must match a whole segment
    assert pattern_key({"up_proj": 1}, "model.layers.0.mlp.gate_up_proj") is None
    assert pattern_key({"proj": 9, "q_proj": 1}, "model.layers.0.self_attn.q_proj") == "q_proj"
    assert pattern_key({".*_proj": 9, "q_proj": 1}, "model.layers.0.self_attn.q_proj") == ".*_proj"  # first wins


def test_scales_rslora_and_patterns(llama_ckpt: Path, tmp_path: Path) -> None:
    adapter = PeftAdapter.open(make_peft_adapter(
        llama_ckpt, tmp_path / "a", r=16, alpha=8, use_rslora=True, rank_pattern={"v_proj": 4},
        alpha_pattern={"o_proj": 32}))
    deltas = adapter.deltas
    assert deltas["model.layers.0.self_attn.q_proj.weight"].scale == pytest.approx(8 / math.sqrt(16))
    assert deltas["model.layers.1.self_attn.v_proj.weight"].scale == pytest.approx(8 / math.sqrt(4))
    assert deltas["model.layers.1.self_attn.v_proj.weight"].rank == 4
    assert deltas["model.layers.0.self_attn.o_proj.weight"].scale == pytest.approx(32 / math.sqrt(16))
    plain = PeftAdapter.open(make_peft_adapter(llama_ckpt, tmp_path / "b", r=8, alpha=16))
    assert {d.scale for d in plain.deltas.values()} == {2.0}


def test_target_modules_forms() -> None:
    def config(targets: object, layers: list[int] | None = None) -> LoraConfig:
        return LoraConfig(r=8, lora_alpha=8, use_rslora=False, use_dora=False, rank_pattern={}, alpha_pattern={},
                          target_modules=targets, layers_to_transform=layers, modules_to_save=[],
                          fan_in_fan_out=False)  # type: ignore[arg-type]
    q = "model.layers.3.self_attn.q_proj"
    assert config(["q_proj"]).targets(q) and not config(["k_proj"]).targets(q)
    assert config(r".*\.(q|v)_proj").targets(q) and not config(r"q_proj").targets(q)  # regex: fullmatch
    assert config("all-linear").targets(q) and not config("all-linear").targets("lm_head")
    assert config(["q_proj"], [3]).targets(q) and not config(["q_proj"], [0, 1]).targets(q)


def test_legal_adapter_reads(tmp_path: Path) -> None:
    from tests.support.paths import LEGAL_ADAPTER_DIR

    adapter = PeftAdapter.open(LEGAL_ADAPTER_DIR)
    assert len(adapter.deltas) == 18 * 7 and not adapter.replacements and not adapter.uses_dora
    assert {d.scale for d in adapter.deltas.values()} == {2.0}
    assert {d.rank for d in adapter.deltas.values()} == {16}


# --- bad adapters ----------------------------------------------------------------------------

def _cli_fails(args: list[str], capsys: pytest.CaptureFixture[str], match: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("edge-lora: error: "), err
    assert "Traceback" not in err
    assert match.lower() in err.lower(), err


def _adapter_convert(adapter: Path, base: Path, out: Path) -> list[str]:
    return ["adapter", "convert", str(adapter), "--base", str(base), "--out", str(out)]


BAD_ADAPTERS = {
    "pickle": (lambda d: ((d / "adapter_model.safetensors").rename(d / "adapter_model.bin")), "pickle"),
    "ia3-type": (lambda d: _edit_config(d, peft_type="IA3"), "IA3"),  # LoRA tensors under an IA3 config
    "unknown-peft-type": (lambda d: _edit_config(d, peft_type="LOHA"), "'LOHA'; edge-lora supports LORA adapters only"),
    "prefix-tuning": (lambda d: _edit_config(d, peft_type="PREFIX_TUNING"), "LORA adapters only"),
    "bias-all": (lambda d: _edit_config(d, bias="all"), "bias"),
    "corrupt-safetensors": (lambda d: (d / "adapter_model.safetensors").write_bytes(
        struct.pack("<Q", 10**6) + b"{}"), "not a valid safetensors"),
    "truncated-safetensors": (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:-100]), "not a valid safetensors"),
    "rank-disagrees-with-config": (lambda d: _edit_config(d, r=4), "rank"),
    "missing-lora-b": (lambda d: _rewrite_tensors(d, lambda t: t.pop(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")), "lora_B"),
    "untargeted-module": (lambda d: _edit_config(d, target_modules=["q_proj"]), "target_modules"),
    "missing-config": (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json"),
    "use-dora-without-magnitude": (lambda d: _edit_config(d, use_dora=True), "magnitude"),
    "target-modules-bad-regex": (lambda d: _edit_config(d, target_modules="(("), "regular expression"),
}


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_bad_adapter_refused_by_cli(case: str, llama_ckpt: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    adapter = make_peft_adapter(llama_ckpt, tmp_path / "adapter")
    damage, match = BAD_ADAPTERS[case]
    damage(adapter)
    out = tmp_path / "out" / "adapter.gguf"
    _cli_fails(_adapter_convert(adapter, llama_ckpt, out), capsys, match)
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    # the merge path refuses it the same way, before writing anything
    _cli_fails(["convert", str(llama_ckpt), "--adapter", str(adapter), "--out", str(tmp_path / "conv"),
                "--quant", "none"], capsys, match)
    assert not any((tmp_path / "conv").glob("*.gguf*"))


def test_pickle_file_path_is_refused(llama_ckpt: Path, tmp_path: Path) -> None:
    path = tmp_path / "adapter_model.bin"
    path.write_bytes(b"\x80\x04not really")
    with pytest.raises(UnsafeFormatError) as caught:
        PeftAdapter.open(path)
    assert "pickle" in caught.value.message and "safe_serialization" in (caught.value.fix or "")


def test_adapter_for_another_base_names_first_mismatch(llama_ckpt: Path, qwen_ckpt: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    adapter = make_peft_adapter(qwen_ckpt, tmp_path / "qwen-adapter")
    out = tmp_path / "adapter.gguf"
    with pytest.raises(AdapterMismatchError):
        from edge_lora.converters.adapter_gguf import convert_adapter_to_gguf
        convert_adapter_to_gguf(adapter, llama_ckpt, out)
    # qwen2 has 3 layers, llama 2: layer 2 does not exist, or a shape differs first
    _cli_fails(_adapter_convert(adapter, llama_ckpt, out), capsys, "adapter")
    err_out = tmp_path / "out2"
    _cli_fails(["convert", str(llama_ckpt), "--adapter", str(adapter), "--out", str(err_out)], capsys, "base")
    assert not out.exists() and not (err_out.exists() and list(err_out.iterdir()))


def test_resized_embedding_is_a_clear_error(llama_ckpt: Path, tmp_path: Path) -> None:
    from edge_lora.converters.checkpoint import HFCheckpoint

    adapter_dir = make_peft_adapter(llama_ckpt, tmp_path / "a", modules_to_save=["embed_tokens"])
    key = "base_model.model.model.embed_tokens.weight"
    _rewrite_tensors(adapter_dir, lambda t: t.__setitem__(key, np.concatenate([t[key], t[key][:8]])))
    adapter = PeftAdapter.open(adapter_dir)
    with HFCheckpoint.open(llama_ckpt) as ckpt, pytest.raises(AdapterMismatchError, match="resized vocabulary"):
        adapter.check_fits(ckpt)


def test_embedding_lora_is_refused(llama_ckpt: Path, tmp_path: Path) -> None:
    adapter_dir = make_peft_adapter(llama_ckpt, tmp_path / "a")
    _rewrite_tensors(adapter_dir, lambda t: t.__setitem__(
        "base_model.model.model.embed_tokens.lora_embedding_A", np.zeros((8, 4), np.float32)))
    with pytest.raises(AdapterError, match="embedding"):
        PeftAdapter.open(adapter_dir)


def test_cli_adapter_convert_outtype_q8_0(llama_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import gguf

    adapter = make_peft_adapter(llama_ckpt, tmp_path / "adapter")
    out = tmp_path / "adapter-q8.gguf"
    assert main(_adapter_convert(adapter, llama_ckpt, out) + ["--outtype", "q8_0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(out)
    assert {t.tensor_type for t in gguf.GGUFReader(out).tensors} == {gguf.GGMLQuantizationType.Q8_0}


@pytest.mark.parametrize("target", ["adapter_model.safetensors", "adapter_config.json", "base-config"])
def test_adapter_convert_never_writes_over_an_input(llama_ckpt: Path, tmp_path: Path, target: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # --out peft/adapter_model.safetensors used to replace the user's adapter weights with the GGUF.
    adapter = make_peft_adapter(llama_ckpt, tmp_path / "adapter")
    out = llama_ckpt / "config.json" if target == "base-config" else adapter / target
    before = out.read_bytes()
    _cli_fails(_adapter_convert(adapter, llama_ckpt, out), capsys, "is an input of this command")
    assert out.read_bytes() == before


@pytest.mark.parametrize("stores_head", [False, True], ids=["head-not-stored", "head-stored-too"])
def test_lora_on_a_tied_head_is_refused_not_dropped(qwen_ckpt: Path, tmp_path: Path, stores_head: bool,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A tied base converts without a separate output weight, so a delta on lm_head has nowhere
    to go; many tied checkpoints store lm_head.weight anyway, which must not hide that."""
    from edge_lora.converters.checkpoint import HFCheckpoint
    from edge_lora.converters.hf_to_gguf import convert_checkpoint
    from edge_lora.converters.merge import PeftMerger

    assert json.loads((qwen_ckpt / "config.json").read_text())["tie_word_embeddings"]
    with_head = tmp_path / "with-head"
    shutil.copytree(qwen_ckpt, with_head)
    with SafetensorsFile(with_head / "model.safetensors") as st:
        tensors = {n: np.array(st.read(n), dtype=np.float32) for n in st.names()}
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    write_safetensors(with_head / "model.safetensors", tensors)
    adapter_dir = make_peft_adapter(with_head, tmp_path / "ad", target_modules=("q_proj", "lm_head"))
    base = with_head if stores_head else qwen_ckpt
    adapter = PeftAdapter.open(adapter_dir)
    assert "lm_head.weight" in adapter.deltas
    with HFCheckpoint.open(base) as ckpt, pytest.raises(AdapterMismatchError, match="ties lm_head"):
        adapter.check_fits(ckpt)
    with pytest.raises(AdapterMismatchError, match="ties lm_head"):  # the library path checks too
        convert_checkpoint(base, tmp_path / "merged.gguf", adapter=PeftMerger(adapter))
    out = tmp_path / "out"
    _cli_fails(["convert", str(base), "--adapter", str(adapter_dir), "--out", str(out), "--quant", "none"],
               capsys, "tie_word_embeddings")
    _cli_fails(_adapter_convert(adapter_dir, base, tmp_path / "a.gguf"), capsys, "tie_word_embeddings")
    assert not (tmp_path / "merged.gguf").exists() and not (tmp_path / "a.gguf").exists()
    assert not (out.exists() and list(out.iterdir()))


def test_lora_on_an_untied_head_fits(llama_ckpt: Path, tmp_path: Path) -> None:
    from edge_lora.converters.checkpoint import HFCheckpoint

    adapter = PeftAdapter.open(make_peft_adapter(llama_ckpt, tmp_path / "ad", target_modules=("lm_head",)))
    with HFCheckpoint.open(llama_ckpt) as ckpt:
        assert not ckpt.config.get("tie_word_embeddings") and ckpt.has_tensor("lm_head.weight")
        adapter.check_fits(ckpt)
