"""Minimal reader and writer for SentencePiece's ``tokenizer.model`` (a protobuf ``ModelProto``).

Only the fields a GGUF tokenizer needs are read: the pieces (text, score, type), the trainer
spec's model type, byte fallback and special ids, and the normalizer's whitespace flags. The
wire format is parsed by hand with bounds checks on every length, since model files are
untrusted input; unknown fields are skipped, so newer files still read.
Field numbers follow sentencepiece's ``sentencepiece_model.proto``.
"""

from __future__ import annotations

import mmap
import os
import struct
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import overload

from edge_lora.core.errors import InvalidCheckpointError

# Hard caps so a hostile file cannot make us allocate or loop without bound.
MAX_MODEL_BYTES = 1 << 30
MAX_PIECES = 4_000_000

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


class PieceType(IntEnum):
    """``ModelProto.SentencePiece.Type``; llama.cpp's token types use the same numbers."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class ModelType(IntEnum):
    """``TrainerSpec.ModelType``."""

    UNIGRAM = 1
    BPE = 2
    WORD = 3
    CHAR = 4


@dataclass
class Piece:
    piece: str
    score: float = 0.0
    type: PieceType = PieceType.NORMAL


@dataclass
class SentencePieceModel:
    pieces: Sequence[Piece] = field(default_factory=list)  # a PieceTable when parsed
    model_type: ModelType = ModelType.UNIGRAM
    byte_fallback: bool = False
    # Defaults are the proto's defaults (pad disabled = -1).
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    normalizer_name: str = ""


# --- wire format --------------------------------------------------------------------------------

class _Malformed(Exception):
    """Internal: turned into InvalidCheckpointError naming the file."""


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if pos >= end:
            raise _Malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise _Malformed("varint longer than 10 bytes")


def _fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) for one message, one field at a time (a list of them
    cost ~36x the message for a crafted run of 2-byte fields); length-delimited values are bytes."""
    pos = start
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed("field number 0")
        if wire == _VARINT:
            value, pos = _read_varint(buf, pos, end)
            yield number, wire, value
        elif wire == _FIXED64:
            if pos + 8 > end:
                raise _Malformed("truncated 64-bit field")
            yield number, wire, int.from_bytes(buf[pos:pos + 8], "little")
            pos += 8
        elif wire == _FIXED32:
            if pos + 4 > end:
                raise _Malformed("truncated 32-bit field")
            yield number, wire, int.from_bytes(buf[pos:pos + 4], "little")
            pos += 4
        elif wire == _LENGTH:
            length, pos = _read_varint(buf, pos, end)
            if length > end - pos:
                raise _Malformed(f"field {number} declares {length} bytes, {end - pos} remain")
            yield number, wire, buf[pos:pos + length]
            pos += length
        else:
            raise _Malformed(f"unsupported wire type {wire} (field {number})")


def _int32(value: int | bytes) -> int:
    if not isinstance(value, int):
        raise _Malformed("expected an integer field")
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _text(value: int | bytes) -> str:
    if not isinstance(value, bytes):
        raise _Malformed("expected a string field")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Malformed("a piece is not valid UTF-8") from exc


def _float(value: int | bytes, wire: int) -> float:
    if wire != _FIXED32 or not isinstance(value, int):
        raise _Malformed("score is not a 32-bit float")
    return float(struct.unpack("<f", value.to_bytes(4, "little"))[0])


_PIECE_TYPES = {t.value: t for t in PieceType}
_unpack_f32 = struct.Struct("<f").unpack_from


