"""The OpenAI-compatible server on the real Gemma base with two adapters: model list, completions,
chat (plain and streamed), concurrent mixed-adapter requests, errors, API key, adapter loading."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edge_lora.serving.runtime import Runtime
from edge_lora.serving.server import make_app

PROMPT = "The Apache License, Version 2.0, grants"


@pytest.fixture(scope="module")
def runtime(gemma_q4_gguf: Path, random_gemma_loras: tuple[Path, Path]) -> Iterator[Runtime]:
    rt = Runtime(gemma_q4_gguf, n_ctx=256, seed=0)
    rt.load_adapter("alpha", random_gemma_loras[0])
    rt.load_adapter("beta", random_gemma_loras[1])
    yield rt
    rt.close()


def client_for(app, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost:8000",
                             headers=headers, timeout=120)


def run(coro):
    return asyncio.run(coro)


def test_models_lists_base_and_adapters(runtime: Runtime) -> None:
    async def go():
        async with client_for(make_app(runtime)) as c:
            return (await c.get("/v1/models")).json()
    data = run(go())["data"]
    base = runtime.model_id
    assert data[0]["id"] == base and data[0]["parent"] is None
    assert {(m["id"], m["parent"]) for m in data[1:]} == {("alpha", base), ("beta", base)}


def _completion(c: httpx.AsyncClient, model: str, **extra):
    # Exact mode: these tests compare answers across load and pools (the prompt cache's reuse
    # may flip a near-tie; tests/test_prompt_cache.py covers it).
    return c.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8,
                                           "temperature": 0, "cache_prompt": False, **extra})


def test_concurrent_mixed_adapter_requests_equal_requests_made_alone(runtime: Runtime) -> None:
    models = [runtime.model_id, "alpha", "beta", "alpha", runtime.model_id, "beta", "beta", "alpha"]

    async def go():
        async with client_for(make_app(runtime)) as c:
            alone = {}
            for m in dict.fromkeys(models):
                r = await _completion(c, m)
                assert r.status_code == 200, r.text
                alone[m] = r.json()["choices"][0]["text"]
            responses = await asyncio.gather(*[_completion(c, m) for m in models])
            return alone, responses
    alone, responses = run(go())
    assert len(set(alone.values())) == 3  # each adapter really changes the output
    for model, r in zip(models, responses):
        body = r.json()
        assert r.status_code == 200 and body["model"] == model
        assert body["choices"][0]["text"] == alone[model]
        assert body["usage"]["completion_tokens"] == 8 and body["choices"][0]["finish_reason"] == "length"


def test_context_pool_gives_the_same_answers(gemma_q4_gguf: Path, random_gemma_loras: tuple[Path, Path],
                                             runtime: Runtime) -> None:
    """Two contexts serving mixed adapters in parallel answer exactly as one context does alone."""
    models = ["alpha", "beta", runtime.model_id, "alpha", "beta", runtime.model_id, "alpha", "beta"]

    async def answers(rt: Runtime, concurrent: bool) -> list[str]:
        async with client_for(make_app(rt)) as c:
            if concurrent:
                responses = await asyncio.gather(*[_completion(c, m) for m in models])
            else:
                responses = [await _completion(c, m) for m in models]
            return [r.json()["choices"][0]["text"] for r in responses]

    alone = run(answers(runtime, concurrent=False))
    with Runtime(gemma_q4_gguf, n_ctx=256, seed=0, n_contexts=2) as pool:
        pool.load_adapter("alpha", random_gemma_loras[0])
        pool.load_adapter("beta", random_gemma_loras[1])
        assert run(answers(pool, concurrent=True)) == alone


def test_llama_server_lora_field_and_explicit_scales(runtime: Runtime) -> None:
    async def go():
        async with client_for(make_app(runtime)) as c:
            listing = (await c.get("/lora-adapters")).json()
            by_id = await _completion(c, runtime.model_id, lora=[{"id": 1, "scale": 1.0}])
            by_name = await _completion(c, "beta")
            by_map = await _completion(c, runtime.model_id, adapters={"beta": 1.0})
            zero = await _completion(c, "beta", adapters={"beta": 0.0})
            base = await _completion(c, runtime.model_id)
            return listing, by_id, by_name, by_map, zero, base
    listing, by_id, by_name, by_map, zero, base = run(go())
    assert [(e["id"], e["name"]) for e in listing] == [(0, "alpha"), (1, "beta")]
    text = [r.json()["choices"][0]["text"] for r in (by_id, by_name, by_map, zero, base)]
    assert text[0] == text[1] == text[2] != text[4]
    assert text[3] == text[4]  # scale 0 switches the adapter off


def _sse_events(text: str) -> list:
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_chat_streamed_equals_chat_plain(runtime: Runtime) -> None:
    body = {"model": "alpha", "messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": 10, "temperature": 0}

    async def go():
        async with client_for(make_app(runtime)) as c:
            plain = await c.post("/v1/chat/completions", json=body)
            streamed = await c.post("/v1/chat/completions", json={**body, "stream": True})
            completion_stream = await c.post("/v1/completions", json={"model": "beta", "prompt": PROMPT,
                                                                      "max_tokens": 6, "stream": True,
                                                                      "temperature": 0})
            completion_plain = await _completion(c, "beta", max_tokens=6)
            return plain, streamed, completion_stream, completion_plain
    plain, streamed, cstream, cplain = run(go())
    assert plain.status_code == 200 and streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    message = plain.json()["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"]
    events = _sse_events(streamed.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == message["content"]
    assert events[-1]["choices"][0]["finish_reason"] == plain.json()["choices"][0]["finish_reason"]
    cevents = _sse_events(cstream.text)
    assert "".join(e["choices"][0]["text"] for e in cevents) == cplain.json()["choices"][0]["text"]


@pytest.mark.parametrize("path,payload,status,code", [
    ("/v1/completions", b"{not json", 400, "invalid_json"),
    ("/v1/completions", b"[1, 2]", 400, "invalid_json"),
    pytest.param("/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", id="deep-nesting"),
    pytest.param("/v1/completions", b'{"model": "BASE", "prompt": "a\\udcffb"}', 400, None, id="lone-surrogate"),
    ("/v1/completions", {"prompt": "x"}, 400, "missing_model"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model_not_found"),
    ("/v1/completions", {"model": "BASE", "prompt": "word " * 400}, 400, "context_length_exceeded"),
    ("/v1/completions", {"model": "BASE", "prompt": "x", "max_tokens": -1}, 400, "invalid_value"),
    ("/v1/completions", {"model": "BASE", "prompt": "x", "max_tokens": "5"}, 400, "invalid_type"),
    ("/v1/completions", {"model": "BASE", "prompt": "x", "temperature": "hot"}, 400, "invalid_type"),
    ("/v1/completions", {"model": "BASE", "prompt": "x", "top_p": 0}, 400, "invalid_value"),
    ("/v1/completions", {"model": "BASE", "prompt": "x", "n": 2}, 400, "invalid_value"),
    ("/v1/completions", {"model": "BASE", "prompt": "x", "stop": [1]}, 400, "invalid_value"),
    ("/v1/completions", {"model": "BASE", "prompt": "x", "stream": "yes"}, 400, "invalid_type"),
    ("/v1/completions", {"model": "BASE", "prompt": 42}, 400, "invalid_value"),
    ("/v1/completions", {"model": "BASE", "prompt": [10**9]}, 400, None),
    ("/v1/completions", {"model": "BASE", "prompt": "x", "adapters": {"nope": 1}}, 404, "model_not_found"),
    ("/v1/completions", {"model": "BASE", "prompt": "x", "lora": [{"id": 9, "scale": 1}]}, 404, "model_not_found"),
    ("/v1/completions", {"model": "BASE", "prompt": "x", "lora": [{"id": "0", "scale": 1}]}, 400, None),
    ("/v1/chat/completions", {"model": "BASE", "messages": "hi"}, 400, None),
    ("/v1/chat/completions", {"model": "BASE", "messages": [{"role": "x", "content": "y"}]}, 400, None),
    ("/v1/load_lora_adapter", {"lora_name": "../x", "lora_path": "/tmp/x.gguf"}, 400, "invalid_value"),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/no/such/file.gguf"}, 403, "path_not_allowed"),
    ("/v1/unload_lora_adapter", {"lora_name": "nope"}, 404, "not_found"),
    ("/v1/nothing", {}, 404, "not_found"),
])
def test_bad_requests_get_openai_errors_and_server_keeps_serving(runtime: Runtime, path: str, payload,
                                                                  status: int, code: str | None) -> None:
    async def go():
        async with client_for(make_app(runtime)) as c:
            if isinstance(payload, dict):
                data = json.dumps(payload).replace('"BASE"', json.dumps(runtime.model_id)).encode()
            else:
                data = payload.replace(b'"BASE"', json.dumps(runtime.model_id).encode())
            bad = await c.post(path, content=data, headers={"content-type": "application/json"})
            good = await _completion(c, runtime.model_id, max_tokens=2)
            return bad, good
    bad, good = run(go())
    assert bad.status_code == status, bad.text
    error = bad.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    assert good.status_code == 200


def test_oversized_body_is_refused_while_streaming(runtime: Runtime) -> None:
    from edge_lora.serving.server import MAX_BODY_BYTES

    sent: list[int] = []

    async def chunked():  # no content-length: the limit must hold while reading
        for _ in range(MAX_BODY_BYTES // 65536 * 4):
            sent.append(65536)
            yield b"a" * 65536

    async def go():
        async with client_for(make_app(runtime)) as c:
            json_type = {"content-type": "application/json"}
            declared = await c.post("/v1/completions", content=b"a" * (MAX_BODY_BYTES + 1), headers=json_type)
            streamed = await c.post("/v1/completions", content=chunked(), headers=json_type)
            good = await _completion(c, runtime.model_id, max_tokens=2)
            return declared, streamed, good
    declared, streamed, good = run(go())
    assert declared.status_code == 413 and streamed.status_code == 413, streamed.text
    assert streamed.json()["error"]["code"] == "body_too_large"
    assert sum(sent) <= MAX_BODY_BYTES + 2 * 65536  # reading stopped at the limit
    assert good.status_code == 200


def test_negative_seed_is_served(runtime: Runtime) -> None:
    async def go():
        async with client_for(make_app(runtime)) as c:
            return [await _completion(c, runtime.model_id, max_tokens=4, temperature=0.9, seed=-1) for _ in range(2)]
    first, second = run(go())
    assert first.status_code == 200, first.text
    assert first.json()["choices"][0]["text"] == second.json()["choices"][0]["text"]


def test_nan_logits_get_an_error_plain_and_streamed(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support.faults import nan_logits

    async def go():
        async with client_for(make_app(runtime)) as c:
            plain = await _completion(c, runtime.model_id, temperature=0.8)
            streamed = await _completion(c, runtime.model_id, temperature=0.8, stream=True)
            return plain, streamed
    with nan_logits(monkeypatch):
        plain, streamed = run(go())
    assert plain.status_code == 400 and "NaN/inf logits" in plain.json()["error"]["message"]
    assert "NaN/inf logits" in _sse_events(streamed.text)[-1]["error"]["message"]


def test_a_bug_mid_stream_ends_the_stream_with_an_error(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only EdgeLoraError used to be forwarded: any other exception left the client waiting forever.
    from edge_lora.serving.runtime import Generation, GenerationStats

    def broken(*args, **kwargs) -> Generation:
        def pieces():
            yield "a"
            raise ZeroDivisionError("boom")
        return Generation(pieces(), GenerationStats())

    monkeypatch.setattr(runtime, "_start", broken)

    async def go():
        async with client_for(make_app(runtime)) as c:
            return await asyncio.wait_for(_completion(c, runtime.model_id, stream=True), timeout=30)
    events = _sse_events(run(go()).text)
    assert events[0]["choices"][0]["text"] == "a"
    assert events[-1]["error"]["code"] == "internal_error"



def test_a_bug_in_a_plain_request_is_a_json_500_and_the_server_keeps_serving(
        runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    real_start = runtime._start

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    async def go():
        async with client_for(make_app(runtime)) as c:
            monkeypatch.setattr(runtime, "_start", broken)
            failed = await _completion(c, runtime.model_id)
            monkeypatch.setattr(runtime, "_start", real_start)
            return failed, await _completion(c, runtime.model_id, temperature=1e-30)
    failed, tiny_temperature = run(go())
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "internal_error"
    assert "boom" not in failed.text  # details go to the log, not to the client
    assert tiny_temperature.status_code == 200  # was an IndexError in sampling: a plain-text 500


def test_api_key_required_when_set(runtime: Runtime) -> None:
    app = make_app(runtime, api_key="s3cret")

    async def go():
        async with client_for(app) as c:
            missing = await c.get("/v1/models")
            wrong = await c.get("/v1/models", headers={"Authorization": "Bearer nope"})
            right = await c.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
            post = await c.post("/v1/completions", json={"model": runtime.model_id, "prompt": "x"})
            return missing, wrong, right, post
    missing, wrong, right, post = run(go())
    assert missing.status_code == wrong.status_code == post.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    assert right.status_code == 200


def test_load_and_unload_adapter_at_run_time(runtime: Runtime, random_gemma_loras: tuple[Path, Path],
                                             tmp_path: Path) -> None:
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "gamma.gguf").write_bytes(random_gemma_loras[0].read_bytes())
    (adapters / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)

    async def go():
        async with client_for(make_app(runtime, adapter_dir=tmp_path / "adapters")) as c:
            loaded = await c.post("/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": "gamma.gguf"})
            again = await c.post("/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": "gamma.gguf"})
            listed = (await c.get("/v1/models")).json()["data"]
            as_gamma = await _completion(c, "gamma")
            as_alpha = await _completion(c, "alpha")
            bad = await c.post("/v1/load_lora_adapter", json={"lora_name": "junk", "lora_path": "junk.gguf"})
            unloaded = await c.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"})
            gone = "gamma" not in runtime.adapters
            after = await _completion(c, "gamma")  # a file in --adapter-dir: loaded again on first use
            unknown = await _completion(c, "delta")
            return loaded, again, listed, as_gamma, as_alpha, bad, unloaded, gone, after, unknown
    loaded, again, listed, as_gamma, as_alpha, bad, unloaded, gone, after, unknown = run(go())
    assert loaded.status_code == 200 and again.status_code == 400
    assert ("gamma", runtime.model_id) in {(m["id"], m["parent"]) for m in listed}
    assert as_gamma.json()["choices"][0]["text"] == as_alpha.json()["choices"][0]["text"]  # same file
    assert bad.status_code == 400 and "not a valid GGUF" in bad.json()["error"]["message"]
    assert unloaded.status_code == 200 and gone
    assert after.status_code == 200 and "gamma" in runtime.adapters and unknown.status_code == 404
    assert "junk" not in runtime.adapters
    runtime.unload_adapter("gamma")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_over_real_http_with_uvicorn(runtime: Runtime) -> None:
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(runtime), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 20
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        assert server.started
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            with c.stream("POST", "/v1/completions", json={"model": "alpha", "prompt": PROMPT, "max_tokens": 6,
                                                           "stream": True, "temperature": 0}) as r:
                lines = [line for line in r.iter_lines() if line]
            # The loop keeps answering while a generation runs.
            assert c.get("/health").json() == {"status": "ok"}
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert lines[-1] == "data: [DONE]" and len(lines) >= 3


def test_client_that_goes_away_cancels_its_generation(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    started = []
    original = runtime._start

    def spy(*args, **kwargs):
        generation = original(*args, **kwargs)
        started.append(generation)
        return generation

    monkeypatch.setattr(runtime, "_start", spy)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(runtime), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            with c.stream("POST", "/v1/completions", json={"model": runtime.model_id, "prompt": PROMPT,
                                                           "max_tokens": 200, "stream": True}) as r:
                lines = r.iter_lines()
                next(lines), next(lines)
            after = c.post("/v1/completions", json={"model": runtime.model_id, "prompt": "x", "max_tokens": 2})
        assert after.status_code == 200
        deadline = time.time() + 10
        while started[0].stats.finish_reason is None and time.time() < deadline:
            time.sleep(0.05)
        assert started[0].stats.finish_reason == "cancelled"
        assert started[0].stats.completion_tokens < 200
    finally:
        server.should_exit = True
        thread.join(timeout=10)
