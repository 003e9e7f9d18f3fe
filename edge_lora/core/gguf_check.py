"""Bounds-checked GGUF header pre-parse.

Model files are untrusted: llama.cpp's and gguf-py's parsers have a history of overflows and
runaway allocations on hostile headers (REFERENCE.md "Untrusted files"). Every file goes
through ``validate_gguf`` before ``GGUFReader`` or llama.cpp sees it. The parser only ever
reads what the file holds: every count is bounded by the bytes left, every size is computed in
Python ints, and large arrays (token lists) are skipped with bounds rather than materialised.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import gguf
import numpy as np

from edge_lora.core.errors import AdapterError, AdapterMismatchError, InputError, InputNotFoundError, InvalidGGUFError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 1024
INT32_MAX = 2**31 - 1
GGML_MAX_NAME = 64  # ggml tensor names are char[64], NUL included
# No real tensor comes near 2**48 elements; a larger product is a hostile header.
MAX_TENSOR_ELEMENTS = 1 << 48
# Arrays up to this length are kept in GGUFInfo.metadata; longer ones are summarised. Numeric
# arrays are kept up to one entry per layer, so per-layer hyperparameters can be checked.
MAX_KEPT_ARRAY_LEN = 64
MAX_KEPT_NUMERIC_ARRAY_LEN = LLAMA_MAX_LAYERS
BYTE_TOKEN_LEN = len("<0x0A>")
# Smallest possible records, used to bound counts against the bytes left.
MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, 1-byte key, value type, 1-byte value
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, n_dims, 1 dim, type, offset

VT = gguf.GGUFValueType
# Fixed-size scalar value types: (struct format, byte size).
_SCALAR_FORMATS: dict[int, tuple[str, int]] = {
    VT.UINT8: ("<B", 1), VT.INT8: ("<b", 1), VT.UINT16: ("<H", 2), VT.INT16: ("<h", 2),
    VT.UINT32: ("<I", 4), VT.INT32: ("<i", 4), VT.FLOAT32: ("<f", 4), VT.BOOL: ("<?", 1),
    VT.UINT64: ("<Q", 8), VT.INT64: ("<q", 8), VT.FLOAT64: ("<d", 8),
}

GGUFKind = Literal["model", "adapter"]


@dataclass(frozen=True)
class ArraySummary:
    """Stands in for a metadata array too long to keep (e.g. 262,144 vocabulary strings)."""

    element_type: str
    count: int
    # Raw bytes of the strings of at most BYTE_TOKEN_LEN bytes (a vocabulary's byte tokens).
    short_strings: frozenset[bytes] = field(default=frozenset(), compare=False, repr=False)


MetadataValue = int | float | bool | str | list | ArraySummary


class TensorRecord(NamedTuple):
    """(name, shape, type_name, n_bytes, offset): unpacks like a tuple, reads like a record."""

    name: str
    shape: tuple[int, ...]  # GGUF ne order: ne[0] is the row length
    type_name: str  # gguf.GGMLQuantizationType name, e.g. "Q4_K"
    n_bytes: int
    offset: int  # absolute byte offset of the data in the file


class FileIdentity(NamedTuple):
    """What names one version of one file: a file replaced (os.replace, a new download) or
    rewritten in place has another identity. ctime too: a rewrite in place can restore the
    mtime (``touch -d``, ``os.utime``), but any write or utime call sets the ctime to now."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def same_content_as(self, other: FileIdentity) -> bool:
        """Everything but the ctime matches: ``other`` is this file renamed (a rename sets the
        ctime), not rewritten."""
        return self[:4] == other[:4]


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    version: int
    architecture: str | None
    general_type: str | None
    file_type: int | None
    metadata: dict[str, MetadataValue]
    tensors: list[TensorRecord]
    tensor_data_bytes: int
    file_bytes: int
    alignment: int = DEFAULT_ALIGNMENT
    identity: FileIdentity | None = None  # of the file as it was parsed
    _by_name: dict[str, TensorRecord] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name.update({t.name: t for t in self.tensors})

    def tensor(self, name: str) -> TensorRecord | None:
        return self._by_name.get(name)

    def array_length(self, key: str) -> int | None:
        value = self.metadata.get(key)
        if isinstance(value, ArraySummary):
            return value.count
        if isinstance(value, list):
            return len(value)
        return None


