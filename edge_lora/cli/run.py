"""``edge-lora run``: generate with the quantized base and adapters hot-applied.

``--prompt`` prints only the generated text on stdout; without it, an interactive chat on
stdin (``/adapter NAME``, ``/adapter none``, ``/scale NAME S``, ``/reset``, ``/quit``) that
switches adapters without reloading the model.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from edge_lora.cli._model_args import add_model_args, add_prompt_cache_arg
from edge_lora.core.constants import MAX_TEMPERATURE
from edge_lora.core.context_size import check_ctx
from edge_lora.core.errors import EdgeLoraError, InputError

if TYPE_CHECKING:  # imported by the handler: llama.cpp loads only when a command needs it
    from edge_lora.serving.conversation import Conversation
    from edge_lora.serving.registry import AdapterRegistry
    from edge_lora.serving.runtime import Runtime
    from edge_lora.serving.structured import Grammar


def _check_args(args: argparse.Namespace) -> None:
    if args.max_tokens < 0:
        raise InputError(f"--max-tokens {args.max_tokens} is negative", fix="use 0 or more")
    check_ctx(args.ctx)
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


def load_json_schema(path: Path) -> Grammar:
    """The grammar for the JSON schema in ``path``; InputError for an unreadable or unsupported one."""
    from edge_lora.core.bounded_json import JsonKind, read_json
    from edge_lora.serving.structured import Grammar

    return Grammar.from_json_schema(read_json(path, JsonKind.JSON_SCHEMA))


def run_command(args: argparse.Namespace) -> int:
    _check_args(args)
    from edge_lora.serving.conversation import Conversation
    from edge_lora.serving.model_choice import load_adapters, parse_adapter_arg, resolve_model_path
    from edge_lora.serving.registry import AdapterRegistry
    from edge_lora.serving.runtime import Runtime

    choices = [parse_adapter_arg(a) for a in args.adapter]
    model_path = resolve_model_path(args.model, args.quant, args.ctx)
    registry = AdapterRegistry()
    # Without --seed every run samples differently; with it, runs repeat exactly.
    base_seed = args.seed if args.seed is not None else secrets.randbits(31)
    grammar = load_json_schema(args.json_schema) if args.json_schema is not None else None
    with Runtime(model_path, n_ctx=args.ctx, seed=base_seed, prompt_cache=args.prompt_cache) as runtime:
        active = load_adapters(runtime, registry, choices)
        sampling = {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed, "grammar": grammar}
        if args.prompt is not None:
            use_chat = args.mode == "chat" or (args.mode is None and runtime.template.family == "gguf")
            if use_chat:
                generation = runtime.chat([{"role": "user", "content": args.prompt}], adapters=active,
                                          max_tokens=args.max_tokens, **sampling)
            else:
                generation = runtime.generate(args.prompt, adapters=active, max_tokens=args.max_tokens, **sampling)
            for piece in generation:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            return 0
        conversation = Conversation(runtime, max_reply_tokens=args.max_tokens)
        return ChatSession(conversation, runtime, registry, active, sampling).loop(sys.stdin, sys.stdout, sys.stderr)


HELP = ("commands: /adapter NAME[:SCALE] (switch to one adapter), /adapter none, /scale NAME S, "
        "/reset (forget the conversation), /quit")


class ChatSession:
    """The interactive chat on stdin: lines are messages, /commands switch adapters."""

    def __init__(self, conversation: Conversation, runtime: Runtime, registry: AdapterRegistry,
                 active: dict[str, float], sampling: dict) -> None:
        self.conversation, self.runtime, self.registry = conversation, runtime, registry
        self.active, self.sampling = active, sampling
        self.left_out = 0  # oldest messages the prompt leaves out, as last reported

    def _status(self) -> str:
        if not self.active:
            return "adapters: none"
        return "adapters: " + ", ".join(f"{n}:{s:g}" for n, s in self.active.items())

    def command(self, line: str, err: TextIO) -> bool:
        """Handle a /command; returns False to quit."""
        from edge_lora.serving.model_choice import parse_adapter_arg, use_adapter

        parts = line.split()
        head = parts[0].lower()
        if head in ("/quit", "/exit", "/bye"):
            return False
        if head == "/reset":
            self.conversation.reset()
            self.left_out = 0
            print("conversation cleared", file=err)
        elif head == "/adapter" and len(parts) == 2:
            if parts[1].lower() == "none":
                self.active = {}
            else:
                self.active = use_adapter(self.runtime, self.registry, parse_adapter_arg(parts[1]))
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

    def say(self, line: str, out: TextIO, err: TextIO) -> None:
        """One turn: the reply streams to ``out``; an error leaves the conversation as it was."""
        reply = self.conversation.send(line, adapters=self.active, **self.sampling)
        if reply.left_out > self.left_out:
            self.left_out = reply.left_out
            print(f"(the {reply.left_out} oldest messages are left out of the prompt to fit the context; "
                  "/reset starts afresh)", file=err)
        for piece in reply:
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()

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
                self.say(line, out, err)
            except EdgeLoraError as exc:
                print(f"edge-lora: error: {exc.one_line()}", file=err)
