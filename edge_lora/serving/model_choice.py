"""Which model file and which adapters a command runs: the policy `run`, `serve` and the chat
share. ``--model`` is a GGUF file or a converted directory (default: the last converted one);
in a directory ``--quant`` names the format, else the fit estimator picks one for the context
and this machine's RAM. Adapters are registered names or GGUF paths, with an optional scale."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_lora.core.errors import InputError, InputNotFoundError
from edge_lora.core.output_dir import OutputDir
from edge_lora.analysis.fit import fit_report
from edge_lora.serving.registry import AdapterRegistry
from edge_lora.serving.runtime import Runtime
from edge_lora.state import last_output_dir


@dataclass(frozen=True)
class AdapterChoice:
    name_or_path: str
    scale: float | None  # None: the registered scale


def parse_adapter_arg(text: str) -> AdapterChoice:
    """``NAME``, ``NAME:SCALE``, ``PATH`` or ``PATH:SCALE``."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return AdapterChoice(head, float(tail))
        except ValueError:
            pass
    if not text:
        raise InputError("empty --adapter value", fix="use --adapter NAME or NAME:SCALE")
    return AdapterChoice(text, None)


def resolve_model_path(model: Path | None, quant: str | None, ctx: int | None = None) -> Path:
    """The GGUF file to run: ``model`` itself when it is a file; in a directory the ``quant``
    format, else the fit estimator's choice at ``ctx``."""
    if model is None:
        model = last_output_dir()
        if model is None:
            raise InputError("no --model given and no converted model remembered",
                             fix="pass --model FILE.gguf or DIR, or run `edge-lora convert` / `edge-lora demo` first")
    model = Path(model).expanduser()
    if model.is_file():
        return model
    if not model.is_dir():
        raise InputNotFoundError(f"model {model} does not exist", fix="pass a .gguf file or a converted directory")
    files = OutputDir.read(model).by_format()
    if not files:
        raise InputNotFoundError(f"no model GGUF files in {model}", fix="run `edge-lora convert` into it first")
    if quant:
        chosen = files.get(quant.upper())
        if chosen is None:
            raise InputNotFoundError(f"no {quant.upper()} file in {model}",
                                     fix=f"available: {', '.join(sorted(files))}")
        return chosen.path
    return Path(fit_report([f.path for f in files.values()], ctx).choice.path)


def load_adapters(runtime: Runtime, registry: AdapterRegistry, choices: Sequence[AdapterChoice]) -> dict[str, float]:
    """Load each chosen adapter into the runtime; returns {name: scale} to activate."""
    active: dict[str, float] = {}
    for choice in choices:
        entry = registry.resolve(choice.name_or_path)
        if entry.name in active:
            raise InputError(f"adapter {entry.name!r} given twice", fix="pass each adapter once")
        runtime.load_adapter(entry.name, entry.path, entry.scale)
        active[entry.name] = entry.scale if choice.scale is None else choice.scale
    return active


def use_adapter(runtime: Runtime, registry: AdapterRegistry, choice: AdapterChoice) -> dict[str, float]:
    """Switch to one adapter mid-session: loaded on first use, kept loaded after (switching back
    costs nothing). Returns {name: scale} to activate."""
    entry = registry.resolve(choice.name_or_path)
    if entry.name not in runtime.adapters:
        runtime.load_adapter(entry.name, entry.path, entry.scale)
    return {entry.name: entry.scale if choice.scale is None else choice.scale}
