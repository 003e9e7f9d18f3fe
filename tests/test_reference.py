"""Sanity checks of the numpy reference forward pass / PEFT merge and of the synthetic fixtures
that every correctness test relies on."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from tests.support.model_fixtures import SUPPORTED_ARCHS, make_checkpoint, make_peft_adapter, to_bf16_bits
from tests.support.reference import (_round_to_dtype, apply_peft, apply_rope, layer_types, load_checkpoint, lora_scale,
                       reference_logits, rope_inv_freq)

ARCH_CASES = [("llama", "spm"), ("llama", "bpe"), ("mistral", None), ("qwen2", None), ("qwen3", None),
              ("gemma3", None)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str | None], Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return {(arch, kind): make_checkpoint(arch, root / f"{arch}-{kind}", tokenizer=kind)
            for arch, kind in ARCH_CASES}


def _header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def _text_ids(ckpt: Path, text: str = "You may obtain a copy of the License at no charge, 2024.") -> list[int]:
    return Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode(text).ids


# ----------------------------------------------------------------------------- fixtures


@pytest.mark.parametrize("arch,kind", ARCH_CASES)
def test_checkpoint_is_hf_layout(checkpoints: dict, arch: str, kind: str | None) -> None:
    ckpt = checkpoints[(arch, kind)]
    config = json.loads((ckpt / "config.json").read_text())
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tok_config = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert config["vocab_size"] == tok.get_vocab_size(with_added_tokens=True)
    assert config["eos_token_id"] == tok.token_to_id(tok_config["eos_token"])
    if tok_config["bos_token"] is not None:
        assert config["bos_token_id"] == tok.token_to_id(tok_config["bos_token"])
    else:  # Qwen: config.json has a BOS id the tokenizer does not add
        assert config["bos_token_id"] == tok.token_to_id("<|endoftext|>")
        assert tok.encode("hi").ids[0] != config["bos_token_id"]
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"],
            config["head_dim"]) == (256, 4, 2, 64)
    header = _header(ckpt / "model.safetensors")
    dtype = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[config["torch_dtype"]]
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {dtype}
    names = set(header) - {"__metadata__"}
    for i in range(config["num_hidden_layers"]):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert f"model.layers.{i}.self_attn.{proj}.weight" in names
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.{i}.mlp.{proj}.weight" in names
    assert ("lm_head.weight" in names) == (not config["tie_word_embeddings"])
    assert ("model.layers.0.self_attn.q_proj.bias" in names) == (arch == "qwen2")
    assert ("model.layers.0.self_attn.q_norm.weight" in names) == (arch in ("qwen3", "gemma3"))
    assert ("model.layers.0.pre_feedforward_layernorm.weight" in names) == (arch == "gemma3")
    assert "chat_template" in tok_config or arch == "llama"  # Llama-2 spm has one too
    assert json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"] == config["eos_token_id"]


def test_tokenizer_families(checkpoints: dict) -> None:
    text = "Copyright © 2007 Free Software Foundation — \u4e2d"
    spm = Tokenizer.from_file(str(checkpoints[("llama", "spm")] / "tokenizer.json"))
    enc = spm.encode(text)
    assert enc.ids[0] == spm.token_to_id("<s>") == 1
    assert spm.token_to_id("<0x00>") == 3 and spm.token_to_id("<0xFF>") == 258
    assert any(t.startswith("<0x") for t in enc.tokens), "CJK must fall back to byte tokens"
    assert spm.decode(enc.ids) == text
    assert enc.tokens[1].startswith("▁")
    gemma = Tokenizer.from_file(str(checkpoints[("gemma3", None)] / "tokenizer.json"))
    assert [gemma.token_to_id(t) for t in ("<pad>", "<eos>", "<bos>", "<unk>")] == [0, 1, 2, 3]
    assert gemma.encode("<start_of_turn>user\nhi").ids[1] == gemma.token_to_id("<start_of_turn>")
    llama3 = Tokenizer.from_file(str(checkpoints[("llama", "bpe")] / "tokenizer.json"))
    qwen = Tokenizer.from_file(str(checkpoints[("qwen2", None)] / "tokenizer.json"))
    assert llama3.encode(text).ids[0] == llama3.token_to_id("<|begin_of_text|>")
    assert qwen.encode(text).ids[0] != qwen.token_to_id("<|endoftext|>")  # Qwen adds no BOS
    for tok in (llama3, qwen):
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == text
    # The two split regexes differ on digit runs: Llama-3 groups up to 3, Qwen2 one at a time.
    assert len(qwen.encode("123456").ids) == 6
    assert len(llama3.encode("123456").ids) - 1 <= 2 * 3 and llama3.encode("123456").ids != qwen.encode("123456").ids


def test_checkpoints_are_deterministic_and_seeded(tmp_path: Path) -> None:
    def digest(d: Path) -> str:
        return hashlib.sha256(b"".join((d / n).read_bytes() for n in sorted(p.name for p in d.iterdir()))).hexdigest()

    a = make_checkpoint("qwen3", tmp_path / "a", seed=3)
    b = make_checkpoint("qwen3", tmp_path / "b", seed=3)
    c = make_checkpoint("qwen3", tmp_path / "c", seed=4)
    assert digest(a) == digest(b) != digest(c)


def test_sharded_checkpoint_holds_the_same_weights(tmp_path: Path) -> None:
    single = make_checkpoint("mistral", tmp_path / "single")
    sharded = make_checkpoint("mistral", tmp_path / "sharded", sharded=True)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2 and not (sharded / "model.safetensors").exists()
    _, w1 = load_checkpoint(single)
    _, w2 = load_checkpoint(sharded)
    assert w1.keys() == w2.keys() and all(np.array_equal(w1[k], w2[k]) for k in w1)
    assert index["metadata"]["total_size"] == sum(v.size * 2 for v in w1.values())


def test_bf16_storage_round_trips_through_the_reference_loader(checkpoints: dict) -> None:
    values = np.array([1.0, -2.5, 3.14159, 1e-3, 65504.0, 1.00390625], dtype=np.float32)
    bits = to_bf16_bits(values)
    assert bits[0] == 0x3F80 and bits[1] == 0xC020
    assert bits[5] == 0x3F80  # 1 + 2^-8 is a tie: rounds to even (1.0)
    _, weights = load_checkpoint(checkpoints[("gemma3", None)])
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == np.float32 and np.all(q.view(np.uint32) & 0xFFFF == 0)  # exactly bf16 values


def test_logits_have_a_healthy_spread(checkpoints: dict) -> None:
    for (arch, kind), ckpt in checkpoints.items():
        config, weights = load_checkpoint(ckpt)
        logits = reference_logits(config, weights, _text_ids(ckpt))
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        entropy = -(probs * np.log(probs + 1e-300)).sum(-1).mean()
        assert 1.5 < logits.std() < 10, (arch, kind)
        assert 0.5 < entropy < math.log(config["vocab_size"]) - 0.5, (arch, kind)
        assert len(set(logits.argmax(-1))) > 3, (arch, kind)


# ----------------------------------------------------------------------------- forward pass


@pytest.mark.parametrize("arch,kind", ARCH_CASES)
def test_causality(checkpoints: dict, arch: str, kind: str | None) -> None:
    config, weights = load_checkpoint(checkpoints[(arch, kind)])
    ids = _text_ids(checkpoints[(arch, kind)])[:12]
    changed = ids[:8] + [(t + 7) % config["vocab_size"] for t in ids[8:]]
    a, b = reference_logits(config, weights, ids), reference_logits(config, weights, changed)
    np.testing.assert_allclose(a[:8], b[:8], rtol=0, atol=1e-9)
    assert np.abs(a[8:] - b[8:]).max() > 0.1
    np.testing.assert_allclose(reference_logits(config, weights, ids[:5]), a[:5], rtol=0, atol=1e-9)


def test_zero_blocks_reduce_to_norm_of_embedding(checkpoints: dict) -> None:
    """With o_proj and down_proj zeroed, every layer adds nothing: logits = norm(emb) @ head."""
    config, weights = load_checkpoint(checkpoints[("llama", "spm")])
    zeroed = {k: (np.zeros_like(v) if k.endswith(("o_proj.weight", "down_proj.weight")) else v)
              for k, v in weights.items()}
    ids = [1, 5, 300, 42]
    emb = weights["model.embed_tokens.weight"][ids].astype(np.float64)
    normed = emb / np.sqrt((emb ** 2).mean(-1, keepdims=True) + config["rms_norm_eps"])
    expected = (normed * weights["model.norm.weight"]) @ weights["lm_head.weight"].astype(np.float64).T
    np.testing.assert_allclose(reference_logits(config, zeroed, ids), expected, rtol=1e-10, atol=1e-10)


def test_gqa_equals_mha_with_repeated_kv_heads(checkpoints: dict) -> None:
    config, weights = load_checkpoint(checkpoints[("qwen3", None)])
    ids = _text_ids(checkpoints[("qwen3", None)])[:10]
    mha_config = dict(config, num_key_value_heads=config["num_attention_heads"])
    mha = dict(weights)
    group = config["num_attention_heads"] // config["num_key_value_heads"]
    for i in range(config["num_hidden_layers"]):
        for proj in ("k_proj", "v_proj"):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            heads = weights[name].reshape(config["num_key_value_heads"], config["head_dim"], -1)
            mha[name] = np.repeat(heads, group, axis=0).reshape(-1, config["hidden_size"])
    np.testing.assert_allclose(reference_logits(mha_config, mha, ids), reference_logits(config, weights, ids),
                               rtol=1e-10, atol=1e-10)


def test_rope_depends_only_on_relative_position() -> None:
    rng = np.random.default_rng(0)
    inv_freq = rope_inv_freq(64, 10000.0, None)
    q, k = rng.standard_normal((1, 1, 64)), rng.standard_normal((1, 1, 64))
    dots = [float((apply_rope(q, np.array([p + 3]), inv_freq) * apply_rope(k, np.array([p]), inv_freq)).sum())
            for p in (0, 5, 40)]
    assert np.allclose(dots, dots[0]) and not np.isclose(dots[0], float((q * k).sum()))
    # rotate_half pairs dimension i with i + 32 (not 2i with 2i+1 as GGUF's interleaved layout)
    e0 = np.zeros((1, 1, 64))
    e0[..., 0] = 1.0
    rotated = apply_rope(e0, np.array([1]), inv_freq)[0, 0]
    assert np.flatnonzero(np.abs(rotated) > 1e-12).tolist() == [0, 32]


def test_llama3_and_linear_rope_scaling() -> None:
    base = rope_inv_freq(64, 500000.0, None)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    scaled = rope_inv_freq(64, 500000.0, scaling)
    wavelen = 2 * math.pi / base
    assert np.array_equal(scaled[wavelen < 8192 / 4], base[wavelen < 8192 / 4])
    np.testing.assert_allclose(scaled[wavelen > 8192], base[wavelen > 8192] / 8)
    assert ((wavelen >= 2048) & (wavelen <= 8192)).any()
    np.testing.assert_allclose(rope_inv_freq(64, 1e4, {"rope_type": "linear", "factor": 4.0}),
                               rope_inv_freq(64, 1e4, None) / 4)


def test_gemma3_sliding_window_and_layer_types(tmp_path: Path) -> None:
    two = make_checkpoint("gemma3", tmp_path / "g2")
    six = make_checkpoint("gemma3", tmp_path / "g6", n_layers=6)
    config2, w2 = load_checkpoint(two)
    config6, w6 = load_checkpoint(six)
    assert layer_types(config2) == ["sliding_attention"] * 2
    assert layer_types(config6) == ["sliding_attention"] * 5 + ["full_attention"]
    assert layer_types({k: v for k, v in config6.items() if k != "layer_types"}) == layer_types(config6)
    window = config2["sliding_window"]
    ids = list(range(10, 10 + 2 * window + 4))
    changed = [99] + ids[1:]
    # Two sliding layers see at most 2 * (window - 1) tokens back.
    horizon = 2 * (window - 1) + 1
    a, b = reference_logits(config2, w2, ids), reference_logits(config2, w2, changed)
    np.testing.assert_allclose(a[horizon:], b[horizon:], rtol=0, atol=1e-9)
    assert np.abs(a[window - 1] - b[window - 1]).max() > 1e-3
    # With a full-attention layer, token 0 reaches every position.
    a6, b6 = reference_logits(config6, w6, ids), reference_logits(config6, w6, changed)
    assert np.abs(a6[-1] - b6[-1]).max() > 1e-3
    # and the window matters: the same model without it gives different late logits
    no_window = dict(config2, layer_types=["full_attention"] * 2)
    assert np.abs(reference_logits(no_window, w2, ids)[-1] - a[-1]).max() > 1e-3


def test_gemma3_specifics_change_the_result(checkpoints: dict) -> None:
    config, weights = load_checkpoint(checkpoints[("gemma3", None)])
    ids = _text_ids(checkpoints[("gemma3", None)])[:6]
    base = reference_logits(config, weights, ids)
    assert _round_to_dtype(math.sqrt(640), "bfloat16") == 25.25  # the real 270M's normalizer
    assert _round_to_dtype(math.sqrt(256), "bfloat16") == 16.0
    for variant in (dict(config, query_pre_attn_scalar=32), dict(config, final_logit_softcapping=2.0),
                    dict(config, rope_local_base_freq=500.0)):
        assert np.abs(reference_logits(variant, weights, ids) - base).max() > 1e-3
    capped = reference_logits(dict(config, final_logit_softcapping=2.0), weights, ids)
    assert np.abs(capped).max() < 2.0


def test_qwen2_biases_are_used(checkpoints: dict) -> None:
    config, weights = load_checkpoint(checkpoints[("qwen2", None)])
    ids = _text_ids(checkpoints[("qwen2", None)])[:6]
    no_bias = {k: v for k, v in weights.items() if not k.endswith(".bias")}
    assert np.abs(reference_logits(config, weights, ids) - reference_logits(config, no_bias, ids)).max() > 0.1


def test_reference_rejects_bad_ids(checkpoints: dict) -> None:
    config, weights = load_checkpoint(checkpoints[("llama", "spm")])
    with pytest.raises(ValueError):
        reference_logits(config, weights, [config["vocab_size"]])
    with pytest.raises(ValueError):
        reference_logits(config, weights, [])


# ----------------------------------------------------------------------------- PEFT


def _adapter_tensors(adapter: Path) -> dict[str, np.ndarray]:
    from tests.support.reference import load_safetensors

    return load_safetensors(adapter / "adapter_model.safetensors")


def test_peft_layout(checkpoints: dict, tmp_path: Path) -> None:
    ckpt = checkpoints[("qwen3", None)]
    adapter = make_peft_adapter(ckpt, tmp_path / "a", use_dora=True, modules_to_save=["lm_head"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    names = set(_adapter_tensors(adapter))
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight" in names
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in names
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in names
    assert "base_model.model.lm_head.weight" in names
    assert len([n for n in names if n.endswith("lora_A.weight")]) == 2 * 7


def test_zero_lora_b_is_the_identity(checkpoints: dict, tmp_path: Path) -> None:
    ckpt = checkpoints[("llama", "spm")]
    config, weights = load_checkpoint(ckpt)
    adapter = make_peft_adapter(ckpt, tmp_path / "zero", strength=0.0)
    merged = apply_peft(weights, adapter, config)
    assert all(np.array_equal(merged[k], weights[k]) for k in weights)
    ids = _text_ids(ckpt)[:6]
    real = apply_peft(weights, make_peft_adapter(ckpt, tmp_path / "real"), config)
    assert np.abs(reference_logits(config, real, ids) - reference_logits(config, weights, ids)).max() > 0.5


def test_lora_delta_is_scale_b_a(checkpoints: dict, tmp_path: Path) -> None:
    ckpt = checkpoints[("mistral", None)]
    config, weights = load_checkpoint(ckpt)
    plain = make_peft_adapter(ckpt, tmp_path / "plain", r=8, alpha=16, seed=5)
    rs = make_peft_adapter(ckpt, tmp_path / "rs", r=8, alpha=16, seed=5, use_rslora=True)
    name = "model.layers.1.self_attn.v_proj"
    t = _adapter_tensors(plain)
    ba = t[f"base_model.model.{name}.lora_B.weight"].astype(np.float64) @ t[
        f"base_model.model.{name}.lora_A.weight"].astype(np.float64)
    d_plain = apply_peft(weights, plain, config)[name + ".weight"] - weights[name + ".weight"]
    d_rs = apply_peft(weights, rs, config)[name + ".weight"] - weights[name + ".weight"]
    np.testing.assert_allclose(d_plain, 2.0 * ba, atol=1e-6)  # 16 / 8
    np.testing.assert_allclose(d_rs, 16 / math.sqrt(8) * ba, atol=1e-6)


def test_rank_and_alpha_patterns_match_like_peft(checkpoints: dict, tmp_path: Path) -> None:
    ckpt = checkpoints[("llama", "spm")]
    adapter = make_peft_adapter(ckpt, tmp_path / "pat", r=8, alpha=16,
                                rank_pattern={"model.layers.0.self_attn.q_proj": 4, "down_proj": 2},
                                alpha_pattern={"v_proj": 64})
    tensors = _adapter_tensors(adapter)
    a = lambda m: tensors[f"base_model.model.{m}.lora_A.weight"]  # noqa: E731
    assert a("model.layers.0.self_attn.q_proj").shape[0] == 4
    assert a("model.layers.1.self_attn.q_proj").shape[0] == 8
    assert a("model.layers.1.mlp.down_proj").shape[0] == 2
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert lora_scale(config, "model.layers.0.self_attn.q_proj", 4) == 16 / 4
    assert lora_scale(config, "model.layers.1.self_attn.v_proj", 8) == 64 / 8
    assert lora_scale(config, "model.layers.1.mlp.down_proj", 2) == 16 / 2
    # PEFT anchors the key at a '.' boundary: "proj" alone must not match "q_proj"
    assert lora_scale(dict(config, alpha_pattern={"proj": 1}), "model.layers.0.self_attn.q_proj", 8) == 2.0
    assert lora_scale(dict(config, use_rslora=True), "model.layers.1.mlp.down_proj", 2) == 16 / math.sqrt(2)


def test_dora_merge(checkpoints: dict, tmp_path: Path) -> None:
    ckpt = checkpoints[("qwen2", None)]
    config, weights = load_checkpoint(ckpt)
    dora = make_peft_adapter(ckpt, tmp_path / "dora", use_dora=True, seed=9)
    merged = apply_peft(weights, dora, config)
    tensors = _adapter_tensors(dora)
    name = "model.layers.0.mlp.up_proj"
    magnitude = tensors[f"base_model.model.{name}.lora_magnitude_vector"]
    assert magnitude.shape == (weights[name + ".weight"].shape[0],)
    # After the merge each output row's norm is the magnitude (PEFT: norm over dim=1 of [out, in]).
    np.testing.assert_allclose(np.linalg.norm(merged[name + ".weight"].astype(np.float64), axis=1), magnitude,
                               rtol=1e-5)
    # The direction is that of W + s*B@A.
    plain_cfg = tmp_path / "plain"
    plain_cfg.mkdir()
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (plain_cfg / "adapter_config.json").write_text(json.dumps(dict(cfg, use_dora=False)))
    (plain_cfg / "adapter_model.safetensors").write_bytes(_strip_magnitudes(dora))
    lora_only = apply_peft(weights, plain_cfg, config)[name + ".weight"].astype(np.float64)
    direction = lora_only / np.linalg.norm(lora_only, axis=1, keepdims=True)
    np.testing.assert_allclose(merged[name + ".weight"], direction * magnitude[:, None], rtol=1e-4, atol=1e-6)


def _strip_magnitudes(adapter: Path) -> bytes:
    from tests.support.model_fixtures import write_safetensors

    kept = {k: v for k, v in _adapter_tensors(adapter).items() if not k.endswith("lora_magnitude_vector")}
    out = adapter.parent / "stripped.safetensors"
    write_safetensors(out, kept, "float32")
    return out.read_bytes()


def test_modules_to_save_replace_base_weights(checkpoints: dict, tmp_path: Path) -> None:
    ckpt = checkpoints[("gemma3", None)]  # tied: the saved lm_head unties the head
    config, weights = load_checkpoint(ckpt)
    adapter = make_peft_adapter(ckpt, tmp_path / "mts", modules_to_save=["lm_head", "embed_tokens"],
                                target_modules=("q_proj",))
    merged = apply_peft(weights, adapter, config)
    tensors = _adapter_tensors(adapter)
    assert np.array_equal(merged["lm_head.weight"], tensors["base_model.model.lm_head.weight"])
    assert np.array_equal(merged["model.embed_tokens.weight"],
                          tensors["base_model.model.model.embed_tokens.weight"])
    assert np.array_equal(merged["model.layers.0.mlp.up_proj.weight"], weights["model.layers.0.mlp.up_proj.weight"])
    ids = _text_ids(ckpt)[:4]
    assert np.abs(reference_logits(config, merged, ids) - reference_logits(config, weights, ids)).max() > 1e-3


def test_fan_in_fan_out_transposes(checkpoints: dict, tmp_path: Path) -> None:
    ckpt = checkpoints[("llama", "spm")]
    config, weights = load_checkpoint(ckpt)
    adapter = make_peft_adapter(ckpt, tmp_path / "fifo", target_modules=("o_proj",))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    name = "model.layers.0.self_attn.o_proj.weight"
    normal = apply_peft(weights, adapter, config)[name]
    (adapter / "adapter_config.json").write_text(json.dumps(dict(cfg, fan_in_fan_out=True)))
    transposed = dict(weights, **{name: weights[name].T.copy()})
    np.testing.assert_allclose(apply_peft(transposed, adapter, config)[name].T, normal, atol=1e-6)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_against_transformers_if_installed(tmp_path: Path, arch: str) -> None:
    """Optional: transformers + torch are not project dependencies."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ckpt = make_checkpoint(arch, tmp_path / arch)
    config, weights = load_checkpoint(ckpt)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32)
    ids = _text_ids(ckpt)[:12]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].double().numpy()
    np.testing.assert_allclose(reference_logits(config, weights, ids), expected, atol=2e-3)


