"""The review's connection findings (issue 23), over real HTTP: 80 idle sockets made the server
answer 503 to everyone (uvicorn's limit counted them); request bodies were parsed on the event
loop and held without bound while queued (18 x 8 MB took 4 GB)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edge_lora.serving import server as server_module
from edge_lora.serving.runtime import Runtime
from edge_lora.serving.server import ServerLimits
from tests.test_server_load import raw_request, serving, wait_until


@pytest.fixture(scope="module")
def runtime(gemma_q4_gguf: Path) -> Iterator[Runtime]:
    rt = Runtime(gemma_q4_gguf, n_ctx=256, seed=0)  # one context
    yield rt
    rt.close()


def test_idle_sockets_do_not_lock_others_out(runtime: Runtime) -> None:
    """The default limits, the review's 80 idle sockets: the ones idle the longest give way."""
    with serving(runtime) as (url, _server):
        host, port = url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(80)]
        try:
            for attempt in range(3):  # each answer on a fresh connection, as a new client
                r = httpx.get(f"{url}/health", timeout=5, headers={"Connection": "close"})
                assert r.status_code == 200, (attempt, r.text)
            closed = 0
            for sock in idle:
                sock.settimeout(5 if closed == 0 else 0.2)
                try:
                    closed += sock.recv(1) == b""
                except TimeoutError:
                    pass
            assert closed >= 80 - 68 + 3 - 1  # the oldest idle ones were closed to make room
        finally:
            for sock in idle:
                sock.close()


def test_request_bodies_held_at_once_are_bounded(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2 MB body waits in the queue (the only context is busy); a second one past the 3 MB
    budget is a 503 at once, not another few hundred MB of parsed JSON; both parse off the loop."""
    parsed_on: list[str] = []
    real_parse = server_module._parse_body

    def spy(raw: bytes) -> dict:
        try:
            asyncio.get_running_loop()
            parsed_on.append("event loop")
        except RuntimeError:
            parsed_on.append(threading.current_thread().name)
        return real_parse(raw)
    monkeypatch.setattr(server_module, "_parse_body", spy)
    padding = "x" * (2 * 1024 * 1024)
    body = {"model": runtime.model_id, "prompt": "Hello", "max_tokens": 2, "temperature": 0, "padding": padding}
    with serving(runtime, ServerLimits(body_budget_bytes=3 * 1024 * 1024)) as (url, server):
        holder = runtime.generate("Hello", max_tokens=100, temperature=0)
        next(holder)  # the context is taken: the next request waits, holding its body
        try:
            waiting = raw_request(url, body)
            wait_until(lambda: server.body_bytes_held >= len(padding))
            refused = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_busy"
            assert refused.headers["retry-after"]
        finally:
            holder.close()
        waiting.settimeout(60)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += waiting.recv(65536)
        waiting.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        wait_until(lambda: server.body_bytes_held == 0)
        again = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert again.status_code == 200 and json.loads(again.text)["usage"]["completion_tokens"] == 2
    assert len(parsed_on) >= 2 and "event loop" not in parsed_on