class _Cursor:
    """Little-endian reader over a buffer where every read is checked against the end."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.end = len(buf)
        self.path = path

    def fail(self, what: str) -> InvalidGGUFError:
        return InvalidGGUFError(f"{self.path} is not a valid GGUF file: {what}",
                                fix="re-download or re-convert the file; it is corrupt, truncated or hostile")

    def remaining(self) -> int:
        return self.end - self.pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.end - self.pos:
            raise self.fail(f"{what} runs past the end of the file (offset {self.pos})")

    def scalar(self, fmt: str, size: int, what: str) -> int | float | bool:
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def u32(self, what: str) -> int:
        return int(self.scalar("<I", 4, what))

    def u64(self, what: str) -> int:
        return int(self.scalar("<Q", 8, what))

    def string_bytes(self, what: str) -> bytes:
        length = self.u64(f"{what} length")
        self.need(length, f"{what} ({length} bytes)")
        data = bytes(self.buf[self.pos:self.pos + length])
        self.pos += length
        return data

    def string(self, what: str) -> str:
        return self.string_bytes(what).decode("utf-8", errors="replace")

    def skip_string(self, what: str) -> None:
        length = self.u64(f"{what} length")
        self.need(length, f"{what} ({length} bytes)")
        self.pos += length


def _type_name(value_type: int) -> str:
    try:
        return VT(value_type).name
    except ValueError:
        return str(value_type)


def _read_value(cur: _Cursor, value_type: int, key: str) -> MetadataValue:
    if value_type in _SCALAR_FORMATS:
        fmt, size = _SCALAR_FORMATS[value_type]
        return cur.scalar(fmt, size, f"value of {key!r}")
    if value_type == VT.STRING:
        return cur.string(f"string value of {key!r}")
    if value_type == VT.ARRAY:
        return _read_array(cur, key)
    raise cur.fail(f"key {key!r} has unknown value type {value_type}")


def _read_array(cur: _Cursor, key: str) -> MetadataValue:
    element_type = cur.u32(f"array type of {key!r}")
    count = cur.u64(f"array length of {key!r}")
    if element_type == VT.ARRAY:
        raise cur.fail(f"key {key!r} is a nested array, which GGUF does not allow")
    if element_type in _SCALAR_FORMATS:
        fmt, size = _SCALAR_FORMATS[element_type]
        # Bound before multiplying into an allocation: the bytes must be in the file.
        cur.need(count * size, f"array {key!r} of {count} {_type_name(element_type)}")
        if count <= MAX_KEPT_NUMERIC_ARRAY_LEN:
            values = list(struct.unpack_from(f"<{count}{fmt[1]}", cur.buf, cur.pos))
            cur.pos += count * size
            return values
        cur.pos += count * size
        return ArraySummary(_type_name(element_type), count)
    if element_type == VT.STRING:
        if count > cur.remaining() // 8:  # each string needs at least its 8-byte length
            raise cur.fail(f"array {key!r} declares {count} strings, more than the file can hold")
        if count <= MAX_KEPT_ARRAY_LEN:
            return [cur.string(f"element of {key!r}") for _ in range(count)]
        return ArraySummary("STRING", count, _skip_strings(cur, count, key))
    raise cur.fail(f"array {key!r} has unknown element type {element_type}")


def _skip_strings(cur: _Cursor, count: int, key: str) -> frozenset[bytes]:
    """Walk ``count`` length-prefixed strings without building Python strings (fast path for
    vocabularies: 262k tokens in well under 0.1 s); returns the short ones (byte tokens)."""
    buf, pos, end = cur.buf, cur.pos, cur.end
    unpack = struct.Struct("<Q").unpack_from
    short: set[bytes] = set()
    for _ in range(count):
        if pos + 8 > end:
            cur.pos = pos
            raise cur.fail(f"array {key!r} runs past the end of the file")
        (length,) = unpack(buf, pos)
        pos += 8 + length
        if pos > end:
            cur.pos = pos - length - 8
            raise cur.fail(f"a string in array {key!r} runs past the end of the file")
        if length <= BYTE_TOKEN_LEN:
            short.add(bytes(buf[pos - length:pos]))
    cur.pos = pos
    return frozenset(short)


def _tensor_bytes(cur: _Cursor, name: str, shape: tuple[int, ...], type_id: int) -> tuple[str, int]:
    try:
        qtype = gguf.GGMLQuantizationType(type_id)
    except ValueError:
        raise cur.fail(f"tensor {name!r} has unknown type {type_id}") from None
    if qtype not in gguf.GGML_QUANT_SIZES:
        raise cur.fail(f"tensor {name!r} has type {qtype.name} with no known block size")
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if shape[0] % block_size:
        raise cur.fail(f"tensor {name!r} row length {shape[0]} is not a multiple of "
                       f"{qtype.name}'s block size {block_size}")
    n_elements = 1
    for dim in shape:
        n_elements *= dim  # Python ints: no wrap-around
    if n_elements > MAX_TENSOR_ELEMENTS:
        raise cur.fail(f"tensor {name!r} declares {n_elements} elements")
    return qtype.name, n_elements // block_size * type_size


def _parse(cur: _Cursor, identity: FileIdentity | None = None) -> GGUFInfo:
    cur.need(4, "magic")
    magic = bytes(cur.buf[0:4])
    cur.pos = 4
    if magic != GGUF_MAGIC:
        raise cur.fail(f"bad magic {magic!r} (expected b'GGUF'; an all-zero header means an "
                       f"interrupted write)")
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        if version.to_bytes(4, "little")[::-1] in (b"\0\0\0\2", b"\0\0\0\3"):
            raise cur.fail("big-endian GGUF files are not supported by llama.cpp on this machine")
        raise cur.fail(f"unsupported version {version} (supported: 2, 3)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    if n_kv > cur.remaining() // MIN_KV_BYTES:
        raise cur.fail(f"declares {n_kv} metadata entries, more than the file can hold")
    if n_tensors > cur.remaining() // MIN_TENSOR_INFO_BYTES:
        raise cur.fail(f"declares {n_tensors} tensors, more than the file can hold")

    metadata: dict[str, MetadataValue] = {}
    for _ in range(n_kv):
        key = cur.string("metadata key")
        if not key:
            raise cur.fail("empty metadata key")
        if key in metadata:
            raise cur.fail(f"duplicate metadata key {key!r}")
        value_type = cur.u32(f"type of {key!r}")
        metadata[key] = _read_value(cur, value_type, key)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0
            or alignment & (alignment - 1)):
        raise cur.fail(f"general.alignment {alignment!r} is not a positive power of two")

    if n_tensors > cur.remaining() // MIN_TENSOR_INFO_BYTES:
        raise cur.fail(f"declares {n_tensors} tensors, more than the file can hold")
    raw: list[tuple[str, tuple[int, ...], str, int, int]] = []
    seen: set[str] = set()
    for _ in range(n_tensors):
        raw_name = cur.string_bytes("tensor name")
        if not raw_name or len(raw_name) >= GGML_MAX_NAME:
            raise cur.fail(f"tensor name of {len(raw_name)} bytes (allowed: 1..{GGML_MAX_NAME - 1})")
        name = raw_name.decode("utf-8", errors="replace")
        if name in seen:
            raise cur.fail(f"duplicate tensor name {name!r}")
        seen.add(name)
        n_dims = cur.u32(f"dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (allowed: 1..{MAX_DIMS})")
        shape = tuple(cur.u64(f"dimension of {name!r}") for _ in range(n_dims))
        if any(d <= 0 for d in shape):
            raise cur.fail(f"tensor {name!r} has a zero dimension {shape}")
        type_id = cur.u32(f"type of {name!r}")
        type_name, n_bytes = _tensor_bytes(cur, name, shape, type_id)
        offset = cur.u64(f"offset of {name!r}")
        if offset % alignment:
            raise cur.fail(f"tensor {name!r} offset {offset} is not aligned to {alignment}")
        raw.append((name, shape, type_name, n_bytes, offset))

    data_start = -(-cur.pos // alignment) * alignment
    file_bytes = cur.end
    previous_end, previous_name = 0, ""
    for name, shape, type_name, n_bytes, offset in sorted(raw, key=lambda r: r[4]):
        if offset < previous_end:
            raise cur.fail(f"tensor {name!r} overlaps tensor {previous_name!r}")
        if data_start + offset + n_bytes > file_bytes:
            raise cur.fail(f"tensor {name!r} data ({n_bytes} bytes at offset {offset}) runs past "
                           f"the end of the file; the data section is shorter than declared")
        previous_end, previous_name = offset + n_bytes, name
    tensors = [TensorRecord(name, shape, type_name, n_bytes, data_start + offset)
               for name, shape, type_name, n_bytes, offset in raw]

    def text(key: str) -> str | None:
        value = metadata.get(key)
        return value if isinstance(value, str) else None

    file_type = metadata.get("general.file_type")
    return GGUFInfo(
        path=cur.path, version=version, architecture=text("general.architecture"),
        general_type=text("general.type"),
        file_type=file_type if isinstance(file_type, int) and not isinstance(file_type, bool) else None,
        metadata=metadata, tensors=tensors, tensor_data_bytes=sum(t.n_bytes for t in tensors),
        file_bytes=file_bytes, alignment=alignment, identity=identity)


def validate_gguf(path: Path | str, *, expect_type: GGUFKind | None = None, fd: int | None = None) -> GGUFInfo:
    """Pre-parse ``path`` with bounds checks; raise InvalidGGUFError on anything malformed.

    ``expect_type="adapter"`` also requires a LoRA adapter (general.type adapter,
    adapter.type lora); ``"model"`` refuses adapters (so a user who swaps --model and
    --adapter hears about it before llama.cpp does). ``fd``: read this open descriptor (the
    file someone already opened and checked) instead of opening ``path``, which then only
    names it in messages."""
    path = Path(path)
    if fd is None:
        if path.is_dir():  # "does not exist" would send the user looking for a typo
            raise InputError(f"{path} is a directory, not a GGUF file", fix="give the path of a .gguf file")
        if not path.is_file():
            raise InputNotFoundError(f"GGUF file {path} does not exist", fix="check the path")
    try:
        with (open(path, "rb") if fd is None else contextlib.nullcontext()) as fh:
            fileno = fh.fileno() if fh is not None else fd
            st = os.fstat(fileno)
            if not stat.S_ISREG(st.st_mode):
                raise InputError(f"{path} is not a regular file", fix="give the path of a .gguf file")
            identity = FileIdentity.of(st)
            if identity.size < 24:
                raise InvalidGGUFError(f"{path} is not a valid GGUF file: only {identity.size} bytes",
                                       fix="re-download or re-convert the file")
            with mmap.mmap(fileno, 0, access=mmap.ACCESS_READ) as buf:
                info = _parse(_Cursor(buf, path), identity)
    except OSError as exc:
        raise InvalidGGUFError(f"cannot read {path}: {exc.strerror or exc}",
                               fix="check the file's permissions") from exc
    if expect_type == "adapter":
        if info.general_type != "adapter" or info.metadata.get("adapter.type") != "lora":
            raise AdapterError(
                f"{path} is not a GGUF LoRA adapter (general.type={info.general_type!r}, "
                f"adapter.type={info.metadata.get('adapter.type')!r})",
                fix="convert the PEFT adapter with `edge-lora adapter convert`")
        _check_lora_alpha(info)
    elif expect_type == "model" and info.general_type == "adapter":
        raise InvalidGGUFError(f"{path} is a LoRA adapter, not a model",
                               fix="pass it with --adapter and give the base model with --model")
    if expect_type == "model" and not info.architecture:
        raise InvalidGGUFError(f"{path} has no general.architecture",
                               fix="re-convert the model")
    if expect_type == "model":
        _check_model_hparams(info)
    return info


def _check_tokenizer_model(info: GGUFInfo) -> None:
    """llama.cpp's RWKV vocabulary parser, given another family's tokens, spins for minutes in
    its loader (found by bench/fuzz.py); only RWKV architectures use it."""
    if info.metadata.get("tokenizer.ggml.model") == "rwkv" and "rwkv" not in (info.architecture or ""):
        raise InvalidGGUFError(f"{info.path} declares an RWKV tokenizer for a {info.architecture} model",
                               fix="re-convert the model; the file's tokenizer metadata is corrupt")


def _check_byte_tokens(info: GGUFInfo) -> None:
    """SentencePiece / Unigram vocabularies fall back to one token per byte for text they do not
    cover; llama.cpp looks the byte up as "<0xXX>" or as the byte itself and, when neither is in
    the vocabulary, throws through the C API: the process aborts on the first such prompt."""
    if info.metadata.get("tokenizer.ggml.model") not in ("llama", "t5"):
        return
    tokens = info.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, ArraySummary):
        present = tokens.short_strings
    elif isinstance(tokens, list):
        present = frozenset(t.encode("utf-8", "surrogateescape") for t in tokens if isinstance(t, str))
    else:
        return  # no vocabulary: llama.cpp refuses the file itself
    missing = [b for b in range(256) if f"<0x{b:02X}>".encode() not in present and bytes([b]) not in present]
    if missing:
        raise InvalidGGUFError(f"{info.path}'s vocabulary has no token for byte 0x{missing[0]:02X} "
                               f"({len(missing)} bytes missing); llama.cpp would abort on text that needs it",
                               fix="re-convert the model with its complete tokenizer")


def _refuse(info: GGUFInfo, what: str) -> InvalidGGUFError:
    return InvalidGGUFError(f"{info.path} {what}; llama.cpp would abort the process loading it",
                            fix="re-convert the model; the file is corrupt or was written by a broken tool")


def _check_model_hparams(info: GGUFInfo) -> None:
    """Values llama.cpp does not refuse but aborts the whole process on (GGML_ASSERT / a C++
    exception through the C API), read from llama.cpp 0.3.36's loader (llama-model.cpp
    load_hparams, llama-hparams.cpp, the graph builders in src/models/): a block count outside
    1..LLAMA_MAX_LAYERS, bad expert counts, nextn layers, an unknown rope scaling type, head
    counts that do not divide, unequal head sizes, a NaN or negative norm epsilon. Whatever else
    the loader asserts on is caught by loading the file in a child process first
    (llama_backend's preflight)."""
    arch = info.architecture
    blocks = info.metadata.get(f"{arch}.block_count")
    if blocks is not None and (isinstance(blocks, bool) or not isinstance(blocks, int)
                               or not 1 <= blocks <= LLAMA_MAX_LAYERS):
        raise InvalidGGUFError(f"{info.path} declares {arch}.block_count {blocks!r} "
                               f"(llama.cpp supports 1..{LLAMA_MAX_LAYERS} layers)", fix="re-convert the model")
    context = info.metadata.get(f"{arch}.context_length")
    if isinstance(context, int) and context > INT32_MAX:  # llama.cpp reports it as a negative int32
        raise InvalidGGUFError(f"{info.path} declares {arch}.context_length {context}, beyond {INT32_MAX}",
                               fix="re-convert the model")
    _check_tokenizer_model(info)
    _check_byte_tokens(info)
    for key in (f"{arch}.attention.layer_norm_rms_epsilon", f"{arch}.attention.layer_norm_epsilon"):
        eps = info.metadata.get(key)
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))
                                or not math.isfinite(eps) or eps < 0):
            raise InvalidGGUFError(f"{info.path} declares {key} {eps!r}, not a finite non-negative number",
                                   fix="re-convert the model")
    _check_rope_scaling(info)
    _check_tensor_types(info)
    if isinstance(blocks, int):
        _check_layers(info, blocks)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _per_layer(info: GGUFInfo, key: str, n_layers: int) -> list[int] | None:
    """A hyperparameter given as one value for every layer or as an array with one entry per
    layer (llama_model_loader::get_key_or_arr), as a list of n_layers ints; None when absent.
    llama.cpp reads int32 arrays as uint32, so a negative entry is a huge count there."""
    value = info.metadata.get(key)
    if value is None:
        return None
    if _is_int(value):
        values = [value] * n_layers
    elif isinstance(value, list):
        if len(value) != n_layers:
            raise _refuse(info, f"gives {key} {len(value)} entries for {n_layers} layers")
        values = value
    elif isinstance(value, ArraySummary):
        raise _refuse(info, f"gives {key} {value.count} entries for {n_layers} layers")
    else:
        return None  # a string or float: llama.cpp refuses the type itself
    if not all(_is_int(v) and 0 <= v < 2**32 for v in values):
        raise _refuse(info, f"gives {key} a value that is not a count: {values[:4]!r}")
    return values


