"""``edge-lora run``: generate with the quantized base and adapters hot-applied.

``--prompt`` prints only the generated text on stdout; without it, an interactive chat on
stdin (``/adapter NAME``, ``/adapter none``, ``/scale NAME S``, ``/reset``, ``/quit``) that
switches adapters without reloading the model.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from edge_lora.core.constants import MAX_TEMPERATURE
from edge_lora.core.errors import EdgeLoraError, InputError, InputNotFoundError

if TYPE_CHECKING:
    from edge_lora.registry import AdapterRegistry
    from edge_lora.runtime import Runtime
    from edge_lora.structured import Grammar

# When no --quant is given and no fit estimate is available: the usual best size/quality
# trade-off first (llama.cpp's own recommendation), then larger, then smaller formats.
QUANT_PREFERENCE = ("Q4_K_M", "Q5_K_M", "Q4_K_S", "Q5_K_S", "Q6_K", "Q8_0", "Q3_K_L", "Q3_K_M",
                    "Q3_K_S", "Q2_K", "F16", "BF16", "F32")


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


def _model_files_in(directory: Path) -> dict[str, Path]:
    """format -> model file in a converted output dir, from manifest.json when present."""
    from edge_lora.core.manifest import Manifest

    found: dict[str, Path] = {}
    for row in Manifest.load(directory).files:
        if row.kind in ("model", "merged") and isinstance(row.format, str) and (directory / row.path).is_file():
            found[row.format.upper()] = directory / row.path
    if found:
        return found
    for path in sorted(directory.glob("*.gguf")):
        if path.name.startswith("adapter-"):
            continue
        fmt = path.name.removesuffix(".gguf").rsplit("-", 1)[-1].upper()
        if fmt in QUANT_PREFERENCE:
            found[fmt] = path
    return found


def _recommended(files: dict[str, Path], ctx: int | None) -> Path | None:
    """The fit estimator's recommendation among ``files``."""
    from edge_lora.fit import fit_report

    chosen = fit_report(list(files.values()), ctx).recommended
    return None if chosen is None else Path(chosen.path)


def resolve_model_path(model: Path | None, quant: str | None, ctx: int | None = None) -> Path:
    if model is None:
        from edge_lora.state import last_output_dir

        model = last_output_dir()
        if model is None:
            raise InputError("no --model given and no converted model remembered",
                             fix="pass --model FILE.gguf or DIR, or run `edge-lora convert` / `edge-lora demo` first")
    model = Path(model).expanduser()
    if model.is_file():
        return model
    if not model.is_dir():
        raise InputNotFoundError(f"model {model} does not exist", fix="pass a .gguf file or a converted directory")
    files = _model_files_in(model)
    if not files:
        raise InputNotFoundError(f"no model GGUF files in {model}", fix="run `edge-lora convert` into it first")
    if quant:
        path = files.get(quant.upper())
        if path is None:
            raise InputNotFoundError(f"no {quant.upper()} file in {model}",
                                     fix=f"available: {', '.join(sorted(files))}")
        return path
    recommended = _recommended(files, ctx)
    if recommended is not None:
        return recommended
    for fmt in QUANT_PREFERENCE:
        if fmt in files:
            return files[fmt]
    return next(iter(files.values()))


def load_adapters(runtime: Runtime, registry: AdapterRegistry, choices: Sequence[AdapterChoice]) -> dict[str, float]:
    """Load each chosen adapter into the runtime; returns {name: scale} to activate."""
    active: dict[str, float] = {}
    for choice in choices:
        entry = registry.resolve(choice.name_or_path)
        name = entry.name
        if name in active:
            raise InputError(f"adapter {name!r} given twice", fix="pass each adapter once")
        scale = entry.scale if choice.scale is None else choice.scale
        runtime.load_adapter(name, entry.path, scale)
        active[name] = scale
    return active


def _check_args(args: argparse.Namespace) -> None:
    if args.max_tokens < 0:
        raise InputError(f"--max-tokens {args.max_tokens} is negative", fix="use 0 or more")
    if args.ctx is not None and not 64 <= args.ctx <= 1 << 20:
        raise InputError(f"--ctx {args.ctx} is out of range", fix="use a context between 64 and 1048576")
    if not 0.0 <= args.temperature <= MAX_TEMPERATURE:
        raise InputError(f"--temperature {args.temperature} is out of range", fix=f"use 0 to {MAX_TEMPERATURE:g}")
    if not 0.0 < args.top_p <= 1.0:
        raise InputError(f"--top-p {args.top_p} is out of range", fix="use a value in (0, 1]")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "run", help="generate with a GGUF model, adapters hot-applied",
        description="Run a GGUF model with LoRA adapters applied at run time. With --prompt, print "
                    "only the generated text; otherwise chat interactively.")
    add_model_args(parser)
    parser.add_argument("--prompt", help="generate once for this text and exit")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    parser.add_argument("--json-schema", type=Path, default=None, metavar="FILE",
                        help="answer with JSON matching this JSON schema (enforced while sampling)")
    add_prompt_cache_arg(parser)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="mode", action="store_const", const="chat",
                      help="apply the chat template to --prompt (default when the model has one)")
    mode.add_argument("--raw", dest="mode", action="store_const", const="raw",
                      help="give --prompt to the model as plain text (default when it has no template)")
    parser.set_defaults(handler=run_command, mode=None)


