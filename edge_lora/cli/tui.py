"""``edge-lora tui [DIR]``: the Textual app on a converted model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_lora.core.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "tui", help="interactive picker: formats that fit this machine, quality, chat with adapters",
        description="Open the Textual UI on DIR (written by `edge-lora convert`) or one GGUF file; "
                    "without DIR, a welcome screen offers the built-in demo model.")
    parser.add_argument("dir", nargs="?", type=Path, help="converted output directory or a .gguf file")
    parser.add_argument("--ctx", type=int, default=None, help="context length to predict memory for")
    parser.set_defaults(handler=run_tui)


def run_tui(args: argparse.Namespace) -> int:
    if args.ctx is not None and not 16 <= args.ctx <= 1 << 20:
        raise InputError(f"--ctx {args.ctx} is out of range", fix="use a context between 16 and 1048576")
    from edge_lora.tui.app import make_app  # textual loads only for this command

    make_app(args.dir, ctx=args.ctx).run()
    return 0
