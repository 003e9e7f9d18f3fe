"""Plain data the TUI displays. The library's own result objects are translated into these by
``tui/services.py`` so widgets never depend on another module's internals."""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class HardwareView:
    total_ram_bytes: int
    available_ram_bytes: int
    cores: int
    cpu_features: tuple[str, ...]
    llama_build: str


@dataclass(frozen=True)
class FormatEntry:
    """One model file of a converted directory (a row of the formats table)."""

    path: Path
    format: str
    file_bytes: int
    bpw: float | None = None
    ppl: float | None = None
    kld: float | None = None
    kind: str = "model"
    calibrated: bool = False  # quantized with an importance matrix


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    path: Path
    scale: float = 1.0


@dataclass(frozen=True)
class ModelDirView:
    directory: Path
    name: str
    formats: tuple[FormatEntry, ...]
    adapters: tuple[AdapterEntry, ...] = ()
    reference: Path | None = None  # the full-precision file KLD is measured against

    def reference_format(self) -> FormatEntry | None:
        return None if self.reference is None else self.entry(self.reference)

    def entry(self, path: Path) -> FormatEntry | None:
        return next((e for e in self.formats if e.path == path), None)

    def with_quality(self, path: Path, ppl: float | None, kld: float | None) -> ModelDirView:
        formats = tuple(replace(e, ppl=ppl, kld=kld) if e.path == path else e for e in self.formats)
        return replace(self, formats=formats)


class Verdict(enum.Enum):
    """The fit estimator's judgement (edge_lora.analysis.fit: "fits" | "tight" | "no")."""

    FITS = "fits"
    TIGHT = "tight"
    NO = "no"

    @property
    def style(self) -> str:
        return {"fits": "bold green", "tight": "bold yellow", "no": "bold red"}[self.value]


@dataclass(frozen=True)
class FitPrediction:
    """Predicted peak RSS of one file at one context, and the verdict, as the fit estimator reports them."""

    path: Path
    total_bytes: int
    verdict: Verdict
    recommended: bool


@dataclass(frozen=True)
class QualityResult:
    ppl: float
    kld: float | None = None


def human_bytes(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
        value /= 1000
    return f"{value:.0f} GB"  # unreachable; keeps type checkers content


def human_ctx(ctx: int) -> str:
    return f"{ctx // 1024}K" if ctx >= 1024 and ctx % 1024 == 0 else str(ctx)
