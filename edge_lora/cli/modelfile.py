"""``edge-lora modelfile --model FILE.gguf [--adapter NAME|FILE.gguf] [--system TEXT] [--ctx N] [--out PATH]``:
an Ollama Modelfile for a converted model (printed on stdout without --out)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_lora.cli._model_args import add_ctx_arg
from edge_lora.core.context_size import check_ctx


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("modelfile", help="write an Ollama Modelfile for a GGUF model",
                                   description="Write an Ollama Modelfile: FROM the model, the chat TEMPLATE "
                                               "translated to Go, stop strings, num_ctx that fits this machine.")
    parser.add_argument("--model", type=Path, required=True, metavar="FILE.gguf", help="the GGUF model (merged is best)")
    parser.add_argument("--adapter", default=None, metavar="NAME|FILE.gguf",
                        help="a registered adapter or GGUF LoRA file for Ollama's ADAPTER (see the caveat printed)")
    parser.add_argument("--system", default=None, metavar="TEXT", help="a SYSTEM prompt")
    add_ctx_arg(parser, help="PARAMETER num_ctx", default="the largest, up to 4096, that fits RAM")
    parser.add_argument("--out", type=Path, default=None, metavar="PATH",
                        help="write here (a directory gets ./Modelfile); default: print on stdout")
    parser.set_defaults(handler=modelfile_command)


def modelfile_command(args: argparse.Namespace) -> int:
    check_ctx(args.ctx)
    from edge_lora.analysis.modelfile import render_modelfile_result, write_modelfile

    adapter_path = None
    if args.adapter is not None:
        from edge_lora.serving.registry import AdapterRegistry

        adapter_path = AdapterRegistry().resolve(args.adapter).path
    if args.out is None:
        result = render_modelfile_result(args.model, adapter_path=adapter_path, system=args.system,
                                         num_ctx=args.ctx)
        sys.stdout.write(result.text)
    else:
        result = write_modelfile(args.out, args.model, adapter_path=adapter_path, system=args.system,
                                 num_ctx=args.ctx)
        print(f"wrote {result.path} (chat format {result.family}, num_ctx {result.num_ctx}); "
              f"create the model with: ollama create NAME -f {result.path}", file=sys.stderr)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0
