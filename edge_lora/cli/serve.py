"""``edge-lora serve``: the OpenAI-compatible API (uvicorn) over one loaded base with adapters."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import stat
import sys
from pathlib import Path

from edge_lora.cli._model_args import add_model_args, add_prompt_cache_arg
from edge_lora.core import constants
from edge_lora.core.context_size import check_ctx
from edge_lora.core.errors import InputError, InputNotFoundError

# Wildcard binds: the address a client uses is not known, so only --allowed-host names it.
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "serve", help="serve an OpenAI-compatible API (adapters selected per request by model name)",
        description="Serve /v1/models, /v1/completions, /v1/chat/completions and "
                    "/v1/load_lora_adapter, /v1/unload_lora_adapter. \"model\" picks an adapter by name "
                    "or the base by its id. Requests must name this server in their Host header "
                    "(localhost, 127.0.0.1 or [::1] with the port, plus --allowed-host names); "
                    "cross-origin browser requests and non-JSON bodies are refused.")
    add_model_args(parser)
    parser.add_argument("--host", default=constants.DEFAULT_HOST, help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=constants.DEFAULT_PORT, help="port (default 8000)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="also answer requests whose Host header is NAME or NAME:PORT (repeatable; needed "
                             "when clients reach the server by a DNS name or a wildcard --host; '*' answers any)")
    parser.add_argument("--adapter-dir", type=Path, default=None, metavar="DIR",
                        help="let /v1/load_lora_adapter load adapter files inside DIR (by file name); "
                             "without it only registered adapter names load")
    parser.add_argument("--max-adapters", type=int, default=16, help="adapters loaded at once (default 16)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every route (visible to other users in "
                             "`ps`: prefer --api-key-file or EDGE_LORA_API_KEY)")
    parser.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                        help="read the API keys from FILE, one per line; each key is a tenant (the prompt "
                             "cache is shared only between requests of one key)")
    # One decode loop batches the running requests (bench/runtime.py): each slot costs KV cache
    # memory for --ctx tokens (fit's estimate for one context), so the default stays modest.
    parser.add_argument("--contexts", type=int, default=4,
                        help="requests decoded together in one batch (slots, each with --ctx tokens of KV "
                             "cache; default 4)")
    parser.add_argument("--queue", type=int, default=16,
                        help="requests that may wait for a context; more are answered 429 (default 16)")
    add_prompt_cache_arg(parser)
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


def api_key_from(args: argparse.Namespace) -> str | list[str] | None:
    """--api-key-file (one key, or a list of several: one per line, each a tenant), else --api-key
    (with a warning: argv is public), else EDGE_LORA_API_KEY."""
    if args.api_key_file is not None and args.api_key is not None:
        raise InputError("both --api-key and --api-key-file were given", fix="pass one of them")
    if args.api_key_file is not None:
        path = args.api_key_file.expanduser()
        try:
            info = path.stat()
            with path.open("r", encoding="utf-8") as handle:
                keys = [line.strip() for line in handle.read(1 << 20).splitlines() if line.strip()]
        except FileNotFoundError:
            raise InputNotFoundError(f"--api-key-file {path} does not exist", fix="check the path") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read --api-key-file {path}: {getattr(exc, 'strerror', None) or exc}",
                             fix="give a readable text file holding the key") from None
        if not keys:
            raise InputError(f"--api-key-file {path} holds no key", fix="write the key into it (one per line)")
        if any(len(k) > 4096 for k in keys):
            raise InputError(f"--api-key-file {path} holds a line longer than 4096 characters",
                             fix="write one key per line")
        if info.st_mode & (stat.S_IRGRP | stat.S_IROTH):
            print(f"edge-lora: warning: {path} is readable by other users (chmod 600 it)", file=sys.stderr)
        return keys[0] if len(keys) == 1 else keys
    if args.api_key is not None:
        if not args.api_key.strip():
            raise InputError("--api-key is empty", fix="give a key, or leave the option out")
        print("edge-lora: warning: --api-key is visible to every user of this machine (ps); "
              "use --api-key-file FILE or EDGE_LORA_API_KEY", file=sys.stderr)
        return args.api_key
    return constants.EDGE_LORA_API_KEY


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts_for(host: str, port: int, extra: list[str]) -> list[str]:
    """Host header values to answer: the loopback names with the port, the bound address when it
    is a specific one, and what the user named (a name alone allows it on any port)."""
    from edge_lora.serving.server import loopback_hosts

    allowed = loopback_hosts(port)
    if not _is_loopback(host) and host not in WILDCARD_ADDRESSES:
        allowed.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    for name in extra:
        name = name.strip().lower()
        if not name or any(c in name for c in "/ @?#"):
            raise InputError(f"--allowed-host {name!r} is not a host name", fix="give a name like box.lan or box.lan:8000")
        allowed.append(name)
    return allowed


def serve_command(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        raise InputError(f"--port {args.port} is out of range", fix="use 1-65535")
    if not 1 <= args.contexts <= 64:
        raise InputError(f"--contexts {args.contexts} is out of range", fix="use 1-64")
    if not 0 <= args.queue <= 4096:
        raise InputError(f"--queue {args.queue} is out of range", fix="use 0-4096")
    if not 1 <= args.max_adapters <= 256:
        raise InputError(f"--max-adapters {args.max_adapters} is out of range", fix="use 1-256")
    check_ctx(args.ctx)
    if args.adapter_dir is not None and not args.adapter_dir.expanduser().is_dir():
        raise InputNotFoundError(f"--adapter-dir {args.adapter_dir} is not a directory", fix="give an existing directory")
    api_key = api_key_from(args)
    allowed_hosts = allowed_hosts_for(args.host, args.port, args.allowed_host)
    import uvicorn

    from edge_lora.serving.model_choice import load_adapters, parse_adapter_arg, resolve_model_path
    from edge_lora.serving.registry import AdapterRegistry
    from edge_lora.serving.runtime import Runtime
    from edge_lora.serving.server import ServerLimits, make_app, uvicorn_config

    choices = [parse_adapter_arg(a) for a in args.adapter]
    if len(choices) > args.max_adapters:
        raise InputError(f"{len(choices)} adapters given, more than --max-adapters {args.max_adapters}",
                         fix="raise --max-adapters")
    model_path = resolve_model_path(args.model, args.quant, args.ctx)
    _check_port_free(args.host, args.port)
    registry = AdapterRegistry()
    limits = ServerLimits(queue=args.queue, max_adapters=args.max_adapters)
    with Runtime(model_path, n_ctx=args.ctx, n_contexts=args.contexts, prompt_cache=args.prompt_cache) as runtime:
        load_adapters(runtime, registry, choices)
        app = make_app(runtime, registry, api_key=api_key, allowed_hosts=allowed_hosts,
                       adapter_dir=args.adapter_dir, limits=limits)
        names = ", ".join([runtime.model_id, *runtime.adapters])
        print(f"edge-lora: serving {names} on http://{args.host}:{args.port}/v1"
              + ("" if api_key else " (no API key)"), file=sys.stderr)
        if not _is_loopback(args.host):
            if not api_key:
                print("edge-lora: warning: listening beyond localhost without an API key", file=sys.stderr)
            if args.host in WILDCARD_ADDRESSES and not args.allowed_host:
                print("edge-lora: warning: other machines must reach this server by a name given with "
                      "--allowed-host (requests naming any other host are refused)", file=sys.stderr)
        uvicorn.Server(uvicorn_config(app, args.host, args.port, limits)).run()
    return 0
