"""A tiny Llama model GGUF (F32, 64-wide, one layer, 300-token SentencePiece-style vocabulary)
written directly with gguf-py, with any metadata key overridden or dropped: the smallest file
llama.cpp loads and runs, for tests that need it to refuse, abort on, or load a variant."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np

N_EMBD, N_FF, N_HEAD = 64, 128, 4
DROP = object()  # a metadata override that removes the key


def _value_type(value: Any) -> gguf.GGUFValueType:
    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    if isinstance(value, int):
        return gguf.GGUFValueType.UINT32 if value >= 0 else gguf.GGUFValueType.INT32
    if isinstance(value, float):
        return gguf.GGUFValueType.FLOAT32
    if isinstance(value, str):
        return gguf.GGUFValueType.STRING
    return gguf.GGUFValueType.ARRAY


def tiny_metadata(tokens: list[str] | None = None) -> dict[str, Any]:
    if tokens is None:
        tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + \
            [f"\u2581w{i}" for i in range(41)]
    types = [2 if t == "<unk>" else 3 if t in ("<s>", "</s>") else 6 if t.startswith("<0x") else 1 for t in tokens]
    return {
        "llama.context_length": 128, "llama.embedding_length": N_EMBD, "llama.block_count": 1,
        "llama.feed_forward_length": N_FF, "llama.attention.head_count": N_HEAD,
        "llama.attention.head_count_kv": N_HEAD, "llama.rope.dimension_count": N_EMBD // N_HEAD,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [-float(i) for i in range(len(tokens))],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
    }


def write_tiny_llama(path: Path, overrides: Mapping[str, Any] | None = None, *, seed: int = 0,
                     n_vocab: int | None = None) -> Path:
    """``overrides``: metadata values to set (``DROP`` removes a key); arrays of ints are written
    as INT32 arrays, as llama.cpp's converters do."""
    metadata = tiny_metadata()
    for key, value in (overrides or {}).items():
        if value is DROP:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    vocab = n_vocab if n_vocab is not None else len(metadata.get("tokenizer.ggml.tokens") or []) or 300
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in metadata.items():
        vtype = _value_type(value)
        if vtype == gguf.GGUFValueType.ARRAY and value and isinstance(value[0], int) and not isinstance(value[0], bool):
            w.add_key_value(key, value, vtype, sub_type=gguf.GGUFValueType.INT32)
        else:
            w.add_key_value(key, value, vtype)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)

    w.add_tensor("token_embd.weight", mat(vocab, N_EMBD))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    w.add_tensor("output.weight", mat(vocab, N_EMBD))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(N_EMBD, np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(N_EMBD, np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(f"blk.0.{name}.weight", mat(N_EMBD, N_EMBD))
    w.add_tensor("blk.0.ffn_gate.weight", mat(N_FF, N_EMBD))
    w.add_tensor("blk.0.ffn_up.weight", mat(N_FF, N_EMBD))
    w.add_tensor("blk.0.ffn_down.weight", mat(N_EMBD, N_FF))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tiny_lora(path: Path, *, rank: int = 4, seed: int = 0, strength: float = 0.05) -> Path:
    """A GGUF LoRA adapter for ``write_tiny_llama``'s model: attn_q and ffn_up of layer 0."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(rank))
    for name, rows in (("attn_q", N_EMBD), ("ffn_up", N_FF)):
        w.add_tensor(f"blk.0.{name}.weight.lora_a", (rng.standard_normal((rank, N_EMBD)) * strength).astype(np.float32))
        w.add_tensor(f"blk.0.{name}.weight.lora_b", (rng.standard_normal((rows, rank)) * strength).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