def add_prompt_cache_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-prompt-cache", dest="prompt_cache", action="store_false",
                        help="process every prompt from an empty KV cache (exact mode: a request's tokens "
                             "never depend on earlier requests; slower as a chat grows)")


def load_json_schema(path: Path) -> Grammar:
    """The grammar for the JSON schema in ``path``; InputError for an unreadable or unsupported one."""
    from edge_lora.structured import Grammar

    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputNotFoundError(f"--json-schema file {path} does not exist", fix="check the path") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"--json-schema file {path} is not readable JSON: {exc}",
                         fix="give a JSON schema file") from None
    return Grammar.from_json_schema(schema)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="a .gguf file or a converted directory (default: the last converted one)")
    parser.add_argument("--quant", default=None, help="format to pick from a directory, e.g. Q4_K_M")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME[:SCALE]",
                        help="registered adapter name or adapter .gguf path, optional scale; repeatable")
    parser.add_argument("--ctx", type=int, default=None, help="context length (default: min(model, 4096))")


def run_command(args: argparse.Namespace) -> int:
    _check_args(args)
    choices = [parse_adapter_arg(a) for a in args.adapter]
    model_path = resolve_model_path(args.model, args.quant, args.ctx)
    from edge_lora.registry import AdapterRegistry
    from edge_lora.runtime import Runtime

    registry = AdapterRegistry()
    # Without --seed every run samples differently; with it, runs repeat exactly.
    base_seed = args.seed if args.seed is not None else secrets.randbits(31)
    grammar = load_json_schema(args.json_schema) if args.json_schema is not None else None
    with Runtime(model_path, n_ctx=args.ctx, seed=base_seed, prompt_cache=args.prompt_cache) as runtime:
        active = load_adapters(runtime, registry, choices)
        sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                    "seed": args.seed, "grammar": grammar}
        if args.prompt is not None:
            use_chat = args.mode == "chat" or (args.mode is None and runtime.template.family == "gguf")
            if use_chat:
                generation = runtime.chat([{"role": "user", "content": args.prompt}], adapters=active, **sampling)
            else:
                generation = runtime.generate(args.prompt, adapters=active, **sampling)
            for piece in generation:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            return 0
        return ChatSession(runtime, registry, active, sampling).loop(sys.stdin, sys.stdout, sys.stderr)


HELP = ("commands: /adapter NAME[:SCALE] (switch to one adapter), /adapter none, /scale NAME S, "
        "/reset (forget the conversation), /quit")


class ChatSession:
    def __init__(self, runtime: Runtime, registry: AdapterRegistry, active: dict[str, float],
                 sampling: dict) -> None:
        self.runtime, self.registry, self.active, self.sampling = runtime, registry, active, sampling
        self.history: list[dict[str, str]] = []

    def _status(self) -> str:
        if not self.active:
            return "adapters: none"
        return "adapters: " + ", ".join(f"{n}:{s:g}" for n, s in self.active.items())

    def command(self, line: str, err: TextIO) -> bool:
        """Handle a /command; returns False to quit."""
        parts = line.split()
        head = parts[0].lower()
        if head in ("/quit", "/exit", "/bye"):
            return False
        if head == "/reset":
            self.history.clear()
            print("conversation cleared", file=err)
        elif head == "/adapter" and len(parts) == 2:
            if parts[1].lower() == "none":
                self.active = {}
            else:
                choice = parse_adapter_arg(parts[1])
                entry = self.registry.resolve(choice.name_or_path)
                if entry.name not in self.runtime.adapters:
                    self.runtime.load_adapter(entry.name, entry.path, entry.scale)
                self.active = {entry.name: entry.scale if choice.scale is None else choice.scale}
            print(self._status(), file=err)
        elif head == "/scale" and len(parts) == 3:
            name = parts[1]
            if name not in self.runtime.adapters:
                raise InputError(f"adapter {name!r} is not loaded", fix="use /adapter NAME first")
            try:
                scale = float(parts[2])
            except ValueError:
                raise InputError(f"scale {parts[2]!r} is not a number") from None
            self.active[name] = scale
            print(self._status(), file=err)
        else:
            print(HELP, file=err)
        return True

    def _prompt_that_fits(self, err: TextIO) -> list[int]:
        """The conversation's prompt, forgetting the oldest exchanges to leave room for a reply."""
        room = min(self.sampling["max_tokens"], self.runtime.n_ctx // 4)
        tokens, dropped = self.runtime.render_conversation(self.history, room)
        if dropped:
            del self.history[:dropped]
            print(f"(forgot the {dropped} oldest messages to fit the context)", file=err)
        return tokens

    def loop(self, inp: TextIO, out: TextIO, err: TextIO) -> int:
        interactive = inp.isatty()
        if interactive:
            print(f"{self.runtime.model_id} — {self._status()}. {HELP}", file=err)
        while True:
            if interactive:
                err.write("> ")
                err.flush()
            line = inp.readline()
            if not line:
                return 0
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line, err):
                        return 0
                    continue
                self.history.append({"role": "user", "content": line})
                generation = self.runtime.generate(self._prompt_that_fits(err), adapters=self.active,
                                                   **self.sampling)
                pieces = []
                for piece in generation:
                    pieces.append(piece)
                    out.write(piece)
                    out.flush()
                out.write("\n")
                out.flush()
                self.history.append({"role": "assistant", "content": "".join(pieces)})
            except EdgeLoraError as exc:
                if self.history and self.history[-1]["role"] == "user":
                    self.history.pop()
                print(f"edge-lora: error: {exc.one_line()}", file=err)
