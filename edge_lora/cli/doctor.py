"""``edge-lora doctor [--json]``: what this machine offers and which versions are installed."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("doctor", help="show RAM, cores, CPU features, the kernel path in use and library versions",
                                   description="Report the hardware and software edge-lora will run on.")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(handler=doctor_command)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def doctor_command(args: argparse.Namespace) -> int:
    from edge_lora.serving.extra_buffers import extra_buffers_verdict
    from edge_lora.hardware import detect_hardware

    hw = detect_hardware()
    extra = extra_buffers_verdict()  # runs the probe on a machine that has none cached
    if args.json:
        print(json.dumps({**hw.to_json(), "extra_buffers": extra.to_json()}))
        return 0
    print(f"RAM          {_gb(hw.total_ram_bytes)} total, {_gb(hw.available_ram_bytes)} available")
    print(f"CPU          {hw.cpu_model}" + (f" (advertises {' '.join(hw.cpu_amx_flags)})" if hw.cpu_amx_flags else ""))
    print(f"CPU cores    {hw.physical_cores} physical, {hw.logical_cores} logical ({hw.machine})")
    print(f"CPU features {' '.join(hw.cpu_features) or 'none detected'}")
    print(f"Extra buffers {extra.describe()}")
    print(f"GPU offload  {'yes' if hw.gpu_offload else 'no (CPU only)'}")
    print(f"llama.cpp    {hw.llama_build}")
    print(f"OS / Python  {hw.os} / {hw.python}")
    for name, version in hw.versions.items():
        print(f"{name:<17}{version or 'not installed'}")
    return 0