class PieceTable(Sequence[Piece]):
    """The pieces of a parsed model, stored compactly: every text's UTF-8 bytes in one buffer
    plus offset, score and type arrays — 9 bytes a piece beyond its text, where a list of
    ``Piece`` objects costs ~250 (a 1 MB model parsed into 17-36 MB). Indexing builds the
    ``Piece`` on demand; equal to any sequence of equal pieces."""

    __slots__ = ("_text", "_ends", "_scores", "_types")

    def __init__(self) -> None:
        self._text = bytearray()
        self._ends = array("I")   # end offset of piece i in _text (MAX_MODEL_BYTES < 4 GiB)
        self._scores = array("f")  # the file's float32 scores, exactly
        self._types = array("B")

    def _append(self, raw: bytes, score: float, piece_type: int) -> None:
        try:
            raw.decode("utf-8")  # each piece on its own: two halves of a character are invalid
        except UnicodeDecodeError as exc:
            raise _Malformed("a piece is not valid UTF-8") from exc
        self._text += raw
        self._ends.append(len(self._text))
        self._scores.append(score)
        self._types.append(piece_type)

    def __len__(self) -> int:
        return len(self._ends)

    @property
    def n_bytes(self) -> int:
        """What the table holds (before its arrays' growth headroom, ~1/8)."""
        return len(self._text) + 9 * len(self._ends)

    @overload
    def __getitem__(self, index: int) -> Piece: ...
    @overload
    def __getitem__(self, index: slice) -> list[Piece]: ...

    def __getitem__(self, index: int | slice) -> Piece | list[Piece]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = range(len(self))[index]  # IndexError and negative indices as a list has them
        start = self._ends[i - 1] if i else 0
        return Piece(self._text[start:self._ends[i]].decode("utf-8"), self._scores[i],
                     _PIECE_TYPES[self._types[i]])

    def __iter__(self) -> Iterator[Piece]:
        start, text = 0, self._text
        for end, score, piece_type in zip(self._ends, self._scores, self._types):
            yield Piece(text[start:end].decode("utf-8"), score, _PIECE_TYPES[piece_type])
            start = end

    def columns(self) -> tuple[list[str], list[float], list[int]]:
        """Every piece's text, score and type number (llama.cpp's token type), in id order:
        what an exporter needs, without building a ``Piece`` per entry."""
        text, starts = self._text, [0, *self._ends[:-1]]
        texts = [text[start:end].decode("utf-8") for start, end in zip(starts, self._ends)]
        return texts, self._scores.tolist(), self._types.tolist()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # mutable, like a list

    def __repr__(self) -> str:
        return f"PieceTable({len(self)} pieces, {len(self._text)} text bytes)"


def piece_columns(pieces: Sequence[Piece]) -> tuple[list[str], list[float], list[int]]:
    """Texts, scores and type numbers of ``pieces`` (a parsed model's ``PieceTable`` in bulk)."""
    if isinstance(pieces, PieceTable):
        return pieces.columns()
    return [p.piece for p in pieces], [p.score for p in pieces], [int(p.type) for p in pieces]


def _parse_piece(buf: bytes, start: int, end: int, table: PieceTable) -> None:
    """Append the ``SentencePiece`` message ``buf[start:end]`` to ``table``."""
    # Fast path for the layout SentencePiece itself writes (text < 128 bytes, then score, then
    # type, each optional after the text): a 262k vocabulary parses in a fraction of the time.
    # Anything else takes the general field walk below, with the same checks.
    if end - start >= 2 and buf[start] == 0x0A and buf[start + 1] < 0x80 and start + 2 + buf[start + 1] <= end:
        text_end = start + 2 + buf[start + 1]
        pos, score, piece_type = text_end, 0.0, PieceType.NORMAL
        if pos + 5 <= end and buf[pos] == 0x15:
            score = _unpack_f32(buf, pos + 1)[0]
            pos += 5
        if pos + 2 <= end and buf[pos] == 0x18 and buf[pos + 1] < 0x80 and buf[pos + 1] in _PIECE_TYPES:
            piece_type = _PIECE_TYPES[buf[pos + 1]]
            pos += 2
        if pos == end:
            table._append(buf[start + 2:text_end], score, piece_type)
            return
    text, score, piece_type = b"", 0.0, PieceType.NORMAL
    for number, wire, value in _fields(buf, start, end):
        if number == 1:
            if not isinstance(value, bytes):
                raise _Malformed("expected a string field")
            text = value
        elif number == 2:
            score = _float(value, wire)
        elif number == 3:
            code = _int32(value)
            try:
                piece_type = PieceType(code)
            except ValueError as exc:
                raise _Malformed(f"unknown piece type {code}") from exc
    table._append(text, score, piece_type)


def _top_level_fields(buf: bytes) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the ``ModelProto`` in
    ``buf``, one at a time: the pieces are never all held as separate objects."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed("field number 0")
        if wire == _LENGTH:
            length, pos = _read_varint(buf, pos, end)
            if length > end - pos:
                raise _Malformed(f"field {number} declares {length} bytes, {end - pos} remain")
            yield number, pos, pos + length
            pos += length
        elif wire == _VARINT:
            _value, pos = _read_varint(buf, pos, end)
        elif wire in (_FIXED64, _FIXED32):
            pos += 8 if wire == _FIXED64 else 4
            if pos > end:
                raise _Malformed(f"truncated {64 if wire == _FIXED64 else 32}-bit field")
        else:
            raise _Malformed(f"unsupported wire type {wire} (field {number})")


# The parsed pieces may take at most this many times the file: a real vocabulary takes about
# one (Gemma 3's 262k pieces: 0.95x), a crafted run of empty pieces (2 bytes each in the file,
# 9 in the table) would take 4.5x.
MAX_TABLE_RATIO = 2


