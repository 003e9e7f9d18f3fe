"""Every architecture, from config.json files transformers 4 and 5 really wrote (tests/data/configs,
non-default RoPE bases and scalings): the converted F16 computes the reference's logits, both
config generations give the same file, and a RoPE setting that cannot be read is refused.
Deliberately wrong files (a default RoPE base, ...) fail the same comparison."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from edge_lora.converters.architectures import arch_spec_for
from edge_lora.converters.hf_to_gguf import convert_checkpoint
from edge_lora.core.errors import InvalidCheckpointError
from edge_lora.core.gguf_check import validate_gguf
from tests.support.gguf_edit import rewrite_gguf
from tests.support.model_fixtures import make_checkpoint
from tests.support.reference import load_checkpoint, reference_logits

N_CTX = 64
N_TOKENS = 60  # far enough that RoPE bases and scalings show
GENERATIONS = ("tf4", "tf5")
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


class Converted:
    """A checkpoint built from a library-saved config, its F16 and the reference logits."""

    def __init__(self, ckpt: Path, f16: Path) -> None:
        self.ckpt, self.f16 = ckpt, f16
        self.config, self.weights = load_checkpoint(ckpt)
        rng = np.random.default_rng(11)
        bos = self.config.get("bos_token_id")
        self.tokens = ([int(bos)] if bos is not None else []) + [
            int(t) for t in rng.integers(3, self.config["vocab_size"], N_TOKENS)][: N_TOKENS]
        self.ref = reference_logits(self.config, self.weights, self.tokens)


@pytest.fixture(scope="session")
def library_models(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Converted]:
    root = tmp_path_factory.mktemp("library-configs")

    class Lazy(dict):  # each (arch, generation) built on first use, once per session
        def __missing__(self, key: tuple[str, str]) -> Converted:
            arch, generation = key
            ckpt = make_checkpoint(arch, root / f"{arch}-{generation}", config_generation=generation)
            self[key] = Converted(ckpt, convert_checkpoint(ckpt, root / f"{arch}-{generation}-F16.gguf"))
            return self[key]

    return Lazy()


def llama_logits(path: Path, tokens: list[int], n_ctx: int = N_CTX) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_threads=2, verbose=False)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / ref.std())


def matches(got: np.ndarray, ref: np.ndarray) -> bool:
    """The project's bar: max|Δ|/σ < 0.01 and the same argmax at every position."""
    return rel_error(got, ref) < 0.01 and bool(np.array_equal(got.argmax(-1), ref.argmax(-1)))


def metadata(path: Path) -> dict:
    return {k: v for k, v in validate_gguf(path).metadata.items() if not k.startswith("general.")}


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_library_config_converts_to_reference_logits(library_models: dict, arch: str, generation: str) -> None:
    model = library_models[(arch, generation)]
    got = llama_logits(model.f16, model.tokens)
    assert matches(got, model.ref), f"max|diff|/std = {rel_error(got, model.ref):.4f}"


@pytest.mark.parametrize("arch", ARCHS)
def test_both_config_generations_give_the_same_file(library_models: dict, arch: str) -> None:
    """transformers 4 (rope_theta + rope_scaling) and 5 (rope_parameters) configs of one model
    convert to the same metadata and tensors; the RoPE base is the config's, never a default."""
    old, new = library_models[(arch, "tf4")], library_models[(arch, "tf5")]
    assert metadata(old.f16) == metadata(new.f16)
    arch_name = validate_gguf(old.f16).architecture
    stated = old.config["rope_theta"]
    assert stated not in (10000.0, None) and metadata(new.f16)[f"{arch_name}.rope.freq_base"] == stated
    for a, b in zip(gguf.GGUFReader(old.f16).tensors, gguf.GGUFReader(new.f16).tensors):
        assert a.name == b.name and np.array_equal(np.asarray(a.data), np.asarray(b.data))


