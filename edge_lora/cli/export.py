"""``edge-lora export vllm``: the converted model's base and its adapters as a vLLM deployment
(``--out DIR``), and the check that a running server answers as edge-lora does (``--check URL``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from edge_lora.core.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("export", help="export the model and adapters to another serving stack")
    sub = parser.add_subparsers(dest="export_target", metavar="TARGET", required=True)
    vllm = sub.add_parser(
        "vllm", help="a vLLM multi-LoRA deployment serving the same model ids, or --check a running one",
        description="Write DIR with the adapters as PEFT directories, serve.sh, compose.yaml, kubernetes.yaml "
                    "and README.md (--out), or compare a running server's greedy answers with edge-lora's own "
                    "(--check URL; exit 1 when they differ). VLLM_API_KEY is sent to a server started with --api-key.")
    vllm.add_argument("--out", type=Path, metavar="DIR", help="directory to write the deployment to")
    vllm.add_argument("--check", metavar="URL", help="check the server at URL instead of exporting")
    vllm.add_argument("--model", type=Path, metavar="CONVERTED_DIR|GGUF",
                      help="the converted model (default: the last converted directory)")
    vllm.add_argument("--base", metavar="HF_DIR|HUB_ID",
                      help="the Hugging Face checkpoint the model was converted from (default: the manifest's)")
    vllm.add_argument("--adapter", action="append", metavar="NAME",
                      help="a registered adapter (or a GGUF adapter file, or a PEFT directory); repeatable "
                           "(default: every registered adapter made for the model's architecture)")
    vllm.add_argument("--max-loras", type=int, metavar="N", help="adapters in one batch (default: all of them)")
    vllm.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N", help="GPUs per replica (default 1)")
    vllm.add_argument("--replicas", type=int, default=1, metavar="N", help="Kubernetes replicas (default 1)")
    vllm.add_argument("--port", type=int, default=8000, metavar="P", help="port to serve on (default 8000)")
    vllm.add_argument("--prompts", type=Path, metavar="FILE", help="--check: one prompt a line (default: built-in)")
    vllm.add_argument("--tokens", type=int, default=16, metavar="K", help="--check: tokens compared per prompt")
    vllm.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    vllm.set_defaults(handler=export_vllm_command)


def export_vllm_command(args: argparse.Namespace) -> int:
    from edge_lora.core.progress import cli_progress

    if (args.out is None) == (args.check is None):
        raise InputError("give --out DIR (export) or --check URL (verify a running server)",
                         fix="see `edge-lora export vllm --help`")
    if args.check is not None:
        return _check(args)
    from edge_lora.export.vllm import export_record, plan_export, write_export

    plan = plan_export(args.out, model=args.model, base=args.base, adapters=args.adapter, max_loras=args.max_loras,
                       tensor_parallel_size=args.tensor_parallel_size, replicas=args.replicas, port=args.port)
    for refusal in plan.refused:
        print(f"edge-lora: refused: {refusal.reason}", file=sys.stderr)
    with cli_progress(quiet=args.json) as progress:
        out = write_export(plan, progress)
    if args.json:
        print(json.dumps({"out": str(out), **export_record(plan)}))
        return 0
    for adapter in plan.adapters:
        print(f"{adapter.name}: {adapter.kind.value} ({adapter.source}), rank {adapter.rank}, scale {adapter.scale:g}")
    print(f"wrote {out} (start it with {out / 'serve.sh'}; check it with "
          f"`edge-lora export vllm --check http://127.0.0.1:{plan.port}`)")
    return 0


def _check(args: argparse.Namespace) -> int:
    from edge_lora.core.progress import cli_progress
    from edge_lora.export.check import check_server, format_report, read_prompts

    prompts = read_prompts(args.prompts)
    with cli_progress(quiet=args.json) as progress:
        report = check_server(args.check, model=args.model, prompts=prompts, tokens=args.tokens,
                              api_key=os.environ.get("VLLM_API_KEY") or None, progress=progress)
    print(json.dumps(report.to_json()) if args.json else format_report(report))
    return 0 if report.passed else 1