def test_lora_bias_and_embedding_lora(checkpoints: dict, tmp_path: Path) -> None:
    ckpt = checkpoints[("qwen2", None)]  # tied embedding: an embedding LoRA moves the head too
    config, weights = load_checkpoint(ckpt)
    adapter = make_peft_adapter(ckpt, tmp_path / "emb", target_modules=("embed_tokens", "v_proj"),
                                lora_bias=True, r=4, alpha=8)
    tensors = _adapter_tensors(adapter)
    a = tensors["base_model.model.model.embed_tokens.lora_embedding_A"]
    b = tensors["base_model.model.model.embed_tokens.lora_embedding_B"]
    assert a.shape == (4, config["vocab_size"]) and b.shape == (config["hidden_size"], 4)
    merged = apply_peft(weights, adapter, config)
    np.testing.assert_allclose(merged["model.embed_tokens.weight"] - weights["model.embed_tokens.weight"],
                               2.0 * (b.astype(np.float64) @ a).T, atol=1e-5)
    name = "model.layers.1.self_attn.v_proj"
    np.testing.assert_allclose(merged[name + ".bias"] - weights[name + ".bias"],
                               2.0 * tensors[f"base_model.model.{name}.lora_B.bias"], atol=1e-6)
    ids = _text_ids(ckpt)[:4]
    assert np.abs(reference_logits(config, merged, ids) - reference_logits(config, weights, ids)).max() > 1e-2