def _scalar(info: GGUFInfo, key: str) -> int | None:
    value = info.metadata.get(key)
    return value if _is_int(value) else None


def _check_layers(info: GGUFInfo, n_layers: int) -> None:
    arch = info.architecture
    nextn = _scalar(info, f"{arch}.nextn_predict_layers")
    if nextn is not None and nextn >= n_layers:  # GGML_ASSERT(n_layer_nextn <= n_layer_all); equal leaves no layer
        raise _refuse(info, f"declares {arch}.nextn_predict_layers {nextn} for {n_layers} blocks")
    for part in ("posnet", "convnext"):  # wavtokenizer-dec: GGML_ASSERT(<part>.n_layer <= n_layer_all)
        count = _scalar(info, f"{arch}.{part}.block_count")
        if count is not None and count > n_layers:
            raise _refuse(info, f"declares {arch}.{part}.block_count {count} for {n_layers} blocks")
    _check_experts(info, n_layers)
    _per_layer(info, f"{arch}.feed_forward_length", n_layers)  # length and values
    heads = _per_layer(info, f"{arch}.attention.head_count", n_layers)
    heads_kv = _per_layer(info, f"{arch}.attention.head_count_kv", n_layers) or heads
    if heads is None or heads_kv is None:
        return
    for layer, (n_head, n_head_kv) in enumerate(zip(heads, heads_kv)):
        # Grouped-query attention broadcasts K/V heads over query heads: ggml_mul_mat asserts
        # that they divide when the graph is built.
        if n_head_kv > n_head or (n_head_kv and n_head % n_head_kv):
            raise _refuse(info, f"declares {n_head} attention heads and {n_head_kv} key/value heads in layer "
                                f"{layer} (the query heads must be a multiple of the key/value heads)")
    _check_head_sizes(info, heads[0])


