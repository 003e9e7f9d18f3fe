"""The formats screen: hardware, context, formats table with fit verdicts, size-vs-KLD chart,
and the actions (measure quality, convert, register adapter, chat, Modelfile)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label, ProgressBar, Select, Static

from edge_lora.core.errors import EdgeLoraError
from edge_lora.tui.progress_bridge import OperationCancelled, ThreadProgress
from edge_lora.tui.screens.adapter_modal import AdapterModal
from edge_lora.tui.screens.combine_modal import CombineModal
from edge_lora.tui.screens.chat_screen import ChatScreen
from edge_lora.tui.screens.convert_modal import ConvertModal, ConvertRequest
from edge_lora.tui.services import TuiServices
from edge_lora.tui.view_model import AdapterEntry, FitPrediction, HardwareView, ModelDirView, human_ctx
from edge_lora.tui.widgets.formats_table import FormatsTable
from edge_lora.tui.widgets.hardware_panel import HardwarePanel
from edge_lora.tui.widgets.size_kld_chart import SizeKldChart

CTX_CHOICES = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
# Free RAM wobbles constantly; re-run the estimator only when it moved by more than this share.
REFIT_RAM_CHANGE = 0.02


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, EdgeLoraError):
        return exc.one_line()
    return f"internal error: {type(exc).__name__}: {exc}"


class MainScreen(Screen[None]):
    CSS_PATH = "main_screen.tcss"

    class TaskProgress(Message, bubble=False):
        """A worker's progress tick: posted (thread-safe, no wait), not called across threads."""

        def __init__(self, task: str, total: float | None, done: float) -> None:
            super().__init__()
            self.task, self.total, self.done = task, total, done

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, MainScreen.TaskProgress)  # a UI that fell behind shows only the latest

    BINDINGS = [
        Binding("p", "measure_selected", "PPL/KLD"),
        Binding("P", "measure_all", "All"),
        Binding("escape,c", "cancel", "Cancel"),
        Binding("n", "convert", "Convert"),
        Binding("a", "add_adapter", "Adapter"),
        Binding("A", "combine_adapters", "Combine", show=False),  # also a button in the adapter dialog
        Binding("t", "chat", "Chat"),
        Binding("m", "modelfile", "Modelfile"),
        Binding("plus,equals_sign", "ctx_up", "+ctx", show=False),
        Binding("minus", "ctx_down", "-ctx", show=False),
    ]

    def __init__(self, view: ModelDirView, services: TuiServices, *, ctx: int = 4096, ppl_ctx: int = 512,
                 refresh_seconds: float = 2.0, chat_max_tokens: int = 128) -> None:
        super().__init__()
        self.view = view
        self.services = services
        self.ctx = ctx
        self.ppl_ctx = ppl_ctx
        self.refresh_seconds = refresh_seconds
        self.chat_max_tokens = chat_max_tokens
        self.hardware: HardwareView | None = None
        self.predictions: dict[Path, FitPrediction] = {}
        self._fit_ram: int | None = None
        self._cancel = threading.Event()
        self.busy: str | None = None  # name of the running long task, one at a time

    # --- layout ---
    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        yield HardwarePanel(self.services.hardware_provider, self.refresh_seconds, id="hardware")
        with Horizontal(id="controls"):
            yield Label("Context ", id="ctx-label")
            options = [(human_ctx(c), c) for c in sorted(set(CTX_CHOICES) | {self.ctx})]
            yield Select(options, value=self.ctx, allow_blank=False, compact=True, id="ctx")
            yield Label(self._model_label(), id="model-name")
        yield FormatsTable(id="formats")
        yield SizeKldChart(id="chart")
        with Horizontal(id="task-row"):
            yield Label("", id="task-label")
            yield ProgressBar(id="task-progress", show_eta=False)
        yield Static("", id="status")
        yield Footer()

    def _model_label(self) -> str:
        return f"  {self.view.name} · {len(self.view.formats)} formats · {self.view.directory.name}/"

    def on_mount(self) -> None:
        self.title = "edge-lora"
        self.sub_title = self.view.name
        self.query_one("#task-row").display = False
        self._redraw()
        self.query_one(FormatsTable).focus()

    def on_unmount(self) -> None:
        # A worker thread must not outlive the screen: its next progress tick raises OperationCancelled.
        self._cancel.set()

    # --- state -> widgets ---
    def _redraw(self) -> None:
        self.query_one(FormatsTable).show(self.view, self.predictions, self.ctx)
        self.query_one(SizeKldChart).show(self.view.formats)
        self.query_one("#model-name", Label).update(self._model_label())

    def set_status(self, message: str, style: str = "") -> None:
        self.query_one("#status", Static).update(Text(message, style=style, no_wrap=True, overflow="ellipsis"))

    # --- fit ---
    @on(HardwarePanel.Refreshed)
    def _hardware_refreshed(self, event: HardwarePanel.Refreshed) -> None:
        self.hardware = event.hardware
        last = self._fit_ram
        available = event.hardware.available_ram_bytes
        if last is None or abs(available - last) > REFIT_RAM_CHANGE * max(event.hardware.total_ram_bytes, 1):
            self.refit()

    def refit(self) -> None:
        if self.hardware is not None:
            self._fit_ram = self.hardware.available_ram_bytes
            self._run_fit(self.ctx, self.hardware.available_ram_bytes)

    @work(thread=True, exclusive=True, group="fit")
    def _run_fit(self, ctx: int, available: int) -> None:
        try:
            predictions = self.services.fit_fn([e.path for e in self.view.formats], ctx, available)
        except Exception as exc:
            self.app.call_from_thread(self.set_status, f"fit: {describe_error(exc)}", "red")
            return
        self.app.call_from_thread(self._apply_fit, ctx, {p.path: p for p in predictions})

    def _apply_fit(self, ctx: int, predictions: dict[Path, FitPrediction]) -> None:
        if ctx != self.ctx:  # a newer context was chosen while this one was computed
            return
        self.predictions = predictions
        self._redraw()

    @on(Select.Changed, "#ctx")
    def _ctx_selected(self, event: Select.Changed) -> None:
        if isinstance(event.value, int) and event.value != self.ctx:
            self.ctx = event.value
            self.predictions = {}
            self._redraw()
            self.refit()

    def _step_ctx(self, step: int) -> None:
        choices = sorted(set(CTX_CHOICES) | {self.ctx})
        index = min(max(choices.index(self.ctx) + step, 0), len(choices) - 1)
        self.query_one("#ctx", Select).value = choices[index]  # posts Select.Changed

    def action_ctx_up(self) -> None:
        self._step_ctx(+1)

    def action_ctx_down(self) -> None:
        self._step_ctx(-1)

    # --- long tasks (quality, convert) ---
    def _begin_task(self, name: str) -> bool:
        if self.busy is not None:
            self.set_status(f"{self.busy} is running — press escape to cancel it first", "yellow")
            return False
        self.busy = name
        self._cancel = threading.Event()
        self.query_one("#task-row").display = True
        self.query_one("#task-label", Label).update(name)
        self.query_one("#task-progress", ProgressBar).update(total=None, progress=0)
        return True

    def _end_task(self, message: str, style: str = "") -> None:
        self.busy = None
        self.query_one("#task-row").display = False
        self.set_status(message, style)

    def _show_progress(self, task: str, total: float | None, done: float) -> None:
        self.query_one("#task-label", Label).update(task)
        self.query_one("#task-progress", ProgressBar).update(total=total, progress=done)

    def _progress_sink(self, prefix: str = "") -> ThreadProgress:
        report: Callable[[str, float | None, float], None] = (
            lambda task, total, done: self.post_message(self.TaskProgress(task, total, done)))
        return ThreadProgress(report, self._cancel, prefix)

    @on(TaskProgress)
    def _progress_posted(self, event: TaskProgress) -> None:
        if self.busy is not None:  # a tick still queued when its task ended is dropped
            self._show_progress(event.task, event.total, event.done)

    def action_cancel(self) -> None:
        if self.busy is None:
            return
        self._cancel.set()
        self.set_status(f"cancelling {self.busy}…", "yellow")

    def action_measure_selected(self) -> None:
        path = self.query_one(FormatsTable).selected_path()
        if path is not None and self._begin_task("perplexity"):
            self._measure([path])

    def action_measure_all(self) -> None:
        if self._begin_task("perplexity"):
            reference = self.view.reference_format()
            # The F16 baseline first: its log-probs are what the others' KLD is measured against.
            ordered = sorted(self.view.formats, key=lambda e: e is not reference)
            self._measure([e.path for e in ordered])

    @work(thread=True, exclusive=True, group="task")
    def _measure(self, paths: list[Path]) -> None:
        try:
            text = self.services.eval_text()
            reference = self.view.reference_format()
            for i, path in enumerate(paths, 1):
                entry = self.view.entry(path)
                label = f"[{i}/{len(paths)}] {entry.format if entry else path.name}: "
                kld_base = reference.path if reference is not None and reference.path != path else None
                result = self.services.ppl_fn(path, text, self.ppl_ctx, kld_base, self._progress_sink(label))
                self.app.call_from_thread(self._apply_quality, path, result.ppl, result.kld)
                self.services.record_quality(self.view.directory, path, result)
        except OperationCancelled:
            self.app.call_from_thread(self._end_task, "perplexity cancelled", "yellow")
        except Exception as exc:
            self.app.call_from_thread(self._end_task, f"perplexity: {describe_error(exc)}", "red")
        else:
            self.app.call_from_thread(self._end_task, f"perplexity done for {len(paths)} format(s)", "green")

    def _apply_quality(self, path: Path, ppl: float, kld: float | None) -> None:
        self.view = self.view.with_quality(path, ppl, kld)
        self._redraw()

    def action_convert(self) -> None:
        if self.busy is None:
            self.app.push_screen(ConvertModal(default_out=self.view.directory.parent), self._convert_chosen)
        else:
            self.set_status(f"{self.busy} is running — press escape to cancel it first", "yellow")

    def _convert_chosen(self, request: ConvertRequest | None) -> None:
        if request is not None and self._begin_task("convert"):
            self._convert(request)

    @work(thread=True, exclusive=True, group="task")
    def _convert(self, request: ConvertRequest) -> None:
        try:
            out = self.services.convert_fn(request.base, request.out_dir, request.adapter, request.quants,
                                           self._progress_sink())
            view = self.services.load_model_dir(out)
        except OperationCancelled:
            self.app.call_from_thread(self._end_task, "convert cancelled (no partial file is left)", "yellow")
        except Exception as exc:
            self.app.call_from_thread(self._end_task, f"convert: {describe_error(exc)}", "red")
        else:
            self.app.call_from_thread(self._show_converted, view)

    def _show_converted(self, view: ModelDirView) -> None:
        self.view = view
        self.predictions = {}
        self.sub_title = view.name
        self._redraw()
        self.refit()
        self._end_task(f"converted: {view.directory}", "green")

    # --- quick actions ---
    def action_add_adapter(self) -> None:
        self.app.push_screen(AdapterModal(self.services.register_adapter, combine=self.action_combine_adapters),
                             self._adapter_added)

    def action_combine_adapters(self) -> None:
        try:
            registered = self.services.list_adapters()
        except Exception as exc:
            self.set_status(f"adapter registry: {describe_error(exc)}", "red")
            return
        self.app.push_screen(CombineModal(self.services.combine_adapters, registered), self._adapter_added)

    def _adapter_added(self, entry: AdapterEntry | None) -> None:
        if entry is not None:
            self.set_status(f"registered adapter {entry.name}", "green")

    @on(DataTable.RowSelected, "#formats")
    def _row_chosen(self, event: DataTable.RowSelected) -> None:
        self.action_chat()

    def action_chat(self) -> None:
        path = self.query_one(FormatsTable).selected_path()
        if path is None:
            return
        try:
            registered = self.services.list_adapters()
        except Exception as exc:
            self.set_status(f"adapter registry: {describe_error(exc)}", "red")
            registered = []
        names = {a.name for a in self.view.adapters}
        adapters = list(self.view.adapters) + [a for a in registered if a.name not in names]
        self.app.push_screen(ChatScreen(path, self.ctx, adapters, self.services.runtime_factory,
                                           max_tokens=self.chat_max_tokens))

    def action_modelfile(self) -> None:
        path = self.query_one(FormatsTable).selected_path()
        if path is None:
            return
        try:
            written = self.services.write_modelfile(path, self.ctx, self.view.directory)
        except Exception as exc:
            self.set_status(f"modelfile: {describe_error(exc)}", "red")
        else:
            self.set_status(f"wrote {written} — run: ollama create {self.view.name.lower()} -f {written}", "green")