def test_unknown_adapter_tensor_is_refused(checkpoints: dict, tmp_path: Path) -> None:
    from tests.support.model_fixtures import write_safetensors

    ckpt = checkpoints[("llama", "spm")]
    config, weights = load_checkpoint(ckpt)
    adapter = make_peft_adapter(ckpt, tmp_path / "odd", target_modules=("q_proj",))
    tensors = dict(_adapter_tensors(adapter))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = np.zeros((2, 2), np.float32)
    write_safetensors(adapter / "adapter_model.safetensors", tensors, "float32")
    with pytest.raises(ValueError, match="lora_C"):
        apply_peft(weights, adapter, config)


# ----------------------------------------------------------------------------- real weights vs llama.cpp

GGUF_TO_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
              "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
              "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
              "post_ffw_norm": "post_feedforward_layernorm", "ffn_gate": "mlp.gate_proj",
              "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
REAL_LAYERS, REAL_WINDOW, REAL_VOCAB = 6, 8, 771


def _small_real_gemma(src: Path, out_gguf: Path) -> dict[str, np.ndarray]:
    """The first 6 blocks of the real Gemma 3 270M (dequantized to F32, so both sides use the
    same weights) with a 771-row slice of its embedding as the vocabulary and an 8-token window,
    written as a GGUF llama.cpp loads directly (no project code involved). Returns HF-named
    weights (GGUF norms carry Gemma's +1, undone here)."""
    import gguf
    from gguf import quants

    from edge_lora.core.gguf_check import validate_gguf

    # The bounded header parser locates tensors in ~0.1 s; gguf.GGUFReader spends ~20 s walking
    # the 262k-entry vocabulary arrays.
    info = validate_gguf(src)
    raw = np.memmap(src, dtype=np.uint8, mode="r")

    def read(name: str, rows: slice | None = None) -> np.ndarray:
        record = info.tensor(name)
        assert record is not None, name
        qtype = gguf.GGMLQuantizationType[record.type_name]
        n_rows = int(np.prod(record.shape[1:]))
        data = raw[record.offset:record.offset + record.n_bytes].reshape(n_rows, -1)
        data = data[rows] if rows is not None else data
        values = quants.dequantize(np.asarray(data), qtype).astype(np.float32)  # [rows, ne0]
        return values.reshape(-1) if len(record.shape) == 1 else values

    meta = info.metadata
    weights = {"model.embed_tokens.weight": read("token_embd.weight", slice(1000, 1000 + REAL_VOCAB))}
    writer = gguf.GGUFWriter(out_gguf, "gemma3")
    hidden = weights["model.embed_tokens.weight"].shape[1]
    writer.add_block_count(REAL_LAYERS)
    writer.add_context_length(1024)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(meta["gemma3.feed_forward_length"]))
    writer.add_head_count(int(meta["gemma3.attention.head_count"]))
    writer.add_head_count_kv(int(meta["gemma3.attention.head_count_kv"]))
    writer.add_key_length(int(meta["gemma3.attention.key_length"]))
    writer.add_value_length(int(meta["gemma3.attention.value_length"]))
    writer.add_layer_norm_rms_eps(float(meta["gemma3.attention.layer_norm_rms_epsilon"]))
    writer.add_rope_freq_base(float(meta["gemma3.rope.freq_base"]))
    writer.add_sliding_window(REAL_WINDOW)
    writer.add_file_type(0)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"▁w{i}" for i in range(REAL_VOCAB - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * REAL_VOCAB)
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (REAL_VOCAB - 259))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    for record in info.tensors:
        name = record.name
        if name == "token_embd.weight" or (name.startswith("blk.") and int(name.split(".")[1]) >= REAL_LAYERS):
            continue
        values = read(name)
        writer.add_tensor(name, values)
        if name == "output_norm.weight":
            hf_name = "model.norm.weight"
        else:
            _, layer, kind, _ = name.split(".")
            hf_name = f"model.layers.{layer}.{GGUF_TO_HF[kind]}.weight"
        weights[hf_name] = values - 1.0 if name.endswith("norm.weight") else values
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


