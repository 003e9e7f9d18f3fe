"""Combining GGUF LoRA adapters into a GGUF LoRA adapter, without the HF base (the TUI combines
registered adapters this way).

Every method of ``combine`` works on the stored tensors as they are: the GGUF layout differs
from PEFT's only by a fixed permutation of some B rows (Llama q/k) and a per-module factor folded
into B, and the methods are elementwise, whole-tensor top-k, sign election or SVD, which that
permutation commutes with. So the result is the PEFT combination of the same adapters, written in
GGUF layout. (DARE's random mask is drawn in GGUF element order: the same rule and density, a
different draw than combining the PEFT tensors with the same seed.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np

from edge_lora.converters.combine import CombineOptions, combine_adapters
from edge_lora.converters.gguf_output import GGMLType, PlannedTensor, StreamingGGUFWriter, encode_rows
from edge_lora.converters.gguf_to_peft import adapter_from_pairs, read_gguf_lora
from edge_lora.converters.peft import LoraDelta, PeftAdapter
from edge_lora.core.atomic import check_not_an_input, ensure_writable_dir
from edge_lora.core.errors import AdapterMismatchError
from edge_lora.core.output_dir import ADAPTER_PREFIX
from edge_lora.core.progress import NullProgress, ProgressSink


def _as_adapter(path: Path) -> tuple[PeftAdapter, str]:
    lora = read_gguf_lora(path)
    deltas = {target: LoraDelta(module=target.removesuffix(".weight"), lora_a=a, lora_b=b, scale=lora.scale(a.shape[0]))
              for target, (a, b) in lora.pairs.items()}
    name = path.name.removesuffix(".gguf").removeprefix(ADAPTER_PREFIX)
    return adapter_from_pairs(path.with_name(name), deltas, lora.alpha), lora.architecture


def combine_gguf_adapters(inputs: Sequence[tuple[Path | str, float]], out_path: Path | str,
                          options: CombineOptions = CombineOptions(), *, name: str | None = None,
                          progress: ProgressSink = NullProgress()) -> Path:
    """Combine GGUF LoRA adapters of one architecture and write the result (F32) atomically."""
    options.check()
    out_path = Path(out_path)
    check_not_an_input(out_path, [p for p, _ in inputs])
    opened = [(_as_adapter(Path(p)), w) for p, w in inputs]
    architectures = {arch for (_, arch), _ in opened}
    if len(architectures) > 1:
        (first, a1), _ = opened[0]
        other, a2 = next(x for x, _ in opened if x[1] != a1)
        raise AdapterMismatchError(f"adapters {first.name} ({a1}) and {other.name} ({a2}) are for different "
                                   "architectures", fix="combine adapters of the same base model")
    combined = combine_adapters([(a, w) for (a, _), w in opened], options, name=name or "combined")
    alpha = float(combined.config.r)
    ensure_writable_dir(out_path.parent)
    writer = StreamingGGUFWriter(architectures.pop())
    kv = writer.kv
    kv.add_type(gguf.GGUFType.ADAPTER)
    kv.add_name(f"{ADAPTER_PREFIX}{name or out_path.stem.removeprefix(ADAPTER_PREFIX)}")
    kv.add_string(gguf.Keys.Adapter.TYPE, "lora")
    kv.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for target, delta in combined.deltas.items():
        # llama.cpp applies alpha / r with r from the shape: fold the rest into B (exactly 1 when r is the new rank)
        fold = np.float32(delta.scale * delta.rank / alpha)
        for suffix, array in ((".lora_a", delta.lora_a), (".lora_b", delta.lora_b * fold)):
            array = np.ascontiguousarray(array, dtype=np.float32)
            writer.add_tensor(PlannedTensor(name=target + suffix, shape=array.shape, ggml_type=GGMLType.F32,
                                            blocks=lambda a=array: [encode_rows(a, GGMLType.F32)]))
    return writer.write(out_path, progress)
