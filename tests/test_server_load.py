"""The server under load, over real HTTP (uvicorn with the limits `edge-lora serve` uses): a
bounded queue answers 429 with Retry-After (the openai SDK honours it), slow clients are cut off
(headers and body), a prompt over the size cap is refused before tokenizing, and a client that
goes away cancels its request while it waits, in prefill or while it generates."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edge_lora.serving.runtime import Runtime
from edge_lora.serving.server import ServerLimits, make_app, uvicorn_config

PROMPT = "The Apache License, Version 2.0, grants"


@pytest.fixture(scope="module")
def runtime(gemma_q4_gguf: Path, random_gemma_loras: tuple[Path, Path]) -> Iterator[Runtime]:
    # One context, small prefill chunks: waiting and prefill are easy to catch.
    rt = Runtime(gemma_q4_gguf, n_ctx=512, seed=0, n_batch=16)
    rt.load_adapter("alpha", random_gemma_loras[0])
    yield rt
    rt.close()


@contextlib.contextmanager
def serving(runtime: Runtime, limits: ServerLimits = ServerLimits()) -> Iterator[tuple[str, object]]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = make_app(runtime, limits=limits)
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, limits, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive()
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app.state.server
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def raw_request(url: str, body: dict) -> socket.socket:
    """A POST sent on a raw socket, so the test can hang up whenever it likes."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: " + f"{host}:{port}".encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(data)).encode()
                 + b"\r\n\r\n" + data)
    return sock


def spy_generations(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> list:
    started = []
    original = runtime._start

    def spy(*args, **kwargs):
        generation = original(*args, **kwargs)
        started.append(generation)
        return generation

    monkeypatch.setattr(runtime, "_start", spy)
    return started


def test_a_full_queue_answers_429_with_retry_after(runtime: Runtime) -> None:
    import openai

    with serving(runtime, ServerLimits(queue=1)) as (url, server):
        with httpx.Client(base_url=url, timeout=120) as c, \
                c.stream("POST", "/v1/completions", json={"model": "alpha", "prompt": PROMPT, "max_tokens": 400,
                                                          "stream": True, "temperature": 0}) as running:
            lines = running.iter_lines()
            next(lines)  # generating: the only context is taken
            waiting = raw_request(url, {"model": "alpha", "prompt": PROMPT, "max_tokens": 2})
            wait_until(lambda: server.gate.admitted == 2)
            refused = c.post("/v1/completions", json={"model": "alpha", "prompt": PROMPT, "max_tokens": 2})
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "server_busy"
            sdk = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            with pytest.raises(openai.RateLimitError) as caught:
                sdk.completions.create(model="alpha", prompt=PROMPT, max_tokens=2)
            assert caught.value.response.headers["retry-after"] == "1"
            # A retrying SDK client gets through once the stream ends (it waits Retry-After between tries).
            retrying = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=6)
            answers: list[str] = []
            worker = threading.Thread(target=lambda: answers.append(
                retrying.completions.create(model="alpha", prompt=PROMPT, max_tokens=2, temperature=0)
                .choices[0].text))
            worker.start()
            time.sleep(1.5)
        waiting.close()
        worker.join(120)
        assert len(answers) == 1
        wait_until(lambda: server.gate.admitted == 0 and server.gate.running == 0)


def test_a_disconnect_cancels_a_waiting_request_and_a_running_one(runtime: Runtime,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    started = spy_generations(runtime, monkeypatch)
    with serving(runtime) as (url, server):
        holder = raw_request(url, {"model": "alpha", "prompt": PROMPT, "max_tokens": 400, "temperature": 0})
        wait_until(lambda: started and started[0].stats.completion_tokens > 0)  # holds the context
        waiter = raw_request(url, {"model": "alpha", "prompt": PROMPT, "max_tokens": 400})
        wait_until(lambda: len(started) == 2 and len(server.gate.waiters) == 1)
        waiter.close()  # gone while waiting for the context
        wait_until(lambda: not server.gate.waiters and server.gate.admitted == 1)
        holder.close()  # gone mid-generation, not streaming
        wait_until(lambda: started[0].stats.finish_reason == "cancelled")
        assert started[0].stats.completion_tokens < 400
        assert started[1].stats.completion_tokens == 0 and started[1].stats.finish_reason is None  # never ran
        wait_until(lambda: server.gate.admitted == 0 and server.gate.running == 0)
        after = httpx.post(url + "/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2},
                           timeout=60)
        assert after.status_code == 200


def test_a_stream_cancelled_before_it_starts_gives_its_place_back(runtime: Runtime) -> None:
    """A server whose send() yields to the loop lets Starlette cancel a streamed response before
    its body iterator ever runs (the client went away at once): the request's place in the
    queue must be given back all the same, or the server fills up with ghosts and answers 429."""
    import asyncio

    app = make_app(runtime)
    body = json.dumps({"model": "alpha", "prompt": PROMPT, "max_tokens": 50, "stream": True}).encode()

    async def one() -> None:
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            return pending.pop() if pending else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            await asyncio.sleep(0)

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
                 "query_string": b"", "root_path": "", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5),
                 "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode())]}
        await app(scope, receive, send)

    async def go() -> None:
        for _ in range(3):
            await one()
        await asyncio.sleep(0.5)

    asyncio.run(go())
    gate = app.state.server.gate
    assert gate.admitted == 0 and gate.running == 0 and not gate.waiters


