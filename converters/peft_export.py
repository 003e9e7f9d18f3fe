"""What ``export vllm`` needs from the converters: the record of which PEFT directory a GGUF
adapter was converted from, that directory copied with a scale folded in, and a GGUF adapter
rebuilt as PEFT.

Provenance: ``adapter_gguf.write_adapter_gguf`` writes ``edge_lora.peft.path`` (the PEFT directory,
absolute) and ``edge_lora.peft.sha256`` (``peft_dir_sha256``) into the GGUF adapter's metadata. The
record travels with the file, so it survives ``adapters add``, copies and moves of the GGUF.

Rebuild: ``gguf_to_peft`` gives what llama.cpp applies (ΔW = alpha / r · B @ A per module, B's row
transform undone); Q8_0's zero-padded rank is trimmed here, and a registry scale goes into
``LoraDelta.scale``, which ``combine.write_peft_adapter`` folds into B.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edge_lora.converters.architectures import ArchSpec
from edge_lora.converters.gguf_to_peft import adapter_from_pairs, peft_tensors_from_gguf_adapter
from edge_lora.converters.peft import CONFIG_FILE, LORA_B, WEIGHTS_FILE, LoraDelta, PeftAdapter
from edge_lora.converters.safetensors_io import SafetensorsFile, write_safetensors
from edge_lora.core.atomic import atomic_path, atomic_write_text
from edge_lora.core.bounded_json import JsonKind, read_json_object
from edge_lora.core.errors import AdapterError
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


def _trim_padding(delta: LoraDelta) -> LoraDelta:
    """Drop trailing all-zero rank components (Q8_0 pads the rank to 32, which would make vLLM
    reserve a larger --max-lora-rank). ΔW is unchanged: the delta keeps its scale, and
    ``write_peft_adapter`` folds the config's other alpha / r back into B."""
    a, b = delta.lora_a, delta.lora_b
    keep = a.shape[0]
    while keep > 1 and not a[keep - 1].any() and not b[:, keep - 1].any():
        keep -= 1
    if keep == a.shape[0]:
        return delta
    return replace(delta, lora_a=a[:keep].copy(), lora_b=b[:, :keep].copy())


def rebuild_from_gguf(gguf_path: Path, spec: ArchSpec) -> PeftAdapter:
    """The GGUF LoRA adapter as an in-memory PEFT adapter for the base ``spec`` describes, rank
    padding trimmed; refuses tensor types it cannot read back exactly, and other bases."""
    info = validate_gguf(gguf_path, expect_type="adapter")
    for record in info.tensors:
        if record.type_name not in READABLE_TYPES:
            raise AdapterError(f"{gguf_path.name} stores {record.name} as {record.type_name}, which cannot "
                               "be turned back into a PEFT adapter exactly",
                               fix=f"re-convert it with --outtype f32, f16 or q8_0 ({', '.join(READABLE_TYPES)})")
    adapter = peft_tensors_from_gguf_adapter(gguf_path, spec)
    deltas = {name: _trim_padding(d) for name, d in adapter.deltas.items()}
    return adapter_from_pairs(adapter.path, deltas, adapter.config.lora_alpha)


def scaled(adapter: PeftAdapter, scale: float) -> PeftAdapter:
    """``adapter`` with every module's ΔW multiplied by ``scale`` (written into B on saving)."""
    deltas = {name: replace(d, scale=d.scale * scale) for name, d in adapter.deltas.items()}
    return PeftAdapter(adapter.path, adapter.config, deltas, adapter.replacements)


def copy_peft_scaled(source: Path, out_dir: Path, *, scale: float = 1.0, base_model: str | None = None) -> Path:
    """The PEFT directory ``source`` as is (config fields untouched: r, lora_alpha, use_rslora,
    patterns, target_modules), with ``scale`` folded into every lora_B (ΔW is linear in B)."""
    config = read_json_object(source / CONFIG_FILE, JsonKind.ADAPTER_CONFIG)
    if base_model is not None:
        config["base_model_name_or_path"] = base_model
    with SafetensorsFile(source / WEIGHTS_FILE) as st:
        tensors = {}
        for name in st.names():
            value = np.array(st.read(name), dtype=np.float32)
            tensors[name] = value * np.float32(scale) if name.endswith(LORA_B) and scale != 1.0 else value
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        write_safetensors(tmp, tensors, {"format": "pt"})
    atomic_write_text(out_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return out_dir
