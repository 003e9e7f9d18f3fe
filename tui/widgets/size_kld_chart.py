"""Size and KLD of each format as horizontal bars drawn with unicode eighth-blocks."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

from edge_lora.tui.view_model import FormatEntry, human_bytes
from edge_lora.tui.widgets._css import css_beside

_EIGHTHS = " ▏▎▍▌▋▊▉"
LABEL_WIDTH = 8
VALUE_WIDTH = 8


def bar(fraction: float, width: int) -> str:
    """A left-aligned bar of ``width`` cells filled to ``fraction`` with 1/8-cell resolution."""
    fraction = min(max(fraction, 0.0), 1.0)
    eighths = round(fraction * width * 8)
    full, rest = divmod(eighths, 8)
    text = "█" * full + (_EIGHTHS[rest] if rest else "")
    return text.ljust(width)


class SizeKldChart(Widget):
    DEFAULT_CSS = css_beside(__file__)

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._formats: tuple[FormatEntry, ...] = ()

    def show(self, formats: tuple[FormatEntry, ...]) -> None:
        self._formats = tuple(sorted(formats, key=lambda e: e.file_bytes, reverse=True))
        self.styles.height = len(self._formats) + 2  # + header line + top border
        self.refresh(layout=True)

    def render(self) -> Text:
        width = max(self.size.width, 40)
        bar_width = max(4, (width - LABEL_WIDTH - 2 * VALUE_WIDTH - 3) // 2)
        max_size = max((e.file_bytes for e in self._formats), default=1) or 1
        max_kld = max((e.kld for e in self._formats if e.kld is not None), default=0.0)
        text = Text(no_wrap=True, overflow="crop")
        text.append(" " * LABEL_WIDTH + "size".ljust(bar_width + VALUE_WIDTH) + " │ KLD vs F16", style="dim")
        for entry in self._formats:
            text.append("\n" + entry.format[:LABEL_WIDTH - 1].ljust(LABEL_WIDTH), style="bold")
            text.append(bar(entry.file_bytes / max_size, bar_width), style="cyan")
            text.append(human_bytes(entry.file_bytes).rjust(VALUE_WIDTH))
            text.append(" │ ", style="dim")
            if entry.kld is None:
                text.append(" " * bar_width + "–".rjust(VALUE_WIDTH), style="dim")
            else:
                text.append(bar(entry.kld / max_kld if max_kld > 0 else 0.0, bar_width), style="red")
                text.append(f"{entry.kld:.4f}".rjust(VALUE_WIDTH))
        return text
