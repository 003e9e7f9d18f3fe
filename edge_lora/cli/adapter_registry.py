"""``edge-lora adapters add NAME PATH [--scale S] | list | remove NAME``: the adapter registry."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("adapters", help="register GGUF LoRA adapters under short names",
                                   description="Manage the adapter registry (EDGE_LORA_HOME/adapters.json).")
    sub = parser.add_subparsers(dest="adapters_command", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="register an adapter file under NAME")
    add.add_argument("name")
    add.add_argument("path", type=Path)
    add.add_argument("--scale", type=float, default=1.0, help="default scale when applied (default 1.0)")
    add.add_argument("--replace", action="store_true", help="replace an existing entry of that name")
    add.set_defaults(handler=add_command)
    listing = sub.add_parser("list", help="list registered adapters (missing files are marked)")
    listing.add_argument("--json", action="store_true", help="print one JSON document")
    listing.set_defaults(handler=list_command)
    remove = sub.add_parser("remove", help="forget NAME (the file is kept)")
    remove.add_argument("name")
    remove.set_defaults(handler=remove_command)


def add_command(args: argparse.Namespace) -> int:
    from edge_lora.serving.registry import AdapterRegistry

    entry = AdapterRegistry().add(args.name, args.path, args.scale, replace=args.replace)
    print(f"registered {entry.name} -> {entry.path} (scale {entry.scale:g}, {entry.architecture})")
    return 0


def list_command(args: argparse.Namespace) -> int:
    from edge_lora.serving.registry import AdapterRegistry

    entries = AdapterRegistry().list()
    if args.json:
        print(json.dumps({"adapters": [{"name": e.name, "path": str(e.path), "scale": e.scale,
                                        "architecture": e.architecture, "exists": e.exists}
                                       for e in entries]}))
        return 0
    if not entries:
        print("no adapters registered (edge-lora adapters add NAME FILE.gguf)")
        return 0
    width = max(len(e.name) for e in entries)
    for e in entries:
        missing = "" if e.exists else "  [missing file]"
        print(f"{e.name:<{width}}  scale {e.scale:<6g} {e.architecture or '?':<10} {e.path}{missing}")
    return 0


def remove_command(args: argparse.Namespace) -> int:
    from edge_lora.serving.registry import AdapterRegistry

    entry = AdapterRegistry().remove(args.name)
    print(f"removed {entry.name} (file kept: {entry.path})")
    return 0
