"""What an export to vLLM will write, decided before anything is written (``vllm.plan_export``)
and rendered by ``deploy``."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from edge_lora.converters.peft import PeftAdapter

# vLLM 0.32's --max-lora-rank choices (vllm/config/lora.py MaxLoRARanks).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_PORT = 8000


class SourceKind(Enum):
    PEFT = "PEFT source"  # the recorded (or given) PEFT directory, copied
    GGUF = "rebuilt from the GGUF adapter"


@dataclass(frozen=True)
class AdapterPlan:
    name: str
    kind: SourceKind
    source: Path  # the PEFT directory or the GGUF file
    scale: float  # the registry's scale, folded into the exported lora_B
    rank: int  # the largest rank of any module
    gguf: Path | None  # the GGUF adapter edge-lora hot-applies (what `--check` compares with)
    rebuilt: PeftAdapter | None = None  # a GGUF rebuild, read during planning


@dataclass(frozen=True)
class Refusal:
    name: str
    reason: str  # one line: what vLLM cannot do, and the way out


@dataclass
class ExportPlan:
    out_dir: Path
    base: str  # what `vllm serve` is given: a local checkpoint directory (absolute) or a hub id
    base_is_local: bool
    architecture: str
    served_names: list[str]  # the base's ids, as `edge-lora serve` answers to them
    adapters: list[AdapterPlan] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    max_loras: int = 1
    tensor_parallel_size: int = 1
    replicas: int = 1
    port: int = DEFAULT_PORT
    model_dir: Path | None = None

    @property
    def max_lora_rank(self) -> int:
        """The smallest --max-lora-rank vLLM accepts that holds every adapter."""
        top = max((a.rank for a in self.adapters), default=1)
        return next(r for r in VLLM_MAX_LORA_RANKS if r >= top)
