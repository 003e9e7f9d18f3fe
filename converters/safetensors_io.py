"""Strict, memory-mapped safetensors reading (and a small writer for tests and tools).

Model files are untrusted. The header is validated the way the official parser does it
(REFERENCE.md "Untrusted files"): u64 header length within the file and <= 100 MB, a JSON
object, known dtypes, shape product x itemsize == byte span, offsets in range, no overlap,
and the tensors cover the data buffer exactly. Reads go through an mmap, so reading a row
block touches only those pages: peak RSS does not grow with the checkpoint's size.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from edge_lora.core.bounded_json import JsonKind, loads_json
from edge_lora.core.errors import InputNotFoundError, InvalidCheckpointError

MAX_HEADER_BYTES = 100 * 1000 * 1000  # the official parser's cap
HEADER_LENGTH_BYTES = 8

# dtype name -> (numpy dtype as stored, itemsize). BF16 is stored as raw u16 and widened on read.
STORED_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
}
_NUMPY_TO_NAME: dict[np.dtype, str] = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16"}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # "F32" | "F16" | "BF16"
    shape: tuple[int, ...]
    begin: int  # offset inside the data buffer
    end: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def n_rows(self) -> int:
        """Rows for row-block reads: the first dimension (1 for a scalar)."""
        return self.shape[0] if self.shape else 1


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 is the top half of an f32: shift the raw u16 into the high bits (exact)."""
    wide = bits.astype(np.uint32)  # a fresh, writable array: shifted in place
    wide <<= 16
    return wide.view(np.float32)


def _bad(path: Path, what: str) -> InvalidCheckpointError:
    return InvalidCheckpointError(f"{path} is not a valid safetensors file: {what}",
                                  fix="re-download or re-export the checkpoint")