def _check_experts(info: GGUFInfo, n_layers: int) -> None:
    """llama-model.cpp load_hparams' expert asserts, in its order."""
    arch = info.architecture
    n_expert = _scalar(info, f"{arch}.expert_count") or 0
    used = _per_layer(info, f"{arch}.expert_used_count", n_layers) or [0]
    groups = _scalar(info, f"{arch}.expert_group_count") or 0
    group_used = _scalar(info, f"{arch}.expert_group_used_count") or 0
    if arch in ("hunyuan-dense", "hunyuan_vl") and n_expert <= 1:
        return  # llama.cpp turns the experts off for these
    used_max = max(used)
    what = f"declares {n_expert} experts ({arch}.expert_count) with {used_max} used per token"
    if n_expert > LLAMA_MAX_EXPERTS:
        raise _refuse(info, f"{what}; llama.cpp supports up to {LLAMA_MAX_EXPERTS}")
    if used_max > n_expert:
        raise _refuse(info, f"{what}; more used than exist")
    if n_expert > 0:
        if used_max == 0:
            raise _refuse(info, f"{what}; a mixture of experts must use at least one")
        if groups >= n_expert:
            raise _refuse(info, f"{what} in {groups} groups; there must be fewer groups than experts")
        if groups > 1 and (n_expert % groups or not 0 < group_used < groups):
            raise _refuse(info, f"{what} in {groups} groups, {group_used} used; the groups must divide the "
                                f"experts and fewer than all groups (at least one) be used")
    elif used_max or groups:
        raise _refuse(info, f"{what} in {groups} groups; without experts both must be 0")


