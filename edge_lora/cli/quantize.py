"""``edge-lora quantize FILE.gguf [--quant all|Q4_K_M,...] [--out DIR] [--imatrix FILE | --calibrate TEXT] [--json]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_lora.core.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "quantize", help="quantize an F16/BF16/F32 GGUF into K-quants / IQ formats with llama.cpp",
        description="Quantize FILE.gguf (F16/BF16/F32) into each requested format, written as "
                    "<name>-<TYPE>.gguf in DIR and recorded in DIR/manifest.json.")
    parser.add_argument("file", metavar="FILE.gguf", type=Path, help="full-precision GGUF model")
    parser.add_argument("--quant", default="all", metavar="all|iq|Q4_K_M,IQ4_XS,...",
                        help="formats to write (default: all = Q2_K ... Q6_K and Q8_0; iq = IQ2_XXS ... IQ4_NL, "
                             "of which IQ2_* and IQ3_XXS need --imatrix or --calibrate; all,iq = both)")
    parser.add_argument("--out", metavar="DIR", type=Path, default=None,
                        help="output directory (default: the input file's directory)")
    calibration = parser.add_mutually_exclusive_group()
    calibration.add_argument("--imatrix", metavar="FILE", type=Path, default=None,
                             help="importance matrix to quantize with (from `edge-lora imatrix` or llama-imatrix)")
    calibration.add_argument("--calibrate", metavar="TEXT", type=Path, default=None,
                             help="compute an importance matrix on FILE.gguf from this text file first "
                                  "(written as DIR/<name>.imatrix.gguf), then quantize with it")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.set_defaults(handler=quantize_command)


def quantize_command(args: argparse.Namespace) -> int:
    from edge_lora.converters.quantize import record_in_manifest
    from edge_lora.core.formats import parse_quant_list
    from edge_lora.core.manifest import Manifest
    from edge_lora.core.progress import cli_progress
    from edge_lora.workflows.calibrate import quantize_calibrated

    names = parse_quant_list(args.quant)
    src: Path = args.file
    out_dir: Path = args.out if args.out is not None else src.resolve().parent
    if not names:
        raise InputError("--quant none leaves nothing to do", fix="give --quant all or a list such as Q4_K_M")
    with cli_progress(quiet=args.json) as progress:
        results, imatrix = quantize_calibrated(src, out_dir, names, imatrix=args.imatrix,
                                               calibrate_text=args.calibrate, progress=progress)
    record_in_manifest(out_dir, src, results, imatrix=imatrix)
    manifest = Manifest.load(out_dir)
    failed = [r for r in results if not r.ok]
    if args.json:
        rows = []
        for r in results:
            row = manifest.file(r.path.name) if r.path is not None else None
            rows.append({"format": r.name, "ok": r.ok, "path": str(r.path) if r.path else None,
                         "bytes": row.bytes if row else None, "bpw": row.bpw if row else None,
                         "sha256": row.sha256 if row else None, "seconds": round(r.seconds, 3),
                         "imatrix": row.imatrix if row else None, "error": r.error})
        print(json.dumps({"source": str(src), "directory": str(out_dir),
                          "imatrix": str(imatrix) if imatrix is not None else None, "results": rows}))
    else:
        for r in results:
            row = manifest.file(r.path.name) if r.path is not None else None
            if row is not None:
                calibrated = "  calibrated" if row.imatrix else ""
                print(f"{out_dir / row.path}  {row.format:<7} {row.bytes / 1e6:9.1f} MB  {row.bpw:.2f} bpw{calibrated}")
        if imatrix is not None:
            print(f"importance matrix: {imatrix}")
    for r in failed:
        print(f"edge-lora: error: {r.error}", file=sys.stderr)
    return 1 if failed else 0
