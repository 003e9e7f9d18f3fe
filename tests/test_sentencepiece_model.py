"""SentencePiece ``tokenizer.model`` parsing is bounded: peak memory a small multiple of the file."""

from __future__ import annotations

import random
import tracemalloc
from pathlib import Path

import pytest

from edge_lora.core.errors import InvalidCheckpointError
from edge_lora.converters.sentencepiece_model import (ModelType, Piece, PieceTable, PieceType, SentencePieceModel,
                                                      read_model, serialize_model)

ALPHABET = "abcdefghijklmnopqrstuvwxyzé日▁"


def _generated_model(n_pieces: int, seed: int = 0) -> SentencePieceModel:
    """A BPE model with byte pieces and short random pieces (1-12 characters, like real
    vocabularies: short pieces are the worst case for per-piece overhead)."""
    rng = random.Random(seed)
    pieces = [Piece("<unk>", 0.0, PieceType.UNKNOWN), Piece("<s>", 0.0, PieceType.CONTROL),
              Piece("</s>", 0.0, PieceType.CONTROL)]
    pieces += [Piece(f"<0x{b:02X}>", 0.0, PieceType.BYTE) for b in range(256)]
    seen: set[str] = set()
    while len(pieces) < n_pieces:
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 12)))
        if text not in seen:
            seen.add(text)
            pieces.append(Piece(text, -rng.randrange(1 << 14) / 256, PieceType.NORMAL))  # exact in float32
    return SentencePieceModel(pieces=pieces, model_type=ModelType.BPE, byte_fallback=True)


def test_parse_peak_memory_is_at_most_4x_the_file(tmp_path: Path) -> None:
    # A list of Piece objects cost ~20x the file (17-36x measured); the compact table ~2x.
    model = _generated_model(50_000)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(serialize_model(model))
    size = path.stat().st_size
    assert size > 900_000
    tracemalloc.start()
    try:
        parsed = read_model(path)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 4 * size, f"peak {peak / size:.1f}x the file"
    assert current <= 1.5 * size, f"the parsed model holds {current / size:.1f}x the file"
    assert isinstance(parsed.pieces, PieceTable) and len(parsed.pieces) == 50_000
    assert parsed.pieces[300] == Piece(model.pieces[300].piece, model.pieces[300].score, PieceType.NORMAL)
    assert parsed.pieces[-1].piece == model.pieces[-1].piece and parsed.pieces[3].type is PieceType.BYTE
    assert parsed == model


def test_piece_table_is_a_sequence(tmp_path: Path) -> None:
    model = _generated_model(400, seed=1)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(serialize_model(model))
    pieces = read_model(path).pieces
    assert list(pieces) == list(model.pieces) == pieces[:]
    assert pieces[-2:] == model.pieces[-2:]
    assert pieces != model.pieces[:-1]
    # A parsed model serializes back to the same bytes.
    assert serialize_model(read_model(path)) == path.read_bytes()


def _traced_peak(path: Path) -> tuple[int, BaseException | None]:
    tracemalloc.start()
    error = None
    try:
        read_model(path)
    except InvalidCheckpointError as exc:
        error = exc
    finally:
        _current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak, error


@pytest.mark.parametrize("crafted,refused", [
    # The review's shape: one message (the trainer spec) of a million 2-byte varint fields; a
    # list of (number, wire, value) tuples for them cost ~36x the file.
    (b"\x0a\x03\x0a\x01a\x0a\x03\x0a\x01b\x0a\x03\x0a\x01c" + b"\x12" + b"\x80\x9f\x49"
     + b"\x08\x01" * 600_000, None),
    # Empty pieces, 2 bytes each: 9 bytes each in the table (4.5x) unless refused.
    (b"\x0a\x00" * 600_000, "far smaller than a real vocabulary"),
], ids=["a-run-of-fields", "empty-pieces"])
def test_crafted_files_cost_at_most_about_twice_their_size(tmp_path: Path, crafted: bytes,
                                                           refused: str | None) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(crafted)
    peak, error = _traced_peak(path)
    assert peak <= 2.3 * len(crafted), f"peak {peak / len(crafted):.1f}x the file"
    if refused is None:
        assert error is None
    else:
        assert error is not None and refused in str(error)


def test_running_out_of_memory_is_a_one_line_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_lora.converters import sentencepiece_model

    path = tmp_path / "tokenizer.model"
    path.write_bytes(serialize_model(_generated_model(50, seed=2)))

    def exhausted(data):
        raise MemoryError
    monkeypatch.setattr(sentencepiece_model, "parse_model", exhausted)
    with pytest.raises(InvalidCheckpointError, match="does not fit in memory"):
        read_model(path)
