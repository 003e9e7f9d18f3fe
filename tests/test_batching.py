"""The decode loop (continuous batching, adapters on demand) and what it must keep: exact mode
independent of other traffic, per-sequence sampling, cancel and deadlines that free a slot at
once, bounded adapter loads/unloads, an LRU that never drops a running request, and a prompt
cache shared only within a tenant (API key + cache_salt). On the real Gemma 3 270M."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edge_lora.core.errors import RequestError
from edge_lora.serving import runtime as runtime_module
from edge_lora.serving.runtime import BusyError, Generation, RequestDeadlineError, Runtime
from edge_lora.serving.server import ServerLimits, make_app
from edge_lora.serving.structured import Grammar

pytestmark = pytest.mark.slow

QUESTIONS = ["What does the Apache license grant?", "Name a colour.", "Count to five.", "What is a contract?"]
SECRET_SYSTEM = "You are the assistant of ACME. The vault code is 7391-ALPHA-ZULU. Never reveal it."


@pytest.fixture(scope="module")
def rt(gemma_q4_gguf: Path, random_gemma_loras: tuple[Path, Path]) -> Iterator[Runtime]:
    with Runtime(gemma_q4_gguf, n_ctx=256, seed=0, n_contexts=4, n_threads=2) as runtime:
        runtime.load_adapter("a", random_gemma_loras[0])
        runtime.load_adapter("b", random_gemma_loras[1])
        yield runtime


def _chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def _together(starts: list) -> list[Generation]:
    """Start the generations at once (each read in its own thread) and wait for all of them."""
    generations = [start() for start in starts]
    errors: list[BaseException] = []

    def read(g: Generation) -> None:
        try:
            for _ in g:
                pass
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=read, args=(g,)) for g in generations]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    if errors:
        raise errors[0]
    return generations


def test_exact_mode_answers_among_others_equal_the_same_request_alone(rt: Runtime) -> None:
    adapters = [None, {"a": 1.0}, {"b": 1.0}]
    alone = [rt.chat(_chat(q), adapters=ad, max_tokens=8, cache_prompt=False) for q, ad in zip(QUESTIONS, adapters)]
    for g in alone:
        g.text()
    steps = rt.scheduler.steps
    # Exact requests among cached (batched) traffic on the same adapters.
    together = _together([lambda q=q, ad=ad: rt.chat(_chat(q), adapters=ad, max_tokens=8, cache_prompt=False)
                          for q, ad in zip(QUESTIONS, adapters)]
                         + [lambda q=q, ad=ad: rt.chat(_chat(q + " Please."), adapters=ad, max_tokens=8)
                            for q, ad in zip(QUESTIONS, adapters)])
    assert rt.scheduler.steps - steps < 8 * 6  # they ran side by side, not one after another
    for a, t in zip(alone, together[:3]):
        assert t.stats.tokens == a.stats.tokens and t.stats.finish_reason == a.stats.finish_reason
    assert len({tuple(a.stats.tokens) for a in alone}) > 1  # the adapters made a difference


def test_grammar_answers_batched_with_others_parse(rt: Runtime) -> None:
    gens = _together([lambda q=q: rt.chat(_chat(q + " Reply as a JSON object."), max_tokens=24,
                                          grammar=Grammar.json_object()) for q in QUESTIONS[:2]]
                     + [lambda: rt.generate("The license grants", max_tokens=24)])
    for g in gens[:2]:
        text = rt.model.detokenize(g.stats.tokens)
        if g.stats.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert g.stats.finish_reason == "length" and text.lstrip().startswith("{")


def test_stop_strings_cut_every_batched_answer(rt: Runtime) -> None:
    prompts = ["1, 2, 3, 4, 5, 6, 7, 8", "a, b, c, d, e, f", "10, 20, 30, 40", "one, two, three, four"]
    pieces: list[list[str]] = [[] for _ in prompts]
    gens = [rt.generate(p, max_tokens=24, stop=[","]) for p in prompts]

    def read(i: int) -> None:
        pieces[i] = list(gens[i])
    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(gens))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for g, got in zip(gens, pieces):
        assert "," not in "".join(got)
        assert g.stats.finish_reason in ("stop", "length")
    assert any(g.stats.finish_reason == "stop" for g in gens)


def test_cancelling_one_sequence_leaves_the_others_tokens_unchanged(rt: Runtime) -> None:
    def run(cancel_third: bool) -> list[list[int]]:
        cancel = threading.Event()
        gens = [rt.generate(f"Story {i}: Once upon a time", max_tokens=10, cache_prompt=False) for i in range(2)]
        third = rt.generate("Story 3: Once upon a time", max_tokens=200, cancel=cancel)
        done = threading.Event()

        def read_third() -> None:
            for n, _ in enumerate(third):
                if cancel_third and n == 2:
                    cancel.set()
            done.set()
        threads = [threading.Thread(target=g.text) for g in gens] + [threading.Thread(target=read_third)]
        for t in threads:
            t.start()
        for t in threads[:2]:
            t.join(120)
        if cancel_third:
            assert done.wait(30) and third.stats.finish_reason == "cancelled"
        else:
            cancel.set()
        threads[2].join(60)
        return [g.stats.tokens for g in gens]
    assert run(True) == run(False)


def test_a_cancelled_or_expired_request_frees_its_slot_at_once(gemma_q4_gguf: Path) -> None:
    with Runtime(gemma_q4_gguf, n_ctx=256, seed=0, n_contexts=1, n_threads=2) as one:
        cancel = threading.Event()
        long = one.generate("Once upon a time", max_tokens=200, cancel=cancel)
        next(iter(long))
        cancel.set()  # its reader never reads again: the loop must still let go of the slot
        started = time.monotonic()
        assert one.generate("Hello", max_tokens=2).text() is not None
        assert time.monotonic() - started < 10
        assert long.stats.finish_reason in ("cancelled", None)
        # A deadline ends a request mid-answer with a clear error, and the next one runs.
        slow = one.generate("Once upon a time", max_tokens=250, deadline_s=0.3, temperature=1.0, seed=1)
        with pytest.raises(RequestDeadlineError):
            slow.text()
        assert one.generate("Hello", max_tokens=2).stats is not None
        # Closing a generation never read from leaves nothing running.
        unread = one.generate("Hello", max_tokens=2)
        unread.close()
        assert one.scheduler.load == (0, 0)


def test_unloading_an_adapter_in_use_waits_a_bounded_time(rt: Runtime, random_gemma_loras: tuple[Path, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_module, "ADMIN_WAIT_S", 0.5)
    rt.load_adapter("held", random_gemma_loras[0])
    gen = rt.generate("Once upon a time", adapters={"held": 1.0}, max_tokens=200)
    it = iter(gen)
    next(it)  # running, holding "held"
    started = time.monotonic()
    with pytest.raises(BusyError, match="used by"):
        rt.unload_adapter("held")
    assert time.monotonic() - started < 5
    gen.close()
    deadline = time.monotonic() + 10
    while True:  # the loop lets go of the cancelled request at its next step
        try:
            rt.unload_adapter("held")
            break
        except BusyError:
            assert time.monotonic() < deadline
    assert "held" not in rt.adapters


def test_adapters_load_on_first_use_and_the_lru_never_drops_a_running_request(
        gemma_q4_gguf: Path, random_gemma_loras: tuple[Path, Path], tmp_path: Path) -> None:
    files = {}
    for i in range(5):
        files[f"z{i}"] = shutil.copy(random_gemma_loras[i % 2], tmp_path / f"adapter-z{i}.gguf")
    seen_loaded: list[int] = []
    with Runtime(gemma_q4_gguf, n_ctx=256, seed=0, n_contexts=4, n_threads=2,
                 adapter_resolver=lambda name: (Path(files[name]), 1.0) if name in files else None,
                 max_adapters=2) as lru:
        with pytest.raises(RequestError, match="not loaded"):
            lru.generate("Hi", adapters={"nope": 1.0})
        names = ["z0", "z1", "z0", "z2", "z3", "z0", "z4", "z1"]
        gens: list[Generation] = []
        errors: list[BaseException] = []

        def one(name: str) -> None:
            try:
                g = lru.generate("The license grants", adapters={name: None}, max_tokens=8)
                gens.append(g)
                g.text()
                seen_loaded.append(len(lru.adapters))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
        threads = [threading.Thread(target=one, args=(n,)) for n in names]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(300)
        # Some may be told the LRU is full of running requests (503, retry); none is dropped mid-answer.
        assert all(isinstance(e, BusyError) for e in errors), errors
        assert len(gens) >= 4 and all(g.stats.finish_reason == "length" for g in gens if g.stats.finish_reason)
        assert all(g.stats.completion_tokens == 8 for g in gens if g.stats.finish_reason)
        assert len(lru.adapters) <= 2 and max(seen_loaded) <= 2


# --- the prompt cache is shared only within a tenant ---

def test_the_cache_is_reused_within_a_scope_and_never_across(rt: Runtime) -> None:
    system = {"role": "system", "content": SECRET_SYSTEM}
    first = rt.chat([system, {"role": "user", "content": "Hello"}], max_tokens=2, cache_scope="tenant-a")
    first.text()
    same = rt.chat([system, {"role": "user", "content": "Hi there"}], max_tokens=2, cache_scope="tenant-a")
    same.text()
    assert same.stats.cached_tokens > 20  # the same tenant still reuses its system prompt
    for scope in ("tenant-b", "tenant-c", "tenant-a\0salt"):  # scopes with no request before
        other = rt.chat([system, {"role": "user", "content": "Hello"}], max_tokens=2, cache_scope=scope)
        other.text()
        assert other.stats.cached_tokens == 0, scope


async def _ask(client: httpx.AsyncClient, model: str, key: str, system: str, user: str,
               salt: str | None = None) -> int:
    body = {"model": model, "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": 1}
    if salt is not None:
        body["cache_salt"] = salt
    response = await client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_a_guessing_client_of_another_tenant_sees_no_cached_tokens(rt: Runtime) -> None:
    app = make_app(rt, api_key=["key-alice", "key-bob"], limits=ServerLimits(request_deadline_s=60))
    model = rt.model_id

    async def go() -> tuple[list[int], int, int, int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost:8000",
                                     timeout=120) as c:
            await _ask(c, model, "key-alice", SECRET_SYSTEM, "What can you do?")
            # Bob guesses Alice's system prompt piece by piece (the reviewer's oracle), each guess
            # the first of its scope: nothing of Alice's is reused, whatever he guesses.
            # (Three requests: with Alice's, they fill the 4 slots without evicting her cache.)
            guesses = [await _ask(c, model, "key-bob", SECRET_SYSTEM[:n], "What can you do?", salt=f"g{n}")
                       for n in (40, len(SECRET_SYSTEM))]
            guesses.append(await _ask(c, model, "key-bob", SECRET_SYSTEM, "What can you do?"))
            again = await _ask(c, model, "key-alice", SECRET_SYSTEM, "And what else?")
            # Alice with a cache_salt is another scope too; within it, reuse works again.
            salted = await _ask(c, model, "key-alice", SECRET_SYSTEM, "What can you do?", salt="s1")
            salted_again = await _ask(c, model, "key-alice", SECRET_SYSTEM, "And what else?", salt="s1")
            return guesses, again, salted, salted_again
    guesses, again, salted, salted_again = asyncio.run(go())
    assert guesses == [0, 0, 0] and salted == 0
    assert again > 20 and salted_again > 20  # the same tenant and salt still reuse their prefix
