"""``edge-lora tui [DIR]``: the Textual app on a converted model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_lora.cli._model_args import add_ctx_arg
from edge_lora.core.context_size import check_ctx


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "tui", help="interactive picker: formats that fit this machine, quality, chat with adapters",
        description="Open the Textual UI on DIR (written by `edge-lora convert`) or one GGUF file; "
                    "without DIR, a welcome screen offers the built-in demo model.")
    parser.add_argument("dir", nargs="?", type=Path, help="converted output directory or a .gguf file")
    add_ctx_arg(parser, help="context length to predict memory for and chat at")
    parser.set_defaults(handler=run_tui)


def run_tui(args: argparse.Namespace) -> int:
    check_ctx(args.ctx)
    from edge_lora.tui.app import make_app  # textual loads only for this command

    make_app(args.dir, ctx=args.ctx).run()
    return 0
