"""Modal asking what to convert: HF dir or repo id, optional PEFT adapter, quant list, output dir."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

DEFAULT_QUANTS = "Q4_K_M,Q5_K_M,Q8_0"


@dataclass(frozen=True)
class ConvertRequest:
    base: str
    adapter: str | None
    quants: tuple[str, ...]
    out_dir: Path


def parse_quants(text: str) -> tuple[str, ...]:
    """'q4_k_m, Q8_0' -> ('Q4_K_M', 'Q8_0'); the converter itself refuses unknown names."""
    names = tuple(dict.fromkeys(part.strip().upper() for part in text.split(",") if part.strip()))
    if not names:
        raise ValueError("give at least one format, e.g. Q4_K_M (or NONE for F16 only)")
    return names


class ConvertModal(ModalScreen[ConvertRequest | None]):
    CSS_PATH = "convert_modal.tcss"
    BINDINGS = [Binding("escape", "dismiss_modal", "Cancel")]

    def __init__(self, default_out: Path) -> None:
        super().__init__()
        self.default_out = default_out

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Convert a model", id="dialog-title")
            yield Input(placeholder="base: HF checkpoint dir or repo id", id="base", compact=True)
            yield Input(placeholder="adapter: PEFT dir or repo id (optional)", id="adapter", compact=True)
            yield Input(value=DEFAULT_QUANTS, placeholder="formats, comma separated", id="quants", compact=True)
            yield Input(value=str(self.default_out / "converted"), placeholder="output dir", id="out", compact=True)
            yield Label("", id="dialog-error")
            with Horizontal(id="dialog-buttons"):
                yield Button("Convert", variant="primary", id="ok", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#base", Input).focus()

    def _value(self, widget_id: str) -> str:
        return self.query_one(f"#{widget_id}", Input).value.strip()

    def request(self) -> ConvertRequest:
        base = self._value("base")
        if not base:
            raise ValueError("give the base model: a local HF checkpoint dir or a repo id")
        out = self._value("out")
        if not out:
            raise ValueError("give an output directory")
        return ConvertRequest(base=base, adapter=self._value("adapter") or None,
                              quants=parse_quants(self._value("quants")), out_dir=Path(out).expanduser())

    @on(Button.Pressed, "#ok")
    @on(Input.Submitted)
    def _submit(self) -> None:
        try:
            request = self.request()
        except ValueError as exc:
            self.query_one("#dialog-error", Label).update(str(exc))
            return
        self.dismiss(request)

    @on(Button.Pressed, "#cancel")
    def action_dismiss_modal(self) -> None:
        self.dismiss(None)
