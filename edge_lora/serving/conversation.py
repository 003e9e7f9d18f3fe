"""A chat with one model, as `run`'s interactive chat and the TUI's chat screen hold it: the
history, the prompt fitted to the context, the reply budget, and turns that either complete or
leave the history as it was.

The whole history is kept (a user scrolls back through all of it; ``/reset`` forgets it); only
the prompt is fitted: a system message, then the newest whole exchanges (a user message and
the reply to it) that fit beside room for the reply, and always the new user message. A prompt
never starts with an assistant turn, which chat templates that check role order refuse.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# A reply may take at most this share of the context: a long conversation keeps most of it.
REPLY_SHARE_OF_CONTEXT = 4

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}


class TextStream(Protocol):
    """A reply being generated (``edge_lora.serving.runtime.Generation``): text pieces; close() stops it."""

    def __iter__(self) -> Iterator[str]: ...
    def close(self) -> None: ...


class ChatModel(Protocol):
    """What a conversation needs of a model (``edge_lora.serving.runtime.Runtime`` provides it)."""

    n_ctx: int

    def render_messages(self, messages: Sequence[Mapping[str, Any]]) -> list[int]: ...
    def generate(self, prompt: Sequence[int], adapters: Mapping[str, float | None] | None = None,
                 max_tokens: int = 128, **sampling: Any) -> TextStream: ...


@dataclass(frozen=True)
class FittedPrompt:
    tokens: list[int]
    left_out: int  # the oldest messages of the history (after a system message) not in the prompt


class Conversation:
    def __init__(self, model: ChatModel, *, max_reply_tokens: int = 128, system: str | None = None) -> None:
        self.model = model
        self.max_reply_tokens = max_reply_tokens
        self._system: list[Message] = [{"role": "system", "content": system}] if system else []
        self._history: list[Message] = []
        self._lock = threading.Lock()
        self._epoch = 0  # bumped by reset(): a reply begun before it is not recorded after it
        # Where the last prompt began: the cut only moves forward as turns are added, so a turn
        # renders a prompt once or twice instead of once per message left out (bench/conversation.py,
        # 60 turns at ctx 512 on Gemma 3: 107 renders, 4.4 s, against 2,269 renders, 230 s).
        self._first_kept = 0

    @property
    def messages(self) -> list[Message]:
        """The whole conversation (a copy), system message first."""
        with self._lock:
            return [dict(m) for m in self._system + self._history]

    @property
    def reply_budget(self) -> int:
        """Tokens kept free for the reply when the prompt is fitted."""
        return min(self.max_reply_tokens, self.model.n_ctx // REPLY_SHARE_OF_CONTEXT)

    def reset(self) -> None:
        with self._lock:
            self._history.clear()
            self._first_kept = 0
            self._epoch += 1

    def fit(self, user_text: str) -> FittedPrompt:
        """The prompt for the history plus a new user message, leaving ``reply_budget`` tokens:
        the oldest whole exchanges are left out until it fits (the new message always stays)."""
        with self._lock:
            body = self._history + [{"role": "user", "content": user_text}]
            start = self._first_kept
        room = self.model.n_ctx - self.reply_budget
        # Exchanges begin at user messages; the cut never goes back before the last prompt's.
        cuts = [i for i, m in enumerate(body) if m["role"] == "user" and i >= start]
        for cut in cuts[:-1]:
            tokens = self.model.render_messages(self._system + body[cut:])
            if len(tokens) <= room:
                return FittedPrompt(tokens, cut)
        last = len(body) - 1
        return FittedPrompt(self.model.render_messages(self._system + body[last:]), last)

    def send(self, user_text: str, *, adapters: Mapping[str, float | None] | None = None,
             **sampling: Any) -> Reply:
        """Start a turn. The reply streams from the returned ``Reply``; the history gains the
        message and the reply only when the reply completes, so an error (or a reply abandoned
        half way) leaves the conversation as it was."""
        epoch = self._epoch
        prompt = self.fit(user_text)
        stream = self.model.generate(prompt.tokens, adapters=adapters, max_tokens=self.max_reply_tokens, **sampling)
        return Reply(self, user_text, stream, prompt.left_out, epoch)

    def _record(self, user_text: str, reply: str, left_out: int, epoch: int) -> None:
        with self._lock:
            if epoch != self._epoch:
                return  # reset while the reply was generated: it belongs to the forgotten conversation
            self._history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}]
            self._first_kept = max(self._first_kept, left_out)


class Reply:
    """One turn's reply: iterate for text pieces. Completing the iteration records the turn."""

    def __init__(self, conversation: Conversation, user_text: str, stream: TextStream, left_out: int,
                 epoch: int) -> None:
        self._conversation = conversation
        self._user_text = user_text
        self._stream = stream
        self._epoch = epoch
        self.left_out = left_out  # oldest history messages the prompt left out to fit the context
        self.text = ""

    def __iter__(self) -> Iterator[str]:
        completed = False
        try:
            for piece in self._stream:
                self.text += piece
                yield piece
            completed = True
        finally:
            if completed:
                self._conversation._record(self._user_text, self.text, self.left_out, self._epoch)
            else:
                self._stream.close()  # hand the model's context back now, not when garbage collected
