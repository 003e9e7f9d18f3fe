"""PEFT LoRA -> GGUF LoRA adapter that llama.cpp hot-applies (``llama_adapter_lora_init``).

Tensors are ``<base GGUF name>.lora_a`` [r, in] and ``.lora_b`` [out, r] (numpy order; GGUF ne
is the reverse, so base.ne[0] == a.ne[0] and base.ne[1] == b.ne[1] as the loader requires),
stored F32 by default. The PEFT directory's path and hash are recorded
(``peft_export.PEFT_PATH_KEY``/``PEFT_SHA256_KEY``) so an export to vLLM can prefer the original. llama.cpp scales every pair by alpha / r with r read from the tensor
shape, which cannot express rsLoRA or rank/alpha patterns; so we write the config's lora_alpha
and fold ``scale · r / alpha`` into lora_b, making llama.cpp's product exactly PEFT's per-module
scale (the factor is exactly 1 for a plain LoRA). lora_b also gets the base's row transforms
(Llama q/k permutation), as the base weight did in conversion.

``outtype="q8_0"`` (llama.cpp's convert_lora_to_gguf offers it too) halves the file and makes
hot-applied decoding faster on CPU: B's rows are r long, and ggml's F32/F16 dot products run
rows shorter than 64 through a scalar tail loop, while Q8_0 does a 32-wide block in SIMD. Q8_0
rows must be whole blocks, so the rank is zero-padded to a multiple of 32 (exact: zero rows of
A meet zero columns of B), with the padded r in the fold.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from edge_lora.converters.architectures import ArchSpec, arch_spec_for
from edge_lora.converters.checkpoint import HFCheckpoint
from edge_lora.converters.gguf_output import GGMLType, PlannedTensor, StreamingGGUFWriter, encode_rows
from edge_lora.converters.peft import LoraDelta, PeftAdapter
from edge_lora.converters.peft_export import PEFT_PATH_KEY, PEFT_SHA256_KEY, recorded_source
from edge_lora.core.atomic import check_not_an_input, ensure_writable_dir
from edge_lora.core.errors import AdapterError, AdapterMismatchError, InputError
from edge_lora.core.output_dir import ADAPTER_PREFIX
from edge_lora.core.progress import NullProgress, ProgressSink

MERGE_INSTEAD = "merge it with `edge-lora convert BASE --adapter PEFT` instead"


def written_alpha(adapter: PeftAdapter) -> float:
    """The adapter.lora.alpha we write: the config's alpha (0 would make llama.cpp skip scaling)."""
    return adapter.config.lora_alpha if adapter.config.lora_alpha != 0 else 1.0


OUTTYPES: dict[str, GGMLType] = {"f32": GGMLType.F32, "f16": GGMLType.F16, "q8_0": GGMLType.Q8_0}