def test_a_disconnect_during_prefill_stops_it(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    import edge_lora.serving.llama_backend as backend

    real_decode = backend.llama.llama_decode
    chunks: list[int] = []

    def slow_decode(ctx, batch):
        chunks.append(batch.n_tokens)
        time.sleep(0.1)  # a long prompt on a slow machine
        return real_decode(ctx, batch)

    monkeypatch.setattr(backend.llama, "llama_decode", slow_decode)
    started = spy_generations(runtime, monkeypatch)
    prompt = runtime.model.tokenize((Path("/usr/share/common-licenses/Apache-2.0").read_text()), add_bos=True)[:480]
    with serving(runtime) as (url, server):
        client = raw_request(url, {"model": "alpha", "prompt": prompt, "max_tokens": 50})
        wait_until(lambda: len(chunks) >= 2)
        client.close()
        wait_until(lambda: started and started[0].stats.finish_reason == "cancelled")
        assert started[0].stats.completion_tokens == 0
        assert len(chunks) < 480 // 16  # stopped between chunks, well before the 30th
        wait_until(lambda: server.gate.admitted == 0)


def test_slow_headers_and_bodies_are_cut_off(runtime: Runtime) -> None:
    limits = ServerLimits(header_timeout_s=1.0, body_timeout_s=1.0)
    with serving(runtime, limits) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        silent = socket.create_connection((host, int(port)))  # connects, sends nothing
        trickle = socket.create_connection((host, int(port)))
        trickle.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        start = time.time()
        closed_at = None
        trickle.settimeout(0.25)
        while time.time() - start < 6:
            try:
                trickle.sendall(b"X-Slow: a\r\n")  # a header line every 0.25 s: never complete
                if trickle.recv(1024) == b"":
                    closed_at = time.time() - start
                    break
            except socket.timeout:
                continue
            except OSError:
                closed_at = time.time() - start
                break
        assert closed_at is not None and closed_at < 3, closed_at
        silent.settimeout(3)
        assert silent.recv(1024) == b""  # closed by the server too
        slow_body = socket.create_connection((host, int(port)))
        slow_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:" + port.encode()
                          + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":")
        slow_body.settimeout(5)
        answer = slow_body.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        for s in (silent, trickle, slow_body):
            s.close()
        assert httpx.get(url + "/health", timeout=10).status_code == 200


def test_a_prompt_over_the_cap_is_refused_before_tokenizing(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    calls: list[int] = []
    real_tokenize = runtime.model.tokenize

    def counting(text, *args, **kwargs):
        calls.append(len(text))
        return real_tokenize(text, *args, **kwargs)

    monkeypatch.setattr(runtime.model, "tokenize", counting)
    app = make_app(runtime, limits=ServerLimits(max_prompt_chars=1000))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost:8000",
                                     timeout=60) as c:
            long = await c.post("/v1/completions", json={"model": "alpha", "prompt": "x" * 1001})
            chat = await c.post("/v1/chat/completions", json={"model": "alpha", "messages": [
                {"role": "system", "content": "y" * 600}, {"role": "user", "content": "z" * 401}]})
            tokens = await c.post("/v1/completions", json={"model": "alpha", "prompt": [1] * 600})
            return long, chat, tokens
    long, chat, tokens = asyncio.run(go())
    for r in (long, chat, tokens):
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert calls == []
    default = make_app(runtime).state.server
    assert default.max_prompt_chars == 32 * runtime.n_ctx


def test_no_more_requests_generate_at_once_than_there_are_contexts(runtime: Runtime,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    inside = [0]
    most = [0]
    lock = threading.Lock()
    real_run = runtime._run

    def counting_run(*args, **kwargs):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            yield from real_run(*args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(runtime, "_run", counting_run)
    with serving(runtime, ServerLimits(queue=8)) as (url, server):
        answers: list[int] = []

        def one() -> None:
            answers.append(httpx.post(url + "/v1/completions", timeout=120, json={
                "model": "alpha", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}).status_code)

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
    assert answers == [200] * 6 and most[0] == 1 == runtime.n_contexts
