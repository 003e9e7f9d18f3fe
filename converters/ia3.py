"""PEFT IA3 adapters (``IA3Config``): learned rescaling vectors, merged into the base weights.

IA3 multiplies a target Linear's output by a vector l (``ia3_l`` [out, 1]), or, for a module in
``feedforward_modules``, its input (``ia3_l`` [1, in]). PEFT's ``merge_and_unload`` folds that into
the weight: W' = l ⊙ W row-wise (and the bias b' = l ⊙ b) or column-wise for feed-forward modules
(the bias is left alone: it is added after the input scaling). ``Ia3Merger`` is a ``TensorMerger``
for ``edge_lora.converters.hf_to_gguf``. llama.cpp's LoRA runtime and vLLM cannot apply IA3 at run
time, so there is no GGUF adapter for it: it is merged or refused (``peft._parse_config``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_lora.converters.architectures import arch_spec_for
from edge_lora.converters.checkpoint import HFCheckpoint
from edge_lora.converters.peft import (CONFIG_FILE, KEY_PREFIX, PICKLE_WEIGHTS, SAME_BASE_FIX, WEIGHTS_FILE,
                                       text_module_name)
from edge_lora.converters.safetensors_io import SafetensorsFile
from edge_lora.core.bounded_json import JsonKind, read_json_object
from edge_lora.core.errors import AdapterError, AdapterMismatchError, EdgeLoraError, UnsafeFormatError

IA3_SUFFIX = ".ia3_l"


def is_ia3_dir(path: Path | str) -> bool:
    """True for a directory whose adapter_config.json says peft_type IA3 (anything else: False)."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        raw = read_json_object(config, JsonKind.ADAPTER_CONFIG)
    except EdgeLoraError:
        return False
    return isinstance(raw.get("peft_type"), str) and raw["peft_type"].upper() == "IA3"


def _err(path: Path, what: str) -> AdapterError:
    return AdapterError(f"IA3 adapter {path}: {what}", fix="re-export the adapter with PEFT")


def _matches(targets: Any, module: str) -> bool:
    """PEFT's ``check_target_module_exists`` (list: exact or dotted suffix; string: full regex)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets or [])


@dataclass(frozen=True)
class Ia3Vector:
    module: str  # HF module name (text model), no suffix
    scale: np.ndarray  # [out] (output rows) or [in] (input columns), float32
    feedforward: bool


class Ia3Adapter:
    def __init__(self, path: Path, vectors: dict[str, Ia3Vector]) -> None:
        self.path = path
        self.vectors = vectors  # keyed by module

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def open(cls, path: Path | str) -> Ia3Adapter:
        path = Path(path)
        raw = read_json_object(path / CONFIG_FILE, JsonKind.ADAPTER_CONFIG)
        targets, feedforward = raw.get("target_modules"), raw.get("feedforward_modules") or []
        for key, value in (("target_modules", targets), ("feedforward_modules", feedforward)):
            if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(t, str) for t in value))):
                raise _err(path, f"{key} must be a list of names or a regex string, got {value!r}")
        if raw.get("fan_in_fan_out"):
            raise _err(path, "fan_in_fan_out is set; it only applies to Conv1D (GPT-2) bases, which are not supported")
        if raw.get("modules_to_save"):
            raise _err(path, "modules_to_save is not supported for IA3 adapters")
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            pickled = [p for p in PICKLE_WEIGHTS if (path / p).exists()]
            if pickled:
                raise UnsafeFormatError(f"IA3 adapter {path} has only {pickled[0]}, a PyTorch pickle that can run "
                                        "code when loaded; edge-lora reads adapter_model.safetensors only",
                                        fix="save it again with PEFT's save_pretrained(safe_serialization=True)")
            raise _err(path, f"has no {WEIGHTS_FILE}")
        vectors: dict[str, Ia3Vector] = {}
        with SafetensorsFile(weights) as st:
            for key in st.names():
                if not (key.startswith(KEY_PREFIX) and key.endswith(IA3_SUFFIX)):
                    raise _err(path, f"tensor {key!r} is not an IA3 vector (base_model.model.<module>.ia3_l)")
                module = key[len(KEY_PREFIX):-len(IA3_SUFFIX)]
                if not _matches(targets, module):
                    raise _err(path, f"has a vector for {module}, which target_modules does not select")
                ff = _matches(feedforward, module)
                value = np.array(st.read(key), dtype=np.float32)
                if value.ndim != 2 or value.shape[1 if not ff else 0] != 1:
                    want = "[1, in]" if ff else "[out, 1]"
                    raise _err(path, f"{module}.ia3_l has shape {list(value.shape)}, expected {want}")
                if not np.isfinite(value).all():
                    raise _err(path, f"{module}.ia3_l has NaN/inf values")
                text = text_module_name(module)
                if text is not None:
                    vectors[text] = Ia3Vector(text, value.reshape(-1), ff)
        if not vectors:
            raise _err(path, "holds no IA3 vectors for the language model")
        return cls(path, vectors)

    def check_fits(self, ckpt: HFCheckpoint) -> None:
        written = arch_spec_for(ckpt.config).expected_shapes()
        for module, vector in self.vectors.items():
            weight = module + ".weight"
            if not ckpt.has_tensor(weight) or weight not in written:
                raise AdapterMismatchError(f"IA3 adapter {self.name} scales {weight}, which the converted base does "
                                           "not have", fix=SAME_BASE_FIX)
            out_features, in_features = ckpt.tensor_info(weight).shape
            want = in_features if vector.feedforward else out_features
            if vector.scale.shape[0] != want:
                raise AdapterMismatchError(
                    f"IA3 adapter {self.name}: {module}.ia3_l has {vector.scale.shape[0]} entries, the base weight "
                    f"{weight} has {want} {'input columns' if vector.feedforward else 'output rows'}",
                    fix=SAME_BASE_FIX)


class Ia3Merger:
    """TensorMerger: rows of W (and of b) times l, as PEFT's merge_and_unload."""

    def __init__(self, adapter: Ia3Adapter) -> None:
        self.adapter = adapter

    def check_fits(self, ckpt: HFCheckpoint) -> None:
        self.adapter.check_fits(ckpt)

    def merge_rows(self, hf_name: str, rows: np.ndarray, row_slice: slice) -> np.ndarray:
        module, _, param = hf_name.rpartition(".")
        vector = self.adapter.vectors.get(module)
        if vector is None or param not in ("weight", "bias"):
            return rows
        if vector.feedforward:
            return rows * vector.scale[None, :] if param == "weight" else rows
        scale = vector.scale[row_slice]
        return rows * (scale[:, None] if rows.ndim == 2 else scale)

    def extra_tensors(self) -> Mapping[str, np.ndarray]:
        return {}