def gguf_lora_pair(spec: ArchSpec, delta: LoraDelta, alpha: float,
                   rank_multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(lora_a, lora_b) as written: lora_b carries scale·r/alpha and the base's row transform;
    the rank is zero-padded up to a multiple of ``rank_multiple``."""
    rank = -(-delta.rank // rank_multiple) * rank_multiple
    fold = np.float32(delta.scale * rank / alpha)
    lora_b = spec.transform_lora_b(delta.module, delta.lora_b * fold)
    pad = rank - delta.rank
    return (np.pad(np.asarray(delta.lora_a, dtype=np.float32), ((0, pad), (0, 0))),
            np.pad(np.asarray(lora_b, dtype=np.float32), ((0, 0), (0, pad))))


def stored_type(requested: GGMLType, row_length: int) -> GGMLType:
    """Q8_0 needs whole 32-wide blocks; a row that is not falls back to F32 (exact)."""
    block, _ = gguf.GGML_QUANT_SIZES[requested]
    return requested if row_length % block == 0 else GGMLType.F32


def check_expressible(adapter: PeftAdapter) -> None:
    """Refuse what a GGUF LoRA cannot carry (llama.cpp applies W·x + s·B(A·x) only)."""
    if adapter.uses_dora:
        raise AdapterError("DoRA cannot be expressed as a GGUF LoRA adapter", fix=MERGE_INSTEAD)
    if adapter.replacements:
        first = next(iter(adapter.replacements))
        raise AdapterError(
            f"adapter {adapter.name} replaces whole modules (modules_to_save: {first}), which a GGUF LoRA "
            "adapter cannot express", fix=MERGE_INSTEAD)


def convert_adapter_to_gguf(peft_dir: Path | str, base_ckpt_dir: Path | str, out_path: Path | str, *,
                            outtype: str = "f32", progress: ProgressSink = NullProgress()) -> Path:
    """Validate the adapter against the base checkpoint, then write the GGUF LoRA atomically."""
    check_outtype(outtype)
    check_not_an_input(Path(out_path), [peft_dir, base_ckpt_dir])
    adapter = PeftAdapter.open(peft_dir)
    check_expressible(adapter)
    with HFCheckpoint.open(base_ckpt_dir) as ckpt:
        adapter.check_fits(ckpt)
        spec = arch_spec_for(ckpt.config)
    return write_adapter_gguf(adapter, spec, out_path, outtype=outtype, progress=progress)


def check_outtype(outtype: str) -> None:
    """Refuse an adapter outtype we cannot write (before anything is read)."""
    if outtype not in OUTTYPES:
        raise InputError(f"unknown adapter outtype {outtype!r}", fix=f"use one of {', '.join(OUTTYPES)}")


def write_adapter_gguf(adapter: PeftAdapter, spec: ArchSpec, out_path: Path | str, *, outtype: str = "f32",
                       progress: ProgressSink = NullProgress()) -> Path:
    """Write ``adapter`` as a GGUF LoRA for the base ``spec`` describes, atomically. The caller has
    checked it against that base (``PeftAdapter.check_fits``): shapes are not re-checked here."""
    check_outtype(outtype)
    check_expressible(adapter)
    requested = OUTTYPES[outtype]
    rank_multiple = gguf.GGML_QUANT_SIZES[requested][0]
    out_path = Path(out_path)
    ensure_writable_dir(out_path.parent)
    alpha = written_alpha(adapter)

    writer = StreamingGGUFWriter(spec.gguf_arch_name)
    kv = writer.kv
    kv.add_type(gguf.GGUFType.ADAPTER)
    kv.add_name(f"{ADAPTER_PREFIX}{adapter.name}")  # named as its file is (adapter-<name>.gguf)
    kv.add_string(gguf.Keys.Adapter.TYPE, "lora")
    kv.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    # Where the PEFT source is (and its hash), so `export vllm` can hand vLLM the original files.
    source = recorded_source(adapter.path)
    if source is not None:
        kv.add_string(PEFT_PATH_KEY, str(source.path))
        kv.add_string(PEFT_SHA256_KEY, source.sha256)
    # Base order (the order llama.cpp lists the model's tensors), then anything left.
    expected = spec.expected_shapes()
    ordered = [n for n in expected if n in adapter.deltas] + [n for n in adapter.deltas if n not in expected]
    for hf_name in ordered:
        delta = adapter.deltas[hf_name]
        gguf_name = spec.gguf_name(hf_name)
        if gguf_name is None or hf_name not in expected:
            raise AdapterMismatchError(
                f"adapter {adapter.name} adapts {hf_name}, which has no tensor in the {spec.gguf_arch_name} GGUF",
                fix=MERGE_INSTEAD)
        lora_a, lora_b = gguf_lora_pair(spec, delta, alpha, rank_multiple)
        for suffix, array in ((".lora_a", lora_a), (".lora_b", lora_b)):
            ggml_type = stored_type(requested, array.shape[-1])
            writer.add_tensor(PlannedTensor(name=gguf_name + suffix, shape=array.shape, ggml_type=ggml_type,
                                            blocks=lambda a=array, t=ggml_type: [encode_rows(a, t)]))
    return writer.write(out_path, progress)
