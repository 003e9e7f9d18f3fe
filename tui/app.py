"""The edge-lora Textual app. ``make_app`` wires the real library by default; every capability
can be replaced (``hardware_provider=``, ``fit_fn=``, ``ppl_fn=``, ``runtime_factory=`` …) so
tests can pin the RAM figure or fake a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual.app import App
from textual.binding import Binding

from edge_lora.core.context_size import default_ctx
from edge_lora.tui.screens.main_screen import MainScreen
from edge_lora.tui.screens.welcome_screen import WelcomeScreen
from edge_lora.tui.real_services import default_services
from edge_lora.tui.services import TuiServices
from edge_lora.tui.view_model import ModelDirView


class EdgeLoraApp(App[None]):
    TITLE = "edge-lora"
    BINDINGS = [Binding("q", "quit", "Quit")]

    def __init__(self, services: TuiServices, view: ModelDirView | None, *, ctx: int, ppl_ctx: int,
                 refresh_seconds: float, chat_max_tokens: int) -> None:
        super().__init__()
        self.services = services
        self.initial_view = view
        self.ctx = ctx
        self.ppl_ctx = ppl_ctx
        self.refresh_seconds = refresh_seconds
        self.chat_max_tokens = chat_max_tokens

    def on_mount(self) -> None:
        if self.initial_view is not None:
            self.push_screen(self.main_screen(self.initial_view))
        else:
            self.push_screen(WelcomeScreen(self.services), self._open)

    def main_screen(self, view: ModelDirView) -> MainScreen:
        return MainScreen(view, self.services, ctx=self.ctx, ppl_ctx=self.ppl_ctx,
                          refresh_seconds=self.refresh_seconds, chat_max_tokens=self.chat_max_tokens)

    def _open(self, view: ModelDirView | None) -> None:
        if view is not None:
            self.push_screen(self.main_screen(view))


def make_app(directory: Path | str | None = None, *, ctx: int | None = None, ppl_ctx: int = 512,
             refresh_seconds: float = 2.0, chat_max_tokens: int = 128, **deps: Any) -> EdgeLoraApp:
    """Build the app for ``directory`` (a converted output dir or one GGUF file; None -> welcome).

    ``deps`` override services by name (see ``edge_lora.tui.services.TuiServices``). The directory is read
    here, before the app starts, so a bad path is a typed error at the CLI, not a broken screen."""
    services = default_services().with_overrides(**deps)
    view = services.load_model_dir(Path(directory)) if directory is not None else None
    # Without --ctx: the cap (the screen lists several files and reads no header to start).
    return EdgeLoraApp(services, view, ctx=ctx or default_ctx(None), ppl_ctx=ppl_ctx,
                       refresh_seconds=refresh_seconds, chat_max_tokens=chat_max_tokens)
