"""Reading a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

The adapter is untrusted input: pickled weights are refused, the config is validated field by
field, every tensor name must be one PEFT writes, A/B ranks must agree with the config, and
``check_fits`` compares every shape with the base checkpoint, and refuses a change to a tensor
the converted model is not written with, before anything is written.
The effective per-module scale (alpha / r, alpha / sqrt(r) with rsLoRA, rank/alpha patterns)
is computed once here; merge and GGUF export only read ``LoraDelta.scale``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_lora.converters.architectures import LM_HEAD, TEXT_ONLY_VIEWS, ArchSpec, arch_spec_for
from edge_lora.converters.checkpoint import HFCheckpoint
from edge_lora.converters.safetensors_io import SafetensorsFile
from edge_lora.core.bounded_json import JsonKind, read_json_object
from edge_lora.core.errors import (AdapterError, AdapterMismatchError, EdgeLoraError, InputNotFoundError,
                              UnsafeFormatError)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
KEY_PREFIX = "base_model.model."
LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"
# PEFT saves the DoRA magnitude without ".weight" since its DoRA refactor; older files kept it.
MAGNITUDE_SUFFIXES = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")
# Config options whose non-empty value changes the computation in ways we do not reproduce.
UNSUPPORTED_OPTIONS = ("lora_bias", "layer_replication", "trainable_token_indices", "target_parameters",
                       "use_qalora", "use_bdlora", "layers_pattern")
logger = logging.getLogger(__name__)
SAME_BASE_FIX = "use the base model this adapter was trained on"
CONVERT_HINT = ("load it with PEFT in an environment you trust and save it again with "
                "`model.save_pretrained(dir, safe_serialization=True)`")


def _err(path: Path, what: str, fix: str = "re-export the adapter with PEFT") -> AdapterError:
    return AdapterError(f"adapter {path}: {what}", fix=fix)


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first key (in config order) that matches the module
    name as a regex anchored at a dot boundary and the end."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error:
            continue  # PEFT would raise too; an unusable pattern simply never matches here
    return None


def _layer_index(module: str) -> int | None:
    """PEFT's default layer index: the number after the first ``<name>.`` segment pair."""
    found = re.match(r".*\.[^.]*\.(\d+)\.", module)
    return int(found.group(1)) if found else None


@dataclass(frozen=True)
class LoraConfig:
    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: list[str] | str | None
    layers_to_transform: list[int] | None
    modules_to_save: list[str]
    fan_in_fan_out: bool
    base_model_name_or_path: str | None = None

    def rank_for(self, module: str) -> int:
        key = pattern_key(self.rank_pattern, module)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        key = pattern_key(self.alpha_pattern, module)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scale_for(self, module: str) -> float:
        r = self.rank_for(module)
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, module: str) -> bool:
        """PEFT's ``check_target_module_exists`` for this config (a saved config may still say
        "all-linear": every projection the adapter could have, never lm_head)."""
        targets = self.target_modules
        if targets is None:
            return True  # PEFT filled in a per-architecture default we cannot know; trust the weights
        if isinstance(targets, str):
            if targets == "all-linear":
                return not module.endswith("lm_head")
            return re.fullmatch(targets, module) is not None
        found = module in targets or any(module.endswith("." + t) for t in targets)
        if found and self.layers_to_transform is not None:
            index = _layer_index(module)
            found = index is not None and index in self.layers_to_transform
        return found


