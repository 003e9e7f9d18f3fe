"""``edge-lora demo [--out DIR] [--json]``: Gemma 3 270M + the legal adapter, end to end."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the workflow loads llama.cpp: imported by the handler, not at CLI start
    from edge_lora.workflows.demo import DemoSummary


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "demo", help="run the whole job on the built-in Gemma 3 270M + legal adapter",
        description="Merge, convert, quantize (every K-quant), fit, measure perplexity, sample with the "
                    "adapter hot-applied and write an Ollama Modelfile, on Gemma 3 270M and a bundled "
                    "legal-text LoRA. Needs: pip install -e \".[demo]\".")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output directory (default: ./edge-lora-demo)")
    parser.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    parser.set_defaults(handler=demo_command)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.0f} MB"


def print_summary(summary: DemoSummary) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    files = Table(title=f"Outputs in {summary.out_dir} (fit at context {summary.fit_ctx}, "
                        f"{summary.available_ram_bytes / 1e9:.1f} GB RAM available)")
    for column in ("file", "format", "kind", "size", "bits/weight", "predicted RAM", "fit"):
        files.add_column(column, justify="right" if column in ("size", "bits/weight", "predicted RAM") else "left")
    for f in summary.files:
        fit = "-" if f.fit_verdict is None else f.fit_verdict + ("  <- recommended" if f.recommended else "")
        files.add_row(Path(f.path).name, f.format + (" (imatrix)" if f.calibrated else ""), f.kind, _mb(f.bytes),
                      f"{f.bpw:.2f}", _mb(f.predicted_ram_bytes), fit)
    console.print(files)
    ppl = summary.perplexity
    quality = Table(title=f"Perplexity on held-out Apache-2.0 + MPL-2.0 text (ctx {ppl.ctx}, {ppl.tokens} tokens scored)")
    quality.add_column("model")
    quality.add_column("perplexity", justify="right")
    quality.add_row("base (Q4_K_M)", f"{ppl.base:.3f}")
    quality.add_row("base + legal adapter, hot-applied", f"{ppl.adapter:.3f}")
    quality.add_row(f"merged {ppl.merged_format}", f"{ppl.merged:.3f}")
    console.print(quality)
    console.print(f"[bold]Prompt:[/bold] {summary.sample_prompt}", markup=True, highlight=False)
    console.print(f"[bold]base:[/bold] {summary.sample_base!r}", markup=True, highlight=False)
    console.print(f"[bold]+adapter:[/bold] {summary.sample_adapter!r}", markup=True, highlight=False)
    stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in summary.stage_seconds.items())
    console.print(f"Done in {summary.seconds:.0f} s ({stages}).")
    if summary.modelfile:
        console.print(f"Ollama: ollama create edge-lora-legal -f {summary.modelfile}", highlight=False)
    console.print(f"Next: edge-lora fit {summary.out_dir}  |  edge-lora run --model {summary.base_gguf} "
                  f"--adapter {summary.adapter_gguf} --prompt \"...\"", highlight=False)


def demo_command(args: argparse.Namespace) -> int:
    from edge_lora.core.progress import cli_progress
    from edge_lora.workflows.demo import run_demo

    def announce(line: str) -> None:
        if not args.json:
            print(line, file=sys.stderr, flush=True)

    with cli_progress(quiet=args.json) as progress:
        summary = run_demo(args.out, progress=progress, announce=announce)
    if args.json:
        print(json.dumps(summary.to_json()))
    else:
        print_summary(summary)
    return 0
