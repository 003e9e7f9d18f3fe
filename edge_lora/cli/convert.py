"""``edge-lora convert BASE [--adapter A[:W] ...] [--method METHOD ...] [--out DIR] [--quant ...] [--outtype ...] [--calibrate TEXT | --imatrix FILE] [--json]``.

A thin layer over ``edge_lora.workflows.convert_model.convert_model``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edge_lora.cli._combine_args import add_combine_args, combine_options


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "convert", help="convert a Hugging Face model (optionally + a PEFT adapter) to GGUF",
        description="Convert BASE (a local Hugging Face checkpoint directory or a Hub repo id) to GGUF "
                    "in DIR: <name>-F16.gguf, optional quantized files and manifest.json.")
    parser.add_argument("base", metavar="BASE", help="HF checkpoint directory or repo id (org/name)")
    parser.add_argument("--adapter", metavar="A[:W]", action="append", default=None,
                        help="PEFT LoRA or IA3 adapter (directory or repo id; or a GGUF adapter file / registered "
                             "name) to merge, optionally with a weight; repeat it to merge a combination "
                             "(see --method)")
    parser.add_argument("--out", metavar="DIR", type=Path, default=None,
                        help="output directory (default: ./<name>-gguf)")
    parser.add_argument("--quant", default="all", metavar="all|iq|none|Q4_K_M,IQ4_XS,...",
                        help="quantized formats to write besides the full-precision file (default: all: every "
                             "K-quant and Q8_0; iq: the IQ formats, IQ2_* and IQ3_XXS need --calibrate; all,iq: both)")
    parser.add_argument("--outtype", choices=("f16", "bf16", "f32"), default="f16",
                        help="type of the full-precision file (default: f16)")
    calibration = parser.add_mutually_exclusive_group()
    calibration.add_argument("--calibrate", metavar="TEXT", type=Path, default=None,
                             help="compute an importance matrix from this text on the full-precision file "
                                  "(<name>.imatrix.gguf) and quantize with it")
    calibration.add_argument("--imatrix", metavar="FILE", type=Path, default=None,
                             help="quantize with this importance matrix (from `edge-lora imatrix` or llama-imatrix, "
                                  "computed on this same model)")
    add_combine_args(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON document (the manifest) on stdout")
    parser.set_defaults(handler=convert_command)


def _default_out(base: str) -> Path:
    return Path.cwd() / f"{Path(base.rstrip('/')).name or 'model'}-gguf"


def _combining(args: argparse.Namespace) -> bool:
    """Any adapter-arithmetic option given (then it must apply: see ``plan_merge``)."""
    return args.method is not None or args.density is not None or args.svd_rank is not None


def convert_command(args: argparse.Namespace) -> int:
    from edge_lora.core.progress import cli_progress

    out_dir: Path = args.out if args.out is not None else _default_out(args.base)
    quant = str(args.quant).strip()
    with cli_progress(quiet=args.json) as progress:
        from edge_lora.workflows.convert_model import convert_model

        manifest = convert_model(args.base, out_dir, adapter=args.adapter, quants=quant,
                                 outtype=args.outtype, calibrate=args.calibrate, imatrix=args.imatrix,
                                 combine=combine_options(args) if _combining(args) else None,
                                 progress=progress)
    if args.json:
        print(json.dumps({"directory": str(out_dir), **manifest.to_json()}))
        return 0
    for row in manifest.files:
        calibrated = "  calibrated" if row.imatrix else ""
        print(f"{out_dir / row.path}  {row.format:<7} {row.bytes / 1e6:9.1f} MB  {row.bpw:.2f} bpw{calibrated}")
    print(f"wrote {out_dir / 'manifest.json'}")
    return 0
