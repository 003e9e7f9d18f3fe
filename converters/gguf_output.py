"""Streaming GGUF writing: header, metadata and tensor infos first, then each tensor's data
row block by row block, so peak memory is one block, not the model.

gguf-py's ``GGUFWriter`` packs the header/KV/tensor-info part (it only needs each tensor's
shape, type and byte size up front); the data part is written here from producer callables.
The writer knows nothing about architectures: callers hand it keys, values and row blocks.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np
from gguf.gguf_writer import WriterState

from edge_lora.converters.safetensors_io import f32_to_bf16_bits
from edge_lora.core.atomic import atomic_file, check_free_space
from edge_lora.core.errors import InternalError, InvalidCheckpointError, InvalidGGUFError
from edge_lora.core.gguf_check import FileIdentity, validate_gguf
from edge_lora.core.progress import NullProgress, ProgressSink

GGMLType = gguf.GGMLQuantizationType

def encode_rows(rows_f32: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    """A float32 row block in the stored representation of ``ggml_type``."""
    if ggml_type == GGMLType.F32:
        return np.ascontiguousarray(rows_f32, dtype=np.float32)
    if ggml_type == GGMLType.F16:
        with np.errstate(over="ignore"):  # values beyond the F16 range become inf, refused by the caller
            return np.ascontiguousarray(rows_f32, dtype=np.float16)
    if ggml_type == GGMLType.BF16:
        return f32_to_bf16_bits(rows_f32)
    if ggml_type == GGMLType.Q8_0:
        return gguf.quants.quantize(np.ascontiguousarray(rows_f32, dtype=np.float32), ggml_type)
    raise InternalError(f"gguf_output cannot encode {ggml_type.name}")


RowBlocks = Callable[[], Iterable[np.ndarray]]

VT = gguf.GGUFValueType
_NUMPY_ARRAY_TYPES: dict[gguf.GGUFValueType, str] = {
    VT.UINT8: "<u1", VT.INT8: "<i1", VT.UINT16: "<u2", VT.INT16: "<i2", VT.UINT32: "<u4", VT.INT32: "<i4",
    VT.FLOAT32: "<f4", VT.UINT64: "<u8", VT.INT64: "<i8", VT.FLOAT64: "<f8", VT.BOOL: "?",
}
_FAST_ARRAY_MIN = 1024
_STRING_SLICE = 4096
_pack_length = struct.Struct("<Q").pack


class FastKVWriter(gguf.GGUFWriter):
    """gguf-py's writer, packing long homogeneous metadata arrays (a 262,144-token vocabulary:
    tokens, scores, types) in bulk instead of one struct.pack per element, which took ~8 s
    for Gemma 3. Produces the same bytes; anything unusual falls back to gguf-py."""

    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool,
                  sub_type: gguf.GGUFValueType | None = None) -> bytes:
        if (vtype != VT.ARRAY or self.endianess != gguf.GGUFEndian.LITTLE or isinstance(val, (bytes, str))
                or not isinstance(val, (list, tuple)) or len(val) < _FAST_ARRAY_MIN):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        first_type = type(val[0])
        if not all(type(item) is first_type for item in val):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        item_type = sub_type if sub_type is not None else VT.get_type(val[0])
        head = (struct.pack("<I", VT.ARRAY) if add_vtype else b"") + struct.pack("<IQ", item_type, len(val))
        if item_type in _NUMPY_ARRAY_TYPES:
            return head + np.asarray(val, dtype=_NUMPY_ARRAY_TYPES[item_type]).tobytes()
        if item_type == VT.STRING and first_type in (str, bytes):
            # A slice at a time: whole-array lists of encoded pieces were ~25 MB of transient
            # bytes objects for a 262,144-token vocabulary, at the top of convert's peak RSS.
            chunks = [head]
            for start in range(0, len(val), _STRING_SLICE):
                encoded = (v.encode("utf-8") if isinstance(v, str) else v for v in val[start:start + _STRING_SLICE])
                chunks.append(b"".join([_pack_length(len(e)) + e for e in encoded]))
            return b"".join(chunks)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


VT = gguf.GGUFValueType
_INT_RANGES: dict[gguf.GGUFValueType, tuple[int, int]] = {
    VT.UINT8: (0, 2**8 - 1), VT.INT8: (-2**7, 2**7 - 1), VT.UINT16: (0, 2**16 - 1), VT.INT16: (-2**15, 2**15 - 1),
    VT.UINT32: (0, 2**32 - 1), VT.INT32: (-2**31, 2**31 - 1), VT.UINT64: (0, 2**64 - 1), VT.INT64: (-2**63, 2**63 - 1),
}


def _check_int_range(key: str, value: Any, vtype: gguf.GGUFValueType) -> None:
    # Metadata values come from config.json; struct.pack would fail mid-write on e.g.
    # max_position_embeddings = 1e30 for a u32 field.
    bounds = _INT_RANGES.get(vtype)
    if bounds is not None and isinstance(value, int) and not bounds[0] <= value <= bounds[1]:
        raise InvalidCheckpointError(f"config.json gives GGUF key {key} the value {value}, outside the "
                                     f"{vtype.name} range", fix="fix or re-download config.json")


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # numpy order: rows first (GGUF ne order is the reverse)
    ggml_type: GGMLType
    blocks: RowBlocks  # yields encoded row blocks, in order, covering the tensor exactly

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_bytes(self) -> int:
        block, block_bytes = gguf.GGML_QUANT_SIZES[self.ggml_type]
        return self.n_elements // block * block_bytes


def write_block(fh: BinaryIO, block: np.ndarray) -> None:
    """One row block to the file (a seam tests patch to simulate a full disk)."""
    fh.write(memoryview(np.ascontiguousarray(block)).cast("B"))


class StreamingGGUFWriter:
    """Collect metadata and tensor plans, then ``write(path)`` atomically."""

    def __init__(self, arch: str) -> None:
        # path=None: nothing is opened until write(); the KV/tensor-info API is gguf-py's.
        self.kv = FastKVWriter(path=None, arch=arch)
        self.tensors: list[PlannedTensor] = []
        self.metadata_released = False

    def add_metadata(self, items: Iterable[tuple[str, Any, gguf.GGUFValueType]]) -> None:
        for key, value, vtype in items:
            _check_int_range(key, value, vtype)
            self.kv.add_key_value(key, value, vtype)

    def add_tensor(self, tensor: PlannedTensor) -> None:
        if any(t.name == tensor.name for t in self.tensors):
            raise InternalError(f"tensor {tensor.name} planned twice")
        self.tensors.append(tensor)
        # dtype is a placeholder: raw_dtype carries the real type, shape is taken as given.
        self.kv.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.n_bytes,
                                raw_dtype=tensor.ggml_type)

    @property
    def tensor_data_bytes(self) -> int:
        align = self.kv.data_alignment
        return sum(-(-t.n_bytes // align) * align for t in self.tensors)

    def write(self, final: Path, progress: ProgressSink = NullProgress(), *, prove_loads: bool = False) -> Path:
        """Write atomically. ``prove_loads``: before publishing, load the written model in
        llama.cpp (in a child process); a file llama.cpp refuses or aborts on never reaches
        ``final``."""
        final = Path(final)
        if self.metadata_released:
            raise InternalError("a StreamingGGUFWriter writes one file")
        check_free_space(final.parent, self.tensor_data_bytes)
        expected = {t.name: t.n_bytes for t in self.tensors}
        check = _LoadCheck(final) if prove_loads else None

        def validate(path: Path) -> None:
            _validate_written(path, expected)
            if check is not None:
                check.verdict(path, progress)

        with atomic_file(final, validate=validate) as fh:
            self._write_to(fh, progress, check)
        if check is not None and check.proven is not None:
            # The rename set the ctime (part of FileIdentity): the proof follows the file.
            from edge_lora.converters.load_check import remember_renamed
            remember_renamed(check.proven, FileIdentity.of(final.stat()))
        return final

    def _write_to(self, fh: BinaryIO, progress: ProgressSink, check: _LoadCheck | None = None) -> None:
        writer = self.kv
        # gguf-py would open the path itself (following a symlink planted there); it writes to
        # the descriptor atomic_file created exclusively instead, and never closes it.
        writer.fout = [fh]
        writer.state = WriterState.EMPTY
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            # The metadata is on disk: let its Python form go (a 262,144-token vocabulary is
            # ~55 MB of str objects), so neither the tensor streaming nor the load-check child,
            # which runs beside this process, has it on top. A writer writes once.
            writer.kv_data = [{} for _ in writer.kv_data]
            self.metadata_released = True
            align = writer.data_alignment
            fh.write(b"\0" * (-fh.tell() % align))
            if check is not None:
                # The file at its final size (the data region a hole until written): what the
                # no_alloc load reads, header, metadata and tensor table, is final already.
                fh.flush()
                os.ftruncate(fh.fileno(), fh.tell() + self.tensor_data_bytes)
                check.start(fh.fileno())
            progress.start("writing GGUF", total=sum(t.n_bytes for t in self.tensors))
            for tensor in self.tensors:
                written = 0
                for block in tensor.blocks():
                    write_block(fh, block)
                    written += block.nbytes
                    progress.advance(block.nbytes, description=tensor.name)
                if written != tensor.n_bytes:
                    raise InternalError(f"tensor {tensor.name}: wrote {written} bytes, planned {tensor.n_bytes}")
                fh.write(b"\0" * (-written % align))
            progress.finish()
            fh.flush()
        finally:
            writer.fout = None
            if check is not None:
                check.join()  # the child has the descriptor: before atomic_file closes it


LOAD_CHECK_FIX = ("nothing was written; the checkpoint (config.json or tokenizer) converts to a file "
                  "llama.cpp cannot use — fix it, or report the conversion as a bug")


class _LoadCheck:
    """The proof that llama.cpp loads the file being written: the whole model (hyperparameters,
    vocabulary, tensor table, a context) rather than ``vocab_only``, whose load skips the
    hyperparameter and tensor-shape checks. llama.cpp's ``no_alloc`` load reads no weight, so
    it runs in a child beside the tensor streaming, from the moment the tensor table is
    written (where /proc/self/fd is missing, after the write). The pass is remembered by the
    file's identity (carried over the publishing rename by ``write``), so the first `run` of it
    does not load it again."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.proven: FileIdentity | None = None  # the written file's identity, once it passed

    def start(self, fd: int) -> None:
        from edge_lora.converters.load_check import proc_fd_path

        if proc_fd_path(fd) is None:
            return
        self.thread = threading.Thread(target=self._run, args=(fd,), name="gguf-load-check", daemon=True)
        self.thread.start()

    def _run(self, fd: int) -> None:
        from edge_lora.converters.load_check import check_loads

        try:
            check_loads(self.final, depth="model", fd=fd, fix=LOAD_CHECK_FIX)
        except BaseException as exc:  # noqa: BLE001 — handed to the writing thread by verdict()
            self.error = exc

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()

    def verdict(self, path: Path, progress: ProgressSink) -> None:
        """Raise what the check found (running it now if it could not run beside the write);
        on a pass, remember the written file as proven."""
        from edge_lora.converters.load_check import check_loads, remember_proven

        identity = FileIdentity.of(path.stat())
        if self.thread is None:
            progress.start("checking that llama.cpp loads it", total=None)
            try:
                check_loads(path, depth="model", fix=LOAD_CHECK_FIX)
            except InvalidGGUFError as exc:
                raise _as_converted(exc, str(path), self.final) from None
            finally:
                progress.finish()
        elif isinstance(self.error, InvalidGGUFError):
            raise _as_converted(self.error, str(self.final), self.final) from None
        elif self.error is not None:
            raise self.error
        remember_proven(identity, "model")
        self.proven = identity


def _as_converted(exc: InvalidGGUFError, named: str, final: Path) -> InvalidGGUFError:
    return InvalidGGUFError(exc.message.replace(named, final.name + " (as converted)"), fix=exc.fix)


def _validate_written(path: Path, expected: dict[str, int]) -> None:
    """Re-read the header we wrote (bounds-checked) and compare it with the plan."""
    info = validate_gguf(path)
    got = {t.name: t.n_bytes for t in info.tensors}
    if got != expected:
        raise InternalError(f"the written file {path} does not match what was planned",
                            fix="report this as a bug")
