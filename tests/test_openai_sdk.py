"""The official ``openai`` Python SDK as the client of ``serve`` (a real uvicorn on loopback, the
real Gemma base, a pool of two contexts and two adapters): what a user's code sees."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import jsonschema
import openai
import pytest
import uvicorn
from pydantic import BaseModel

from edge_lora.serving.runtime import Runtime
from edge_lora.serving.server import make_app

PROMPT = "The Apache License, Version 2.0, grants"
MESSAGES = [{"role": "user", "content": "Name three things a software license says."}]
EXACT = {"cache_prompt": False}  # answers that must not depend on what ran before


@pytest.fixture(scope="module")
def served(gemma_q4_gguf: Path, random_gemma_loras: tuple[Path, Path]) -> Iterator[tuple[Runtime, openai.OpenAI]]:
    runtime = Runtime(gemma_q4_gguf, n_ctx=512, seed=0, n_contexts=2)
    runtime.load_adapter("alpha", random_gemma_loras[0])
    runtime.load_adapter("beta", random_gemma_loras[1])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(runtime), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
    try:
        yield runtime, client
    finally:
        client.close()
        server.should_exit = True
        thread.join(timeout=10)
        runtime.close()


def test_models_list(served) -> None:
    runtime, client = served
    models = client.models.list().data
    assert [m.id for m in models] == [runtime.model_id, "alpha", "beta"]


def test_chat_and_completion_usage_and_max_tokens(served) -> None:
    runtime, client = served
    chat = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=8, temperature=0)
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    assert chat.usage.completion_tokens == 8
    assert chat.usage.prompt_tokens == len(runtime.render_messages(MESSAGES))
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 8
    assert chat.usage.prompt_tokens_details.cached_tokens >= 0
    again = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=8, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == chat.usage.prompt_tokens - 1  # the prompt cache
    completion = client.completions.create(model=runtime.model_id, prompt=PROMPT, max_tokens=5, temperature=0)
    assert completion.choices[0].text and completion.usage.completion_tokens == 5
    assert completion.usage.prompt_tokens == len(runtime.tokenize_prompt(PROMPT))


def test_streamed_chunks_concatenate_to_the_plain_answer(served) -> None:
    _, client = served
    plain = client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=20, temperature=0,
                                           extra_body=EXACT)
    chunks = list(client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=EXACT))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens  # include_usage
    plain = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=12, temperature=0, extra_body=EXACT)
    streamed = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                         extra_body=EXACT)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_stop_strings(served) -> None:
    _, client = served
    full = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=16, temperature=0,
                                     extra_body=EXACT).choices[0].text
    stop = full[6:10]
    cut = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop, "zzzz"],
                                    extra_body=EXACT).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"


def test_seeds_repeat_and_differ(served) -> None:
    _, client = served

    def sample(seed: int) -> str:
        return client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=12, temperature=1.0,
                                              seed=seed, extra_body=EXACT).choices[0].message.content
    first = sample(7)
    assert sample(7) == first
    assert len({first, sample(8), sample(9)}) >= 2


def test_error_classes(served) -> None:
    runtime, client = served
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-adapter", messages=MESSAGES)
    bad = [dict(temperature=5), dict(max_tokens=-1), dict(top_p=0), dict(n=2),
           dict(logprobs=True, top_logprobs=30), dict(top_logprobs=2),
           dict(response_format={"type": "xml"}), dict(extra_body={"cache_prompt": "no"}),
           dict(extra_body={"stream_options": 5}),
           dict(response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {
               "type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}}}})]
    for params in bad:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="alpha", messages=MESSAGES, **params)
        assert info.value.status_code == 400
    assert "minimum" in info.value.message  # the unsupported keyword is named
    assert info.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=runtime.model_id, prompt="word " * 600)  # longer than the context


SCHEMA = {"type": "object", "properties": {
    "license": {"enum": ["MIT", "Apache-2.0", "GPL-3.0", "other"]},
    "permissive": {"type": "boolean"},
    "obligations": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 20}}},
    "required": ["license", "permissive", "obligations"], "additionalProperties": False}


class Verdict(BaseModel):
    license: Literal["MIT", "Apache-2.0", "other"]
    permissive: bool
    year: int


@pytest.mark.slow
def test_response_format(served) -> None:
    _, client = served
    question = [{"role": "user", "content": "Describe the Apache License as JSON."}]
    for seed in range(3):
        for model in ("alpha", "beta"):
            answer = client.chat.completions.create(
                model=model, messages=question, max_tokens=200, temperature=1.0, seed=seed,
                response_format={"type": "json_schema", "json_schema": {"name": "license", "schema": SCHEMA}})
            jsonschema.validate(json.loads(answer.choices[0].message.content), SCHEMA)
    loose = client.chat.completions.create(model="alpha", messages=question, max_tokens=200, temperature=0.7,
                                           seed=1, response_format={"type": "json_object"})
    assert isinstance(json.loads(loose.choices[0].message.content), dict)
    # The SDK's own structured-output helper: a pydantic model becomes a strict json_schema.
    parsed = client.chat.completions.parse(model="beta", messages=question, max_tokens=200, temperature=0,
                                           response_format=Verdict)
    assert isinstance(parsed.choices[0].message.parsed, Verdict)
    # Completions take it too.
    completion = client.completions.create(model="alpha", prompt="License facts as JSON: ", max_tokens=200,
                                           temperature=0, extra_body={"response_format": {
                                               "type": "json_schema", "json_schema": {"schema": SCHEMA}}})
    jsonschema.validate(json.loads(completion.choices[0].text), SCHEMA)


def test_logprobs_chat_and_completions(served) -> None:
    _, client = served
    chat = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=10, temperature=0,
                                          logprobs=True, top_logprobs=3, extra_body=EXACT)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 10
    assert b"".join(bytes(t.bytes) for t in content).decode() == chat.choices[0].message.content
    for token in content:
        tops = token.top_logprobs
        assert len(tops) == 3 and [t.logprob for t in tops] == sorted((t.logprob for t in tops), reverse=True)
        assert token.logprob <= 0 and (token.token, token.logprob) == (tops[0].token, tops[0].logprob)  # greedy
    streamed = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=10, temperature=0,
                                              logprobs=True, top_logprobs=3, stream=True, extra_body=EXACT)
    streamed_content = [t for c in streamed if c.choices and c.choices[0].logprobs
                        for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed_content] == [(t.token, t.logprob) for t in content]
    no_logprobs = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=2)
    assert no_logprobs.choices[0].logprobs is None

    completion = client.completions.create(model="beta", prompt=PROMPT, max_tokens=8, temperature=0.8, seed=3,
                                           logprobs=2, extra_body=EXACT)
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert all(len(top) <= 2 and max(top.values()) >= chosen for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    streamed = client.completions.create(model="beta", prompt=PROMPT, max_tokens=8, temperature=0.8, seed=3,
                                         logprobs=2, stream=True, extra_body=EXACT)
    assert [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs] \
        == lp.token_logprobs


def test_answers_do_not_depend_on_load(served) -> None:
    """Temperature 0 with the cache off: each request gives the same tokens alone and among 8
    concurrent clients on mixed adapters (the pool splits the cores differently then)."""
    runtime, client = served
    models = [runtime.model_id, "alpha", "beta", "alpha", "beta", runtime.model_id, "alpha", "beta"]

    def ask(model: str) -> tuple[str, str]:
        chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, temperature=0,
                                              extra_body=EXACT)
        text = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0,
                                         extra_body=EXACT).choices[0].text
        return chat.choices[0].message.content, text

    alone = {model: ask(model) for model in dict.fromkeys(models)}
    assert len({answer for answer in alone.values()}) == 3  # the adapters matter
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, models))
    assert together == [alone[m] for m in models]
