"""GGUF LoRA adapter -> PEFT LoRA tensors, the inverse of ``adapter_gguf``.

A GGUF LoRA holds ``<gguf name>.lora_a`` [r, in] and ``.lora_b`` [out, r] in the base GGUF's
row order (Llama q/k rows permuted) and llama.cpp applies (alpha / r)·B·A with r read from the
tensor shape. So the PEFT module is the HF name the base maps to that GGUF name, lora_A = A,
lora_B = B with the row permutation undone, and scale = alpha / r: exactly what llama.cpp
applies. Ranks that differ between modules become a ``rank_pattern``. F16 and Q8_0 tensors are
dequantized (a Q8_0 adapter's zero-padded rank is kept: the padding is exact zeros).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edge_lora.converters.architectures import ArchSpec, arch_spec_for
from edge_lora.converters.checkpoint import HFCheckpoint
from edge_lora.converters.peft import LoraConfig, LoraDelta, PeftAdapter
from edge_lora.core.errors import AdapterError, AdapterMismatchError
from edge_lora.core.gguf_check import validate_gguf


def _undo_row_transform(spec: ArchSpec, module: str, lora_b: np.ndarray) -> np.ndarray:
    """Inverse of ``spec.transform_lora_b`` (a row permutation, e.g. Llama q/k): row i of the
    GGUF B is row perm[i] of the HF B, with perm read by transforming the row indices."""
    perm = spec.transform_lora_b(module, np.arange(lora_b.shape[0], dtype=np.float64)[:, None])[:, 0]
    out = np.empty_like(lora_b)
    out[perm.astype(np.int64)] = lora_b
    return out


def _tensor(t: gguf.ReaderTensor) -> np.ndarray:
    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF ne order -> numpy order
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.asarray(t.data, dtype=np.float32).reshape(shape)
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)


@dataclass(frozen=True)
class GgufLora:
    """A GGUF LoRA adapter as stored: pairs keyed by the base GGUF tensor they adapt."""

    path: Path
    architecture: str
    alpha: float  # 0: llama.cpp applies no alpha / r scaling
    pairs: dict[str, tuple[np.ndarray, np.ndarray]]  # "blk.0.attn_q.weight" -> (A [r, in], B [out, r])

    def scale(self, rank: int) -> float:
        return self.alpha / rank if self.alpha != 0 else 1.0


def read_gguf_lora(gguf_path: Path | str) -> GgufLora:
    path = Path(gguf_path)
    info = validate_gguf(path, expect_type="adapter")
    reader = gguf.GGUFReader(path)
    field = reader.fields.get(gguf.Keys.Adapter.LORA_ALPHA)
    alpha = float(field.contents()) if field is not None else 0.0
    tensors = {t.name: t for t in reader.tensors}
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in tensors:
        if not name.endswith(".lora_a"):
            if not name.endswith(".lora_b"):
                raise AdapterError(f"GGUF adapter {path.name} holds {name}, which is not a LoRA tensor",
                                   fix="give a GGUF LoRA adapter")
            continue
        target = name[:-len(".lora_a")]
        if target + ".lora_b" not in tensors:
            raise AdapterError(f"GGUF adapter {path.name} has {name} but not {target}.lora_b",
                               fix="re-convert the adapter")
        a, b = _tensor(tensors[name]), _tensor(tensors[target + ".lora_b"])
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"GGUF adapter {path.name}: {target} lora_a {list(a.shape)} and lora_b "
                               f"{list(b.shape)} do not form B @ A", fix="re-convert the adapter")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise AdapterError(f"GGUF adapter {path.name}: {target} has NaN/inf values", fix="re-convert the adapter")
        pairs[target] = (a, b)
    if not pairs:
        raise AdapterError(f"GGUF adapter {path.name} holds no LoRA tensors", fix="give a GGUF LoRA adapter")
    return GgufLora(path, info.architecture or "", alpha, pairs)


def adapter_from_pairs(path: Path, deltas: dict[str, LoraDelta], alpha: float) -> PeftAdapter:
    """A PeftAdapter over ``deltas`` whose config gives every module its scale alpha / r."""
    ranks = Counter(d.rank for d in deltas.values())
    r = ranks.most_common(1)[0][0]
    rank_pattern = {re.escape(d.module): d.rank for d in deltas.values() if d.rank != r}
    lora_alpha = alpha if alpha != 0 else float(r)
    alpha_pattern = {k: float(v) for k, v in rank_pattern.items()} if alpha == 0 else {}
    config = LoraConfig(r=r, lora_alpha=lora_alpha, use_rslora=False, use_dora=False, rank_pattern=rank_pattern,
                        alpha_pattern=alpha_pattern,
                        target_modules=sorted({d.module.rsplit(".", 1)[-1] for d in deltas.values()}),
                        layers_to_transform=None, modules_to_save=[], fan_in_fan_out=False)
    return PeftAdapter(path, config, deltas, {})


def peft_tensors_from_gguf_adapter(gguf_path: Path | str, base: HFCheckpoint | ArchSpec) -> PeftAdapter:
    """The GGUF LoRA adapter at ``gguf_path`` as an in-memory ``PeftAdapter`` (HF module names,
    PEFT's A/B layout and per-module scales) for the base ``base`` (an open checkpoint, or its
    ``ArchSpec``) it was made for. Write it with ``combine.write_peft_adapter``."""
    lora = read_gguf_lora(gguf_path)
    path = lora.path
    spec = base if isinstance(base, ArchSpec) else arch_spec_for(base.config)
    if lora.architecture != spec.gguf_arch_name:
        raise AdapterMismatchError(f"GGUF adapter {path.name} is for {lora.architecture}, the base is "
                                   f"{spec.gguf_arch_name}", fix="give the base the adapter was made for")
    shapes = spec.expected_shapes(separate_head=True)
    hf_for_gguf = {g: n for n in shapes if (g := spec.gguf_name(n)) is not None}
    deltas: dict[str, LoraDelta] = {}
    for target, (a, b) in lora.pairs.items():
        hf_name = hf_for_gguf.get(target)
        if hf_name is None:
            raise AdapterMismatchError(f"GGUF adapter {path.name} adapts {target}, which the base does not have",
                                       fix="give the base the adapter was made for")
        if (b.shape[0], a.shape[1]) != shapes[hf_name]:
            raise AdapterMismatchError(f"GGUF adapter {path.name}: {target} lora_b @ lora_a is "
                                       f"{[b.shape[0], a.shape[1]]}, the base weight is {list(shapes[hf_name])}",
                                       fix="give the base the adapter was made for")
        b = _undo_row_transform(spec, hf_name.removesuffix(".weight"), b)
        deltas[hf_name] = LoraDelta(module=hf_name.removesuffix(".weight"), lora_a=a,
                                    lora_b=np.ascontiguousarray(b), scale=lora.scale(a.shape[0]))
    name = path.name.removesuffix(".gguf").removeprefix("adapter-")
    return adapter_from_pairs(path.with_name(name), deltas, lora.alpha)
