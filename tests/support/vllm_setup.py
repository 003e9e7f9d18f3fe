"""A tiny Llama converted by edge-lora with one adapter of each kind the vLLM export handles:
plain LoRA, rsLoRA, rank/alpha patterns, a registry entry with scale 0.5, and an adapter whose
PEFT files are gone (only its GGUF is left). Built once per test module (about 3 s)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_lora.converters.adapter_gguf import convert_adapter_to_gguf
from edge_lora.serving.registry import AdapterRegistry
from edge_lora.workflows.convert_model import convert_model
from tests.support.model_fixtures import make_checkpoint, make_peft_adapter

STRENGTH = 0.3  # large enough that every adapter changes the tiny model's greedy tokens
ADAPTERS: dict[str, dict[str, Any]] = {
    "plain": {"r": 8, "alpha": 16, "seed": 11},
    "rs": {"r": 16, "alpha": 4, "use_rslora": True, "seed": 12},
    "pat": {"r": 8, "alpha": 16, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"down_proj": 32}, "seed": 13},
    "scaled": {"r": 8, "alpha": 16, "seed": 14},
    "gone": {"r": 8, "alpha": 8, "seed": 15, "target_modules": ("q_proj", "k_proj", "v_proj", "up_proj")},
}
SCALES = {"scaled": 0.5}
GONE = "gone"  # its PEFT directory is deleted after conversion (a copy is kept as the reference)


@dataclass
class TinyDeployment:
    root: Path
    base: Path  # the HF checkpoint
    out: Path  # edge-lora's converted directory (F16)
    peft: dict[str, Path] = field(default_factory=dict)  # the original PEFT adapters (references)
    gguf: dict[str, Path] = field(default_factory=dict)

    def register(self, registry: AdapterRegistry) -> None:
        for name, path in self.gguf.items():
            registry.add(name, path, scale=SCALES.get(name, 1.0), replace=True)


def build_tiny_deployment(root: Path) -> TinyDeployment:
    root.mkdir(parents=True, exist_ok=True)
    base = make_checkpoint("llama", root / "base", n_layers=2)
    setup = TinyDeployment(root, base, root / "out")
    convert_model(base, setup.out, quants="none")
    for name, options in ADAPTERS.items():
        source = make_peft_adapter(base, root / "peft" / name, strength=STRENGTH, **options)
        setup.gguf[name] = convert_adapter_to_gguf(source, base, setup.out / f"adapter-{name}.gguf")
        setup.peft[name] = source
    kept = root / "peft-kept" / GONE
    shutil.copytree(setup.peft[GONE], kept)
    shutil.rmtree(setup.peft[GONE])
    setup.peft[GONE] = kept
    return setup
