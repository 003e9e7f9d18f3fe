"""Modal registering an adapter (name + path + scale) in the adapter registry; its "Combine
registered…" button opens the combine dialog (``combine_modal``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

from edge_lora.core.errors import EdgeLoraError
from edge_lora.tui.services import AdapterRegistrar
from edge_lora.tui.view_model import AdapterEntry


class AdapterModal(ModalScreen[AdapterEntry | None]):
    CSS_PATH = "adapter_modal.tcss"
    BINDINGS = [Binding("escape", "dismiss_modal", "Cancel")]

    def __init__(self, register: AdapterRegistrar, combine: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.register = register
        self.combine = combine  # opens the combine dialog (registered adapters with weights)

    def compose(self) -> ComposeResult:
        with Vertical(id="adapter-dialog"):
            yield Label("Register an adapter", id="adapter-dialog-title")
            yield Input(placeholder="name, e.g. legal", id="adapter-name", compact=True)
            yield Input(placeholder="path: GGUF LoRA file or PEFT dir", id="adapter-path", compact=True)
            yield Input(value="1.0", placeholder="scale", id="adapter-scale", compact=True)
            yield Label("", id="adapter-dialog-error")
            with Horizontal(id="adapter-dialog-buttons"):
                yield Button("Register", variant="primary", id="adapter-ok", compact=True)
                yield Button("Cancel", id="adapter-cancel", compact=True)
                if self.combine is not None:
                    yield Button("Combine registered…", id="adapter-combine", compact=True)

    def on_mount(self) -> None:
        self.query_one("#adapter-name", Input).focus()

    def _error(self, message: str) -> None:
        self.query_one("#adapter-dialog-error", Label).update(message)

    @on(Button.Pressed, "#adapter-ok")
    @on(Input.Submitted)
    def _submit(self) -> None:
        name = self.query_one("#adapter-name", Input).value.strip()
        path = self.query_one("#adapter-path", Input).value.strip()
        scale_text = self.query_one("#adapter-scale", Input).value.strip() or "1.0"
        if not name or not path:
            self._error("give both a name and a path")
            return
        try:
            scale = float(scale_text)
        except ValueError:
            self._error(f"scale {scale_text!r} is not a number")
            return
        try:
            entry = self.register(name, Path(path).expanduser(), scale)
        except EdgeLoraError as exc:  # the registry validates; show its message and fix here
            self._error(exc.one_line())
            return
        self.dismiss(entry)

    @on(Button.Pressed, "#adapter-combine")
    def _open_combine(self) -> None:
        self.dismiss(None)
        if self.combine is not None:
            self.combine()

    @on(Button.Pressed, "#adapter-cancel")
    def action_dismiss_modal(self) -> None:
        self.dismiss(None)
