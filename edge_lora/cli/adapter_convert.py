"""``edge-lora adapter convert PEFT --base BASE --out FILE.gguf``: PEFT LoRA -> GGUF LoRA;
``edge-lora adapter combine A[:W] B[:W] ... --out DIR [--method ...]``: adapter arithmetic."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edge_lora.cli._combine_args import add_combine_args, combine_options


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("adapter", help="convert a PEFT LoRA adapter to GGUF, or combine adapters")
    sub = parser.add_subparsers(dest="adapter_command", metavar="ACTION", required=True)
    convert = sub.add_parser(
        "convert", help="PEFT adapter -> GGUF LoRA adapter for llama.cpp hot-apply",
        description="Convert a PEFT LoRA adapter (directory or Hub repo id) to a GGUF LoRA adapter for "
                    "BASE (the HF checkpoint it was trained on), applying the base's conversion transforms.")
    convert.add_argument("peft", metavar="PEFT", help="PEFT adapter directory or repo id")
    convert.add_argument("--base", metavar="BASE", required=True, help="HF base checkpoint directory or repo id")
    convert.add_argument("--out", metavar="FILE.gguf", type=Path, default=None,
                         help="output file (default: ./adapter-<name>.gguf)")
    convert.add_argument("--outtype", choices=("f32", "f16", "q8_0"), default="f32",
                         help="tensor type: f32 is exact; q8_0 is half the size and faster to hot-apply on CPU "
                              "(default: f32)")
    convert.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    convert.set_defaults(handler=adapter_convert_command)
    combine = sub.add_parser(
        "combine", help="combine adapters (weighted sum, TIES, DARE, ...) into one PEFT adapter",
        description="Combine PEFT LoRA adapters (directories or Hub ids, or GGUF adapters / registered names with "
                    "--base) with weights, as PEFT's add_weighted_adapter does, into a PEFT adapter directory that "
                    "`adapter convert`, `convert --adapter`, PEFT and vLLM load. A:-1 subtracts A.")
    combine.add_argument("adapters", nargs="+", metavar="A[:W]", help="adapter and optional weight (default 1)")
    combine.add_argument("--out", metavar="DIR", type=Path, required=True, help="output PEFT adapter directory")
    combine.add_argument("--base", metavar="BASE", default=None,
                         help="HF base checkpoint: checks every adapter against it; needed for GGUF inputs")
    add_combine_args(combine)
    combine.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    combine.set_defaults(handler=adapter_combine_command)


def adapter_convert_command(args: argparse.Namespace) -> int:
    from edge_lora.converters.adapter_gguf import convert_adapter_to_gguf
    from edge_lora.converters.hf_to_gguf import model_name_for
    from edge_lora.core.manifest import sha256_file
    from edge_lora.core.output_dir import adapter_file_name
    from edge_lora.core.progress import cli_progress
    from edge_lora.hub import resolve_local_or_hub

    peft_dir = resolve_local_or_hub(args.peft, "adapter")
    base_dir = resolve_local_or_hub(args.base, "model")
    out: Path = args.out if args.out is not None else Path.cwd() / adapter_file_name(model_name_for(args.peft, peft_dir))
    with cli_progress(quiet=args.json) as progress:
        path = convert_adapter_to_gguf(peft_dir, base_dir, out, outtype=args.outtype, progress=progress)
    if args.json:
        print(json.dumps({"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}))
    else:
        print(f"wrote {path}")
    return 0


def adapter_combine_command(args: argparse.Namespace) -> int:
    from edge_lora.workflows.combine_adapters import combine_to_dir

    options = combine_options(args)
    result = combine_to_dir(args.adapters, args.out, options, base=args.base)
    if args.json:
        print(json.dumps({"directory": str(result.out_dir), "method": options.method if len(result.inputs) > 1
                          else "linear", "rank": result.adapter.config.r, "seed": options.seed,
                          "inputs": [{"adapter": r.ref, "weight": 1.0 if r.weight is None else r.weight}
                                     for r in result.inputs]}))
    else:
        print(f"wrote {result.out_dir} (rank {result.adapter.config.r}, {len(result.adapter.deltas)} modules)")
    return 0
