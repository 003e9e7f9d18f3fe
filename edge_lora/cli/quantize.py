"""``edge-lora quantize FILE.gguf [--quant all|Q4_K_M,...] [--out DIR] [--json]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_lora.core.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "quantize", help="quantize an F16/BF16/F32 GGUF into K-quants with llama.cpp",
        description="Quantize FILE.gguf (F16/BF16/F32) into each requested format, written as "
                    "<name>-<TYPE>.gguf in DIR and recorded in DIR/manifest.json.")
    parser.add_argument("file", metavar="FILE.gguf", type=Path, help="full-precision GGUF model")
    parser.add_argument("--quant", default="all", metavar="all|Q4_K_M,Q8_0,...",
                        help="formats to write (default: all = Q2_K ... Q6_K and Q8_0)")
    parser.add_argument("--out", metavar="DIR", type=Path, default=None,
                        help="output directory (default: the input file's directory)")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.set_defaults(handler=quantize_command)


def quantize_command(args: argparse.Namespace) -> int:
    from edge_lora.converters.quantize import quantize_ladder, record_in_manifest
    from edge_lora.core.formats import parse_quant_list
    from edge_lora.core.manifest import Manifest
    from edge_lora.core.progress import cli_progress

    names = parse_quant_list(args.quant)
    src: Path = args.file
    out_dir: Path = args.out if args.out is not None else src.resolve().parent
    if not names:
        raise InputError("--quant none leaves nothing to do", fix="give --quant all or a list such as Q4_K_M")
    with cli_progress(quiet=args.json) as progress:
        results = quantize_ladder(src, out_dir, names, progress=progress)
    record_in_manifest(out_dir, src, results)
    manifest = Manifest.load(out_dir)
    failed = [r for r in results if not r.ok]
    if args.json:
        rows = []
        for r in results:
            row = manifest.file(r.path.name) if r.path is not None else None
            rows.append({"format": r.name, "ok": r.ok, "path": str(r.path) if r.path else None,
                         "bytes": row.bytes if row else None, "bpw": row.bpw if row else None,
                         "sha256": row.sha256 if row else None, "seconds": round(r.seconds, 3),
                         "error": r.error})
        print(json.dumps({"source": str(src), "directory": str(out_dir), "results": rows}))
    else:
        for r in results:
            row = manifest.file(r.path.name) if r.path is not None else None
            if row is not None:
                print(f"{out_dir / row.path}  {row.format:<7} {row.bytes / 1e6:9.1f} MB  {row.bpw:.2f} bpw")
    for r in failed:
        print(f"edge-lora: error: {r.error}", file=sys.stderr)
    return 1 if failed else 0
