"""Every architecture, from config.json files transformers 4 and 5 really wrote (tests/data/configs,
non-default RoPE bases and scalings): the converted F16 computes the reference's logits, both
config generations give the same file, and a RoPE setting that cannot be read is refused.
Deliberately wrong files (a default RoPE base, no soft-cap, a wrong multiplier, fused halves in the
wrong order, ...) fail the same comparison. PEFT adapters on the newer architectures (plain,
rsLoRA, patterns, DoRA, modules_to_save, LoRA on Phi-3's fused projections) match PEFT's merged
model, merged and hot-applied."""

from __future__ import annotations

import json
import math
import os
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
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "gemma2", "phi3", "granite", "smollm3")
NEW_ARCHS = ("gemma2", "phi3", "granite", "smollm3")


def dir_name(arch: str, generation: str) -> str:
    # A name with "phi3" in it switches on llama.cpp's Phi-3 tokenizer rule, which needs a Phi-3
    # vocabulary; these fixtures ship Phi-4-mini's (gpt-4o) tokenizer.
    return f"{arch.replace('phi3', 'phi-mini')}-{generation}"


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
            ckpt = make_checkpoint(arch, root / dir_name(arch, generation), config_generation=generation)
            self[key] = Converted(ckpt, convert_checkpoint(ckpt, root / f"{dir_name(arch, generation)}-F16.gguf"))
            return self[key]

    return Lazy()


EXACT = 1e-4  # max|Δ|/σ with F32 weights and an F32 KV cache: the conversion itself, no rounding
# Gemma's GELU goes through ggml's F16 table (emulated by the reference's llama_cpp_gelu); an input
# that f32 and float64 round to neighbouring F16 values still flips one table entry now and then.
EXACT_GEMMA = 2e-3


def exact_bound(config: dict) -> float:
    return EXACT_GEMMA if config.get("model_type", "").startswith("gemma") else EXACT


def llama_logits(path: Path, tokens: list[int], n_ctx: int = N_CTX, *, lora: Path | None = None,
                 f32_cache: bool = False) -> np.ndarray:
    """llama.cpp's logits for every token; ``f32_cache``: keys and values kept in F32 (the
    default F16 cache rounds them), so with an F32 file nothing is rounded at all."""
    import llama_cpp

    cache = {"type_k": 0, "type_v": 0} if f32_cache else {}  # GGML_TYPE_F32
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_threads=2, verbose=False,
                          lora_path=str(lora) if lora is not None else None, **cache)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / ref.std())


TOLERANCE = 0.01  # max|Δ|/σ


def matches(got: np.ndarray, ref: np.ndarray) -> bool:
    """The project's bar: max|Δ|/σ < 0.01 and the same argmax at every position, except where
    the reference's top two logits are closer than 2 x 0.01σ: within the tolerance either order
    is the same model (F16 rounding picks one), and no error above the tolerance can hide there."""
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) >= 2 * TOLERANCE * ref.std()
    same = got.argmax(-1) == ref.argmax(-1)
    return rel_error(got, ref) < TOLERANCE and bool(same[decided].all()) and decided.mean() > 0.5


def metadata(path: Path) -> dict:
    return {k: v for k, v in validate_gguf(path).metadata.items() if not k.startswith("general.")}


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_library_config_converts_to_reference_logits(library_models: dict, arch: str, generation: str) -> None:
    model = library_models[(arch, generation)]
    got = llama_logits(model.f16, model.tokens)
    assert matches(got, model.ref), f"max|diff|/std = {rel_error(got, model.ref):.4f}"


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_f32_conversion_is_exact(library_models: dict, tmp_path: Path, arch: str, generation: str) -> None:
    """Without rounding anywhere (F32 file, F32 KV cache) llama.cpp computes the reference's
    logits to 1e-4 σ: every semantic detail of the conversion is right, not just close."""
    model = library_models[(arch, generation)]
    f32 = convert_checkpoint(model.ckpt, tmp_path / "model-F32.gguf", outtype="f32")
    got = llama_logits(f32, model.tokens, f32_cache=True)
    # Gemma's GELU is the one rounding left: ggml computes it through an F16 table.
    ref = reference_logits(model.config, model.weights, model.tokens, llama_cpp_gelu=True)
    assert rel_error(got, ref) < exact_bound(model.config) and np.array_equal(got.argmax(-1), ref.argmax(-1))


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


