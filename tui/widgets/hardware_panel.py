"""RAM total / available (refreshed on a timer), cores, CPU features, llama.cpp build."""

from __future__ import annotations

from rich.text import Text
from textual import work
from textual.message import Message
from textual.widgets import Static

from edge_lora.tui.services import HardwareProvider
from edge_lora.tui.view_model import HardwareView, human_bytes
from edge_lora.tui.widgets._css import css_beside


class HardwarePanel(Static):
    DEFAULT_CSS = css_beside(__file__)

    class Refreshed(Message):
        """Posted after every reading, so the screen can re-check fit when free RAM moves."""

        def __init__(self, hardware: HardwareView) -> None:
            super().__init__()
            self.hardware = hardware

    def __init__(self, provider: HardwareProvider, refresh_seconds: float = 2.0, *, id: str | None = None) -> None:
        super().__init__("reading hardware…", id=id)
        self._provider = provider
        self._refresh_seconds = refresh_seconds
        self.hardware: HardwareView | None = None

    def on_mount(self) -> None:
        self.read_hardware()
        if self._refresh_seconds > 0:
            self.set_interval(self._refresh_seconds, self.read_hardware)

    @work(thread=True, exclusive=True, group="hardware")
    def read_hardware(self) -> None:
        # psutil is quick, but the first call may load llama.cpp for its system info: keep it off the UI thread.
        try:
            hardware = self._provider()
        except Exception as exc:  # a failed reading must not take the app down; show why instead
            self.app.call_from_thread(self.update, Text(f"hardware: unavailable ({exc})", style="red"))
            return
        self.app.call_from_thread(self._show, hardware)

    def _show(self, hardware: HardwareView) -> None:
        self.hardware = hardware
        self.update(self.render_hardware(hardware))
        self.post_message(self.Refreshed(hardware))

    @staticmethod
    def render_hardware(hw: HardwareView) -> Text:
        text = Text()
        text.append("RAM ", style="bold")
        text.append(f"{human_bytes(hw.available_ram_bytes)} free", style="bold cyan")
        text.append(f" of {human_bytes(hw.total_ram_bytes)}")
        text.append("  Cores ", style="bold")
        text.append(str(hw.cores))
        text.append("  llama.cpp ", style="bold")
        text.append(hw.llama_build or "unknown")
        text.append("\nCPU ", style="bold")
        text.append(" ".join(hw.cpu_features) or "no SIMD features reported")
        text.no_wrap = True
        text.overflow = "ellipsis"
        return text