@pytest.mark.parametrize("arch, key, wrong", [
    ("qwen2", "qwen2.rope.freq_base", 10000.0),  # the transformers-5 bug: the default base
    ("gemma3", "gemma3.rope.freq_base_swa", 10000.0),  # Gemma 3's sliding layers at llama.cpp's default
    ("qwen3", "qwen3.rope.scaling.factor", 1.0),  # scaling lost
    ("llama", "llama.rope.freq_base", 10000.0),
])
def test_a_wrong_rope_setting_fails_the_comparison(library_models: dict, tmp_path: Path, arch: str, key: str,
                                                   wrong: float) -> None:
    model = library_models[(arch, "tf5")]
    broken = rewrite_gguf(model.f16, tmp_path / "wrong.gguf", set_values={key: wrong})
    assert not matches(llama_logits(broken, model.tokens), model.ref)


def test_qwen2_yarn_needs_its_attention_factor(library_models: dict, tmp_path: Path) -> None:
    """YaRN's cos/sin factor (1 + 0.1 ln 4 here) matters: a file scaled without it is caught."""
    model = library_models[("qwen2", "tf5")]
    broken = rewrite_gguf(model.f16, tmp_path / "wrong.gguf", set_values={"qwen2.rope.scaling.attn_factor": 1 / 1.1386})
    assert not matches(llama_logits(broken, model.tokens), model.ref)


# --- reading RoPE settings -------------------------------------------------------------------------

_TINY = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 4096}


def _md(config: dict) -> dict:
    items, _ = arch_spec_for(config).metadata()
    return {key: value for key, value, _ in items}


def test_rope_read_from_either_generation() -> None:
    legacy = _md({**_TINY, "rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}})
    current = _md({**_TINY, "rope_parameters": {"rope_theta": 1e6, "rope_type": "linear", "factor": 2.0}})
    assert legacy == current and current["qwen2.rope.freq_base"] == 1e6 and current["qwen2.rope.scaling.factor"] == 2.0
    # transformers 5 fills a rope_parameters without rope_theta from the top level, as here
    assert _md({**_TINY, "rope_theta": 1e6, "rope_parameters": {"rope_type": "default"}})["qwen2.rope.freq_base"] == 1e6


@pytest.mark.parametrize("change, message", [
    ({}, "states no RoPE base"),  # neither rope_theta nor rope_parameters: never a default base
    ({"rope_parameters": {"rope_type": "default"}}, "states no RoPE base"),
    ({"rope_parameters": [1e6]}, "rope_parameters must be an object"),
    ({"rope_parameters": {"rope_theta": "1e6"}}, "must be a number"),
    ({"rope_theta": True}, "must be a number"),
    ({"rope_theta": 1e6, "rope_scaling": "linear"}, "rope_scaling must be an object"),
    ({"rope_parameters": {"sliding_attention": {"rope_theta": 1e4}}}, "no 'full_attention' entry"),
    ({"rope_parameters": {"rope_theta": 1e6, "rope_type": 3}}, "rope_type must be a string"),
    ({"rope_theta": 1e6, "partial_rotary_factor": 1.5}, "partial_rotary_factor"),
    ({"rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4, "truncate": False}}, "truncate"),
], ids=["none", "no-theta", "not-object", "string-theta", "bool-theta", "scaling-string", "nested-missing",
        "type-number", "partial", "yarn-truncate"])
def test_unreadable_rope_settings_are_refused(change: dict, message: str) -> None:
    from edge_lora.core.errors import EdgeLoraError

    with pytest.raises(EdgeLoraError, match=message) as err:
        _md({**_TINY, **change})
    assert err.value.fix


def test_cli_refuses_a_config_without_rope_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge_lora.cli import main

    ckpt = make_checkpoint("qwen2", tmp_path / "ckpt", config_generation="tf5", n_layers=1)
    config = json.loads((ckpt / "config.json").read_text())
    del config["rope_parameters"]["rope_theta"]
    (ckpt / "config.json").write_text(json.dumps(config))
    assert main(["convert", str(ckpt), "--out", str(tmp_path / "out"), "--quant", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "states no RoPE base" in err[0]
    assert not list((tmp_path / "out").glob("*.gguf")) if (tmp_path / "out").exists() else True
    with pytest.raises(InvalidCheckpointError):
        convert_checkpoint(ckpt, tmp_path / "direct.gguf")
