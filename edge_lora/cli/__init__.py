"""``edge-lora`` command line: a thin layer over the library.

Each module in this package is one command group and exposes ``register(subparsers)``,
which adds its parser(s) with ``set_defaults(handler=...)``. A handler takes the parsed
``argparse.Namespace`` and returns an exit code. Heavy imports (llama_cpp, textual) happen
inside handlers so ``edge-lora --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

from edge_lora import __version__
from edge_lora.core.errors import EdgeLoraError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-lora",
        description="Merge, convert and quantize LoRA fine-tunes, then run them locally with llama.cpp.")
    parser.add_argument("--version", action="version", version=f"edge-lora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Library code reports non-fatal problems through logging; show them as one-line warnings.
    logging.basicConfig(format="edge-lora: %(levelname)s: %(message)s", level=logging.WARNING)
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with a usage line on bad arguments
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(handler(args) or 0)
    except EdgeLoraError as exc:
        print(f"edge-lora: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edge-lora: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
