"""The strict safetensors reader: values, row blocks, bf16 widening, and refusal of every
malformed header the official parser refuses."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from edge_lora.converters.safetensors_io import (MAX_HEADER_BYTES, SafetensorsFile, bf16_bits_to_f32,
                                       f32_to_bf16_bits, write_safetensors)
from edge_lora.core.errors import InvalidCheckpointError


def _raw_file(path: Path, header: dict, data: bytes, header_len: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def test_round_trip_f32_f16_and_row_blocks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((7, 5)).astype(np.float32)
    b = rng.standard_normal((4,)).astype(np.float16)
    path = write_safetensors(tmp_path / "m.safetensors", {"a": a, "b": b}, {"format": "pt"})
    with SafetensorsFile(path) as f:
        assert f.names() == ["a", "b"]
        assert f.metadata == {"format": "pt"}
        assert f.info("a").shape == (7, 5) and f.info("a").dtype == "F32"
        np.testing.assert_array_equal(f.read("a"), a)
        np.testing.assert_array_equal(f.read("a", rows=slice(2, 5)), a[2:5])
        np.testing.assert_array_equal(f.read("a", rows=slice(6, 100)), a[6:])
        assert f.read("b").dtype == np.float16
        np.testing.assert_array_equal(f.read("b", rows=slice(1, 3)), b[1:3])


def test_bf16_widening_is_exact_bit_shift(tmp_path: Path) -> None:
    values = np.array([[1.0, -2.5, 3.140625], [0.0, 65504.0, -1e-3]], dtype=np.float32)
    path = write_safetensors(tmp_path / "m.safetensors", {"w": values}, bf16=True)
    with SafetensorsFile(path) as f:
        assert f.info("w").dtype == "BF16"
        got = f.read("w")
        assert got.dtype == np.float32
        # bf16 keeps the top 16 bits: the result is the value rounded to 8 mantissa bits.
        expected = bf16_bits_to_f32(f32_to_bf16_bits(values))
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_allclose(got, values, rtol=2 ** -8)
        np.testing.assert_array_equal(f.read("w", rows=slice(1, 2)), expected[1:2])
    # Round to nearest even, as torch does: 1 + 2^-8 is a tie and goes down to 1.0.
    assert bf16_bits_to_f32(f32_to_bf16_bits(np.array([1 + 2 ** -8], np.float32)))[0] == 1.0
    assert bf16_bits_to_f32(f32_to_bf16_bits(np.array([1 + 3 * 2 ** -8], np.float32)))[0] == 1 + 2 ** -6


def test_row_read_touches_only_its_rows(tmp_path: Path) -> None:
    """A row block is a view at the right offset of the mmap, not a copy of the tensor."""
    big = np.arange(1000 * 64, dtype=np.float32).reshape(1000, 64)
    path = write_safetensors(tmp_path / "m.safetensors", {"big": big})
    with SafetensorsFile(path) as f:
        block = f.read("big", rows=slice(500, 502))
        assert block.shape == (2, 64) and block[0, 0] == 500 * 64
        assert not block.flags.owndata and not block.flags.writeable


@pytest.mark.parametrize("case, message", [
    ("header_past_eof", "runs past the end"),
    ("header_too_big", "100 MB"),
    ("not_json", "header is not valid JSON"),
    ("not_object", "not a JSON object"),
    ("unknown_dtype", "dtype I64"),
    ("size_mismatch", "does not match"),
    ("offset_out_of_range", "outside"),
    ("overlap", "overlaps"),
    ("gap", "gap"),
    ("not_covering", "cover"),
    ("negative_offset", "invalid data_offsets"),
    ("negative_dim", "invalid shape"),
    ("tiny", "truncated"),
])
def test_malformed_headers_are_refused(tmp_path: Path, case: str, message: str) -> None:
    p = tmp_path / "bad.safetensors"
    f32 = lambda shape, begin, end: {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}  # noqa: E731
    if case == "header_past_eof":
        _raw_file(p, {"a": f32([1], 0, 4)}, b"\0" * 4, header_len=10_000)
    elif case == "header_too_big":
        _raw_file(p, {}, b"", header_len=MAX_HEADER_BYTES + 1)
    elif case == "not_json":
        p.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    elif case == "not_object":
        _raw_file(p, [1, 2], b"")  # type: ignore[arg-type]
    elif case == "unknown_dtype":
        _raw_file(p, {"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8)
    elif case == "size_mismatch":
        _raw_file(p, {"a": f32([3], 0, 8)}, b"\0" * 8)
    elif case == "offset_out_of_range":
        _raw_file(p, {"a": f32([4], 0, 16)}, b"\0" * 8)
    elif case == "overlap":
        _raw_file(p, {"a": f32([2], 0, 8), "b": f32([2], 4, 12)}, b"\0" * 12)
    elif case == "gap":
        _raw_file(p, {"a": f32([1], 0, 4), "b": f32([1], 8, 12)}, b"\0" * 12)
    elif case == "not_covering":
        _raw_file(p, {"a": f32([1], 0, 4)}, b"\0" * 12)
    elif case == "negative_offset":
        _raw_file(p, {"a": f32([1], -4, 0)}, b"\0" * 4)
    elif case == "negative_dim":
        _raw_file(p, {"a": f32([-1], 0, 4)}, b"\0" * 4)
    elif case == "tiny":
        p.write_bytes(b"\1\2\3")
    with pytest.raises(InvalidCheckpointError, match=message):
        SafetensorsFile(p)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    good = write_safetensors(tmp_path / "m.safetensors", {"a": np.ones((64, 64), np.float32)})
    data = good.read_bytes()
    good.write_bytes(data[:-100])
    with pytest.raises(InvalidCheckpointError, match="outside"):
        SafetensorsFile(good)


def test_hostile_shape_product_does_not_wrap(tmp_path: Path) -> None:
    p = _raw_file(tmp_path / "bad.safetensors",
                  {"a": {"dtype": "F32", "shape": [2 ** 62, 4], "data_offsets": [0, 0]}}, b"")
    with pytest.raises(InvalidCheckpointError, match="does not match"):
        SafetensorsFile(p)