def parse_model(data: bytes | mmap.mmap) -> SentencePieceModel:
    """Parse a ``ModelProto``. Memory beyond ``data`` (which read_model maps, not reads) is the
    compact ``PieceTable``, refused past MAX_TABLE_RATIO x the file; fields are walked one at
    a time, never listed (tests/test_sentencepiece_model.py measures both)."""
    pieces = PieceTable()
    model = SentencePieceModel(pieces=pieces)
    budget = max(MAX_TABLE_RATIO * len(data), 1 << 20)  # small files: no ratio worth refusing
    for number, start, end in _top_level_fields(data):
        if number == 1:
            if len(pieces) >= MAX_PIECES:
                raise _Malformed(f"more than {MAX_PIECES} pieces")
            _parse_piece(data, start, end, pieces)
            if pieces.n_bytes > budget:
                raise _Malformed(f"{len(pieces)} pieces in {len(data)} bytes: far smaller than a real "
                                 "vocabulary's (a crafted file)")
        elif number == 2:
            for sub, _w, v in _fields(data, start, end):
                if sub == 3:
                    code = _int32(v)
                    try:
                        model.model_type = ModelType(code)
                    except ValueError as exc:
                        raise _Malformed(f"unknown model type {code}") from exc
                elif sub == 35:
                    model.byte_fallback = bool(_int32(v))
                elif sub == 40:
                    model.unk_id = _int32(v)
                elif sub == 41:
                    model.bos_id = _int32(v)
                elif sub == 42:
                    model.eos_id = _int32(v)
                elif sub == 43:
                    model.pad_id = _int32(v)
        elif number == 3:
            for sub, _w, v in _fields(data, start, end):
                if sub == 1:
                    model.normalizer_name = _text(v)
                elif sub == 3:
                    model.add_dummy_prefix = bool(_int32(v))
                elif sub == 4:
                    model.remove_extra_whitespaces = bool(_int32(v))
    if not pieces:
        raise _Malformed("no pieces")
    n = len(pieces)
    for name in ("unk_id", "bos_id", "eos_id", "pad_id"):
        token_id = getattr(model, name)
        if token_id >= n or token_id < -1:
            raise _Malformed(f"{name} {token_id} is outside the vocabulary of {n} pieces")
    return model


def read_model(path: Path) -> SentencePieceModel:
    """The parsed model; the file is memory-mapped (page cache, not the process's own memory)."""
    fix = "re-download tokenizer.model, or remove it if tokenizer.json is present"
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > MAX_MODEL_BYTES:
                raise InvalidCheckpointError(f"{path} is {size} bytes, too large for a SentencePiece model",
                                             fix="check the file is a tokenizer.model")
            if size == 0:
                raise InvalidCheckpointError(f"{path} is not a valid SentencePiece model: no pieces (the file is empty)",
                                             fix=fix)
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return parse_model(data)
    except OSError as exc:
        raise InvalidCheckpointError(f"cannot read {path}: {exc.strerror or exc}",
                                     fix="check the file exists and is readable") from exc
    except _Malformed as exc:
        raise InvalidCheckpointError(f"{path} is not a valid SentencePiece model: {exc}", fix=fix) from exc
    except MemoryError:
        raise InvalidCheckpointError(f"{path} does not fit in memory to be parsed",
                                     fix="free memory, or check the file is a real tokenizer.model") from None


# --- writer -------------------------------------------------------------------------------------

def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 -> 10-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _int_field(number: int, value: int) -> bytes:
    return _key(number, _VARINT) + _varint(value)


def _bytes_field(number: int, value: bytes) -> bytes:
    return _key(number, _LENGTH) + _varint(len(value)) + value


def serialize_model(model: SentencePieceModel) -> bytes:
    parts: list[bytes] = []
    for piece in model.pieces:
        body = (_bytes_field(1, piece.piece.encode("utf-8"))
                + _key(2, _FIXED32) + struct.pack("<f", piece.score)
                + _int_field(3, int(piece.type)))
        parts.append(_bytes_field(1, body))
    trainer = (_int_field(3, int(model.model_type)) + _int_field(4, len(model.pieces))
               + _int_field(35, int(model.byte_fallback))
               + _int_field(40, model.unk_id) + _int_field(41, model.bos_id)
               + _int_field(42, model.eos_id) + _int_field(43, model.pad_id))
    parts.append(_bytes_field(2, trainer))
    normalizer = (_bytes_field(1, model.normalizer_name.encode("utf-8"))
                  + _int_field(3, int(model.add_dummy_prefix))
                  + _int_field(4, int(model.remove_extra_whitespaces))
                  + _int_field(5, 1))  # escape_whitespaces: spaces become U+2581
    parts.append(_bytes_field(3, normalizer))
    return b"".join(parts)
