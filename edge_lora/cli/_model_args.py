"""Arguments several commands share: which model (run, serve), the context size (run, serve,
tui, fit, modelfile) and the prompt cache switch (run, serve). Parsing only: the policy is ``edge_lora.serving.model_choice`` and
``edge_lora.core.context_size``."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_lora.core.context_size import MAX_CTX, MIN_CTX


def add_ctx_arg(parser: argparse.ArgumentParser, help: str = "context length in tokens",
                default: str = "the model's, capped at 4096") -> None:
    parser.add_argument("--ctx", type=int, default=None, metavar="N", help=f"{help}, {MIN_CTX}-{MAX_CTX} (default: {default})")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="a .gguf file or a converted directory (default: the last converted one)")
    parser.add_argument("--quant", default=None, help="format to pick from a directory, e.g. Q4_K_M")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME[:SCALE]",
                        help="registered adapter name or adapter .gguf path, optional scale; repeatable")
    add_ctx_arg(parser)


def add_prompt_cache_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-prompt-cache", dest="prompt_cache", action="store_false",
                        help="process every prompt from an empty KV cache (exact mode: a request's tokens "
                             "never depend on earlier requests; slower as a chat grows)")
