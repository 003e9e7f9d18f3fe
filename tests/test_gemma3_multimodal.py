"""Gemma3ForConditionalGeneration converts as its language model alone (llama.cpp's plain
gemma3 GGUF): for both transformers tensor layouts the GGUF, the merged GGUF and the GGUF
adapter are byte-identical to those of the same weights as Gemma3ForCausalLM, vision tensors
are never read, and vision LoRA modules are skipped (with a warning) or refused if alone."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_lora.converters.adapter_gguf import convert_adapter_to_gguf
from edge_lora.converters.architectures import arch_spec_for
from edge_lora.converters.checkpoint import HFCheckpoint
from edge_lora.converters.hf_to_gguf import convert_checkpoint
from edge_lora.converters.merge import PeftMerger
from edge_lora.converters.peft import PeftAdapter
from edge_lora.converters.safetensors_io import SafetensorsFile
from edge_lora.cli import main
from edge_lora.core.errors import AdapterError
from tests.support.model_fixtures import (GEMMA3_MULTIMODAL_LAYOUTS, make_checkpoint, make_gemma3_multimodal_checkpoint,
                            make_peft_adapter, multimodal_name, vision_tensor_names, write_safetensors)

LAYOUTS = tuple(GEMMA3_MULTIMODAL_LAYOUTS)
# Same basename everywhere: general.name comes from the directory name.
MODEL_DIR = "gemma-3-tiny"
ADAPTER_DIR = "tiny-lora"


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("gemma3", tmp_path_factory.mktemp("text") / MODEL_DIR)


@pytest.fixture(scope="module")
def text_adapter(tmp_path_factory: pytest.TempPathFactory, text_ckpt: Path) -> Path:
    return make_peft_adapter(text_ckpt, tmp_path_factory.mktemp("text-lora") / ADAPTER_DIR, r=4, strength=0.05)


@pytest.fixture(scope="module")
def text_gguf(tmp_path_factory: pytest.TempPathFactory, text_ckpt: Path) -> Path:
    return convert_checkpoint(text_ckpt, tmp_path_factory.mktemp("text-gguf") / "model.gguf")


def _multimodal(text_ckpt: Path, root: Path, layout: str, **kwargs: bool) -> Path:
    return make_gemma3_multimodal_checkpoint(text_ckpt, root / layout / MODEL_DIR, layout=layout, **kwargs)


def _rename_adapter(text_adapter: Path, out_dir: Path, layout: str,
                    extra_vision: bool = False, only_vision: bool = False) -> Path:
    """The text adapter's LoRA weights under the multimodal model's module names (as PEFT saves
    an adapter trained on Gemma3ForConditionalGeneration), optionally with vision modules."""
    prefix = "base_model.model."
    with SafetensorsFile(text_adapter / "adapter_model.safetensors") as f:
        tensors = {prefix + multimodal_name(n[len(prefix):], layout): np.array(f.read(n), dtype=np.float32)
                   for n in f.names()}
    rng = np.random.default_rng(5)
    vision_module = prefix + vision_tensor_names(layout)[0][: -len(".weight")]
    vision = {vision_module + ".lora_A.weight": rng.standard_normal((4, 8)).astype(np.float32),
              vision_module + ".lora_B.weight": rng.standard_normal((8, 4)).astype(np.float32)}
    if only_vision:
        tensors = vision
    elif extra_vision:
        tensors.update(vision)
    out_dir.mkdir(parents=True)
    shutil.copy(text_adapter / "adapter_config.json", out_dir / "adapter_config.json")
    write_safetensors(out_dir / "adapter_model.safetensors", tensors, "float32")
    return out_dir


def _assert_same_file(got: Path, want: Path) -> None:
    got_bytes, want_bytes = got.read_bytes(), want.read_bytes()
    assert len(got_bytes) == len(want_bytes)
    assert got_bytes == want_bytes, f"{got} differs from {want}"


def _assert_same_adapter(got: Path, want: Path) -> None:
    """Two GGUF adapters hold the same tensors and metadata, but for the PEFT source each records
    (its path and hash: the two adapters come from two directories)."""
    from gguf import GGUFReader

    from edge_lora.converters.peft_export import PEFT_PATH_KEY, PEFT_SHA256_KEY

    def content(path: Path) -> tuple[dict, dict]:
        reader = GGUFReader(path)
        fields = {name: [bytes(part) for part in field.parts] for name, field in reader.fields.items()
                  if name not in (PEFT_PATH_KEY, PEFT_SHA256_KEY) and not name.startswith("GGUF.")}
        tensors = {t.name: (t.tensor_type, tuple(t.shape), bytes(t.data)) for t in reader.tensors}
        return fields, tensors

    got_fields, got_tensors = content(got)
    want_fields, want_tensors = content(want)
    assert got_fields == want_fields, f"{got}'s metadata differs from {want}'s"
    assert got_tensors == want_tensors, f"{got}'s tensors differ from {want}'s"
    assert GGUFReader(got).fields[PEFT_PATH_KEY].contents() != GGUFReader(want).fields[PEFT_PATH_KEY].contents()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_converts_like_the_text_model(tmp_path: Path, text_ckpt: Path, text_gguf: Path, layout: str) -> None:
    mm = _multimodal(text_ckpt, tmp_path, layout)
    out = convert_checkpoint(mm, tmp_path / "model.gguf")
    _assert_same_file(out, text_gguf)


def test_tie_word_embeddings_at_top_level(tmp_path: Path, text_ckpt: Path, text_gguf: Path) -> None:
    mm = _multimodal(text_ckpt, tmp_path, "4.52+", tie_at_top=True)
    assert "tie_word_embeddings" not in json.loads((mm / "config.json").read_text())["text_config"]
    _assert_same_file(convert_checkpoint(mm, tmp_path / "model.gguf"), text_gguf)


def test_checkpoint_is_seen_as_the_text_model(tmp_path: Path, text_ckpt: Path) -> None:
    mm = _multimodal(text_ckpt, tmp_path, "pre-4.52")
    with HFCheckpoint.open(text_ckpt) as text, HFCheckpoint.open(mm) as multi:
        assert sorted(multi.tensor_names()) == sorted(text.tensor_names())
        assert multi.config["vocab_size"] == text.config["vocab_size"]
        assert multi.architecture == "Gemma3ForConditionalGeneration"
        assert multi.config["architectures"] == ["Gemma3ForCausalLM"]  # what the text model converts as
        np.testing.assert_array_equal(multi.read("model.layers.1.mlp.up_proj.weight"),
                                      text.read("model.layers.1.mlp.up_proj.weight"))


def test_text_config_defaults_fill_missing_fields() -> None:
    text = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
            "num_hidden_layers": 6, "head_dim": 16, "query_pre_attn_scalar": 16}
    spec = arch_spec_for({"architectures": ["Gemma3ForConditionalGeneration"], "text_config": text})
    # Gemma3TextConfig's vocab_size (the 4B config omits it); rope/window from the gemma3 entry.
    assert spec.dims.vocab == 262208 and spec.gguf_arch_name == "gemma3" and spec.tied
    metadata = {key: value for key, value, _ in spec.metadata()[0]}
    assert metadata["gemma3.rope.freq_base"] == 1_000_000.0
    assert metadata["gemma3.attention.sliding_window"] == 4096


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vision_tensors_are_never_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text_ckpt: Path,
                                       layout: str) -> None:
    mm = _multimodal(text_ckpt, tmp_path, layout)
    touched: list[str] = []
    for method in ("read", "info", "release"):
        original = getattr(SafetensorsFile, method)

        def spy(self: SafetensorsFile, name: str, *args: object, _original=original) -> object:
            touched.append(name)
            return _original(self, name, *args)

        monkeypatch.setattr(SafetensorsFile, method, spy)
    convert_checkpoint(mm, tmp_path / "model.gguf")
    vision = set(vision_tensor_names(layout))
    assert touched and not vision & set(touched), sorted(vision & set(touched))
    assert multimodal_name("model.embed_tokens.weight", layout) in touched


def test_unknown_tensor_is_still_an_error(tmp_path: Path, text_ckpt: Path) -> None:
    from edge_lora.core.errors import InvalidCheckpointError
    from tests.support.reference import load_safetensors

    mm = _multimodal(text_ckpt, tmp_path, "4.52+")
    tensors = load_safetensors(mm / "model.safetensors")
    tensors["model.audio_tower.weight"] = np.zeros((4,), dtype=np.float32)
    write_safetensors(mm / "model.safetensors", tensors, "bfloat16")
    with pytest.raises(InvalidCheckpointError, match="audio_tower"):
        convert_checkpoint(mm, tmp_path / "model.gguf")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_adapter_merges_and_converts_like_the_text_adapter(
        tmp_path: Path, text_ckpt: Path, text_adapter: Path, layout: str) -> None:
    mm = _multimodal(text_ckpt, tmp_path / "mm", layout)
    mm_adapter = _rename_adapter(text_adapter, tmp_path / "mm-lora" / ADAPTER_DIR, layout)
    text_merged = convert_checkpoint(text_ckpt, tmp_path / "text-merged.gguf",
                                     adapter=PeftMerger(PeftAdapter.open(text_adapter)))
    mm_merged = convert_checkpoint(mm, tmp_path / "mm-merged.gguf", adapter=PeftMerger(PeftAdapter.open(mm_adapter)))
    _assert_same_file(mm_merged, text_merged)
    text_lora = convert_adapter_to_gguf(text_adapter, text_ckpt, tmp_path / "text-lora.gguf")
    mm_lora = convert_adapter_to_gguf(mm_adapter, mm, tmp_path / "mm-lora.gguf")
    _assert_same_adapter(mm_lora, text_lora)


def test_vision_lora_modules_are_skipped_with_a_warning(
        caplog: pytest.LogCaptureFixture, tmp_path: Path, text_ckpt: Path, text_adapter: Path) -> None:
    layout = "pre-4.52"
    mm = _multimodal(text_ckpt, tmp_path / "mm", layout)
    mm_adapter = _rename_adapter(text_adapter, tmp_path / "mm-lora" / ADAPTER_DIR, layout, extra_vision=True)
    with caplog.at_level(logging.WARNING, logger="edge_lora.converters.peft"):
        adapter = PeftAdapter.open(mm_adapter)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 1 vision" in warnings[0], warnings
    assert all(name.startswith("model.layers.") for name in adapter.deltas)
    text_merged = convert_checkpoint(text_ckpt, tmp_path / "text-merged.gguf",
                                     adapter=PeftMerger(PeftAdapter.open(text_adapter)))
    mm_merged = convert_checkpoint(mm, tmp_path / "mm-merged.gguf", adapter=PeftMerger(adapter))
    _assert_same_file(mm_merged, text_merged)
    _assert_same_adapter(convert_adapter_to_gguf(mm_adapter, mm, tmp_path / "mm-lora.gguf"),
                      convert_adapter_to_gguf(text_adapter, text_ckpt, tmp_path / "text-lora.gguf"))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vision_only_adapter_is_refused(tmp_path: Path, text_adapter: Path, layout: str) -> None:
    mm_adapter = _rename_adapter(text_adapter, tmp_path / ADAPTER_DIR, layout, only_vision=True)
    with pytest.raises(AdapterError, match="only the vision tower") as info:
        PeftAdapter.open(mm_adapter)
    assert "\n" not in info.value.one_line() and info.value.fix


def test_cli_bad_multimodal_config_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                               text_ckpt: Path) -> None:
    mm = _multimodal(text_ckpt, tmp_path, "4.52+")
    config = json.loads((mm / "config.json").read_text())
    del config["text_config"]["hidden_size"]
    (mm / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    rc = main(["convert", str(mm), "--out", str(out), "--quant", "none"])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-lora:") and "Traceback" not in err, err
    assert "hidden_size" in lines[0]
    assert not out.is_dir() or not [p for p in out.iterdir() if p.suffix in (".gguf", ".partial")]


def test_cli_multimodal_config_without_text_config(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                   text_ckpt: Path) -> None:
    mm = _multimodal(text_ckpt, tmp_path, "pre-4.52")
    config = json.loads((mm / "config.json").read_text())
    del config["text_config"]
    (mm / "config.json").write_text(json.dumps(config))
    rc = main(["convert", str(mm), "--out", str(tmp_path / "out"), "--quant", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "text_config" in err, err


def test_extra_embedding_rows_load_in_llama_cpp_with_the_same_logits(tmp_path: Path, text_ckpt: Path,
                                                                      text_gguf: Path) -> None:
    """The released models have 262208 embedding rows for 262144 tokenizer tokens: all rows are
    kept and the GGUF vocab is padded to match, so llama.cpp loads it and every real token's
    logit is the text model's (the extra rows only add logits no token ever decodes to)."""
    from edge_lora.serving.llama_backend import LlamaContext, LlamaModel

    extra = 64
    mm = _multimodal(text_ckpt, tmp_path, "4.52+", extra_vocab_rows=extra)
    mm_gguf = convert_checkpoint(mm, tmp_path / "model.gguf")
    tokens = [2, 17, 40, 5, 99, 23, 8, 61]

    def logits(path: Path) -> tuple[int, np.ndarray]:
        with LlamaModel(path) as model, LlamaContext(model, n_ctx=32, n_batch=32, n_threads=2) as ctx:
            ctx.decode(tokens, 0, "all")
            return model.n_vocab, np.array([ctx.logits(i) for i in range(len(tokens))], dtype=np.float64)

    text_vocab, text_logits = logits(text_gguf)
    mm_vocab, mm_logits = logits(mm_gguf)
    assert mm_vocab == text_vocab + extra
    np.testing.assert_allclose(mm_logits[:, :text_vocab], text_logits, rtol=1e-4, atol=1e-4 * text_logits.std())
    assert np.abs(mm_logits[:, text_vocab:]).max() > 0  # the extra rows are really there