def _parse_header(path: Path, raw: bytes, data_bytes: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    try:
        header = loads_json(raw, JsonKind.SAFETENSORS_HEADER, "the header")
    except InvalidCheckpointError as exc:
        raise _bad(path, exc.message) from exc
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    metadata: dict[str, str] = {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise _bad(path, "__metadata__ must map strings to strings")
            metadata = dict(entry)
            continue
        if not isinstance(entry, dict):
            raise _bad(path, f"entry for tensor {name!r} is not an object")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise _bad(path, f"tensor {name!r} has no dtype")
        if dtype not in STORED_DTYPES:
            raise InvalidCheckpointError(
                f"{path}: tensor {name!r} has dtype {dtype}, which edge-lora cannot convert "
                f"(supported: {', '.join(STORED_DTYPES)})",
                fix="save the checkpoint in float32, float16 or bfloat16")
        if (not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise _bad(path, f"tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
            raise _bad(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if begin > end or end > data_bytes:
            raise _bad(path, f"tensor {name!r} data_offsets {offsets} are outside the "
                             f"{data_bytes}-byte data buffer (file truncated?)")
        # Python ints: a hostile shape cannot wrap around.
        if math.prod(shape) * STORED_DTYPES[dtype][1] != end - begin:
            raise _bad(path, f"tensor {name!r} shape {shape} x {dtype} does not match its "
                             f"{end - begin}-byte span")
        tensors[name] = TensorInfo(dtype, tuple(shape), begin, end)
    # Non-overlapping and covering the buffer exactly: sorted spans must tile [0, data_bytes).
    cursor = 0
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != cursor:
            what = "overlaps another tensor" if info.begin < cursor else "leaves a gap before it"
            raise _bad(path, f"tensor {name!r} {what} (offset {info.begin}, expected {cursor})")
        cursor = info.end
    if cursor != data_bytes:
        raise _bad(path, f"tensors cover {cursor} bytes but the data buffer holds {data_bytes}")
    return tensors, metadata


class SafetensorsFile:
    """One .safetensors file, mmapped, header validated on open."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
        except FileNotFoundError as exc:
            raise InputNotFoundError(f"safetensors file {self.path} does not exist",
                                     fix="check the checkpoint directory") from exc
        except OSError as exc:
            raise InvalidCheckpointError(f"cannot read {self.path}: {exc.strerror or exc}",
                                         fix="check the file's permissions") from exc
        try:
            size = self.path.stat().st_size
            if size < HEADER_LENGTH_BYTES:
                raise _bad(self.path, f"only {size} bytes (truncated)")
            (header_len,) = struct.unpack("<Q", self._fh.read(HEADER_LENGTH_BYTES))
            if header_len > MAX_HEADER_BYTES:
                raise _bad(self.path, f"header length {header_len} exceeds the 100 MB limit")
            if HEADER_LENGTH_BYTES + header_len > size:
                raise _bad(self.path, f"header length {header_len} runs past the end of the "
                                      f"{size}-byte file (truncated?)")
            raw = self._fh.read(header_len)
            self._data_start = HEADER_LENGTH_BYTES + header_len
            self._tensors, self.metadata = _parse_header(self.path, raw, size - self._data_start)
            self._mmap: mmap.mmap | None = (
                mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None)
        except BaseException:
            self._fh.close()
            raise

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise InvalidCheckpointError(f"tensor {name!r} is not in {self.path}",
                                         fix="check the checkpoint is complete") from None

    def read_raw(self, name: str, rows: slice | None = None) -> np.ndarray:
        """The stored values (bf16 as raw u16) as a read-only view into the mmap."""
        info = self.info(name)
        stored, itemsize = STORED_DTYPES[info.dtype]
        n_rows = info.n_rows
        row_elems = info.n_elements // n_rows if n_rows else 0
        start, stop, step = (rows or slice(None)).indices(n_rows)
        if step != 1:
            raise ValueError("row slices must be contiguous")
        stop = max(start, stop)
        assert self._mmap is not None or info.n_elements == 0
        offset = self._data_start + info.begin + start * row_elems * itemsize
        count = (stop - start) * row_elems
        if count == 0:
            flat = np.empty(0, dtype=stored)
        else:
            flat = np.frombuffer(self._mmap, dtype=stored, count=count, offset=offset)  # type: ignore[arg-type]
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        return flat.reshape(shape)

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """A row block as an array: float32 for BF16 (exact widening), native f16/f32 otherwise.
        The f16/f32 result is a read-only view; copy before modifying."""
        raw = self.read_raw(name, rows)
        if self._tensors[name].dtype == "BF16":
            return bf16_bits_to_f32(raw)
        return raw

    def release(self, name: str, rows: slice | None = None) -> None:
        """Drop the mmap pages of a row block already read (and copied) from this process's
        resident set. Touched file pages otherwise count towards RSS until unmapped, so a
        streaming pass over a 500 MB checkpoint would end with 500 MB resident. The kernel's
        page cache keeps the data; only our mapping of it goes."""
        info = self.info(name)
        if self._mmap is None or not hasattr(self._mmap, "madvise") or info.n_elements == 0:
            return
        itemsize = STORED_DTYPES[info.dtype][1]
        row_bytes = (info.n_elements // info.n_rows) * itemsize
        start, stop, _ = (rows or slice(None)).indices(info.n_rows)
        begin = self._data_start + info.begin + start * row_bytes
        end = self._data_start + info.begin + max(start, stop) * row_bytes
        page = mmap.PAGESIZE
        # Whole pages strictly inside the block: never drop a neighbour's page that is in use.
        first, last = -(-begin // page) * page, (end // page) * page
        if last > first:
            self._mmap.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                # A caller still holds a view; the mapping is released when it is collected.
                pass
            self._mmap = None
        self._fh.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bf16 bit patterns (as torch does); NaN stays NaN."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 64).astype(np.uint16)
    return rounded


def write_safetensors(path: Path | str, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None, *, bf16: bool = False) -> Path:
    """Write tensors (f32/f16; with ``bf16=True`` float32 arrays are stored as BF16).
    For tests and tools; not used on the conversion path."""
    path = Path(path)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    blobs: list[bytes] = []
    offset = 0
    for name, array in tensors.items():
        array = np.asarray(array)
        if bf16 and array.dtype == np.float32:
            blob, dtype = f32_to_bf16_bits(array).tobytes(), "BF16"
        else:
            dtype_name = _NUMPY_TO_NAME.get(array.dtype.newbyteorder("<"))
            if dtype_name is None:
                raise ValueError(f"cannot store dtype {array.dtype} for {name!r}")
            blob, dtype = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes(), dtype_name
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # 8-byte aligned data start, as the reference writer pads
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for blob in blobs:
            fh.write(blob)
    return path
