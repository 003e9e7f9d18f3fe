"""Deterministic stand-ins for the TUI's services (fixed RAM, scripted fit/ppl/runtime) and a
fixture model directory, shared by tests/test_tui*.py and bench/tui.py."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_lora.core.errors import InputNotFoundError
from edge_lora.tui.view_model import AdapterEntry, FitPrediction, HardwareView, QualityResult, Verdict

GB = 1_000_000_000
# name -> (file bytes, bpw); small placeholder files stand for them (fast tests never parse them).
FIXTURE_FORMATS = {"F16": (540_000_000, 16.0), "Q8_0": (290_000_000, 8.5),
                   "Q4_K_M": (250_000_000, 4.89), "Q2_K": (180_000_000, 3.16)}
KV_BYTES_PER_TOKEN = 100_000


def write_fixture_dir(root: Path, name: str = "tiny-model") -> Path:
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for fmt, (size, bpw) in FIXTURE_FORMATS.items():
        path = directory / f"{name}-{fmt}.gguf"
        path.write_bytes(b"GGUF")
        files.append({"path": path.name, "format": fmt, "kind": "model", "bytes": size, "bpw": bpw,
                      "sha256": "0" * 64})
    adapter = directory / "adapter-legal.gguf"
    adapter.write_bytes(b"GGUF")
    files.append({"path": adapter.name, "format": "F32", "kind": "adapter", "bytes": 4, "bpw": 32.0, "sha256": "0" * 64})
    manifest = {"name": name, "architecture": "gemma3", "base": "fixture", "adapter": "legal", "files": files}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return directory


def fixed_hardware(available: int = 1 * GB, total: int = 8 * GB) -> HardwareView:
    return HardwareView(total_ram_bytes=total, available_ram_bytes=available, cores=2,
                        cpu_features=("AVX2", "FMA", "F16C"), llama_build="b0000 (test)")


class ScriptedFit:
    """file bytes + KV_BYTES_PER_TOKEN * ctx; "fits" up to 80% of the available RAM, "tight" up
    to all of it (edge_lora.analysis.fit's rule); the largest file that runs is recommended. Records calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, paths: Sequence[Path], ctx: int, available: int) -> list[FitPrediction]:
        self.calls.append((ctx, available))
        sizes = {p: FIXTURE_FORMATS[p.stem.rsplit("-", 1)[1]][0] for p in paths}
        totals = {p: sizes[p] + KV_BYTES_PER_TOKEN * ctx for p in paths}
        verdicts = {p: Verdict.FITS if totals[p] <= 0.8 * available else Verdict.TIGHT if totals[p] <= available
                    else Verdict.NO for p in paths}
        best = max((p for p in paths if verdicts[p] is not Verdict.NO), key=lambda p: sizes[p], default=None)
        return [FitPrediction(p, totals[p], verdicts[p], p == best) for p in paths]


class ScriptedPpl:
    """PPL = 10 + 16 / bpw-ish from the file name; KLD only when a baseline is given. Reports
    progress in ``steps`` ticks; with ``block`` set it waits between ticks until cancelled."""

    def __init__(self, steps: int = 4, tick_seconds: float = 0.0) -> None:
        self.steps = steps
        self.tick_seconds = tick_seconds
        self.calls: list[tuple[Path, int, Path | None]] = []
        self.started = threading.Event()

    def __call__(self, model: Path, text: str, ctx: int, kld_base: Path | None, progress: Any) -> QualityResult:
        self.calls.append((model, ctx, kld_base))
        progress.start("windows", self.steps)
        self.started.set()
        for _ in range(self.steps):
            time.sleep(self.tick_seconds)
            progress.advance(1)
        progress.finish()
        fmt = model.stem.rsplit("-", 1)[1]
        bpw = FIXTURE_FORMATS[fmt][1]
        return QualityResult(ppl=round(9.0 + 8.0 / bpw, 3), kld=None if kld_base is None else round(0.5 / bpw, 4))


class FakeRuntime:
    """Echo runtime: the reply names the active adapter set, so a switch shows in the output."""

    instances: list[FakeRuntime] = []

    def __init__(self, model: Path, n_ctx: int) -> None:
        self.model, self.n_ctx = model, n_ctx
        self.loaded: dict[str, Path] = {}
        self.requests: list[dict[str, float | None]] = []
        self.prompts: list[list[Mapping[str, Any]]] = []
        self.max_tokens: list[int] = []
        self.closed = False
        FakeRuntime.instances.append(self)

    def load_adapter(self, name: str, path: Path | str, scale: float = 1.0) -> None:
        self.loaded[name] = Path(path)

    def render_messages(self, messages: Sequence[Mapping[str, Any]]) -> list[Any]:
        return list(messages)  # the fake's "tokens" are the messages themselves: one each

    def generate(self, prompt: Any, adapters: Mapping[str, float | None] | None = None,
                 max_tokens: int = 128, **kwargs: Any) -> Iterator[str]:
        active = dict(adapters or {})
        self.requests.append(active)
        self.prompts.append(list(prompt))
        self.max_tokens.append(max_tokens)
        last = prompt[-1]["content"]
        tag = "+".join(sorted(active)) or "base"
        yield from [f"[{tag}] ", "echo ", last]

    def close(self) -> None:
        self.closed = True


def fake_services(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments for make_app: every service faked, nothing touches a real model."""
    registered: list[AdapterEntry] = []

    def register(name: str, path: Path, scale: float) -> AdapterEntry:
        entry = AdapterEntry(name, path, scale)
        registered.append(entry)
        return entry

    def combine(name: str, inputs: Sequence[tuple[str, float]], method: str, density: float | None) -> AdapterEntry:
        known = {e.name for e in registered}
        missing = [ref for ref, _ in inputs if ref not in known]
        if missing:
            raise InputNotFoundError(f"{missing[0]!r} is neither a registered adapter nor an adapter file")
        combine.calls.append((name, tuple(inputs), method, density))  # type: ignore[attr-defined]
        return register(name, Path(f"/adapters/adapter-{name}.gguf"), 1.0)

    combine.calls = []  # type: ignore[attr-defined]
    services: dict[str, Any] = dict(
        hardware_provider=fixed_hardware, fit_fn=ScriptedFit(), ppl_fn=ScriptedPpl(),
        record_quality=lambda directory, model, result: None, runtime_factory=FakeRuntime,
        list_adapters=lambda: list(registered), register_adapter=register, combine_adapters=combine,

        eval_text=lambda: "held-out text",
    )
    services.update(overrides)
    return services


def write_gemma_dir(root: Path, files: Mapping[str, Path], adapters: Mapping[str, Path] = {},
                    name: str = "gemma-3-270m") -> Path:
    """A converted-output dir over real GGUF files (symlinked, not copied): ``files`` maps a format
    name to a model GGUF, ``adapters`` an adapter name to a GGUF LoRA. The manifest carries the
    real size and bpw (read by edge_lora.core.manifest)."""
    from edge_lora.core.manifest import gguf_bits_per_weight

    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for fmt, target in files.items():
        link = directory / f"{name}-{fmt}.gguf"
        link.symlink_to(target)
        rows.append({"path": link.name, "format": fmt, "kind": "model", "bytes": target.stat().st_size,
                     "bpw": round(gguf_bits_per_weight(target)[1], 4), "sha256": ""})
    for adapter_name, target in adapters.items():
        link = directory / f"adapter-{adapter_name}.gguf"
        link.symlink_to(target)
        rows.append({"path": link.name, "format": "F32", "kind": "adapter", "bytes": target.stat().st_size,
                     "bpw": 32.0, "sha256": ""})
    (directory / "manifest.json").write_text(json.dumps(
        {"name": name, "architecture": "gemma3", "base": "test", "adapter": None, "files": rows}, indent=1))
    return directory