# llama-model.cpp LLAMA_ROPE_SCALING_TYPES; any other name is GGML_ASSERT(... != UNSPECIFIED).
ROPE_SCALING_TYPES = frozenset({"none", "linear", "yarn", "longrope"})


def _check_rope_scaling(info: GGUFInfo) -> None:
    key = f"{info.architecture}.rope.scaling.type"
    value = info.metadata.get(key)
    if isinstance(value, str) and value not in ROPE_SCALING_TYPES:
        raise _refuse(info, f"declares {key} {value!r} (llama.cpp knows {', '.join(sorted(ROPE_SCALING_TYPES))})")


# Architectures whose graph builder asserts n_embd_head_v == n_embd_head_k == n_rot when a
# context is created (GGML_ASSERT in each src/models/<arch>.cpp of llama.cpp 0.3.36; listed by
# reading llama_model_mapping for the classes whose graph has both asserts).
HEAD_SIZES_MUST_MATCH = frozenset({
    "apertus", "arcee", "arctic", "baichuan", "chameleon", "codeshell", "cogvlm", "cohere2moe", "dbrx", "deci",
    "deepseek", "dots1", "dream", "ernie4_5", "ernie4_5-moe", "exaone", "falcon", "granite", "granite_swa",
    "graniteswitch", "grok", "grovemoe", "hunyuan-moe", "hunyuan_vl", "hy_v3", "internlm2", "jais2", "llada",
    "llada-moe", "llama", "llama4", "maincoder", "mellum", "minimax-01", "minimax-m2", "mistral3", "nemotron",
    "olmo", "olmo2", "olmoe", "orion", "paddleocr", "pangu-embedded", "plamo", "pockettts", "qwen2", "qwen2moe",
    "qwen2vl", "qwen3", "qwen3moe", "qwen3vl", "qwen3vlmoe", "rnd1", "seed_oss", "smallthinker", "smollm3",
    "starcoder2", "xverse",
})


