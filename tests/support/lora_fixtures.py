"""Small GGUF LoRA adapters built by code for a real base GGUF (shapes read from the base),
strong enough to change greedy output. Used by runtime, server and CLI tests."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from edge_lora.core.gguf_check import validate_gguf


def write_random_lora(base_gguf: Path, out: Path, *, seed: int, layers: tuple[int, ...] = (0, 1, 2, 3),
                      targets: tuple[str, ...] = ("attn_q", "ffn_up"), rank: int = 8,
                      alpha: float = 8.0, strength: float = 1.0) -> Path:
    """lora_a ~ N(0, 1/in) [r, in], lora_b ~ N(0, strength^2) [out, r] — PEFT layout; the GGUF
    ne order is the reverse (llama.cpp: base.ne[0] == a.ne[0], base.ne[1] == b.ne[1])."""
    base = validate_gguf(base_gguf, expect_type="model")
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(out, base.architecture or "")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for layer in layers:
        for target in targets:
            name = f"blk.{layer}.{target}.weight"
            record = base.tensor(name)
            assert record is not None, name
            n_in, n_out = record.shape[0], record.shape[1]
            lora_a = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
            lora_b = (rng.standard_normal((n_out, rank)) * strength).astype(np.float32)
            writer.add_tensor(name + ".lora_a", lora_a)
            writer.add_tensor(name + ".lora_b", lora_b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def write_merged_reference(base_gguf: Path, lora_gguf: Path, out: Path, scale: float = 1.0) -> Path:
    """A test-only reference merge: copy ``base_gguf``, replacing each LoRA-targeted tensor with
    dequantize(W) + scale * alpha / r * B @ A in F32 (every other tensor byte-identical). Running
    this file must give what llama.cpp computes with the adapter hot-applied on the base."""
    from gguf import quants

    base = gguf.GGUFReader(base_gguf)
    lora = gguf.GGUFReader(lora_gguf)
    alpha = float(lora.fields["adapter.lora.alpha"].contents())
    lora_tensors = {t.name: t for t in lora.tensors}
    writer = gguf.GGUFWriter(out, base.fields["general.architecture"].contents())
    for key, fld in base.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        main_type = fld.types[0]
        sub_type = fld.types[-1] if main_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, fld.contents(), main_type, sub_type)
    for tensor in base.tensors:
        a = lora_tensors.get(tensor.name + ".lora_a")
        if a is None:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
            continue
        b = lora_tensors[tensor.name + ".lora_b"]
        lora_a = np.asarray(a.data, dtype=np.float32)  # [r, in]
        lora_b = np.asarray(b.data, dtype=np.float32)  # [out, r]
        weight = quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)  # [out, in]
        merged = weight + (scale * alpha / lora_a.shape[0]) * (lora_b @ lora_a)
        writer.add_tensor(tensor.name, merged.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
