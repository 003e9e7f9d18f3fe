"""Modal combining two or more registered adapters with weights (adapter arithmetic) into a new
registered adapter: ``legal:0.5 tone:0.5``, ``legal:-1`` to subtract, a method and its density."""

from __future__ import annotations

from collections.abc import Sequence

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

from edge_lora.core.errors import EdgeLoraError
from edge_lora.tui.services import AdapterCombiner
from edge_lora.tui.view_model import AdapterEntry

METHODS = ("cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
           "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")


def parse_inputs(text: str) -> list[tuple[str, float]]:
    """``legal:0.5 tone:-1`` (spaces or commas) -> [(name, weight)]; a bare name weighs 1."""
    inputs: list[tuple[str, float]] = []
    for item in text.replace(",", " ").split():
        name, sep, weight = item.rpartition(":")
        if not sep:
            name, weight = item, "1"
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(f"weight {weight!r} of {name!r} is not a number") from None
        inputs.append((name, value))
    return inputs


class CombineModal(ModalScreen[AdapterEntry | None]):
    CSS_PATH = "adapter_modal.tcss"
    BINDINGS = [Binding("escape", "dismiss_modal", "Cancel")]

    def __init__(self, combine: AdapterCombiner, registered: Sequence[AdapterEntry]) -> None:
        super().__init__()
        self.combine = combine
        self.registered = list(registered)

    def compose(self) -> ComposeResult:
        names = ", ".join(a.name for a in self.registered) or "none registered yet (press a)"
        with Vertical(id="adapter-dialog"):
            yield Label("Combine adapters", id="adapter-dialog-title")
            yield Label(f"registered: {names}", id="combine-registered")
            yield Input(placeholder="adapters with weights, e.g. legal:0.5 tone:0.5 (legal:-1 subtracts)",
                        id="combine-inputs", compact=True)
            yield Input(value="cat", placeholder=f"method: {' '.join(METHODS)}", id="combine-method", compact=True)
            yield Input(placeholder="density 0-1 (ties, dare_*, magnitude_prune*)", id="combine-density",
                        compact=True)
            yield Input(placeholder="name of the result, e.g. legal-half", id="combine-name", compact=True)
            yield Label("", id="adapter-dialog-error")
            with Horizontal(id="adapter-dialog-buttons"):
                yield Button("Combine", variant="primary", id="combine-ok", compact=True)
                yield Button("Cancel", id="combine-cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#combine-inputs", Input).focus()

    def _error(self, message: str) -> None:
        self.query_one("#adapter-dialog-error", Label).update(message)

    @on(Button.Pressed, "#combine-ok")
    @on(Input.Submitted)
    def _submit(self) -> None:
        name = self.query_one("#combine-name", Input).value.strip()
        method = self.query_one("#combine-method", Input).value.strip() or "cat"
        density_text = self.query_one("#combine-density", Input).value.strip()
        try:
            inputs = parse_inputs(self.query_one("#combine-inputs", Input).value)
        except ValueError as exc:
            self._error(str(exc))
            return
        if not inputs or not name:
            self._error("give the adapters with weights and a name for the result")
            return
        if method not in METHODS:
            self._error(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
            return
        try:
            density = float(density_text) if density_text else None
        except ValueError:
            self._error(f"density {density_text!r} is not a number")
            return
        try:
            entry = self.combine(name, inputs, method, density)
        except EdgeLoraError as exc:  # the library validates; show its message and fix here
            self._error(exc.one_line())
            return
        self.dismiss(entry)

    @on(Button.Pressed, "#combine-cancel")
    def action_dismiss_modal(self) -> None:
        self.dismiss(None)
