"""``edge-lora fit [DIR|FILE.gguf...] [--ctx N] [--json]``: which format fits this machine's RAM."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_lora.cli._model_args import add_ctx_arg
from edge_lora.core.context_size import check_ctx
from edge_lora.core.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("fit", help="predict RAM use of each format and recommend one",
                                   description="Predict the peak RAM of each model file at a context size "
                                               "and recommend the best format that fits.")
    parser.add_argument("paths", nargs="*", type=Path, metavar="DIR|FILE",
                        help="converted output directories or .gguf files (default: the last converted directory)")
    add_ctx_arg(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(handler=fit_command)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def fit_command(args: argparse.Namespace) -> int:
    check_ctx(args.ctx)
    from edge_lora.analysis.fit import fit_report
    from edge_lora.state import last_output_dir

    paths = list(args.paths)
    if not paths:
        last = last_output_dir()
        if last is None:
            raise InputError("no model given and no converted output directory remembered",
                             fix="pass a DIR or FILE.gguf, or run `edge-lora convert` / `edge-lora demo` first")
        print(f"using the last converted directory {last}", file=sys.stderr)
        paths = [last]
    report = fit_report(paths, ctx=args.ctx)
    if args.json:
        print(json.dumps(report.to_json()))
        return 0
    print(f"RAM {_gb(report.total_bytes)} total, {_gb(report.available_bytes)} available; context {report.ctx}")
    for m in report.models:
        mark = "  <- recommended" if m.recommended else ""
        calibrated = f"  [imatrix {m.calibrated}]" if m.calibrated else ""
        print(f"{m.format:<8} {_gb(m.file_bytes):>9} file  {_gb(m.total_bytes):>9} predicted  {m.verdict:<5} "
              f"{Path(m.path).name}{mark}{calibrated}")
    if report.recommended is None:
        print("nothing fits: try a smaller --ctx or a smaller format (edge-lora quantize --quant Q4_K_M)",
              file=sys.stderr)
    return 0
