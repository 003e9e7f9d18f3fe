"""Stage timings of ``edge-lora demo`` next to the anchors in ../shared/REFERENCE.md, as ratios,
plus the demo's peak RSS. No assertions on wall time.

Anchors (Gemma 3 270M, 2 cores): llama.cpp's convert_hf_to_gguf.py bf16 -> F16 19.0 s;
llama-quantize F16 -> Q4_K_M 7.1 s (x 10 formats for the ladder); llama-perplexity on the same
held-out text at ctx 512: 25.7 s (x 3 runs: base, base + adapter, merged).

The demo also does work the anchors do not cover (merging the LoRA, writing the GGUF adapter,
rebuilding the HF base once), so a ratio above 1 is expected for ``convert``.

Usage: python bench/demo.py [--out DIR] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ANCHOR_CONVERT_F16_S = 19.0
ANCHOR_QUANTIZE_Q4_K_M_S = 7.1
ANCHOR_PPL_S = 25.7
QUANT_FORMATS = 10
PPL_RUNS = 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="demo output dir (default: a temp dir)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="EDGE_LORA_CACHE for the run (default: the user's; a fresh dir times the base build too)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "demo"
        env = dict(os.environ)
        if args.cache is not None:
            env["EDGE_LORA_CACHE"] = str(args.cache)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "edge_lora", "demo", "--out", str(out), "--json"],
                              capture_output=True, text=True, env=env)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
        summary = json.loads(done.stdout)
    stages = summary["stage_seconds"]
    anchors = {
        "convert": ANCHOR_CONVERT_F16_S + QUANT_FORMATS * ANCHOR_QUANTIZE_Q4_K_M_S,
        "quality": PPL_RUNS * ANCHOR_PPL_S,
    }
    print(f"edge-lora demo on {os.cpu_count()} cores: {wall:.1f} s wall, peak RSS {peak_rss / 1e9:.2f} GB")
    print(f"{'stage':<10} {'seconds':>9} {'anchor s':>9} {'ratio':>7}")
    for name, seconds in stages.items():
        anchor = anchors.get(name)
        ratio = f"{seconds / anchor:7.2f}" if anchor else "      -"
        anchor_text = f"{anchor:9.1f}" if anchor else "        -"
        print(f"{name:<10} {seconds:9.1f} {anchor_text} {ratio}")
    ppl = summary["perplexity"]
    print(f"perplexity base {ppl['base']:.3f}, +adapter {ppl['adapter']:.3f}, merged {ppl['merged_format']} "
          f"{ppl['merged']:.3f} (adapter README: 9.460 -> 8.918); ratio adapter/base "
          f"{ppl['adapter'] / ppl['base']:.4f} vs {8.918 / 9.460:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