@pytest.mark.slow
def test_reference_matches_llama_cpp_on_real_gemma3_blocks(gemma_q4_gguf: Path, tmp_path: Path) -> None:
    """The reference's Gemma 3 semantics (sandwich norms, q/k norms, GeGLU, scaled embedding,
    sliding + global layers with their two RoPE bases) checked against llama.cpp itself on real
    trained weights — independently of the project's converters."""
    import llama_cpp

    model = tmp_path / "gemma3-real-blocks.gguf"
    weights = _small_real_gemma(gemma_q4_gguf, model)
    config = {"model_type": "gemma3_text", "hidden_size": 640, "num_hidden_layers": REAL_LAYERS,
              "intermediate_size": 2048, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
              "rms_norm_eps": 1e-6, "rope_theta": 1e6, "rope_local_base_freq": 10000.0,
              "sliding_window": REAL_WINDOW, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
              "tie_word_embeddings": True, "torch_dtype": "float32"}  # llama.cpp: sqrtf(n_embd) in f32
    assert layer_types(config) == ["sliding_attention"] * 5 + ["full_attention"]
    ids = [1] + [int(t) for t in np.random.default_rng(0).integers(259, REAL_VOCAB, 23)]
    llm = llama_cpp.Llama(str(model), logits_all=True, n_ctx=64, n_batch=64, n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        expected = np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()

    def max_error(cfg: dict) -> float:
        return float(np.abs(reference_logits(cfg, weights, ids) - expected).max() / expected.std())

    ours = max_error(config)
    assert ours < 0.01, ours
    np.testing.assert_array_equal(reference_logits(config, weights, ids).argmax(-1), expected.argmax(-1))
    # The check resolves each semantic detail: getting any one wrong is at least 5x further off.
    for wrong in (dict(config, sliding_window=None), dict(config, rope_local_base_freq=1e6),
                  dict(config, query_pre_attn_scalar=640 / 4), dict(config, torch_dtype="bfloat16")):
        assert max_error(wrong) > 5 * ours, wrong
