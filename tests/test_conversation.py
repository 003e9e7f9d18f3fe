"""The conversation both chats use (edge_lora.serving.conversation): the whole history is kept, only
the prompt is fitted (whole exchanges, never a leading assistant turn, the system message
kept), a failed or abandoned turn leaves the history as it was, and the reply budget."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from edge_lora.serving.conversation import Conversation
from edge_lora.core.errors import ContextLengthError, RequestError
from edge_lora.serving.runtime import Runtime


class WordModel:
    """Counts a token per word plus two per message; replies with a scripted text."""

    def __init__(self, n_ctx: int = 64, reply: str = "fine thanks", fail_after: int | None = None) -> None:
        self.n_ctx = n_ctx
        self.reply = reply
        self.fail_after = fail_after  # raise after this many pieces
        self.rendered: list[list[dict[str, str]]] = []
        self.calls: list[dict[str, Any]] = []
        self.closed = 0

    def render_messages(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        self.rendered.append([dict(m) for m in messages])
        return [0] * sum(len(str(m["content"]).split()) + 2 for m in messages)

    def generate(self, prompt: Sequence[int], adapters: Mapping[str, float | None] | None = None,
                 max_tokens: int = 128, **sampling: Any) -> Stream:
        if len(prompt) >= self.n_ctx:
            raise ContextLengthError(f"the prompt is {len(prompt)} tokens; the context holds {self.n_ctx}")
        self.calls.append({"prompt": len(prompt), "adapters": adapters, "max_tokens": max_tokens, **sampling})
        return Stream(self, self.reply.split(" "))


class Stream:
    def __init__(self, model: WordModel, words: list[str]) -> None:
        self.model, self.words = model, words

    def __iter__(self) -> Iterator[str]:
        for i, word in enumerate(self.words):
            if self.model.fail_after is not None and i >= self.model.fail_after:
                raise RequestError("the model is being unloaded")
            yield word if i == 0 else " " + word

    def close(self) -> None:
        self.model.closed += 1


def say(conversation: Conversation, text: str, **kwargs: Any) -> str:
    return "".join(conversation.send(text, **kwargs))


def test_a_turn_records_the_exchange_and_passes_budget_and_sampling() -> None:
    model = WordModel(n_ctx=400)
    chat = Conversation(model, max_reply_tokens=300)
    assert chat.reply_budget == 100  # a reply takes at most a quarter of the context
    assert say(chat, "hello there", adapters={"legal": 0.5}, temperature=0.2) == "fine thanks"
    assert chat.messages == [{"role": "user", "content": "hello there"},
                             {"role": "assistant", "content": "fine thanks"}]
    assert model.calls == [{"prompt": 4, "adapters": {"legal": 0.5}, "max_tokens": 300, "temperature": 0.2}]
    assert Conversation(model, max_reply_tokens=12).reply_budget == 12


def test_the_prompt_leaves_out_oldest_whole_exchanges_and_the_history_stays() -> None:
    model = WordModel(n_ctx=64)  # budget 16: prompts up to 48 tokens
    chat = Conversation(model, max_reply_tokens=32, system="be brief")
    for i in range(12):
        reply = chat.send(f"question number {i} about the licence")
        assert reply.left_out % 2 == 0  # whole exchanges only
        "".join(reply)
        prompt = model.rendered[-1]
        assert prompt[0] == {"role": "system", "content": "be brief"}  # kept
        assert prompt[1]["role"] == "user"  # never a leading assistant turn
        assert prompt[-1] == {"role": "user", "content": f"question number {i} about the licence"}
        assert model.calls[-1]["prompt"] + chat.reply_budget <= model.n_ctx
    assert reply.left_out > 0
    # the whole history is kept: nothing trimmed from what the user saw
    assert len(chat.messages) == 1 + 2 * 12
    # the last prompt is the largest suffix of whole exchanges that fits: one more would not
    system, body = chat.messages[0], chat.messages[1:-1]  # the history then, and its new message
    assert model.rendered[-1] == [system] + body[reply.left_out:]
    one_more = [system] + body[reply.left_out - 2:]
    assert len(model.render_messages(one_more)) + chat.reply_budget > model.n_ctx


def test_a_message_too_long_for_the_context_is_refused_and_forgotten() -> None:
    model = WordModel(n_ctx=64)
    chat = Conversation(model, max_reply_tokens=8)
    say(chat, "hi")
    before = chat.messages
    with pytest.raises(ContextLengthError):
        chat.send("word " * 80)
    assert chat.messages == before


def test_a_failed_or_abandoned_turn_leaves_the_history_as_it_was() -> None:
    model = WordModel(n_ctx=200, reply="one two three four")
    chat = Conversation(model)
    say(chat, "first")
    before = chat.messages
    model.fail_after = 2
    with pytest.raises(RequestError):
        say(chat, "second")
    assert chat.messages == before and model.closed == 1  # the stream was closed, not leaked
    model.fail_after = None
    pieces = iter(chat.send("third"))
    next(pieces)
    pieces.close()  # the reader stops early (the chat pane closed)
    assert chat.messages == before and model.closed == 2
    say(chat, "fourth")
    assert [m["content"] for m in chat.messages] == ["first", "one two three four", "fourth", "one two three four"]


def test_reset_forgets_and_a_reply_begun_before_it_is_not_recorded() -> None:
    model = WordModel(n_ctx=200)
    chat = Conversation(model)
    say(chat, "first")
    pending = iter(chat.send("second"))
    next(pending)
    chat.reset()
    assert "".join(pending) == " thanks"
    assert chat.messages == []
    say(chat, "again")
    assert model.rendered[-1] == [{"role": "user", "content": "again"}]


def test_on_the_real_model_the_fitted_prompt_is_the_newest_exchanges_rendered(gemma_q4_gguf: Path) -> None:
    with Runtime(gemma_q4_gguf, n_ctx=256) as runtime:
        # max_tokens 0: the turns are recorded without decoding (this is about the prompt)
        chat = Conversation(runtime, max_reply_tokens=0)
        turn = "Licensed under the Apache License, Version 2.0. " * 3
        for i in range(8):
            assert "".join(chat.send(f"{i}: {turn}")) == ""
        chat.max_reply_tokens = 16
        assert len(chat.messages) == 16
        prompt = chat.fit("last question")
        body = chat.messages + [{"role": "user", "content": "last question"}]
        assert prompt.left_out > 0 and body[prompt.left_out]["role"] == "user"
        assert prompt.tokens == runtime.render_messages(body[prompt.left_out:])  # Gemma's own template
        assert len(prompt.tokens) + chat.reply_budget <= runtime.n_ctx
        assert len(runtime.render_messages(body[prompt.left_out - 2:])) + chat.reply_budget > runtime.n_ctx