# --- what each newer architecture adds, and the wrong variants the comparison catches ---------------

def _swap_halves(rows: np.ndarray) -> np.ndarray:
    half = rows.shape[0] // 2
    return np.concatenate([rows[half:], rows[:half]])


def _swap_k_v(rows: np.ndarray, q_rows: int = 256) -> np.ndarray:
    kv = (rows.shape[0] - q_rows) // 2
    return np.concatenate([rows[:q_rows], rows[q_rows + kv:], rows[q_rows:q_rows + kv]])


WRONG_VARIANTS = {
    "gemma2-no-attention-softcap": ("gemma2", {"drop": ("gemma2.attn_logit_softcapping",)}),
    "gemma2-no-final-softcap": ("gemma2", {"drop": ("gemma2.final_logit_softcapping",)}),
    "gemma2-no-sliding-window": ("gemma2", {"set_values": {"gemma2.attention.sliding_window": 4096}}),
    "granite-residual-multiplier": ("granite", {"set_values": {"granite.residual_scale": 1.0}}),
    "granite-embedding-multiplier": ("granite", {"drop": ("granite.embedding_scale",)}),
    "granite-attention-multiplier": ("granite", {"drop": ("granite.attention.scale",)}),
    "granite-logits-scaling": ("granite", {"set_values": {"granite.logit_scale": 1.0}}),
    "phi3-gate-up-swapped": ("phi3", {"tensors": {f"blk.{i}.ffn_up.weight": _swap_halves for i in range(2)}}),
    "phi3-k-v-swapped": ("phi3", {"tensors": {"blk.0.attn_qkv.weight": _swap_k_v}}),
    "phi3-no-attention-factor": ("phi3", {"drop": ("phi3.rope.scaling.attn_factor",)}),
    "phi3-long-short-factors-swapped": ("phi3", {"tensors": {"rope_factors_long.weight": lambda f: f[::-1] * 0 + 1,
                                                              "rope_factors_short.weight": lambda f: f * 0 + 12.5}}),
}


@pytest.mark.parametrize("variant", list(WRONG_VARIANTS))
def test_wrong_variants_fail_the_comparison(library_models: dict, tmp_path: Path, variant: str) -> None:
    arch, edit = WRONG_VARIANTS[variant]
    model = library_models[(arch, "tf4")]
    assert matches(llama_logits(model.f16, model.tokens), model.ref)
    broken = rewrite_gguf(model.f16, tmp_path / "wrong.gguf", **edit)  # type: ignore[arg-type]
    got = llama_logits(broken, model.tokens)
    assert not matches(got, model.ref), f"{variant}: max|diff|/std = {rel_error(got, model.ref):.4f}"


def test_smollm3_nope_layers_matter(library_models: dict) -> None:
    """llama.cpp fixes SmolLM3's NoPE pattern (every 4th layer); the reference reads it from
    no_rope_layers. RoPE on every layer would be a different model: the check resolves it."""
    model = library_models[("smollm3", "tf5")]
    assert model.config["no_rope_layers"] == [1, 1, 1, 0]
    got = llama_logits(model.f16, model.tokens)
    assert matches(got, model.ref)
    all_rope = reference_logits(dict(model.config, no_rope_layers=[1, 1, 1, 1]), model.weights, model.tokens)
    assert not matches(got, all_rope)


def test_gemma2_query_scaling_and_sliding_window_matter(library_models: dict) -> None:
    """llama.cpp scales Gemma 2's queries by 1/sqrt(head_dim) (the converter refuses a config
    whose query_pre_attn_scalar says otherwise) and runs its sliding layers over 8 tokens here:
    the reference with another scalar, or without the window, is another model."""
    model = library_models[("gemma2", "tf5")]
    assert model.config["query_pre_attn_scalar"] == model.config["head_dim"] and model.config["sliding_window"] < N_TOKENS
    got = llama_logits(model.f16, model.tokens)
    assert matches(got, model.ref)
    for change in ({"query_pre_attn_scalar": 4 * model.config["head_dim"]}, {"sliding_window": 4096}):
        assert not matches(got, reference_logits(dict(model.config, **change), model.weights, model.tokens)), change