def _parse_config(path: Path, raw: dict[str, Any]) -> LoraConfig:
    peft_type = raw.get("peft_type")
    if isinstance(peft_type, str) and peft_type.upper() == "IA3":
        raise _err(path, "is an IA3 adapter (learned rescaling vectors), which llama.cpp's LoRA runtime and "
                         "vLLM cannot apply and which cannot be combined with LoRA arithmetic",
                   fix="merge it into the model with `edge-lora convert BASE --adapter IA3_DIR`")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise _err(path, f"peft_type is {peft_type!r}; edge-lora supports LORA adapters only",
                   fix="use a LoRA adapter (peft_type LORA)")

    def number(key: str, default: Any = None, *, integer: bool = False, positive: bool = False) -> Any:
        value = raw.get(key, default)
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if not ok or isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)) \
                or (positive and value <= 0):
            raise _err(path, f"{key} must be a {'positive ' if positive else ''}"
                             f"{'integer' if integer else 'number'}, got {value!r}")
        return value

    def flag(key: str) -> bool:
        value = raw.get(key, False)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise _err(path, f"{key} must be true or false, got {value!r}")
        return value

    def pattern(key: str, integer: bool) -> dict[str, Any]:
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            raise _err(path, f"{key} must be an object, got {value!r}")
        for k, v in value.items():
            bad = (not isinstance(v, int) if integer else not isinstance(v, (int, float))) or isinstance(v, bool)
            if bad or (integer and v <= 0) or (not integer and not math.isfinite(v)):
                raise _err(path, f"{key}[{k!r}] must be a {'positive integer' if integer else 'number'}, got {v!r}")
        return dict(value)

    bias = raw.get("bias", "none")
    if bias != "none":
        raise _err(path, f"bias is {bias!r}; only bias=\"none\" adapters are supported "
                         "(trained biases cannot be applied as a LoRA)", fix="retrain with bias=\"none\"")
    for option in UNSUPPORTED_OPTIONS:
        if raw.get(option):
            raise _err(path, f"option {option}={raw[option]!r} is not supported",
                       fix="use a plain LoRA adapter without this option")
    targets = raw.get("target_modules")
    if not (targets is None or isinstance(targets, str)
            or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise _err(path, f"target_modules must be a list of names or a regex string, got {targets!r}")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:  # PEFT full-matches a string target_modules as a regex
            raise _err(path, f"target_modules {targets!r} is not a valid regular expression ({exc})") from None
    layers = raw.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not (layers is None or (isinstance(layers, list) and all(isinstance(i, int) for i in layers))):
        raise _err(path, f"layers_to_transform must be an integer or a list of integers, got {layers!r}")
    to_save = raw.get("modules_to_save") or []
    if not isinstance(to_save, list) or not all(isinstance(m, str) for m in to_save):
        raise _err(path, f"modules_to_save must be a list of module names, got {to_save!r}")
    return LoraConfig(
        r=number("r", 8, integer=True, positive=True), lora_alpha=float(number("lora_alpha", 8)),
        use_rslora=flag("use_rslora"), use_dora=flag("use_dora"),
        rank_pattern=pattern("rank_pattern", True),
        alpha_pattern={k: float(v) for k, v in pattern("alpha_pattern", False).items()},
        target_modules=targets, layers_to_transform=layers, modules_to_save=list(to_save),
        fan_in_fan_out=flag("fan_in_fan_out"),
        base_model_name_or_path=base_model if isinstance(base_model := raw.get("base_model_name_or_path"), str)
        and base_model else None)


@dataclass(frozen=True)
class LoraDelta:
    """One adapted Linear: ΔW = scale · B @ A for the HF weight ``module + '.weight'`` [out, in]."""

    module: str
    lora_a: np.ndarray  # [r, in] float32
    lora_b: np.ndarray  # [out, r] float32
    scale: float
    magnitude: np.ndarray | None = None  # DoRA: per-output-row magnitude [out]

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def weight_shape(self) -> tuple[int, int]:
        return int(self.lora_b.shape[0]), int(self.lora_a.shape[1])

    def delta_rows(self, rows: slice) -> np.ndarray:
        """scale · B[rows] @ A in float32: only the requested output rows are computed."""
        return (np.float32(self.scale) * self.lora_b[rows]) @ self.lora_a


class PeftAdapter:
    """A validated PEFT LoRA adapter: deltas keyed by HF weight name, full replacements
    (``modules_to_save``) keyed by HF tensor name."""

    def __init__(self, path: Path, config: LoraConfig, deltas: dict[str, LoraDelta],
                 replacements: dict[str, np.ndarray]) -> None:
        self.path = path
        self.config = config
        self.deltas = deltas  # HF weight name ("model.layers.0.self_attn.q_proj.weight") -> delta
        self.replacements = replacements

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def uses_dora(self) -> bool:
        return any(d.magnitude is not None for d in self.deltas.values())

    def delta_for(self, hf_weight_name: str) -> LoraDelta | None:
        return self.deltas.get(hf_weight_name)

    # --- opening ---
    @classmethod
    def open(cls, path_or_dir: Path | str) -> PeftAdapter:
        path = Path(path_or_dir)
        if path.is_file():
            if path.name in PICKLE_WEIGHTS or path.suffix in (".bin", ".pt", ".pth", ".pkl"):
                raise UnsafeFormatError(
                    f"{path} is a PyTorch pickle, which can run code when loaded; edge-lora reads "
                    "adapter_model.safetensors only", fix=CONVERT_HINT)
            path = path.parent
        if not path.is_dir():
            raise InputNotFoundError(f"adapter directory {path} does not exist",
                                     fix="give a PEFT adapter directory (adapter_config.json + "
                                         "adapter_model.safetensors) or a Hub repo id")
        config_path = path / CONFIG_FILE
        raw = read_json_object(config_path, JsonKind.ADAPTER_CONFIG, missing_ok=True)
        if raw is None:
            raise _err(path, f"has no {CONFIG_FILE}", fix="give a PEFT adapter directory")
        config = _parse_config(path, raw)
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            pickled = [p for p in PICKLE_WEIGHTS if (path / p).exists()]
            if pickled:
                raise UnsafeFormatError(
                    f"adapter {path} has only {pickled[0]}, a PyTorch pickle that can run code when "
                    "loaded; edge-lora reads adapter_model.safetensors only", fix=CONVERT_HINT)
            raise _err(path, f"has no {WEIGHTS_FILE}", fix="give a complete PEFT adapter directory")
        try:
            with SafetensorsFile(weights) as st:
                tensors = {n: np.array(st.read(n), dtype=np.float32) for n in st.names()}
        except EdgeLoraError as exc:
            raise AdapterError(f"adapter weights {weights} are unreadable: {exc.message}",
                               fix="re-download or re-export the adapter") from exc
        deltas, replacements = _assemble(path, config, tensors)
        return cls(path, config, deltas, replacements)

    # --- base compatibility ---
    def check_fits(self, ckpt: HFCheckpoint) -> None:
        """Every adapted weight and every replacement is a tensor the base ``ckpt`` has with a
        fitting shape, and one the converted model is written with (a delta on a tensor that is
        not written, e.g. lm_head of a tied model, would be lost); names the first misfit."""
        spec = arch_spec_for(ckpt.config)
        written = spec.expected_shapes(separate_head=LM_HEAD in self.replacements)
        for weight_name, delta in self.deltas.items():
            self._check_written(weight_name, "adapts", ckpt, spec, written)
            shape = tuple(ckpt.tensor_info(weight_name).shape)
            if shape != delta.weight_shape:
                raise AdapterMismatchError(
                    f"adapter {self.path.name}: {delta.module} lora_B @ lora_A is {list(delta.weight_shape)} "
                    f"but the base weight {weight_name} is {list(shape)}", fix=SAME_BASE_FIX)
            if delta.magnitude is not None and delta.magnitude.shape != (shape[0],):
                raise AdapterMismatchError(
                    f"adapter {self.path.name}: DoRA magnitude of {delta.module} has shape "
                    f"{list(delta.magnitude.shape)}, the base weight has {shape[0]} rows", fix=SAME_BASE_FIX)
        for hf_name, tensor in self.replacements.items():
            # A tied base stores no lm_head (or one transformers ignores): the embedding is its shape.
            base_name = "model.embed_tokens.weight" if hf_name == LM_HEAD and spec.tied else hf_name
            self._check_written(hf_name, "replaces", ckpt, spec, written, base_name)
            shape = tuple(ckpt.tensor_info(base_name).shape)
            if tuple(tensor.shape) != shape:
                resized = "embed_tokens" in hf_name or hf_name == LM_HEAD
                raise AdapterMismatchError(
                    f"adapter {self.path.name} replaces {hf_name} with shape {list(tensor.shape)}, the base has "
                    f"{list(shape)}" + (" (the adapter was trained with a resized vocabulary)" if resized else ""),
                    fix="use the exact base checkpoint (and tokenizer) the adapter was trained with")

    def _check_written(self, hf_name: str, verb: str, ckpt: HFCheckpoint, spec: ArchSpec,
                       written: Mapping[str, tuple[int, ...]], base_name: str | None = None) -> None:
        """``hf_name`` exists in the base (as ``base_name``) and in the converted model."""
        if hf_name == LM_HEAD and hf_name not in written and spec.tied:
            raise AdapterMismatchError(
                f"adapter {self.path.name} {verb} lm_head, but the base ties lm_head to the input "
                "embeddings (tie_word_embeddings), so the converted model has no separate output "
                "weight to carry it", fix="train the adapter without lm_head in target_modules")
        if not ckpt.has_tensor(base_name or hf_name):
            raise AdapterMismatchError(
                f"adapter {self.path.name} {verb} {hf_name}, which the base {ckpt.path} does not have",
                fix=SAME_BASE_FIX)
        if hf_name not in written:
            raise AdapterMismatchError(
                f"adapter {self.path.name} {verb} {hf_name}, which {spec.entry.hf_architecture} does not "
                "use, so it would be lost in conversion", fix="train the adapter without this module")


def text_module_name(module: str) -> str | None:
    """An adapter trained on a multimodal model names its modules by the multimodal layout
    (``language_model.model.layers.0...`` / ``model.language_model.layers.0...``): map them to
    the text model's names the base checkpoint is read with; None for a vision/projector module."""
    for view in TEXT_ONLY_VIEWS:
        text_name = view.text_name(module)
        if text_name != module:
            return text_name
    return module


def _assemble(path: Path, config: LoraConfig, tensors: dict[str, np.ndarray]
              ) -> tuple[dict[str, LoraDelta], dict[str, np.ndarray]]:
    parts: dict[str, dict[str, np.ndarray]] = {}
    replacements: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise _err(path, f"tensor {key!r} is not in PEFT's key layout (base_model.model.<module>...)")
        rest = key[len(KEY_PREFIX):]
        if "lora_embedding_" in rest:
            raise _err(path, f"tensor {key!r} is a LoRA on an embedding layer, which is not supported",
                       fix="train the adapter without embed_tokens in target_modules")
        if rest.endswith(LORA_A):
            parts.setdefault(rest[:-len(LORA_A)], {})["a"] = value
        elif rest.endswith(LORA_B):
            parts.setdefault(rest[:-len(LORA_B)], {})["b"] = value
        elif rest.endswith(MAGNITUDE_SUFFIXES):
            module = rest[:rest.rindex(".lora_magnitude_vector")]
            parts.setdefault(module, {})["m"] = value.reshape(-1) if value.ndim == 2 and 1 in value.shape else value
        elif ".lora_" in rest:
            raise _err(path, f"tensor {key!r} is not a LoRA tensor edge-lora understands")
        else:
            module = rest.rsplit(".", 1)[0]
            if not any(module == m or module.endswith("." + m) for m in config.modules_to_save):
                raise _err(path, f"tensor {key!r} is neither a LoRA weight nor listed in modules_to_save")
            replacements[rest] = value
    skipped = [name for name in list(parts) + list(replacements) if text_module_name(name) is None]
    replacements = {text_module_name(n) or n: v for n, v in replacements.items() if n not in skipped}
    deltas: dict[str, LoraDelta] = {}
    for module, part in parts.items():
        a, b, m = part.get("a"), part.get("b"), part.get("m")
        if a is None or b is None:
            raise _err(path, f"module {module} has {'lora_A' if a is not None else 'lora_B'} but not "
                             f"{'lora_B' if a is not None else 'lora_A'}")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise _err(path, f"module {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not "
                             "form B @ A (conv or mismatched ranks are not supported)")
        if not config.targets(module):
            raise _err(path, f"has weights for {module}, which target_modules / layers_to_transform "
                             "in adapter_config.json does not select")
        rank = config.rank_for(module)
        if a.shape[0] != rank:
            raise _err(path, f"module {module} has rank {a.shape[0]} but the config (r / rank_pattern) says {rank}")
        if config.use_dora != (m is not None):
            raise _err(path, f"module {module} {'lacks' if config.use_dora else 'has'} a DoRA magnitude vector "
                             f"but use_dora is {str(config.use_dora).lower()}")
        if m is not None and m.ndim != 1:
            raise _err(path, f"module {module}: DoRA magnitude has shape {list(m.shape)}, expected a vector")
        if not (np.isfinite(a).all() and np.isfinite(b).all() and (m is None or np.isfinite(m).all())):
            raise _err(path, f"module {module} has NaN/inf weights")
        # fan_in_fan_out only applies to Conv1D (GPT-2) bases; PEFT resets it to False for
        # nn.Linear, which every supported architecture uses, so B @ A is [out, in] as stored.
        text_module = text_module_name(module)
        if text_module is None:
            continue  # validated like the rest (and scaled by its original name), then dropped
        deltas[text_module + ".weight"] = LoraDelta(module=text_module, lora_a=a, lora_b=b,
                                                    scale=config.scale_for(module), magnitude=m)
    if skipped and not deltas and not replacements:
        raise _err(path, f"adapts only the vision tower / multimodal projector ({len(skipped)} modules, "
                         f"e.g. {skipped[0]}), which the text-only GGUF does not have",
                   fix="use an adapter trained on the language model's modules")
    if skipped:
        # The text model is still exactly what PEFT computes for text input; images are out of scope.
        logger.warning("adapter %s: skipped %d vision tower / projector module(s) (e.g. %s); the text "
                       "model does not use them", path.name, len(skipped), skipped[0])
    if not deltas and not replacements:
        raise _err(path, "holds no LoRA weights")
    return deltas, replacements
