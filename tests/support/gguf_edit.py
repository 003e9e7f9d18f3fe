"""Copies of a GGUF with deliberate mistakes (a metadata key dropped or changed, a tensor's rows
reordered), to show that the logits comparisons catch the converter bug each one stands for."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np


def rewrite_gguf(src: Path, dst: Path, *, drop: tuple[str, ...] = (), set_values: Mapping[str, Any] | None = None,
                 tensors: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
                 drop_tensors: tuple[str, ...] = ()) -> Path:
    """``src`` with the keys ``drop`` and tensors ``drop_tensors`` removed, ``set_values``
    replaced (same value type) and the named tensors passed through a function of their array
    (numpy layout, rows first)."""
    reader = gguf.GGUFReader(src)
    set_values = dict(set_values or {})
    tensors = dict(tensors or {})
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        main_type = fld.types[0]
        sub_type = fld.types[-1] if main_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, set_values.pop(key, fld.contents()), main_type, sub_type)
    for key, value in set_values.items():  # keys the source did not have
        writer.add_key_value(key, value, gguf.GGUFValueType.FLOAT32 if isinstance(value, float)
                             else gguf.GGUFValueType.UINT32)
    for tensor in reader.tensors:
        if tensor.name in drop_tensors:
            continue
        if tensor.name in tensors:
            data = np.asarray(tensor.data)
            writer.add_tensor(tensor.name, np.ascontiguousarray(tensors.pop(tensor.name)(data)).astype(data.dtype),
                              raw_dtype=tensor.tensor_type)
        else:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    if tensors:
        raise KeyError(f"no tensors {sorted(tensors)} in {src}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
