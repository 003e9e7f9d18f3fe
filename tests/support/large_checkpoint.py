"""A large synthetic Llama checkpoint (hundreds of MB to GB) for memory and throughput
measurements of the converter: the tiny fixture's tokenizer, wide random weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge_lora.converters.safetensors_io import write_safetensors
from tests.support.model_fixtures import make_checkpoint


def make_large_llama(out_dir: Path, *, vocab: int = 65536, hidden: int = 1024, layers: int = 1,
                     ffn: int = 2816, bf16: bool = False, seed: int = 0) -> Path:
    """Llama checkpoint with untied embeddings; its size is about
    (2 * vocab * hidden + layers * (4 * hidden^2 + 3 * hidden * ffn)) * (2 if bf16 else 4) bytes.
    config.json's vocab_size exceeds the tokenizer's; the converter pads the vocabulary."""
    out_dir = make_checkpoint("llama", Path(out_dir))
    config = json.loads((out_dir / "config.json").read_text())
    heads = hidden // 128
    config.update(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=ffn, vocab_size=vocab,
                  num_attention_heads=heads, num_key_value_heads=heads, head_dim=128,
                  torch_dtype="bfloat16" if bf16 else "float32")
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    weights = {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
               "model.norm.weight": np.ones(hidden, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        weights.update({
            p + "input_layernorm.weight": np.ones(hidden, np.float32),
            p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
            p + "self_attn.q_proj.weight": rand(hidden, hidden), p + "self_attn.k_proj.weight": rand(hidden, hidden),
            p + "self_attn.v_proj.weight": rand(hidden, hidden), p + "self_attn.o_proj.weight": rand(hidden, hidden),
            p + "mlp.gate_proj.weight": rand(ffn, hidden), p + "mlp.up_proj.weight": rand(ffn, hidden),
            p + "mlp.down_proj.weight": rand(hidden, ffn),
        })
    write_safetensors(out_dir / "model.safetensors", weights, bf16=bf16)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir
