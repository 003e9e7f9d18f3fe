"""Everything the TUI asks of the library, as injectable callables.

``TuiServices`` holds one callable per capability; ``real_services.default_services()`` wires the real
edge_lora / converters modules (imported lazily, so the app starts fast and tests can replace
any of them with a fake). The adapters below only translate the library's result objects into
``edge_lora.tui.view_model`` data; the decisions (what fits, what is recommended, the numbers) are the
library's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

from edge_lora.serving.conversation import ChatModel
from edge_lora.core.progress import ProgressSink
from edge_lora.tui.view_model import AdapterEntry, FitPrediction, HardwareView, ModelDirView, QualityResult


class ChatRuntime(ChatModel, Protocol):
    """The part of edge_lora.serving.runtime.Runtime the chat pane uses: a conversation's model, plus
    adapters loaded once and closing."""

    def load_adapter(self, name: str, path: Path | str, scale: float = 1.0) -> Any: ...
    def close(self) -> None: ...


HardwareProvider = Callable[[], HardwareView]
FitFn = Callable[[Sequence[Path], int, int], list[FitPrediction]]  # (paths, ctx, available bytes)
PplFn = Callable[[Path, str, int, "Path | None", ProgressSink], QualityResult]  # (model, text, ctx, kld base, progress)
QualityRecorder = Callable[[Path, Path, QualityResult], None]  # (dir, model path, result)
RuntimeFactory = Callable[[Path, int], ChatRuntime]  # (model path, n_ctx)
AdapterLister = Callable[[], list[AdapterEntry]]
AdapterRegistrar = Callable[[str, Path, float], AdapterEntry]
# (new name, [(registered name or path, weight)], method, density) -> the registered result
AdapterCombiner = Callable[[str, Sequence[tuple[str, float]], str, "float | None"], AdapterEntry]
ConvertFn = Callable[[str, Path, "str | None", Sequence[str], ProgressSink], Path]  # -> output dir
ModelfileWriter = Callable[[Path, int, Path], Path]  # (model path, num_ctx, out dir) -> written file
ModelDirLoader = Callable[[Path], ModelDirView]
DemoModelProvider = Callable[[], Path]
EvalTextProvider = Callable[[], str]


@dataclass(frozen=True)
class TuiServices:
    hardware_provider: HardwareProvider
    fit_fn: FitFn
    ppl_fn: PplFn
    record_quality: QualityRecorder
    runtime_factory: RuntimeFactory
    list_adapters: AdapterLister
    register_adapter: AdapterRegistrar
    combine_adapters: AdapterCombiner
    convert_fn: ConvertFn
    write_modelfile: ModelfileWriter
    load_model_dir: ModelDirLoader
    demo_model: DemoModelProvider
    eval_text: EvalTextProvider

    def with_overrides(self, **overrides: Any) -> TuiServices:
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown TUI service(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