def _check_head_sizes(info: GGUFInfo, n_head: int) -> None:
    arch = info.architecture or ""
    if arch not in HEAD_SIZES_MUST_MATCH or n_head <= 0:
        return
    if any(key.startswith(f"{arch}.") and key.endswith("_swa") for key in info.metadata):
        return  # sliding-window layers may have their own sizes; the preflight load covers them
    n_embd = _scalar(info, f"{arch}.embedding_length")
    key_length = _scalar(info, f"{arch}.attention.key_length")
    value_length = _scalar(info, f"{arch}.attention.value_length")
    if n_embd is None:
        return  # llama.cpp refuses a missing embedding length itself
    if (key_length is None or value_length is None) and n_embd % n_head:
        raise _refuse(info, f"declares {arch}.embedding_length {n_embd}, not a multiple of its {n_head} heads, "
                            f"and no head size")
    k = key_length if key_length is not None else n_embd // n_head
    v = value_length if value_length is not None else n_embd // n_head
    rot = _scalar(info, f"{arch}.rope.dimension_count")
    rot = k if rot is None else rot
    if not k == v == rot:
        raise _refuse(info, f"declares key head size {k}, value head size {v} and rope dimensions {rot}; "
                            f"{arch} needs them equal")


# Integer and F64 tensors have no matrix-multiplication kernel in ggml; no model stores weights so.
MODEL_REFUSED_TYPES = frozenset({"I8", "I16", "I32", "I64", "F64"})


