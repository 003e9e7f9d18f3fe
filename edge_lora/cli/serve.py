"""``edge-lora serve``: the OpenAI-compatible API (uvicorn) over one loaded base with adapters."""

from __future__ import annotations

import argparse
import socket
import sys

from edge_lora.cli._model_args import add_model_args
from edge_lora.core import constants
from edge_lora.core.context_size import check_ctx
from edge_lora.core.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "serve", help="serve an OpenAI-compatible API (adapters selected per request by model name)",
        description="Serve /v1/models, /v1/completions, /v1/chat/completions and "
                    "/v1/load_lora_adapter, /v1/unload_lora_adapter. \"model\" picks an adapter by name "
                    "or the base by its id.")
    add_model_args(parser)
    parser.add_argument("--host", default=constants.DEFAULT_HOST, help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=constants.DEFAULT_PORT, help="port (default 8000)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every route (or set EDGE_LORA_API_KEY)")
    # bench/runtime.py on 2 cores (Gemma 3 270M): 8 concurrent mixed-adapter clients get 1.5-1.7x
    # the tokens/s from two 1-thread contexts than from one 2-thread context behind a lock; a lone
    # client loses 0-10% (small-model decoding barely scales past one thread per sequence).
    parser.add_argument("--contexts", type=int, default=min(2, constants.N_THREADS),
                        help="parallel inference contexts sharing the cores (default 2 on 2+ cores)")
    parser.set_defaults(handler=serve_command)


def _check_port_free(host: str, port: int) -> None:
    # uvicorn reports a busy port by logging and exiting 1; say it as bad input instead.
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InputError(f"cannot resolve --host {host!r}: {exc.strerror}", fix="use an address like 127.0.0.1") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}",
                             fix="choose another --port or stop the program using it") from exc


def serve_command(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        raise InputError(f"--port {args.port} is out of range", fix="use 1-65535")
    if not 1 <= args.contexts <= 8:
        raise InputError(f"--contexts {args.contexts} is out of range", fix="use 1-8")
    check_ctx(args.ctx)
    import uvicorn

    from edge_lora.model_choice import load_adapters, parse_adapter_arg, resolve_model_path
    from edge_lora.registry import AdapterRegistry
    from edge_lora.runtime import Runtime
    from edge_lora.server import make_app

    api_key = args.api_key or constants.EDGE_LORA_API_KEY
    choices = [parse_adapter_arg(a) for a in args.adapter]
    model_path = resolve_model_path(args.model, args.quant, args.ctx)
    _check_port_free(args.host, args.port)
    registry = AdapterRegistry()
    with Runtime(model_path, n_ctx=args.ctx, n_contexts=args.contexts) as runtime:
        load_adapters(runtime, registry, choices)
        app = make_app(runtime, registry, api_key=api_key)
        names = ", ".join([runtime.model_id, *runtime.adapters])
        print(f"edge-lora: serving {names} on http://{args.host}:{args.port}/v1"
              + ("" if api_key else " (no API key)"), file=sys.stderr)
        if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
            print("edge-lora: warning: listening beyond localhost without --api-key", file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
