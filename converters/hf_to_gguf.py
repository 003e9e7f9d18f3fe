"""HF checkpoint -> F16/BF16/F32 GGUF, streamed row block by row block, with an optional
merge hook (a ``TensorMerger``, implemented by the PEFT merge code) applied before the
architecture transforms, i.e. in HF space where the adapter's deltas live."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import gguf
import numpy as np

from edge_lora.converters.architectures import LM_HEAD, ArchSpec, arch_spec_for
from edge_lora.converters.checkpoint import HFCheckpoint, checkpoint_name
from edge_lora.converters.gguf_output import GGMLType, PlannedTensor, StreamingGGUFWriter, encode_rows
from edge_lora.converters.tokenizer_export import add_tokenizer, check_name_rules, read_tokenizer
from edge_lora.core.atomic import ensure_writable_dir
from edge_lora.core.errors import InputError, InternalError, InvalidCheckpointError
from edge_lora.core.formats import BY_NAME, Format
from edge_lora.core.progress import NullProgress, ProgressSink

# Rows per block are chosen so a float32 block stays near this size: small enough that peak
# RSS does not depend on the model, large enough that numpy overhead is negligible.
BLOCK_ELEMENTS = 1024 * 1024

# outtype -> how tensors are stored; the file's format is the row of the same name (f16 -> F16).
OUTTYPES: dict[str, GGMLType] = {"f16": GGMLType.F16, "bf16": GGMLType.BF16, "f32": GGMLType.F32}


class TensorMerger(Protocol):
    """What the converter asks of an adapter while streaming the base weights."""

    def check_fits(self, ckpt: HFCheckpoint) -> None:
        """Raise (naming the first misfit) unless every change the adapter makes lands in a
        tensor converted from ``ckpt``: a change to a tensor that is not written would be lost."""
        ...

    def merge_rows(self, hf_name: str, rows: np.ndarray, row_slice: slice) -> np.ndarray:
        """Return the merged float32 rows ``row_slice`` of HF tensor ``hf_name`` (``rows`` is
        the base's float32 block, HF layout); return ``rows`` unchanged for untouched tensors."""
        ...

    def extra_tensors(self) -> Mapping[str, np.ndarray]:
        """HF-named full tensors the adapter adds or replaces outright (``modules_to_save``).
        They take precedence over the base checkpoint's tensor of the same name; an
        ``lm_head.weight`` here unties the embeddings."""
        ...


def _row_blocks(n_rows: int, row_len: int, granularity: int) -> Iterator[slice]:
    per_block = max(granularity, (BLOCK_ELEMENTS // max(row_len, 1)) // granularity * granularity)
    for start in range(0, n_rows, per_block):
        yield slice(start, min(n_rows, start + per_block))


class _TensorSource:
    """Where one HF tensor's rows come from: the checkpoint (mmap) or an adapter's full tensor."""

    def __init__(self, ckpt: HFCheckpoint, extras: Mapping[str, np.ndarray]) -> None:
        self.ckpt = ckpt
        self.extras = extras

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name in self.extras:
            return tuple(np.shape(self.extras[name]))
        if self.ckpt.has_tensor(name):
            return self.ckpt.tensor_info(name).shape
        return None

    def read_f32(self, name: str, rows: slice) -> np.ndarray:
        if name in self.extras:
            return np.asarray(self.extras[name], dtype=np.float32)[rows].copy()
        # Transforms may work in place: the view of the mmap that f16/f32 storage reads as is
        # copied; bf16 is widened into a fresh array already. Once read, the mapped pages are released so
        # RSS stays at about one block.
        block = self.ckpt.read(name, rows)
        if self.ckpt.tensor_info(name).dtype != "BF16":
            block = block.astype(np.float32, copy=True)
        self.ckpt.release(name, rows)
        return block


def _check_tensors(spec: ArchSpec, source: _TensorSource, ckpt: HFCheckpoint,
                   extras: Mapping[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor the architecture needs is present with the right shape; nothing unknown
    is silently dropped. Returns (hf_name, shape) in writing order."""
    expected = spec.expected_shapes(separate_head=LM_HEAD in extras)
    for name, shape in expected.items():
        got = source.shape(name)
        if got is None:
            raise InvalidCheckpointError(
                f"checkpoint {ckpt.path} has no tensor {name!r}, which {spec.entry.hf_architecture} "
                f"with this config.json needs", fix="the checkpoint is incomplete or its config.json does not match it")
        if got != shape:
            raise InvalidCheckpointError(
                f"tensor {name!r} has shape {list(got)}, config.json implies {list(shape)}",
                fix="the checkpoint's config.json does not match its weights")
    unknown = [n for n in list(ckpt.tensor_names()) + list(extras)
               if n not in expected and not spec.is_ignored(n)]
    if unknown:
        raise InvalidCheckpointError(
            f"checkpoint has {len(unknown)} tensor(s) {spec.entry.hf_architecture} does not use, e.g. {unknown[0]!r}",
            fix="check the architecture in config.json matches the weights")
    return list(expected.items())


_F16_EXPONENT = np.uint16(0x7C00)


def _all_finite(values: np.ndarray) -> bool:
    """No NaN or inf. For F16 the stored values are checked (a finite f32 beyond the F16 range
    became inf) by their exponent bits: numpy's isfinite on float16 costs five times as much."""
    if values.dtype == np.float16:
        return not ((values.view(np.uint16) & _F16_EXPONENT) == _F16_EXPONENT).any()
    return bool(np.isfinite(values).all())


def _plan_tensor(spec: ArchSpec, source: _TensorSource, hf_name: str, shape: tuple[int, ...],
                 outtype: GGMLType, adapter: TensorMerger | None) -> PlannedTensor:
    gguf_name = spec.gguf_name(hf_name)
    if gguf_name is None:
        raise InternalError(f"no GGUF name for {hf_name} in the {spec.gguf_arch_name} table")
    # llama.cpp keeps 1-D tensors (norms, biases) in F32: they are tiny and precision-sensitive.
    ggml_type = GGMLType.F32 if len(shape) < 2 else outtype
    n_rows = shape[0] if shape else 1
    row_len = int(np.prod(shape[1:])) if len(shape) > 1 else 1

    def blocks() -> Iterator[np.ndarray]:
        for rows in _row_blocks(n_rows, row_len, spec.row_granularity(hf_name)):
            block = source.read_f32(hf_name, rows)
            if adapter is not None:
                block = np.asarray(adapter.merge_rows(hf_name, block, rows), dtype=np.float32)
            block = spec.transform(hf_name, block)
            encoded = encode_rows(block, ggml_type)
            if not _all_finite(encoded if ggml_type == GGMLType.F16 else block):
                raise InputError(
                    f"tensor {hf_name!r} has NaN/inf values (or values outside the {ggml_type.name} range)",
                    fix="check the checkpoint; try --outtype bf16 or f32 if values exceed the f16 range")
            yield encoded

    return PlannedTensor(name=gguf_name, shape=shape, ggml_type=ggml_type, blocks=blocks)


def convert_checkpoint(ckpt_dir: Path | str, out_path: Path | str, *, outtype: str = "f16",
                       adapter: TensorMerger | None = None, name: str | None = None,
                       progress: ProgressSink = NullProgress()) -> Path:
    """Convert the HF checkpoint in ``ckpt_dir`` to a GGUF at ``out_path`` (written atomically).
    With ``adapter``, every weight passes through ``adapter.merge_rows`` first."""
    with HFCheckpoint.open(ckpt_dir) as ckpt:
        return write_checkpoint_gguf(ckpt, out_path, outtype=outtype, adapter=adapter, name=name,
                                     progress=progress)


def check_outtype(outtype: str) -> Format:
    """Refuse an outtype convert cannot write (before anything is read); its format otherwise."""
    if outtype not in OUTTYPES:
        raise InputError(f"unknown outtype {outtype!r}", fix=f"use one of {', '.join(OUTTYPES)}")
    return BY_NAME[outtype.upper()]


def write_checkpoint_gguf(ckpt: HFCheckpoint, out_path: Path | str, *, outtype: str = "f16",
                          adapter: TensorMerger | None = None, name: str | None = None,
                          progress: ProgressSink = NullProgress()) -> Path:
    """``convert_checkpoint`` for a checkpoint the caller already holds open."""
    file_format = check_outtype(outtype)
    out_path = Path(out_path)
    ensure_writable_dir(out_path.parent)
    spec = arch_spec_for(ckpt.config)
    if adapter is not None:
        adapter.check_fits(ckpt)
    extras = dict(adapter.extra_tensors()) if adapter is not None else {}
    source = _TensorSource(ckpt, extras)
    ordered = _check_tensors(spec, source, ckpt, extras)
    tokenizer = read_tokenizer(ckpt.path, ckpt.config)
    display_name = name or ckpt.name
    check_name_rules(display_name, tokenizer)

    writer = StreamingGGUFWriter(spec.gguf_arch_name)
    kv = writer.kv
    kv.add_type(gguf.GGUFType.MODEL)
    kv.add_name(display_name)
    kv.add_basename(display_name)
    kv.add_file_type(int(file_format.file_type))
    kv.add_quantization_version(gguf.GGML_QUANT_VERSION)
    metadata, extra_gguf_tensors = spec.metadata()
    writer.add_metadata(metadata)
    add_tokenizer(kv, tokenizer)
    del tokenizer  # the writer holds the vocabulary now, and lets it go once it is written

    for hf_name, shape in ordered:
        writer.add_tensor(_plan_tensor(spec, source, hf_name, shape, OUTTYPES[outtype], adapter))
    for gguf_name, values in extra_gguf_tensors.items():
        writer.add_tensor(PlannedTensor(name=gguf_name, shape=values.shape, ggml_type=GGMLType.F32,
                                        blocks=lambda v=values: [np.ascontiguousarray(v, dtype=np.float32)]))
    return writer.write(out_path, progress, prove_loads=True)


def output_file_name(name: str, outtype: str) -> str:
    """``<name>-F16.gguf`` (``-BF16`` / ``-F32`` for other outtypes), per DESIGN.md."""
    return check_outtype(outtype).file_name(name)


def model_name_for(ref: str, ckpt_dir: Path) -> str:
    """The output name: the repo's name for a repo id ("google/gemma-3-270m" -> "gemma-3-270m"),
    else the checkpoint directory's name."""
    if not Path(ref).expanduser().exists() and ref.count("/") <= 1:
        return ref.rstrip("/").split("/")[-1]
    return checkpoint_name(ckpt_dir)