def _check_tensor_types(info: GGUFInfo) -> None:
    for tensor in info.tensors:
        if tensor.type_name in MODEL_REFUSED_TYPES:
            raise _refuse(info, f"stores tensor {tensor.name} as {tensor.type_name}, which llama.cpp cannot compute with")
        # Norm weights, biases and rope factors enter ggml's element-wise ops, which assert F32
        # operands on CPU (found by bench/fuzz.py: an F16 norm aborted the first decode).
        # llama.cpp's converter and quantizer always keep 1-D tensors F32.
        if len(tensor.shape) == 1 and tensor.type_name != "F32":
            raise _refuse(info, f"stores the 1-D tensor {tensor.name} as {tensor.type_name}, not F32")


def _check_lora_alpha(info: GGUFInfo) -> None:
    # llama.cpp multiplies every LoRA delta by alpha / rank: a NaN/inf alpha turns all logits NaN.
    alpha = info.metadata.get("adapter.lora.alpha")
    if alpha is None:
        return  # llama.cpp then uses scale 1
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterError(f"{info.path} has adapter.lora.alpha {alpha!r}, which is not a finite number",
                           fix="re-convert the adapter with `edge-lora adapter convert`")


LORA_A_SUFFIX = ".lora_a"
LORA_B_SUFFIX = ".lora_b"
# ggml_mul_mat has no integer or F64 kernels: an adapter stored so crashed the process (SIGSEGV)
# at the first decode.
LORA_REFUSED_TYPES = MODEL_REFUSED_TYPES


