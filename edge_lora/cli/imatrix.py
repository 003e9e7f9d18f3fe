"""``edge-lora imatrix FILE.gguf --text TEXT [--adapter NAME]... [--ctx N] [--out imatrix.gguf] [--json]``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "imatrix", help="compute an importance matrix on calibration text (for calibrated quantization)",
        description="Compute llama.cpp's importance matrix of FILE.gguf on a calibration text, as "
                    "llama-imatrix does; `edge-lora quantize --imatrix` (or llama-quantize --imatrix) uses it. "
                    "For a base that will run with adapters hot-applied, pass them with --adapter.")
    parser.add_argument("file", type=Path, metavar="FILE.gguf", help="the full-precision model to calibrate")
    parser.add_argument("--text", type=Path, required=True, metavar="TEXT",
                        help="UTF-8 calibration text (not the text you evaluate on)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME",
                        help="registered adapter name or adapter .gguf to hot-apply while collecting (repeatable)")
    parser.add_argument("--ctx", type=int, default=512, help="chunk size in tokens (default 512, as llama-imatrix)")
    parser.add_argument("--out", type=Path, default=None, metavar="imatrix.gguf",
                        help="output file (default: <name>.imatrix.gguf beside FILE.gguf)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(handler=imatrix_command)


def imatrix_command(args: argparse.Namespace) -> int:
    from edge_lora.core.progress import cli_progress
    from edge_lora.workflows.calibrate import calibrate, imatrix_path_for

    adapters = []
    if args.adapter:
        from edge_lora.serving.registry import AdapterRegistry

        registry = AdapterRegistry()
        adapters = [(e.path, e.scale) for e in (registry.resolve(name) for name in args.adapter)]
    out: Path = args.out if args.out is not None else imatrix_path_for(args.file, args.file.absolute().parent)
    with cli_progress(quiet=args.json) as progress:
        run = calibrate(args.file, args.text, out, ctx=args.ctx, adapters=adapters, progress=progress)
    per_1k = 1000 * run.eval_seconds / run.tokens
    if args.json:
        print(json.dumps({"path": str(out), "model": str(args.file), "text": str(args.text),
                          "text_sha256": run.imatrix.text_sha256, "ctx": args.ctx, "chunks": run.chunks,
                          "tokens": run.tokens, "entries": len(run.imatrix.entries),
                          "adapters": [str(p) for p, _ in adapters], "seconds": round(run.seconds, 3),
                          "seconds_per_1k_tokens": round(per_1k, 4)}))
        return 0
    print(f"{out}: {len(run.imatrix.entries)} weights, {run.chunks} chunks of {args.ctx} tokens "
          f"({run.tokens} tokens, {per_1k:.2f} s per 1,000 tokens)")
    return 0
