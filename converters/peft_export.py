"""GGUF LoRA adapter -> PEFT LoRA directory (the inverse of ``adapter_gguf``), and the record of
which PEFT directory a GGUF adapter was converted from.

Provenance: ``adapter_gguf.write_adapter_gguf`` writes ``edge_lora.peft.path`` (the PEFT directory,
absolute) and ``edge_lora.peft.sha256`` (``peft_dir_sha256``) into the GGUF adapter's metadata. The
record travels with the file, so it survives ``adapters add``, copies and moves of the GGUF.

Reconstruction: llama.cpp applies ``W + (alpha / r) · B_g @ A_g`` with ``B_g`` carrying the base's
row transform (Llama q/k permutation) and the folded PEFT scale (``adapter_gguf`` module docstring).
So a PEFT adapter with the same A, ``B = inverse_transform(B_g)`` and, per module, ``r`` = the
tensor's rank and ``lora_alpha`` = the GGUF's alpha computes the same ΔW in HF space. Ranks that
differ between modules go into ``rank_pattern``; a Q8_0 adapter's zero-padded rank is trimmed
(with ``r_trimmed / r_padded`` folded into B, so the scale stays the same).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edge_lora.converters.architectures import ArchSpec
from edge_lora.converters.peft import CONFIG_FILE, KEY_PREFIX, LORA_A, LORA_B, WEIGHTS_FILE
from edge_lora.converters.safetensors_io import write_safetensors
from edge_lora.core.atomic import atomic_path, atomic_write_text
from edge_lora.core.errors import AdapterError, AdapterMismatchError, InvalidGGUFError
from edge_lora.core.gguf_check import GGUFInfo, validate_gguf
from edge_lora.core.manifest import sha256_file

PEFT_PATH_KEY = "edge_lora.peft.path"
PEFT_SHA256_KEY = "edge_lora.peft.sha256"
# What a GGUF adapter may store that we can turn back into float32 exactly as llama.cpp reads it.
READABLE_TYPES = ("F32", "F16", "BF16", "Q8_0")


def peft_dir_sha256(peft_dir: Path) -> str:
    """One hash for a PEFT directory: sha256 over the sha256 of its config and of its weights."""
    parts = [sha256_file(Path(peft_dir) / name) for name in (CONFIG_FILE, WEIGHTS_FILE)]
    return hashlib.sha256(" ".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class PeftSource:
    """The PEFT directory a GGUF adapter was converted from, as recorded at conversion."""
    path: Path
    sha256: str

    @property
    def usable(self) -> bool:
        """Still there and unchanged (same hash) since the conversion."""
        try:
            return (self.path / CONFIG_FILE).is_file() and (self.path / WEIGHTS_FILE).is_file() \
                and peft_dir_sha256(self.path) == self.sha256
        except OSError:
            return False


def recorded_source(peft_dir: Path) -> PeftSource | None:
    """What a GGUF adapter converted from ``peft_dir`` records; None for an adapter that is not a
    directory on disk (one combined in memory)."""
    peft_dir = Path(peft_dir)
    if not ((peft_dir / CONFIG_FILE).is_file() and (peft_dir / WEIGHTS_FILE).is_file()):
        return None
    try:
        return PeftSource(peft_dir.resolve(), peft_dir_sha256(peft_dir))
    except OSError:
        return None


def peft_source_of(info: GGUFInfo) -> PeftSource | None:
    path, digest = info.metadata.get(PEFT_PATH_KEY), info.metadata.get(PEFT_SHA256_KEY)
    if isinstance(path, str) and isinstance(digest, str) and path:
        return PeftSource(Path(path), digest)
    return None


@dataclass(frozen=True)
class LoraPair:
    """One adapted module in HF space: ΔW = scale · B @ A, scale = alpha / rank."""
    module: str  # "model.layers.0.self_attn.q_proj"
    lora_a: np.ndarray  # [r, in] float32
    lora_b: np.ndarray  # [out, r] float32

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])


def _undo_row_transform(spec: ArchSpec, module: str, lora_b: np.ndarray) -> np.ndarray:
    """The inverse of ``spec.transform_lora_b`` (a row permutation: Llama's q/k interleave), read
    off by transforming the row indices."""
    perm = spec.transform_lora_b(module, np.arange(lora_b.shape[0], dtype=np.float64)[:, None])[:, 0]
    out = np.empty_like(lora_b)
    out[perm.astype(np.int64)] = lora_b
    return out


def _dequantized(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    tensor = next(t for t in reader.tensors if t.name == name)
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(values, dtype=np.float32)


def _trim_padding(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop trailing all-zero rank components (Q8_0 pads the rank to 32), folding r'/r into B so
    that alpha / r' · B' @ A' equals alpha / r · B @ A."""
    rank = a.shape[0]
    keep = rank
    while keep > 1 and not a[keep - 1].any() and not b[:, keep - 1].any():
        keep -= 1
    if keep == rank:
        return a, b
    return a[:keep].copy(), b[:, :keep] * np.float32(keep / rank)


def read_gguf_lora(path: Path, spec: ArchSpec) -> tuple[float, list[LoraPair]]:
    """(alpha, pairs in HF space) of a GGUF LoRA adapter made for the base ``spec`` describes;
    refuses tensor types it cannot read back, names not in the base, and shapes that do not fit."""
    info = validate_gguf(path, expect_type="adapter")
    if info.architecture != spec.gguf_arch_name:
        raise AdapterMismatchError(
            f"adapter {path.name} was made for a {info.architecture} model, the base is {spec.gguf_arch_name}",
            fix="export adapters made for this base only")
    alpha = info.metadata.get(gguf.Keys.Adapter.LORA_ALPHA)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not np.isfinite(alpha) or alpha == 0:
        raise InvalidGGUFError(f"adapter {path.name} has no usable adapter.lora.alpha ({alpha!r})",
                               fix="re-convert the adapter with `edge-lora adapter convert`")
    expected = spec.expected_shapes()
    by_gguf: dict[str, str] = {}
    for hf_name in expected:
        gguf_name = spec.gguf_name(hf_name)
        if gguf_name is not None and hf_name.endswith(".weight"):
            by_gguf[gguf_name] = hf_name
    for record in info.tensors:
        if record.type_name not in READABLE_TYPES:
            raise AdapterError(f"adapter {path.name} stores {record.name} as {record.type_name}, which cannot be "
                               "turned back into a PEFT adapter exactly",
                               fix=f"re-convert it with --outtype f32, f16 or q8_0 ({', '.join(READABLE_TYPES)})")
    reader = gguf.GGUFReader(path)
    pairs = []
    for record in info.tensors:
        if not record.name.endswith(".lora_a"):
            continue
        gguf_name = record.name.removesuffix(".lora_a")
        hf_name = by_gguf.get(gguf_name)
        if hf_name is None:
            raise AdapterMismatchError(f"adapter {path.name} adapts {gguf_name}, which the base does not have",
                                       fix="export adapters made for this base only")
        if info.tensor(gguf_name + ".lora_b") is None:
            raise InvalidGGUFError(f"adapter {path.name} has {record.name} but no {gguf_name}.lora_b",
                                   fix="re-convert the adapter")
        lora_a = _dequantized(reader, record.name)
        lora_b = _dequantized(reader, gguf_name + ".lora_b")
        out_rows, in_cols = expected[hf_name]
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[1] != in_cols or lora_b.shape[0] != out_rows \
                or lora_a.shape[0] != lora_b.shape[1]:
            raise AdapterMismatchError(
                f"adapter {path.name}: {gguf_name} lora_a {list(lora_a.shape)} / lora_b {list(lora_b.shape)} do not "
                f"fit the base weight {list(expected[hf_name])}", fix="export adapters made for this base only")
        module = hf_name.removesuffix(".weight")
        lora_a, lora_b = _trim_padding(lora_a, _undo_row_transform(spec, module, lora_b))
        pairs.append(LoraPair(module, lora_a, lora_b))
    if not pairs:
        raise InvalidGGUFError(f"adapter {path.name} holds no LoRA tensors", fix="re-convert the adapter")
    return float(alpha), pairs


def _exact_pattern(module: str) -> str:
    return re.escape(module)


def write_peft_from_pairs(out_dir: Path, alpha: float, pairs: list[LoraPair], *, scale: float = 1.0,
                          base_model: str = "") -> Path:
    """A PEFT LoRA directory computing ``scale · alpha / r_m · B @ A`` per module: ``r`` is the
    largest rank, modules of another rank get a ``rank_pattern`` entry (keyed by their exact name),
    ``scale`` is folded into B. Written atomically, file by file, into ``out_dir``."""
    top = max(p.rank for p in pairs)
    rank_pattern = {_exact_pattern(p.module): p.rank for p in pairs if p.rank != top}
    tensors = {}
    for pair in pairs:
        tensors[KEY_PREFIX + pair.module + LORA_A] = pair.lora_a.astype(np.float32)
        tensors[KEY_PREFIX + pair.module + LORA_B] = (pair.lora_b * np.float32(scale)).astype(np.float32)
    config = peft_config(r=top, alpha=alpha, targets=sorted({p.module.rsplit(".", 1)[-1] for p in pairs}),
                         rank_pattern=rank_pattern, base_model=base_model)
    return _write_peft_dir(out_dir, config, tensors)


def peft_config(*, r: int, alpha: float, targets: list[str], rank_pattern: Mapping[str, int] | None = None,
                alpha_pattern: Mapping[str, float] | None = None, use_rslora: bool = False,
                base_model: str = "") -> dict[str, object]:
    """adapter_config.json as PEFT writes it for an inference-only LoRA."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": r, "lora_alpha": alpha, "use_rslora": use_rslora, "use_dora": False,
            "rank_pattern": dict(rank_pattern or {}), "alpha_pattern": dict(alpha_pattern or {}),
            "target_modules": targets, "modules_to_save": None, "bias": "none", "lora_dropout": 0.0,
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "layers_to_transform": None, "layers_pattern": None}


def _write_peft_dir(out_dir: Path, config: Mapping[str, object], tensors: Mapping[str, np.ndarray]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        write_safetensors(tmp, tensors)
    atomic_write_text(out_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return out_dir


def copy_peft_scaled(source: Path, out_dir: Path, *, scale: float = 1.0, base_model: str | None = None) -> Path:
    """The PEFT directory ``source`` as is (config fields untouched: r, lora_alpha, use_rslora,
    patterns, target_modules), with ``scale`` folded into every lora_B (ΔW is linear in B)."""
    from edge_lora.converters.safetensors_io import SafetensorsFile
    from edge_lora.core.bounded_json import JsonKind, read_json_object

    config = read_json_object(source / CONFIG_FILE, JsonKind.ADAPTER_CONFIG)
    if base_model is not None:
        config["base_model_name_or_path"] = base_model
    with SafetensorsFile(source / WEIGHTS_FILE) as st:
        tensors = {}
        for name in st.names():
            value = np.array(st.read(name), dtype=np.float32)
            tensors[name] = value * np.float32(scale) if name.endswith(LORA_B) and scale != 1.0 else value
    return _write_peft_dir(out_dir, config, tensors)