def test_phi3_short_factors_below_the_pretraining_context(tmp_path: Path) -> None:
    """LongRoPE's short factors apply while the context stays within the pretraining length
    (llama.cpp: its context, rounded up to 256, <= the original context; transformers: the
    sequence <= it); the attention factor always does."""
    ckpt = make_checkpoint("phi3", tmp_path / "phi-short", config_generation="tf4",
                           config_changes={"max_position_embeddings": 1024, "original_max_position_embeddings": 256})
    model = Converted(ckpt, convert_checkpoint(ckpt, tmp_path / "short-F16.gguf"))
    md = metadata(model.f16)
    assert md["phi3.rope.scaling.original_context_length"] == 256 and md["phi3.context_length"] == 1024
    assert md["phi3.rope.scaling.attn_factor"] == pytest.approx(math.sqrt(1 + math.log(4) / math.log(256)))
    got = llama_logits(model.f16, model.tokens, n_ctx=64)
    assert matches(got, model.ref)
    rope = dict(model.config["rope_scaling"], short_factor=model.config["rope_scaling"]["long_factor"])
    long_ref = reference_logits(dict(model.config, rope_scaling=rope), model.weights, model.tokens)
    assert not matches(got, long_ref)  # the long factors give another model


def test_fused_tensors_are_written_fused(library_models: dict) -> None:
    model = library_models[("phi3", "tf4")]
    info = validate_gguf(model.f16)
    assert tuple(info.tensor("blk.0.attn_qkv.weight").shape) == (256, 256 + 2 * 128)  # GGUF order: ne0 first
    assert tuple(info.tensor("blk.0.ffn_up.weight").shape) == (256, 2 * 512)
    assert info.tensor("blk.0.attn_q.weight") is None and info.tensor("blk.0.ffn_gate.weight") is None
    assert tuple(info.tensor("rope_factors_long.weight").shape) == (24,)
    md = metadata(model.f16)
    assert md["phi3.rope.dimension_count"] == 48  # partial_rotary_factor 0.75 of 64


_CONFIGS = {
    "Gemma2ForCausalLM": {"hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 512,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 100,
                          "query_pre_attn_scalar": 64, "attn_logit_softcapping": 50.0,
                          "final_logit_softcapping": 30.0, "sliding_window": 4096, "rope_theta": 10000.0,
                          "max_position_embeddings": 8192},
    "Phi3ForCausalLM": {"hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 512,
                        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 100,
                        "max_position_embeddings": 4096, "rope_theta": 10000.0, "sliding_window": 2047},
    "GraniteForCausalLM": {"hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 512,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
                           "rope_theta": 10000.0, "logits_scaling": 8.0},
    "SmolLM3ForCausalLM": {"hidden_size": 256, "num_hidden_layers": 8, "intermediate_size": 512,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
                           "rope_theta": 2e6},
}


def _arch_md(arch: str, **changes: object) -> dict:
    return _md({"architectures": [arch], **_CONFIGS[arch], **changes})


def test_newer_architecture_metadata() -> None:
    md = _arch_md("Gemma2ForCausalLM")
    assert md["gemma2.attn_logit_softcapping"] == 50.0 and md["gemma2.final_logit_softcapping"] == 30.0
    assert md["gemma2.attention.sliding_window"] == 4096
    md = _arch_md("Phi3ForCausalLM")  # Phi-3-mini-4k: a 2047-token window llama.cpp does not run
    assert md["phi3.context_length"] == 2047 and "phi3.attention.sliding_window" not in md
    md = _arch_md("GraniteForCausalLM")  # absent multipliers: transformers' defaults (1.0)
    assert (md["granite.embedding_scale"], md["granite.residual_scale"], md["granite.attention.scale"],
            md["granite.logit_scale"]) == (1.0, 1.0, 1.0, 8.0)
    assert _arch_md("SmolLM3ForCausalLM")["smollm3.rope.freq_base"] == 2e6


