"""validate_gguf / check_adapter_fits: the real Gemma file passes; every hostile header
llama.cpp's test-gguf.cpp builds is refused with InvalidGGUFError, quickly."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from edge_lora.core.errors import AdapterError, AdapterMismatchError, InputError, InputNotFoundError, InvalidGGUFError
from edge_lora.core.gguf_check import ArraySummary, check_adapter_fits, validate_gguf

VT = gguf.GGUFValueType


# --- a byte-level GGUF builder, so each test can corrupt exactly one field ---

def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _str(key) + struct.pack("<I", vtype) + payload


def _tensor_info(name: str, dims: list[int], ttype: int, offset: int, n_dims: int | None = None) -> bytes:
    nd = len(dims) if n_dims is None else n_dims
    return _str(name) + struct.pack("<I", nd) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", ttype, offset)


def build_gguf(*, magic: bytes = b"GGUF", version: int = 3, kvs: list[bytes] | None = None,
               tensors: list[bytes] | None = None, n_kv: int | None = None, n_tensors: int | None = None,
               data: bytes | None = None, alignment: int = 32) -> bytes:
    if kvs is None:
        kvs = [_kv("general.architecture", VT.STRING, _str("llama"))]
    if tensors is None:
        tensors = [_tensor_info("a.weight", [32, 2], gguf.GGMLQuantizationType.F32, 0),
                   _tensor_info("b.weight", [32], gguf.GGMLQuantizationType.F32, 256)]
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    body += b"\0" * (-len(body) % alignment)
    if data is None:
        data = b"\0" * (256 + 128)
    return body + data


def write(tmp_path: Path, blob: bytes, name: str = "x.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(blob)
    return p


def refused(path: Path, match: str) -> None:
    # CPU time of this thread, here and below: the bound is on the work a refusal takes (no
    # reading of what a header declares), not on how busy the machine is.
    start = time.thread_time()
    with pytest.raises(InvalidGGUFError, match=match):
        validate_gguf(path)
    assert time.thread_time() - start < 1.0


def test_builder_makes_a_valid_file_that_gguf_reader_agrees_with(tmp_path: Path) -> None:
    p = write(tmp_path, build_gguf())
    info = validate_gguf(p)
    reader = gguf.GGUFReader(p)
    assert [(t.name, t.n_bytes, t.data_offset) for t in reader.tensors] == \
        [(t.name, t.n_bytes, t.offset) for t in info.tensors]
    assert info.architecture == "llama" and info.tensor_data_bytes == 256 + 128


def test_real_gemma_file_passes_fast_and_matches_llama_cpps_parser(gemma_q4_gguf: Path) -> None:
    """The tensor table and the vocabulary's length as ggml's own gguf_init_from_file reads them
    (gguf-py's GGUFReader, the former reference, took ~16 s of CPU on this file's vocabulary)."""
    from tests.support.ggml_gguf import read_with_ggml

    start = time.thread_time()
    info = validate_gguf(gemma_q4_gguf, expect_type="model")
    assert time.thread_time() - start < 0.5
    assert info.architecture == "gemma3" and info.version == 3 and info.file_type == 15
    assert info.metadata["tokenizer.ggml.tokens"] == ArraySummary("STRING", 262144)
    tensors, lengths = read_with_ggml(gemma_q4_gguf, ("tokenizer.ggml.tokens",))
    assert info.array_length("tokenizer.ggml.tokens") == lengths["tokenizer.ggml.tokens"] == 262144
    assert len(info.tensors) == len(tensors) == 236
    for name, t in tensors.items():
        rec = info.tensor(name)
        assert rec is not None
        assert (rec.shape, rec.n_bytes, rec.offset, rec.type_name) == \
            (t.shape, t.n_bytes, t.offset, gguf.GGMLQuantizationType(t.ggml_type).name), name


def test_writer_output_passes(tmp_path: Path) -> None:
    p = tmp_path / "w.gguf"
    w = gguf.GGUFWriter(p, "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(1000)])
    w.add_tensor("blk.0.attn_q.weight", np.ones((64, 32), dtype=np.float32))
    w.add_tensor("blk.0.ffn_up.weight", np.ones((128, 32), dtype=np.float16))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    info = validate_gguf(p)
    assert info.tensor("blk.0.attn_q.weight").shape == (32, 64)
    assert info.tensor("blk.0.ffn_up.weight").type_name == "F16"
    assert info.metadata["llama.block_count"] == 1
    assert info.array_length("tokenizer.ggml.tokens") == 1000


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError):
        validate_gguf(tmp_path / "nope.gguf")


def test_directory_is_named_as_a_directory(tmp_path: Path) -> None:
    # It used to say "does not exist", which sends the user looking for a typo.
    (tmp_path / "model.gguf").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        validate_gguf(tmp_path / "model.gguf")


@pytest.mark.parametrize("cut", [3, 20, 40, 80, 200])
def test_truncated_files_refused(tmp_path: Path, cut: int) -> None:
    blob = build_gguf()
    refused(write(tmp_path, blob[:cut]), "not a valid GGUF")


def test_zeroed_header_refused(tmp_path: Path) -> None:
    blob = build_gguf()
    refused(write(tmp_path, b"\0" * 32 + blob[32:]), "bad magic")


def test_bad_magic(tmp_path: Path) -> None:
    refused(write(tmp_path, build_gguf(magic=b"GGML")), "bad magic")


@pytest.mark.parametrize("version", [0, 1, 4, 0x03000000])
def test_bad_version(tmp_path: Path, version: int) -> None:
    refused(write(tmp_path, build_gguf(version=version)), "version|big-endian")


def test_huge_n_kv(tmp_path: Path) -> None:
    refused(write(tmp_path, build_gguf(n_kv=2**63)), "metadata entries")


def test_huge_n_tensors(tmp_path: Path) -> None:
    refused(write(tmp_path, build_gguf(n_tensors=2**40)), "tensors")


def test_huge_string_length(tmp_path: Path) -> None:
    bad = struct.pack("<Q", 2**62) + b"general.architecture"
    refused(write(tmp_path, build_gguf(kvs=[bad + struct.pack("<I", VT.STRING) + _str("x")])), "past the end")


def test_huge_array_count(tmp_path: Path) -> None:
    # GGUFReader spends seconds on this; the pre-parse refuses it immediately.
    kv = _kv("tokenizer.ggml.scores", VT.ARRAY, struct.pack("<IQ", VT.FLOAT32, 10**9))
    refused(write(tmp_path, build_gguf(kvs=[kv])), "past the end")
    kv = _kv("tokenizer.ggml.tokens", VT.ARRAY, struct.pack("<IQ", VT.STRING, 10**9))
    refused(write(tmp_path, build_gguf(kvs=[kv])), "more than the file can hold")


def test_unknown_value_type_and_nested_array(tmp_path: Path) -> None:
    refused(write(tmp_path, build_gguf(kvs=[_kv("k", 99, b"\0" * 8)])), "unknown value type")
    nested = _kv("k", VT.ARRAY, struct.pack("<IQ", VT.ARRAY, 1) + struct.pack("<IQ", VT.UINT8, 1) + b"\1")
    refused(write(tmp_path, build_gguf(kvs=[nested])), "nested array")


def test_duplicate_key(tmp_path: Path) -> None:
    kv = _kv("general.architecture", VT.STRING, _str("llama"))
    refused(write(tmp_path, build_gguf(kvs=[kv, kv])), "duplicate metadata key")


def test_huge_n_dims(tmp_path: Path) -> None:
    t = _tensor_info("a.weight", [32], gguf.GGMLQuantizationType.F32, 0, n_dims=10**6)
    refused(write(tmp_path, build_gguf(tensors=[t])), "dimensions")


def test_zero_dim(tmp_path: Path) -> None:
    t = _tensor_info("a.weight", [32, 0], gguf.GGMLQuantizationType.F32, 0)
    refused(write(tmp_path, build_gguf(tensors=[t])), "zero dimension")


def test_overflowing_element_count(tmp_path: Path) -> None:
    # 2**32 * 2**32 wraps to 0 in uint64; Python ints see the real product.
    t = _tensor_info("a.weight", [2**32, 2**32], gguf.GGMLQuantizationType.F32, 0)
    refused(write(tmp_path, build_gguf(tensors=[t])), "elements")
    t = _tensor_info("a.weight", [2**16, 2**16, 2**16, 2**16], gguf.GGMLQuantizationType.F32, 0)
    refused(write(tmp_path, build_gguf(tensors=[t])), "elements")


def test_unknown_tensor_type_and_block_divisibility(tmp_path: Path) -> None:
    refused(write(tmp_path, build_gguf(tensors=[_tensor_info("a", [32], 200, 0)])), "unknown type")
    t = _tensor_info("a", [100], gguf.GGMLQuantizationType.Q4_K, 0)
    refused(write(tmp_path, build_gguf(tensors=[t])), "block size")


@pytest.mark.parametrize("alignment", [0, 3, 48])
def test_bad_alignment(tmp_path: Path, alignment: int) -> None:
    kvs = [_kv("general.alignment", VT.UINT32, struct.pack("<I", alignment))]
    refused(write(tmp_path, build_gguf(kvs=kvs)), "power of two")


def test_alignment_wrong_type(tmp_path: Path) -> None:
    kvs = [_kv("general.alignment", VT.STRING, _str("32"))]
    refused(write(tmp_path, build_gguf(kvs=kvs)), "power of two")


def test_misaligned_offset(tmp_path: Path) -> None:
    t = _tensor_info("a.weight", [32], gguf.GGMLQuantizationType.F32, 4)
    refused(write(tmp_path, build_gguf(tensors=[t])), "not aligned")


def test_offset_past_eof(tmp_path: Path) -> None:
    t = _tensor_info("a.weight", [32], gguf.GGMLQuantizationType.F32, 2**60)
    refused(write(tmp_path, build_gguf(tensors=[t])), "past the end")


def test_overlapping_tensors(tmp_path: Path) -> None:
    ts = [_tensor_info("a.weight", [32, 2], gguf.GGMLQuantizationType.F32, 0),
          _tensor_info("b.weight", [32], gguf.GGMLQuantizationType.F32, 128)]
    refused(write(tmp_path, build_gguf(tensors=ts)), "overlaps")


def test_duplicate_tensor_names(tmp_path: Path) -> None:
    ts = [_tensor_info("a.weight", [32], gguf.GGMLQuantizationType.F32, 0),
          _tensor_info("a.weight", [32], gguf.GGMLQuantizationType.F32, 128)]
    refused(write(tmp_path, build_gguf(tensors=ts)), "duplicate tensor name")


def test_tensor_name_too_long(tmp_path: Path) -> None:
    t = _tensor_info("x" * 64, [32], gguf.GGMLQuantizationType.F32, 0)
    refused(write(tmp_path, build_gguf(tensors=[t])), "tensor name of 64 bytes")


def test_data_shorter_than_declared(tmp_path: Path) -> None:
    refused(write(tmp_path, build_gguf(data=b"\0" * 300)), "shorter than declared")


def test_expect_type(tmp_path: Path) -> None:
    p = write(tmp_path, build_gguf())
    with pytest.raises(AdapterError, match="not a GGUF LoRA adapter"):
        validate_gguf(p, expect_type="adapter")
    kvs = [_kv("general.architecture", VT.STRING, _str("llama")), _kv("general.type", VT.STRING, _str("adapter")),
           _kv("adapter.type", VT.STRING, _str("lora"))]
    a = write(tmp_path, build_gguf(kvs=kvs), "a.gguf")
    assert validate_gguf(a, expect_type="adapter").general_type == "adapter"
    with pytest.raises(InvalidGGUFError, match="adapter, not a model"):
        validate_gguf(a, expect_type="model")


@pytest.mark.parametrize("alpha", [_kv("adapter.lora.alpha", VT.FLOAT32, struct.pack("<f", float("nan"))),
                                   _kv("adapter.lora.alpha", VT.FLOAT32, struct.pack("<f", float("inf"))),
                                   _kv("adapter.lora.alpha", VT.STRING, _str("32"))], ids=["nan", "inf", "string"])
def test_adapter_alpha_must_be_a_finite_number(tmp_path: Path, alpha: bytes) -> None:
    # llama.cpp scales every delta by alpha / rank: a NaN alpha makes every logit NaN.
    kvs = [_kv("general.architecture", VT.STRING, _str("llama")), _kv("general.type", VT.STRING, _str("adapter")),
           _kv("adapter.type", VT.STRING, _str("lora")), alpha]
    with pytest.raises(AdapterError, match="adapter.lora.alpha"):
        validate_gguf(write(tmp_path, build_gguf(kvs=kvs)), expect_type="adapter")


@pytest.mark.parametrize("kv", [
    _kv("llama.block_count", VT.UINT32, struct.pack("<I", 0)),
    _kv("llama.block_count", VT.UINT32, struct.pack("<I", 513)),
    _kv("llama.attention.layer_norm_rms_epsilon", VT.FLOAT32, struct.pack("<f", float("nan"))),
    _kv("llama.attention.layer_norm_rms_epsilon", VT.FLOAT32, struct.pack("<f", -1e-5)),
    _kv("llama.context_length", VT.UINT32, struct.pack("<I", 4_000_000_000)),
], ids=["no-layers", "too-many-layers", "eps-nan", "eps-negative", "context-beyond-int32"])
def test_model_hparams_llama_cpp_aborts_on_are_refused(tmp_path: Path, kv: bytes) -> None:
    # llama.cpp GGML_ASSERTs on these (SIGABRT of the whole process), at load or at the first decode.
    kvs = [_kv("general.architecture", VT.STRING, _str("llama")), kv]
    path = write(tmp_path, build_gguf(kvs=kvs))
    with pytest.raises(InvalidGGUFError, match="llama.(block_count|attention|context_length)"):
        validate_gguf(path, expect_type="model")
    validate_gguf(path)  # only a model about to be loaded is held to it


def _spm_vocab_kvs(tokens: list[str]) -> list[bytes]:
    strings = b"".join(_str(t) for t in tokens)
    return [_kv("general.architecture", VT.STRING, _str("llama")),
            _kv("tokenizer.ggml.model", VT.STRING, _str("llama")),
            _kv("tokenizer.ggml.tokens", VT.ARRAY, struct.pack("<IQ", VT.STRING, len(tokens)) + strings)]


@pytest.mark.parametrize("byte_form", ["hex", "raw-byte"])
def test_spm_vocabulary_must_cover_every_byte(tmp_path: Path, byte_form: str) -> None:
    # llama.cpp's byte fallback threw std::out_of_range through the C API (SIGABRT) on the first
    # prompt needing a byte the vocabulary lacked.
    words = [f"word{i}" for i in range(100)]
    with_bytes = [f"<0x{b:02X}>" for b in range(256)] if byte_form == "hex" else \
        [chr(b) for b in range(128)] + [f"<0x{b:02X}>" for b in range(128, 256)]
    ok = write(tmp_path, build_gguf(kvs=_spm_vocab_kvs(words + with_bytes)), "ok.gguf")
    validate_gguf(ok, expect_type="model")
    lacking = write(tmp_path, build_gguf(kvs=_spm_vocab_kvs(words + with_bytes[:10] + with_bytes[11:])), "bad.gguf")
    with pytest.raises(InvalidGGUFError, match="no token for byte 0x0A"):
        validate_gguf(lacking, expect_type="model")


# --- check_adapter_fits ---

def _write_model(path: Path, arch: str, tensors: dict[str, np.ndarray], adapter: bool = False) -> Path:
    w = gguf.GGUFWriter(path, arch)
    if adapter:
        w.add_string("general.type", "adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", 8.0)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


@pytest.fixture
def tiny_base(tmp_path: Path):
    # numpy [out, in] = GGUF ne (in, out)
    return validate_gguf(_write_model(tmp_path / "base.gguf", "llama", {
        "blk.0.attn_q.weight": np.zeros((64, 32), np.float32),
        "blk.0.ffn_up.weight": np.zeros((96, 32), np.float32)}))


def _adapter(tmp_path: Path, tensors: dict[str, np.ndarray], arch: str = "llama"):
    return validate_gguf(_write_model(tmp_path / "adapter.gguf", arch, tensors, adapter=True))


def test_adapter_fits(tmp_path: Path, tiny_base) -> None:
    a = _adapter(tmp_path, {"blk.0.attn_q.weight.lora_a": np.zeros((4, 32), np.float32),
                            "blk.0.attn_q.weight.lora_b": np.zeros((64, 4), np.float32)})
    check_adapter_fits(tiny_base, a)


@pytest.mark.parametrize("tensors,match", [
    ({"blk.0.attn_q.weight.lora_a": np.zeros((4, 32), np.float32)}, "no matching .lora_b"),
    ({"blk.0.attn_q.weight.lora_b": np.zeros((64, 4), np.float32)}, "no matching .lora_a"),
    ({"blk.9.attn_q.weight.lora_a": np.zeros((4, 32), np.float32),
      "blk.9.attn_q.weight.lora_b": np.zeros((64, 4), np.float32)}, "blk.9.attn_q.weight does not exist"),
    ({"blk.0.ffn_up.weight.lora_a": np.zeros((4, 32), np.float32),
      "blk.0.ffn_up.weight.lora_b": np.zeros((64, 4), np.float32)}, "blk.0.ffn_up.weight shapes"),
    ({"blk.0.attn_q.weight.lora_a": np.zeros((4, 64), np.float32),
      "blk.0.attn_q.weight.lora_b": np.zeros((64, 4), np.float32)}, "blk.0.attn_q.weight shapes"),
    ({"blk.0.attn_q.weight.lora_a": np.zeros((4, 32), np.float32),
      "blk.0.attn_q.weight.lora_b": np.zeros((64, 8), np.float32)}, "blk.0.attn_q.weight shapes"),
])
def test_adapter_mismatches_name_the_tensor(tmp_path: Path, tiny_base, tensors, match: str) -> None:
    with pytest.raises(AdapterMismatchError, match=match):
        check_adapter_fits(tiny_base, _adapter(tmp_path, tensors))


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.float64])
def test_adapter_with_integer_or_f64_tensors_refused(tmp_path: Path, tiny_base, dtype: type) -> None:
    # llama.cpp loaded such an adapter and then crashed with SIGSEGV at the first decode.
    a = _adapter(tmp_path, {"blk.0.attn_q.weight.lora_a": np.zeros((4, 32), dtype),
                            "blk.0.attn_q.weight.lora_b": np.zeros((64, 4), np.float32)})
    with pytest.raises(AdapterError, match="cannot multiply"):
        check_adapter_fits(tiny_base, a)


def test_adapter_wrong_architecture(tmp_path: Path, tiny_base) -> None:
    a = _adapter(tmp_path, {"blk.0.attn_q.weight.lora_a": np.zeros((4, 32), np.float32),
                            "blk.0.attn_q.weight.lora_b": np.zeros((64, 4), np.float32)}, arch="qwen2")
    with pytest.raises(AdapterMismatchError, match="architecture 'qwen2'"):
        check_adapter_fits(tiny_base, a)


def test_model_file_as_adapter_refused(tiny_base) -> None:
    with pytest.raises(AdapterError, match="not a GGUF LoRA adapter"):
        check_adapter_fits(tiny_base, tiny_base)


def test_random_header_corruption_only_raises_invalid_gguf(tmp_path: Path) -> None:
    """Fuzz: flip bytes and cut the header of a valid file; the parser may accept (a data byte
    changed) or refuse with InvalidGGUFError — never any other exception, never slowly."""
    w = gguf.GGUFWriter(tmp_path / "seed.gguf", "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(100)])
    w.add_array("tokenizer.ggml.scores", [float(i) for i in range(100)])
    w.add_string("tokenizer.chat_template", "{{ messages }}")
    w.add_tensor("blk.0.attn_q.weight", np.ones((64, 32), dtype=np.float32))
    w.add_tensor("blk.0.ffn_up.weight", np.ones((8, 256), dtype=np.float16))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    seed = (tmp_path / "seed.gguf").read_bytes()
    header_end = seed.index(b"blk.0.ffn_up.weight") + 64
    rng = np.random.default_rng(0)
    target = tmp_path / "fuzz.gguf"
    start = time.thread_time()
    for trial in range(400):
        blob = bytearray(seed)
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(0, header_end))
            blob[pos] = int(rng.choice([0, 0xFF, 0x7F, 0x80, int(rng.integers(0, 256))]))
        if trial % 5 == 0:
            blob = blob[:int(rng.integers(0, len(blob)))]
        target.write_bytes(bytes(blob))
        try:
            validate_gguf(target)
        except InvalidGGUFError:
            pass
    assert time.thread_time() - start < 20


# --- hyperparameters llama.cpp's loader or graph builder asserts on (llama-model.cpp, src/models) ---

@pytest.mark.parametrize("overrides,match", [
    ({"llama.nextn_predict_layers": 1}, "nextn_predict_layers 1 for 1 blocks"),
    ({"llama.expert_count": 2000, "llama.expert_used_count": 2}, "up to 1024"),
    ({"llama.expert_count": 4, "llama.expert_used_count": 5}, "more used than exist"),
    ({"llama.expert_count": 4, "llama.expert_used_count": [0]}, "at least one"),
    ({"llama.expert_used_count": 2}, "0 experts .* with 2 used per token; more used than exist"),
    ({"llama.expert_group_count": 2}, "without experts both must be 0"),
    ({"llama.expert_count": 8, "llama.expert_used_count": 2, "llama.expert_group_count": 8}, "fewer groups"),
    ({"llama.expert_count": 8, "llama.expert_used_count": 2, "llama.expert_group_count": 3,
      "llama.expert_group_used_count": 1}, "groups must divide"),
    ({"llama.expert_count": 8, "llama.expert_used_count": 2, "llama.expert_group_count": 4,
      "llama.expert_group_used_count": 4}, "fewer than all groups"),
    ({"llama.expert_used_count": [2, 2]}, "2 entries for 1 layers"),
    ({"llama.rope.scaling.type": "dynamic"}, "rope.scaling.type 'dynamic'"),
    ({"llama.attention.head_count": [4, 4]}, "head_count 2 entries for 1 layers"),
    ({"llama.attention.head_count": [-4]}, "not a count"),
    ({"llama.attention.head_count_kv": 3}, "multiple of the key/value heads"),
    ({"llama.attention.head_count_kv": 8}, "multiple of the key/value heads"),
    ({"llama.attention.key_length": 32}, "key head size 32, value head size 16"),
    ({"llama.rope.dimension_count": 8}, "rope dimensions 8"),
    ({"llama.embedding_length": 66}, "not a multiple of its 4 heads"),
], ids=["nextn", "experts-max", "experts-used", "experts-none-used", "used-without-experts",
        "groups-without-experts", "groups-too-many",
        "groups-divide", "groups-used", "used-array-length", "rope-scaling", "heads-array-length",
        "heads-negative", "kv-heads-divide", "kv-heads-more", "key-length", "rope-dims", "embd-not-divisible"])
def test_hparams_llama_cpp_aborts_on_are_refused_before_it_sees_them(tmp_path: Path, overrides: dict,
                                                                      match: str) -> None:
    from tests.support.tiny_gguf import write_tiny_llama

    path = write_tiny_llama(tmp_path / "bad.gguf", overrides)
    start = time.thread_time()
    with pytest.raises(InvalidGGUFError, match=match):
        validate_gguf(path, expect_type="model")
    assert time.thread_time() - start < 1.0


@pytest.mark.parametrize("overrides", [
    {}, {"llama.expert_count": 8, "llama.expert_used_count": 2},
    {"llama.expert_count": 8, "llama.expert_used_count": 2, "llama.expert_group_count": 4,
     "llama.expert_group_used_count": 2},
    {"llama.attention.head_count_kv": 2}, {"llama.attention.head_count_kv": [1]},
    {"llama.rope.scaling.type": "yarn"}, {"llama.nextn_predict_layers": 0},
    {"llama.attention.key_length": 16, "llama.attention.value_length": 16},
], ids=["plain", "moe", "moe-groups", "gqa", "gqa-array", "yarn", "no-nextn", "explicit-head-size"])
def test_valid_hparams_pass(tmp_path: Path, overrides: dict) -> None:
    from tests.support.tiny_gguf import write_tiny_llama

    validate_gguf(write_tiny_llama(tmp_path / "ok.gguf", overrides), expect_type="model")


def test_head_sizes_are_checked_only_for_architectures_that_assert_them(tmp_path: Path) -> None:
    def kvs(arch: str) -> list[bytes]:
        return [_kv("general.architecture", VT.STRING, _str(arch)),
                _kv(f"{arch}.block_count", VT.UINT32, struct.pack("<I", 1)),
                _kv(f"{arch}.embedding_length", VT.UINT32, struct.pack("<I", 64)),
                _kv(f"{arch}.attention.head_count", VT.UINT32, struct.pack("<I", 4)),
                _kv(f"{arch}.rope.dimension_count", VT.UINT32, struct.pack("<I", 8))]

    with pytest.raises(InvalidGGUFError, match="qwen2 needs them equal"):
        validate_gguf(write(tmp_path, build_gguf(kvs=kvs("qwen2")), "qwen2.gguf"), expect_type="model")
    # gemma3's graph uses n_rot separately from the head size: a partial rotary is its business.
    validate_gguf(write(tmp_path, build_gguf(kvs=kvs("gemma3")), "gemma3.gguf"), expect_type="model")


def test_integer_tensors_in_a_model_are_refused(tmp_path: Path) -> None:
    tensors = [_tensor_info("blk.0.attn_q.weight", [8, 2], gguf.GGMLQuantizationType.I32, 0)]
    path = write(tmp_path, build_gguf(tensors=tensors))
    with pytest.raises(InvalidGGUFError, match="as I32"):
        validate_gguf(path, expect_type="model")


def test_a_one_dimensional_tensor_not_in_f32_is_refused(tmp_path: Path) -> None:
    """Found by bench/fuzz.py: an F16 norm weight passed the load and aborted the first decode."""
    tensors = [_tensor_info("blk.0.attn_q.weight", [32, 2], gguf.GGMLQuantizationType.F16, 0),
               _tensor_info("output_norm.weight", [32], gguf.GGMLQuantizationType.F16, 128)]
    with pytest.raises(InvalidGGUFError, match="1-D tensor output_norm.weight as F16"):
        validate_gguf(write(tmp_path, build_gguf(tensors=tensors), "f16norm.gguf"), expect_type="model")
    tensors[1] = _tensor_info("output_norm.weight", [32], gguf.GGMLQuantizationType.F32, 128)
    validate_gguf(write(tmp_path, build_gguf(tensors=tensors), "f32norm.gguf"), expect_type="model")


def test_an_rwkv_tokenizer_on_another_architecture_is_refused(tmp_path: Path) -> None:
    """Found by bench/fuzz.py: llama.cpp's loader spun for over a minute on such a file."""
    kvs = [_kv("general.architecture", VT.STRING, _str("llama")),
           _kv("tokenizer.ggml.model", VT.STRING, _str("rwkv"))]
    with pytest.raises(InvalidGGUFError, match="RWKV tokenizer for a llama model"):
        validate_gguf(write(tmp_path, build_gguf(kvs=kvs)), expect_type="model")


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16", "Q8_0"])
def test_adapter_values_nan_or_inf_refused_in_every_type_converters_write(tmp_path: Path, type_name: str) -> None:
    import os

    from edge_lora.core.gguf_check import check_adapter_values

    def adapter(bad: float | None) -> Path:
        lora_b = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
        if bad is not None:
            lora_b[17, 5] = bad
        path = tmp_path / f"{type_name}-{bad}.gguf"
        w = gguf.GGUFWriter(path, "llama")
        w.add_string("general.type", "adapter")
        w.add_string("adapter.type", "lora")
        for name, values in (("blk.0.attn_q.weight.lora_a", np.ones((8, 32), np.float32)),
                             ("blk.0.attn_q.weight.lora_b", lora_b)):
            if type_name == "F32":
                w.add_tensor(name, values)
            elif type_name == "F16":
                w.add_tensor(name, values.astype(np.float16))
            elif type_name == "BF16":
                w.add_tensor(name, (values.view(np.uint32) >> 16).astype(np.uint16), raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                qtype = gguf.GGMLQuantizationType.Q8_0
                with np.errstate(invalid="ignore", over="ignore"):
                    w.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    def check(path: Path) -> None:
        info = validate_gguf(path, expect_type="adapter")
        assert {t.type_name for t in info.tensors} == {type_name}
        fd = os.open(path, os.O_RDONLY)
        try:
            check_adapter_values(info, fd)
        finally:
            os.close(fd)

    check(adapter(None))  # finite: accepted
    for bad in (float("nan"), float("inf")):
        with pytest.raises(AdapterError, match=r"tensor blk\.0\.attn_q\.weight\.lora_b holds NaN/inf"):
            check(adapter(bad))
