"""Prompt (KV prefix) cache and thread sharing on the real Gemma 3 270M: chat turns reuse the
cached prefix, a different adapter set never does, a cut a sliding-window cache cannot make
falls back to a full prefill, the pool routes a request to the context holding its prefix, and
a lone request gets every core."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edge_lora.serving.llama_backend import LlamaContext
from edge_lora.serving.runtime import Runtime

LICENSE = Path("/usr/share/common-licenses/Apache-2.0").read_text()
QUESTIONS = ["What does the license grant?", "Can I sell copies?", "What about patents?",
             "Must I keep the notices?", "Is there a warranty?"]


@pytest.fixture(scope="module")
def runtime(gemma_q4_gguf: Path, random_gemma_loras: tuple[Path, Path]) -> Iterator[Runtime]:
    rt = Runtime(gemma_q4_gguf, n_ctx=1024, seed=0)
    rt.load_adapter("a", random_gemma_loras[0])
    rt.load_adapter("b", random_gemma_loras[1])
    yield rt
    rt.close()


def chat_turn(rt: Runtime, history: list[dict], question: str, adapters: dict | None = None,
              cache_prompt: bool | None = None):
    history.append({"role": "user", "content": question})
    gen = rt.chat(history, adapters=adapters, max_tokens=12, cache_prompt=cache_prompt)
    history.append({"role": "assistant", "content": gen.text()})
    return gen.stats


def test_chat_turns_decode_only_the_new_tokens(runtime: Runtime) -> None:
    history: list[dict] = []
    previous = chat_turn(runtime, history, QUESTIONS[0])
    for question in QUESTIONS[1:3]:
        stats = chat_turn(runtime, history, question)
        # Everything up to the previous reply is reused; only the new message is decoded.
        assert previous.prompt_tokens <= stats.cached_tokens < stats.prompt_tokens
        assert stats.prompt_tokens - stats.cached_tokens < 40
        previous = stats
    exact = runtime.chat(history[:-1], max_tokens=12, cache_prompt=False)
    exact.text()
    assert exact.stats.cached_tokens == 0


def test_a_repeated_prompt_reuses_all_but_its_last_token(runtime: Runtime) -> None:
    prompt = "The Apache License, Version 2.0, grants"
    n = len(runtime.tokenize_prompt(prompt))
    runtime.generate(prompt, max_tokens=2).text()
    again = runtime.generate(prompt, max_tokens=2)
    again.text()
    assert again.stats.cached_tokens == n - 1  # the last prompt token is decoded for its logits


@pytest.mark.slow
def test_switching_adapters_mid_chat_gives_the_tokens_of_a_fresh_request(runtime: Runtime, gemma_q4_gguf: Path,
                                                                          random_gemma_loras: tuple[Path, Path]) -> None:
    history: list[dict] = []
    for question in QUESTIONS[:3]:
        chat_turn(runtime, history, question, adapters={"a": 1.0})
    history.append({"role": "user", "content": QUESTIONS[3]})
    switched = runtime.chat(history, adapters={"b": 1.0}, max_tokens=16)
    switched.text()
    assert switched.stats.cached_tokens == 0  # the cache was computed under another adapter set
    with Runtime(gemma_q4_gguf, n_ctx=1024, seed=0) as fresh:
        fresh.load_adapter("b", random_gemma_loras[1])
        alone = fresh.chat(history, adapters={"b": 1.0}, max_tokens=16, cache_prompt=False)
        alone.text()
    assert switched.stats.tokens == alone.stats.tokens
    # Another scale of the same adapter is another adapter set too.
    rescaled = runtime.chat(history, adapters={"b": 0.5}, max_tokens=4)
    rescaled.text()
    assert rescaled.stats.cached_tokens == 0


class RecordingRuntime:
    """The runtime as a Conversation sees it (run's chat, the TUI chat), keeping each turn's Generation."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.n_ctx = runtime.n_ctx
        self.render_messages = runtime.render_messages
        self.generations: list = []

    def generate(self, prompt, **kwargs):
        self.generations.append(self.runtime.generate(prompt, **kwargs))
        return self.generations[-1]


@pytest.mark.slow
def test_a_conversation_reuses_the_cache_and_an_adapter_switch_reads_afresh(runtime: Runtime) -> None:
    from edge_lora.serving.conversation import Conversation

    model = RecordingRuntime(runtime)
    chat = Conversation(model, max_reply_tokens=12)
    for question in QUESTIONS[:3]:
        "".join(chat.send(question, adapters={"a": 1.0}, temperature=0.0))
    first, *later = [g.stats for g in model.generations]
    for previous, stats in zip([first, *later], later):
        assert previous.prompt_tokens <= stats.cached_tokens < stats.prompt_tokens
    prompt = chat.fit(QUESTIONS[3]).tokens
    "".join(chat.send(QUESTIONS[3], adapters={"b": 1.0}, temperature=0.0))  # /adapter b mid-chat
    switched = model.generations[-1].stats
    assert switched.cached_tokens == 0
    fresh = runtime.generate(prompt, adapters={"b": 1.0}, max_tokens=12, cache_prompt=False)
    fresh.text()
    assert switched.tokens == fresh.stats.tokens


def test_the_prompt_cache_is_on_by_default_in_run_serve_and_the_tui() -> None:
    import inspect

    from edge_lora.cli import build_parser
    from edge_lora.tui import real_services

    parser = build_parser()
    for command in ("run", "serve"):
        assert parser.parse_args([command]).prompt_cache is True
        assert parser.parse_args([command, "--no-prompt-cache"]).prompt_cache is False
    assert inspect.signature(Runtime).parameters["prompt_cache"].default is True
    # The TUI chat opens its runtime with the defaults.
    assert "prompt_cache" not in inspect.getsource(real_services.open_runtime)


@pytest.mark.slow
def test_the_pool_routes_a_request_to_the_context_holding_its_prefix(gemma_q4_gguf: Path,
                                                                    random_gemma_loras: tuple[Path, Path]) -> None:
    with Runtime(gemma_q4_gguf, n_ctx=1024, n_contexts=2) as rt:
        rt.load_adapter("a", random_gemma_loras[0])
        chats: dict[str, list[dict]] = {"base": [], "a": []}
        adapters = {"base": None, "a": {"a": 1.0}}
        for question in QUESTIONS[:2]:
            for name, history in chats.items():  # interleaved: each turn finds the other chat's cache too
                stats = chat_turn(rt, history, question, adapters[name])
        assert stats.cached_tokens > 0
        # Two chats on the same adapter set: each continues from its own context.
        other: list[dict] = []
        chat_turn(rt, other, "Tell me about the MIT license.", adapters["a"])
        for history, expected_min in ((chats["a"], 30), (other, 10)):
            stats = chat_turn(rt, history, "And then?", adapters["a"])
            assert stats.cached_tokens >= expected_min
        # Base chat: its context now holds an "a" conversation, so nothing is reused.
        assert chat_turn(rt, chats["base"], "And then?").cached_tokens == 0


def test_a_failed_request_leaves_nothing_to_reuse(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_lora.core.errors import InvalidGGUFError
    from tests.support.faults import nan_logits

    prompt = "The license grants"
    with nan_logits(monkeypatch):
        for _ in range(2):
            with pytest.raises(InvalidGGUFError, match="NaN/inf"):
                runtime.generate(prompt, max_tokens=2).text()
    after = runtime.generate(prompt, max_tokens=2)
    assert after.text()
    assert after.stats.cached_tokens == 0  # the failed request's prefill was not kept
    again = runtime.generate(prompt, max_tokens=2)
    again.text()
    assert again.stats.cached_tokens > 0  # a successful one is (the check above could fail)


# --- the backend's cut: what a reused prefix leaves behind must not leak into the rest ---

@pytest.mark.slow
def test_keep_prefix_then_decode_matches_a_full_prefill(runtime: Runtime) -> None:
    m = runtime.model
    tokens = m.tokenize(LICENSE[:2000])[:300]
    other = m.tokenize("Completely different text about cooking pasta and tomatoes. " * 8, add_bos=False)
    with LlamaContext(m, 1024, flash_attn=False) as cached, LlamaContext(m, 1024, flash_attn=False) as fresh:
        cached.decode(tokens[:200] + other[:60])  # a cache that diverges after 200 tokens
        n = cached.reusable_prefix(tokens)
        assert n == 200
        assert cached.keep_prefix(n) == 200 and cached.cached_tokens == tuple(tokens[:200])
        cached.decode(tokens[200:], 200, logits="all")
        fresh.decode(tokens, logits="all")
        got = np.stack([cached.logits(i) for i in range(100)])
        want = np.stack([fresh.logits(i) for i in range(200, 300)])
    # Batch shapes differ (two chunks vs one), so not bit-equal; a leftover of the other text
    # would move the logits by whole units.
    assert np.abs(got - want).max() < 0.05 * want.std()
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.97


@pytest.mark.slow
def test_a_sliding_window_cache_refuses_a_cut_it_cannot_make(runtime: Runtime) -> None:
    m = runtime.model
    assert m.n_swa == 512  # Gemma 3's local layers
    # swa_full off: the local layers keep pad(512 + 256, 256) = 768 positions, so after 900
    # tokens the window before position 100 is gone while the one before 850 is not.
    tokens = m.tokenize(LICENSE * 2)[:900]
    changed = tokens[:100] + m.tokenize(" cooking pasta", add_bos=False) + tokens[103:]
    late = tokens[:850] + m.tokenize(" cooking pasta", add_bos=False)
    with LlamaContext(m, 1024, n_batch=256, flash_attn=False, swa_full=False) as window:
        window.decode(tokens)
        assert window.reusable_prefix(changed) == 0 and not window.remove_kv_from(100)
        assert window.reusable_prefix(late) == 850
        # A refused cut falls back to a full prefill: the logits of a fresh context.
        assert window.keep_prefix(window.reusable_prefix(changed)) == 0 and window.n_past == 0
        window.decode(changed)
        with LlamaContext(m, 1024, n_batch=256, flash_attn=False, swa_full=False) as fresh:
            fresh.decode(changed)
            np.testing.assert_array_equal(window.logits(), fresh.logits())
    # The runtime's contexts keep full-size windows (llama.cpp's default): any cut is possible.
    with LlamaContext(m, 1024, n_batch=256, flash_attn=False) as full:
        full.decode(tokens[:700])
        assert full.remove_kv_from(100) and full.n_past == 100


# --- threads ---

def test_the_decode_loop_gives_every_decode_all_the_threads(gemma_q4_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One loop decodes for every request, so each call gets every core given, alone or among others,
    and the thread count changes no exact-mode token."""
    from edge_lora.serving.llama_backend import BatchedContext

    seen: list[int] = []
    real = BatchedContext.set_threads
    monkeypatch.setattr(BatchedContext, "set_threads", lambda self, n: seen.append(n) or real(self, n))
    with Runtime(gemma_q4_gguf, n_ctx=256, n_contexts=2, n_threads=2) as rt:
        rt.generate("The license grants", max_tokens=6).text()
        gens = [rt.generate("The license grants", max_tokens=20, cache_prompt=False) for _ in range(2)]
        threads = [threading.Thread(target=g.text) for g in gens]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert seen and set(seen) == {2}
        assert gens[0].stats.tokens == gens[1].stats.tokens
