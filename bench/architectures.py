"""Per-architecture accuracy of conversion, merge and hot-apply, each next to a baseline measured in
the same run: the same file with the RoPE base a converter falls back to when it cannot read the
config (10000; what a transformers 5 config got before `rope_parameters` was read).

For each architecture, from its transformers 5 library config (tests/data/configs): convert to
F16 (wall time), then max|Δ|/σ and top-1 agreement against the float64 reference
(tests/support/reference.py) for
  - the base F16,
  - the PEFT adapter merged into an F16,
  - the base F16 with the GGUF adapter hot-applied by llama.cpp,
  - baseline: the base F16 rewritten with rope.freq_base = 10000 (skipped where the config's
    base is 10000 already).

Usage: python bench/architectures.py [--arch phi3 ...] [--tokens 60]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: edge_lora and tests.support

from edge_lora.converters.adapter_gguf import convert_adapter_to_gguf  # noqa: E402
from edge_lora.converters.hf_to_gguf import convert_checkpoint  # noqa: E402
from edge_lora.converters.merge import PeftMerger  # noqa: E402
from edge_lora.converters.peft import PeftAdapter  # noqa: E402
from edge_lora.core.gguf_check import validate_gguf  # noqa: E402
from tests.support.gguf_edit import rewrite_gguf  # noqa: E402
from tests.support.llama_reference import follow_extra_buffer_verdict  # noqa: E402
from tests.support.model_fixtures import DEFAULT_TARGETS, SUPPORTED_ARCHS, make_checkpoint, make_peft_adapter  # noqa: E402
from tests.support.reference import apply_peft, load_checkpoint, reference_logits  # noqa: E402

FUSED_TARGETS = {"phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")}
N_CTX = 64


def llama_logits(path: Path, tokens: list[int], lora: Path | None = None) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=N_CTX, n_batch=N_CTX, n_threads=2, verbose=False,
                          lora_path=str(lora) if lora is not None else None)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def compare(got: np.ndarray, ref: np.ndarray) -> str:
    """max|Δ|/σ / top-1 agreement at the positions whose reference top two are at least 0.02σ
    apart (closer ones are ties within the 0.01σ tolerance; as the tests count them)."""
    rel = float(np.abs(got - ref).max() / ref.std())
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) >= 0.02 * ref.std()
    top1 = float((got.argmax(-1) == ref.argmax(-1))[decided].mean())
    return f"{rel:.4f} / {top1:.0%}"


def bench(arch: str, root: Path, n_tokens: int) -> list[str]:
    dir_name = f"{arch.replace('phi3', 'phi-mini')}-tf5"  # a *phi3* name triggers llama.cpp's Phi-3 vocab rule
    ckpt = make_checkpoint(arch, root / dir_name, config_generation="tf5")
    config, weights = load_checkpoint(ckpt)
    rng = np.random.default_rng(11)
    bos = config.get("bos_token_id")
    tokens = ([int(bos)] if bos is not None else []) + [int(t) for t in rng.integers(3, config["vocab_size"], n_tokens)]
    tokens = tokens[:n_tokens]
    start = time.perf_counter()
    f16 = convert_checkpoint(ckpt, root / f"{arch}-F16.gguf")
    convert_s = time.perf_counter() - start
    ref = reference_logits(config, weights, tokens)
    base = compare(llama_logits(f16, tokens), ref)

    peft = make_peft_adapter(ckpt, root / f"{arch}-peft", strength=0.05,
                             target_modules=FUSED_TARGETS.get(arch, DEFAULT_TARGETS))
    adapted = reference_logits(config, apply_peft(weights, peft, config), tokens)
    merged = convert_checkpoint(ckpt, root / f"{arch}-merged-F16.gguf", adapter=PeftMerger(PeftAdapter.open(peft)))
    lora = convert_adapter_to_gguf(peft, ckpt, root / f"{arch}-adapter.gguf")
    merged_cmp = compare(llama_logits(merged, tokens), adapted)
    hot_cmp = compare(llama_logits(f16, tokens, lora=lora), adapted)

    info = validate_gguf(f16)
    key = f"{info.architecture}.rope.freq_base"
    if info.metadata.get(key) == 10000.0:
        baseline = "(base is 10000)"
    else:
        wrong = rewrite_gguf(f16, root / f"{arch}-default-base.gguf", set_values={key: 10000.0})
        baseline = compare(llama_logits(wrong, tokens), ref)
    return [arch, f"{convert_s:.2f} s", base, merged_cmp, hot_cmp, baseline]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="*", default=list(SUPPORTED_ARCHS), choices=SUPPORTED_ARCHS)
    parser.add_argument("--tokens", type=int, default=60)
    args = parser.parse_args()
    follow_extra_buffer_verdict()  # llama_cpp.Llama loads as edge-lora does on this CPU
    header = ["arch", "convert F16", "base F16", "merged F16", "hot-applied", "baseline: default RoPE base"]
    print("max|Δ|/σ / top-1 (decided positions) vs the float64 reference (merged and hot-applied: vs the reference with the "
          f"adapter merged), {args.tokens} tokens")
    print(" | ".join(header))
    with tempfile.TemporaryDirectory(prefix="edge-lora-bench-archs-") as tmp:
        for arch in args.arch:
            print(" | ".join(bench(arch, Path(tmp), args.tokens)), flush=True)


if __name__ == "__main__":
    main()