def check_adapter_values(adapter: GGUFInfo, fd: int) -> None:
    """Refuse NaN/inf in an adapter's lora_a/lora_b (read through ``fd``, the checked file).
    llama.cpp loads them without a word, and whether they reach the logits depends on the CPU's
    kernels: on AVX2 the logits turn NaN, on AVX-512 SIMD clamps swallow the NaN and the model
    writes finite nonsense. Adapters are small: this reads them once, per tensor. Checked: the
    types llama.cpp's and edge-lora's adapter converters write (F32, F16, BF16, Q8_0)."""
    with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as data:
        for tensor in adapter.tensors:
            if not tensor.name.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX)):
                continue
            raw = np.frombuffer(data, dtype=np.uint8, count=tensor.n_bytes, offset=tensor.offset)
            if tensor.type_name in _FLOAT_VIEWS:
                finite = np.isfinite(raw.view(_FLOAT_VIEWS[tensor.type_name])).all()
            elif tensor.type_name == "BF16":  # exponent bits all ones: inf or NaN
                finite = not ((raw.view(np.uint16) & 0x7F80) == 0x7F80).any()
            elif tensor.type_name == "Q8_0":
                with np.errstate(invalid="ignore", over="ignore"):  # the NaN it looks for is no warning
                    finite = np.isfinite(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0)).all()
            else:
                finite = True  # not a type adapter converters write: left to llama.cpp's own loader
            del raw  # no view may outlive the map
            if not finite:
                raise AdapterError(f"adapter {adapter.path.name}: tensor {tensor.name} holds NaN/inf values",
                                   fix="the adapter is corrupt or its training diverged: re-train or re-convert it")


_FLOAT_VIEWS = {"F32": np.float32, "F16": np.float16}


def check_adapter_fits(base: GGUFInfo, adapter: GGUFInfo) -> None:
    """Apply llama.cpp's adapter-loading rules in Python, naming the first bad tensor, so a
    mismatch is a clear error rather than a refusal (or worse) inside llama.cpp."""
    where = f"adapter {adapter.path.name}"
    if adapter.general_type != "adapter" or adapter.metadata.get("adapter.type") != "lora":
        raise AdapterError(f"{adapter.path} is not a GGUF LoRA adapter",
                           fix="convert the PEFT adapter with `edge-lora adapter convert`")
    if adapter.architecture != base.architecture:
        raise AdapterMismatchError(
            f"{where} is for architecture {adapter.architecture!r}, the model is {base.architecture!r}",
            fix="use an adapter trained and converted for this base model")
    pairs = 0
    for tensor in adapter.tensors:
        if tensor.name.endswith(LORA_B_SUFFIX):
            if adapter.tensor(tensor.name[:-len(LORA_B_SUFFIX)] + LORA_A_SUFFIX) is None:
                raise AdapterMismatchError(f"{where}: tensor {tensor.name} has no matching .lora_a",
                                           fix="re-convert the adapter")
            continue
        if not tensor.name.endswith(LORA_A_SUFFIX):
            continue  # llama.cpp ignores tensors that are not lora_a/lora_b
        base_name = tensor.name[:-len(LORA_A_SUFFIX)]
        lora_a = tensor
        lora_b = adapter.tensor(base_name + LORA_B_SUFFIX)
        if lora_b is None:
            raise AdapterMismatchError(f"{where}: tensor {lora_a.name} has no matching .lora_b",
                                       fix="re-convert the adapter")
        base_tensor = base.tensor(base_name)
        if base_tensor is None:
            raise AdapterMismatchError(
                f"{where}: tensor {base_name} does not exist in the base model {base.path.name}",
                fix="use an adapter trained and converted for this base model")
        for part in (lora_a, lora_b):
            if part.type_name in LORA_REFUSED_TYPES:
                raise AdapterError(f"{where}: tensor {part.name} is {part.type_name}, which llama.cpp cannot "
                                   f"multiply by", fix="re-convert the adapter (f32, f16 or q8_0)")
        if len(lora_a.shape) != 2 or len(lora_b.shape) != 2 or len(base_tensor.shape) < 2:
            raise AdapterMismatchError(f"{where}: tensor {base_name} lora_a/lora_b are not matrices",
                                       fix="re-convert the adapter")
        if (base_tensor.shape[0] != lora_a.shape[0] or base_tensor.shape[1] != lora_b.shape[1]
                or lora_a.shape[1] != lora_b.shape[0]):
            raise AdapterMismatchError(
                f"{where}: tensor {base_name} shapes do not fit: base {base_tensor.shape}, "
                f"lora_a {lora_a.shape}, lora_b {lora_b.shape} (GGUF ne order)",
                fix="use an adapter trained and converted for this base model")
        pairs += 1
    if pairs == 0:
        raise AdapterError(f"{where} holds no lora_a/lora_b tensor pairs",
                           fix="re-convert the adapter")
