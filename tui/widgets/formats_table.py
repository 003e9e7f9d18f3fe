"""The formats of a converted model: size, bpw, predicted RAM at the chosen context, fit verdict,
quality against F16; the recommended row is starred. When any file was quantized with an
importance matrix, an ``imatrix`` column marks the calibrated ones."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.widgets import DataTable

from edge_lora.tui.view_model import FitPrediction, FormatEntry, ModelDirView, Verdict, human_bytes, human_ctx
from edge_lora.tui.widgets._css import css_beside

RECOMMENDED_MARK = "★"
CALIBRATED_MARK = "✓"


class FormatsTable(DataTable[Text]):
    DEFAULT_CSS = css_beside(__file__)

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.verdicts: dict[Path, Verdict] = {}
        self.recommended: Path | None = None

    def show(self, view: ModelDirView, predictions: dict[Path, FitPrediction], ctx: int) -> None:
        """Redraw every row, keeping the cursor on the same file."""
        keep = self.selected_path()
        self.clear(columns=True)
        calibrated = any(entry.calibrated for entry in view.formats)
        columns = [("", "mark", 1), ("Format", "format", 7), ("Size", "size", 8), ("bpw", "bpw", 5),
                   (f"RAM@{human_ctx(ctx)}", "ram", 8), ("Fit", "fit", 5), ("PPL", "ppl", 7), ("KLD", "kld", 7)]
        if calibrated:
            columns.append(("imatrix", "imatrix", 7))
        for label, key, width in columns:
            self.add_column(label, key=key, width=width)
        self.verdicts = {}
        self.recommended = None
        for entry in view.formats:
            prediction = predictions.get(entry.path)
            verdict = prediction.verdict if prediction is not None else None
            if verdict is not None:
                self.verdicts[entry.path] = verdict
            if prediction is not None and prediction.recommended:
                self.recommended = entry.path
            cells = self._cells(entry, prediction, verdict)
            if calibrated:
                cells.append(Text(CALIBRATED_MARK if entry.calibrated else "", justify="center"))
            self.add_row(*cells, key=str(entry.path))
        if keep is not None and str(keep) in self.rows:
            self.move_cursor(row=self.get_row_index(str(keep)))
        elif self.recommended is not None:
            self.move_cursor(row=self.get_row_index(str(self.recommended)))

    @staticmethod
    def _cells(entry: FormatEntry, prediction: FitPrediction | None, verdict: Verdict | None) -> list[Text]:
        recommended = prediction is not None and prediction.recommended
        return [
            Text(RECOMMENDED_MARK if recommended else "", style="bold yellow"),
            Text(entry.format, style="bold" if recommended else ""),
            Text(human_bytes(entry.file_bytes), justify="right"),
            Text("" if entry.bpw is None else f"{entry.bpw:.2f}", justify="right"),
            Text("…" if prediction is None else human_bytes(prediction.total_bytes), justify="right"),
            Text("…" if verdict is None else verdict.value, style="" if verdict is None else verdict.style),
            Text("–" if entry.ppl is None else f"{entry.ppl:.3f}", justify="right"),
            Text("–" if entry.kld is None else f"{entry.kld:.4f}", justify="right"),
        ]

    def selected_path(self) -> Path | None:
        if self.row_count == 0:
            return None
        try:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        except Exception:  # cursor outside the (just cleared) table
            return None
        return None if key.value is None else Path(key.value)

    def row_text(self, path: Path) -> list[str]:
        """Plain text of a row, as a user reads it (used by tests and the tmux check)."""
        return [cell.plain if isinstance(cell, Text) else str(cell) for cell in self.get_row(str(path))]