@pytest.mark.parametrize("arch, change, message", [
    ("Gemma2ForCausalLM", {"attn_logit_softcapping": None}, "always soft-caps"),
    ("Gemma2ForCausalLM", {"final_logit_softcapping": None}, "always soft-caps"),
    ("Gemma2ForCausalLM", {"query_pre_attn_scalar": 48}, "query_pre_attn_scalar"),
    ("Gemma2ForCausalLM", {"tie_word_embeddings": False}, "untied lm_head"),
    ("Gemma2ForCausalLM", {"layer_types": ["full_attention", "sliding_attention"]}, "layer pattern"),
    ("Gemma2ForCausalLM", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
    ("Phi3ForCausalLM", {"num_attention_heads": 8, "head_dim": 16}, "hidden_size"),
    ("Phi3ForCausalLM", {"rope_scaling": {"type": "longrope", "factor": 3.0, "short_factor": [1.0] * 32,
                                          "long_factor": [2.0] * 32}, "original_max_position_embeddings": 1024},
     "transformers 4 and 5 disagree"),
    ("Phi3ForCausalLM", {"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 31, "long_factor": [2.0] * 32},
                         "original_max_position_embeddings": 1024}, "32 positive numbers"),
    ("Phi3ForCausalLM", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
    ("GraniteForCausalLM", {"head_dim": 32}, "head_dim"),
    ("GraniteForCausalLM", {"mlp_bias": True}, "mlp_bias"),
    ("GraniteForCausalLM", {"residual_multiplier": 0.0}, "residual_multiplier"),
    ("SmolLM3ForCausalLM", {"no_rope_layers": [1, 1, 0, 1, 1, 1, 0, 1]}, "NoPE layers"),
    ("SmolLM3ForCausalLM", {"no_rope_layer_interval": 3}, "NoPE layers"),
    ("SmolLM3ForCausalLM", {"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window"),
    ("SmolLM3ForCausalLM", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0}}, "llama3"),
])
def test_what_llama_cpp_cannot_run_is_refused(arch: str, change: dict, message: str) -> None:
    from edge_lora.core.errors import EdgeLoraError

    with pytest.raises(EdgeLoraError, match=message) as err:
        _arch_md(arch, **change)
    assert err.value.fix


def test_a_phi3_name_that_llama_cpp_would_choke_on_is_refused(tmp_path: Path) -> None:
    """llama.cpp gives a model named *phi3* / *phi-3* Phi-3's token attributes and looks up
    </s>, <unk>, <s> and <|endoftext|> without checking: a vocabulary without them would not
    load. The converter refuses instead of writing such a file."""
    ckpt = make_checkpoint("phi3", tmp_path / "my-phi3-finetune", config_generation="tf4", n_layers=1)
    with pytest.raises(InvalidCheckpointError, match="Phi-3 tokenizer rule.*</s>"):
        convert_checkpoint(ckpt, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    out = convert_checkpoint(ckpt, tmp_path / "y.gguf", name="my-finetune")
    assert validate_gguf(out).metadata["general.name"] == "my-finetune"


# --- PEFT adapters on the newer architectures ---------------------------------------------------------

ADAPTER_TARGETS = {"phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")}
STRENGTH = 0.05
# Adapters are checked on the first 20 tokens: llama.cpp's F16 KV cache adds an error that grows
# with the positions attended (up to 0.011σ at 32-60 tokens for Phi-3 and SmolLM3 with a strong
# rsLoRA, also with F32 weights), which is the runtime's, not the conversion's. 20 tokens, as in
# tests/test_merge_and_adapter.py.
ADAPTER_TOKENS = 20
ADAPTER_CASES = {
    "plain": {},
    "rslora": {"use_rslora": True, "r": 16, "alpha": 8},
    "patterns": {"r": 8, "alpha": 16, "rank_pattern": {r"layers\.0\..*": 4}, "alpha_pattern": {"down_proj": 2}},
}


def _adapter(model: Converted, arch: str, out: Path, **options: object) -> Path:
    from tests.support.model_fixtures import DEFAULT_TARGETS, make_peft_adapter

    return make_peft_adapter(model.ckpt, out, strength=STRENGTH,
                             target_modules=ADAPTER_TARGETS.get(arch, DEFAULT_TARGETS), **options)  # type: ignore[arg-type]


def _peft_reference(model: Converted, adapter: Path) -> np.ndarray:
    from tests.support.reference import apply_peft

    return reference_logits(model.config, apply_peft(model.weights, adapter, model.config),
                            model.tokens[:ADAPTER_TOKENS])


def _merged_logits(model: Converted, adapter: Path, out: Path) -> np.ndarray:
    from edge_lora.converters.merge import PeftMerger
    from edge_lora.converters.peft import PeftAdapter

    merged = convert_checkpoint(model.ckpt, out, adapter=PeftMerger(PeftAdapter.open(adapter)))
    return llama_logits(merged, model.tokens[:ADAPTER_TOKENS])


def _hot_applied_logits(base: Path, lora: Path, tokens: list[int]) -> np.ndarray:
    tokens = tokens[:ADAPTER_TOKENS]
    from edge_lora.serving.llama_backend import LlamaContext, LlamaModel, LoraAdapter

    with LlamaModel(base) as llm, LlamaContext(llm, n_ctx=N_CTX, n_batch=N_CTX, n_threads=2) as ctx:
        adapter = LoraAdapter(llm, lora)
        ctx.set_adapters([(adapter, 1.0)])
        ctx.decode(tokens, 0, "all")
        out = np.array([ctx.logits(i) for i in range(len(tokens))], dtype=np.float64)
        adapter.free()
    return out


# Every adapter case on the newer architectures; a plain LoRA on the others' library configs (Llama 3.2's
# llama3 RoPE and tied embeddings, Mistral's and Qwen2's YaRN, Qwen3's linear scaling, Gemma 3's
# per-layer-type bases), so hot-applying runs with each scaling too.
ADAPTER_PARAMS = [(arch, case) for arch in NEW_ARCHS for case in ADAPTER_CASES] + [
    (arch, "plain") for arch in ARCHS if arch not in NEW_ARCHS]


@pytest.mark.parametrize("arch, case", ADAPTER_PARAMS)
def test_adapters_merged_and_hot_applied_match_peft(library_models: dict, tmp_path: Path, arch: str,
                                                    case: str) -> None:
    from edge_lora.converters.adapter_gguf import convert_adapter_to_gguf

    model = library_models[(arch, "tf4")]
    adapter = _adapter(model, arch, tmp_path / "peft", **ADAPTER_CASES[case])
    ref = _peft_reference(model, adapter)
    assert rel_error(model.ref[:ADAPTER_TOKENS], ref) > 0.05  # the adapter moves the model far more than the tolerance
    merged = _merged_logits(model, adapter, tmp_path / "merged-F16.gguf")
    assert matches(merged, ref), f"merged: {rel_error(merged, ref):.4f}"
    lora = convert_adapter_to_gguf(adapter, model.ckpt, tmp_path / "adapter.gguf")
    hot = _hot_applied_logits(model.f16, lora, model.tokens)
    assert matches(hot, ref), f"hot-applied: {rel_error(hot, ref):.4f}"
    # and exactly, with nothing rounded: merged into an F32 file, and hot-applied on an F32 base
    from edge_lora.converters.merge import PeftMerger
    from edge_lora.converters.peft import PeftAdapter

    from tests.support.reference import apply_peft

    tokens = model.tokens[:ADAPTER_TOKENS]
    exact = reference_logits(model.config, apply_peft(model.weights, adapter, model.config), tokens,
                             llama_cpp_gelu=True)
    merged32 = convert_checkpoint(model.ckpt, tmp_path / "merged-F32.gguf", outtype="f32",
                                  adapter=PeftMerger(PeftAdapter.open(adapter)))
    assert rel_error(llama_logits(merged32, tokens, f32_cache=True), exact) < exact_bound(model.config)
    base32 = convert_checkpoint(model.ckpt, tmp_path / "base-F32.gguf", outtype="f32")
    assert rel_error(llama_logits(base32, tokens, lora=lora, f32_cache=True), exact) < exact_bound(model.config)


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_dora_and_modules_to_save_merge(library_models: dict, tmp_path: Path, arch: str) -> None:
    from edge_lora.converters.adapter_gguf import convert_adapter_to_gguf
    from edge_lora.core.errors import AdapterError, AdapterMismatchError

    model = library_models[(arch, "tf4")]
    dora = _adapter(model, arch, tmp_path / "dora", use_dora=True)
    assert matches(_merged_logits(model, dora, tmp_path / "dora-F16.gguf"), _peft_reference(model, dora))
    with pytest.raises(AdapterError, match="DoRA"):
        convert_adapter_to_gguf(dora, model.ckpt, tmp_path / "dora.gguf")
    # modules_to_save: the embedding everywhere; lm_head where llama.cpp can hold a separate output
    modules = ["embed_tokens"] if arch == "gemma2" else ["embed_tokens", "lm_head"]
    saved = _adapter(model, arch, tmp_path / "saved", modules_to_save=modules)
    assert matches(_merged_logits(model, saved, tmp_path / "saved-F16.gguf"), _peft_reference(model, saved))
    if arch == "gemma2":  # llama.cpp's gemma2 has no output tensor: a trained lm_head cannot be kept
        head = _adapter(model, arch, tmp_path / "head", modules_to_save=["lm_head"])
        with pytest.raises(AdapterMismatchError, match="lm_head"):
            _merged_logits(model, head, tmp_path / "head-F16.gguf")


def test_lora_on_fused_projections_keeps_the_row_order(library_models: dict, tmp_path: Path) -> None:
    """A LoRA on Phi-3's qkv_proj / gate_up_proj is written as one adapter on attn_qkv / ffn_up
    whose B rows follow the weight's [q | k | v] and [gate | up] order; the same adapter with
    its B rows in another order fails the comparison."""
    from edge_lora.converters.adapter_gguf import convert_adapter_to_gguf

    model = library_models[("phi3", "tf4")]
    adapter = _adapter(model, "phi3", tmp_path / "peft")
    ref = _peft_reference(model, adapter)
    lora = convert_adapter_to_gguf(adapter, model.ckpt, tmp_path / "adapter.gguf")
    names = {t.name for t in gguf.GGUFReader(lora).tensors}
    assert {"blk.0.attn_qkv.weight.lora_b", "blk.1.ffn_up.weight.lora_a"} <= names
    assert matches(_hot_applied_logits(model.f16, lora, model.tokens), ref)
    for wrong in ({f"blk.{i}.ffn_up.weight.lora_b": _swap_halves for i in range(2)},
                  {"blk.0.attn_qkv.weight.lora_b": _swap_k_v}):
        broken = rewrite_gguf(lora, tmp_path / "wrong.gguf", tensors=wrong)
        assert not matches(_hot_applied_logits(model.f16, broken, model.tokens), ref)


# --- Llama 3.2 and SmolLM2: covered by the llama entry, proved here ---------------------------------

def test_llama32_llama3_rope_and_tied_embeddings(library_models: dict, tmp_path: Path) -> None:
    """Llama 3.2 1B/3B: llama3 RoPE scaling (per-frequency divisors in rope_freqs) and tied
    embeddings (no output.weight: llama.cpp reuses token_embd). Without rope_freqs the same file
    is another model."""
    for generation in GENERATIONS:
        model = library_models[("llama", generation)]
        info = validate_gguf(model.f16)
        assert info.tensor("rope_freqs.weight") is not None and info.tensor("output.weight") is None
        assert matches(llama_logits(model.f16, model.tokens), model.ref)
    broken = rewrite_gguf(model.f16, tmp_path / "no-freqs.gguf", drop_tensors=("rope_freqs.weight",))
    assert not matches(llama_logits(broken, model.tokens), model.ref)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_smollm2_llama_with_its_own_tokenizer(tmp_path: Path, generation: str) -> None:
    """SmolLM2: the llama architecture with a StarCoder-style byte-level tokenizer (single digits,
    then GPT-2's regex; no clean-up on decoding), which llama.cpp knows as "smollm"."""
    from tokenizers import Tokenizer

    from tests.test_tokenizer_export import MIXED_TEXT

    rope = ({"rope_theta": 100000.0, "rope_scaling": None} if generation == "tf4"
            else {"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}})
    ckpt = make_checkpoint("llama", tmp_path / "SmolLM2-tiny", tokenizer="smollm2", config_generation=generation,
                           config_changes=rope)
    model = Converted(ckpt, convert_checkpoint(ckpt, tmp_path / "smollm2-F16.gguf"))
    md = metadata(model.f16)
    assert md["tokenizer.ggml.pre"] == "smollm" and md["llama.rope.freq_base"] == 100000.0
    assert matches(llama_logits(model.f16, model.tokens), model.ref)
    import llama_cpp

    vocab = llama_cpp.Llama(str(model.f16), vocab_only=True, verbose=False)
    expected = Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode(MIXED_TEXT, add_special_tokens=False).ids
    assert vocab.tokenize(MIXED_TEXT.encode(), add_bos=False, special=False) == expected
    from edge_lora.analysis.go_template import detect_family

    assert detect_family(md["tokenizer.chat_template"]) == "chatml"


# --- the whole pipeline on each newer architecture --------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_convert_every_k_quant_fit_ppl_and_hot_apply(tmp_path: Path, arch: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`edge-lora convert BASE --adapter PEFT --quant all`: merged F16, the GGUF adapter and every
    K-quant load in llama.cpp; `fit` recommends one; `ppl` measures the F16 and a K-quant with the
    adapter hot-applied; a Modelfile is written where the chat family translates (not SmolLM3)."""
    from edge_lora.cli import main
    from edge_lora.core.formats import LADDER
    from tests.support.model_fixtures import DEFAULT_TARGETS, make_peft_adapter
    from tests.support.paths import LICENSES

    ckpt = make_checkpoint(arch, tmp_path / dir_name(arch, "tf5"), config_generation="tf5")
    peft = make_peft_adapter(ckpt, tmp_path / "legal", strength=STRENGTH,
                             target_modules=ADAPTER_TARGETS.get(arch, DEFAULT_TARGETS))
    out = tmp_path / "out"
    assert main(["convert", str(ckpt), "--adapter", str(peft), "--out", str(out), "--quant", "all", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {f["format"] if f["kind"] != "adapter" else "adapter": f for f in report["files"]}
    assert {f.name for f in LADDER} | {"F16", "adapter"} <= set(rows)
    text = tmp_path / "eval.txt"
    text.write_text((LICENSES / "Apache-2.0").read_text()[:4000])
    tokens = [int(t) for t in np.random.default_rng(2).integers(3, 300, 16)]
    for name, row in rows.items():
        if name != "adapter":
            assert np.isfinite(llama_logits(out / row["path"], tokens)).all(), name
    assert main(["fit", str(out), "--ctx", "64", "--json"]) == 0
    fit = json.loads(capsys.readouterr().out)
    assert sum(m["recommended"] for m in fit["models"]) == 1
    adapter = out / rows["adapter"]["path"]
    assert main(["ppl", str(out / rows["F16"]["path"]), "--text", str(text), "--ctx", "64", "--json"]) == 0
    merged_ppl = json.loads(capsys.readouterr().out)["ppl"]
    base = tmp_path / "base"
    assert main(["convert", str(ckpt), "--out", str(base), "--quant", "Q4_K_M", "--json"]) == 0
    base_rows = {f["format"]: f for f in json.loads(capsys.readouterr().out)["files"]}
    assert main(["adapters", "add", "legal", str(adapter)]) == 0
    capsys.readouterr()
    assert main(["ppl", str(base / base_rows["Q4_K_M"]["path"]), "--adapter", "legal", "--text", str(text),
                 "--ctx", "64", "--json"]) == 0
    hot_ppl = json.loads(capsys.readouterr().out)["ppl"]
    assert np.isfinite(merged_ppl) and np.isfinite(hot_ppl) and abs(np.log(hot_ppl / merged_ppl)) < 0.1
    assert (out / "Modelfile").is_file() == (arch != "smollm3")


# --- optional: the reference against transformers itself -------------------------------------------

TRANSFORMERS_PYTHONS = [p for p in os.environ.get("EDGE_LORA_TRANSFORMERS_PYTHON", "").split(os.pathsep) if p]
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_reference_agrees_with_transformers(library_models: dict, tmp_path: Path, arch: str,
                                            generation: str) -> None:
    """Optional (torch and transformers are never project dependencies): with
    EDGE_LORA_TRANSFORMERS_PYTHON naming side-venv Pythons (os.pathsep-separated, e.g. one with
    transformers 4 and one with 5), transformers' own float32 logits equal the float64
    reference's on every fixture. transformers 4 cannot read a transformers 5 config."""
    import subprocess

    if not TRANSFORMERS_PYTHONS:
        pytest.skip("set EDGE_LORA_TRANSFORMERS_PYTHON to a Python with torch and transformers")
    model = library_models[(arch, generation)]
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(model.tokens))
    compared = 0
    for python in TRANSFORMERS_PYTHONS:
        out = tmp_path / "hf.npy"
        done = subprocess.run([python, "-m", "tests.support.hf_logits", str(model.ckpt), str(tokens), str(out)],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        version = done.stdout.strip().splitlines()[-1]
        if generation == "tf5" and version.startswith("4."):
            continue
        hf = np.load(out)
        assert rel_error(hf, model.ref) < EXACT, (version, rel_error(hf, model.ref))
        compared += 1
    assert compared
