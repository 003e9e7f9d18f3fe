"""llama.cpp's own GGUF parser (ggml's ``gguf_init_from_file``, from the libggml-base that
llama-cpp-python ships) as a reference for tests: the tensor table and array lengths exactly as
the loader sees them, in C — gguf-py's GGUFReader takes ~16 s of CPU on a 262,144-token
vocabulary, this a fraction of a second."""

from __future__ import annotations

import ctypes
import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path

GGML_MAX_DIMS = 4


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


class _TensorHead(ctypes.Structure):
    """The first fields of ``struct ggml_tensor`` (ggml.h): type, buffer, ne[4]."""
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * GGML_MAX_DIMS)]


@dataclass(frozen=True)
class GGMLTensor:
    shape: tuple[int, ...]  # ne order, as gguf-py's reader gives it
    n_bytes: int
    offset: int  # absolute, in the file
    ggml_type: int


@cache
def _lib() -> ctypes.CDLL:
    spec = importlib.util.find_spec("llama_cpp")
    assert spec is not None and spec.origin is not None
    lib = ctypes.CDLL(str(Path(spec.origin).parent / "lib" / "libggml-base.so"))
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _InitParams]
    for name, restype, argtypes in (
            ("gguf_free", None, [ctypes.c_void_p]),
            ("gguf_get_data_offset", ctypes.c_size_t, [ctypes.c_void_p]),
            ("gguf_get_n_tensors", ctypes.c_int64, [ctypes.c_void_p]),
            ("gguf_get_tensor_name", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
            ("gguf_get_tensor_offset", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
            ("gguf_get_tensor_size", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
            ("gguf_get_tensor_type", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
            ("gguf_find_key", ctypes.c_int64, [ctypes.c_void_p, ctypes.c_char_p]),
            ("gguf_get_arr_n", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
            ("ggml_get_tensor", ctypes.POINTER(_TensorHead), [ctypes.c_void_p, ctypes.c_char_p]),
            ("ggml_n_dims", ctypes.c_int, [ctypes.c_void_p]),
            ("ggml_free", None, [ctypes.c_void_p]),
            ("gguf_get_kv_type", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
            ("gguf_get_arr_type", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
            ("gguf_get_val_data", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int64]),
            ("gguf_get_val_str", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
            ("gguf_get_arr_data", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int64]),
            ("gguf_get_arr_str", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def read_with_ggml(path: Path | str, array_keys: tuple[str, ...] = ()) -> tuple[dict[str, GGMLTensor], dict[str, int]]:
    """(tensor name -> its record, array key -> its length) as ggml parses ``path``."""
    lib = _lib()
    ggml_ctx = ctypes.c_void_p()
    gguf_ctx = lib.gguf_init_from_file(str(path).encode(), _InitParams(True, ctypes.pointer(ggml_ctx)))
    assert gguf_ctx, f"ggml cannot parse {path}"
    try:
        data_offset = lib.gguf_get_data_offset(gguf_ctx)
        tensors = {}
        for i in range(lib.gguf_get_n_tensors(gguf_ctx)):
            name = lib.gguf_get_tensor_name(gguf_ctx, i)
            head = lib.ggml_get_tensor(ggml_ctx, name)
            n_dims = lib.ggml_n_dims(ctypes.cast(head, ctypes.c_void_p))
            tensors[name.decode()] = GGMLTensor(
                shape=tuple(int(n) for n in head.contents.ne[:n_dims]), n_bytes=lib.gguf_get_tensor_size(gguf_ctx, i),
                offset=data_offset + lib.gguf_get_tensor_offset(gguf_ctx, i),
                ggml_type=lib.gguf_get_tensor_type(gguf_ctx, i))
        lengths = {}
        for key in array_keys:
            key_id = lib.gguf_find_key(gguf_ctx, key.encode())
            assert key_id >= 0, key
            lengths[key] = lib.gguf_get_arr_n(gguf_ctx, key_id)
        return tensors, lengths
    finally:
        lib.gguf_free(gguf_ctx)
        if ggml_ctx:
            lib.ggml_free(ggml_ctx)


def tensor_values(path: Path | str, tensor: GGMLTensor, rows: "np.ndarray | None" = None) -> "np.ndarray":
    """A tensor's values as float32 in numpy order (rows first; only ``rows`` of the first axis
    when given), dequantized with gguf-py's reference dequantizers: what GGUFReader's ``data``
    gives, without parsing the metadata."""
    import gguf
    import numpy as np

    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=tensor.offset, shape=(tensor.n_bytes,))
    qtype = gguf.GGMLQuantizationType(tensor.ggml_type)
    shape = tuple(reversed(tensor.shape))
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        data = raw.view(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16).reshape(shape)
        return np.array(data[rows] if rows is not None else data, dtype=np.float32)
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    stored = raw.reshape(*shape[:-1], shape[-1] // block * block_bytes)
    return gguf.quants.dequantize(np.array(stored[rows] if rows is not None else stored), qtype).astype(np.float32)


# gguf_type (gguf.h) -> numpy dtype of a scalar or array element; 8 is STRING, 9 ARRAY
_GGUF_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
                12: "<f8"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_values_with_ggml(path: Path | str, keys: tuple[str, ...]) -> dict[str, object]:
    """The values of metadata ``keys`` as ggml parses them (absent keys: None): scalars as Python
    values, arrays as lists."""
    import numpy as np

    lib = _lib()
    gguf_ctx = lib.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
    assert gguf_ctx, f"ggml cannot parse {path}"
    try:
        values: dict[str, object] = {}
        for key in keys:
            key_id = lib.gguf_find_key(gguf_ctx, key.encode())
            if key_id < 0:
                values[key] = None
                continue
            kind = lib.gguf_get_kv_type(gguf_ctx, key_id)
            if kind == _GGUF_STRING:
                values[key] = lib.gguf_get_val_str(gguf_ctx, key_id).decode()
            elif kind != _GGUF_ARRAY:
                dtype = np.dtype(_GGUF_DTYPES[kind])
                raw = ctypes.string_at(lib.gguf_get_val_data(gguf_ctx, key_id), dtype.itemsize)
                values[key] = np.frombuffer(raw, dtype)[0].item()
            else:
                n = lib.gguf_get_arr_n(gguf_ctx, key_id)
                item = lib.gguf_get_arr_type(gguf_ctx, key_id)
                if item == _GGUF_STRING:
                    values[key] = [lib.gguf_get_arr_str(gguf_ctx, key_id, i).decode() for i in range(n)]
                else:
                    dtype = np.dtype(_GGUF_DTYPES[item])
                    raw = ctypes.string_at(lib.gguf_get_arr_data(gguf_ctx, key_id), n * dtype.itemsize)
                    values[key] = np.frombuffer(raw, dtype).tolist()
        return values
    finally:
        lib.gguf_free(gguf_ctx)
