"""The review's grammar findings (issue 23), against the real Gemma: an ambiguous recursive schema
that doubled llama.cpp's grammar stacks with every "[" now costs a bounded step per token (the
engine is llguidance); schemas whose conversion alone is expensive (a 160k-value enum, a huge or
deeply nested schema) are refused with a 400 before any context is taken; the server stays usable."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from edge_lora.serving.llama_backend import GrammarSampler, LlamaModel
from edge_lora.serving.runtime import Runtime
from edge_lora.serving.server import make_app
from edge_lora.serving.structured import MAX_ENUM_VALUES, Grammar, SchemaError

# The review's schema: "a" is an array of "a"s, listed twice in the anyOf (ambiguous), or null.
_A = {"type": "array", "items": {"$ref": "#/$defs/a"}}
AMBIGUOUS = {"$defs": {"a": {"anyOf": [_A, _A, {"type": "null"}]}}, "$ref": "#/$defs/a"}
BIG_ENUM = {"enum": [f"v{i}" for i in range(160_000)]}


def test_expensive_schemas_are_refused_before_conversion() -> None:
    for schema, words in ((BIG_ENUM, "bytes"),  # 1.3 MB as JSON: the size bound answers first
                          ({"enum": list(range(MAX_ENUM_VALUES + 1))}, "at most 1024"),
                          ({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(3000)},
                            "additionalProperties": False}, "bytes")):
        started = time.perf_counter()
        with pytest.raises(SchemaError, match=words):
            Grammar.from_json_schema(schema)
        assert time.perf_counter() - started < 1.0  # the 160k enum cost ~30 s of conversion before
    deep: dict = {"type": "string"}
    for _ in range(200):
        deep = {"type": "array", "items": deep}
    with pytest.raises(SchemaError, match="nests deeper"):
        Grammar.from_json_schema(deep)
    assert "root ::=" in Grammar.from_json_schema(AMBIGUOUS).gbnf  # ambiguity itself is no longer refused


@pytest.fixture(scope="module")
def model(gemma_q4_gguf: Path) -> Iterator[LlamaModel]:
    with LlamaModel(gemma_q4_gguf) as m:
        yield m


def test_each_grammar_step_is_bounded_on_the_ambiguous_schema(model: LlamaModel) -> None:
    """llama.cpp's sampler took 2.7 s for the 12th "[" and doubled per level (80 s at 15);
    every one of 40 steps now costs milliseconds, and the grammar still means what it says."""
    bracket = model.tokenize("[", add_bos=False, special=False)[0]
    close = model.tokenize("]", add_bos=False, special=False)[0]
    window = np.arange(64, dtype=np.int32)
    window[0] = bracket
    steps = []
    with GrammarSampler(model, Grammar.from_json_schema(AMBIGUOUS).gbnf) as grammar:
        for _ in range(40):
            started = time.perf_counter()
            assert grammar.allowed(window)[0]
            grammar.accept(bracket)
            steps.append(time.perf_counter() - started)
        assert not grammar.allowed(np.array([model.eos], dtype=np.int32))[0]  # 40 arrays still open
        for _ in range(40):
            assert grammar.allowed(np.array([close], dtype=np.int32))[0]
            grammar.accept(close)
        assert grammar.allowed(np.array([model.eos], dtype=np.int32))[0]
    assert max(steps) < 0.5, max(steps)


@pytest.fixture(scope="module")
def runtime(gemma_q4_gguf: Path) -> Iterator[Runtime]:
    rt = Runtime(gemma_q4_gguf, n_ctx=256, seed=0, n_contexts=2)
    yield rt
    rt.close()


def _post(app, payloads: list[dict]) -> list[httpx.Response]:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost:8000", timeout=300) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json=p) for p in payloads))
    return asyncio.run(go())


@pytest.mark.slow
def test_the_reviewers_requests_get_an_answer_or_a_400_and_the_server_stays_usable(runtime: Runtime) -> None:
    """Two ambiguous-schema requests after the prompt "[" * 40 at temperature 0 (the review's
    jam: both contexts held for minutes), the 160k enum, then an ordinary request."""
    app = make_app(runtime)
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": AMBIGUOUS}}
    jam = {"model": runtime.model_id, "prompt": "[" * 40, "max_tokens": 32, "temperature": 0, "response_format": fmt}
    started = time.perf_counter()
    first, second = _post(app, [jam, jam])
    took = time.perf_counter() - started
    for r in (first, second):
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["text"]
        assert r.json()["usage"]["completion_tokens"] > 10
        if r.json()["choices"][0]["finish_reason"] == "stop":
            json.loads(text)
        else:  # cut at max_tokens: still a prefix of the grammar's language
            assert set(text) <= set("[], null\n")
    assert took < 120, took  # two answers of 32 tokens; llama.cpp's sampler spent 80 s on one token
    started = time.perf_counter()
    enum, = _post(app, [{"model": runtime.model_id, "prompt": "x", "max_tokens": 4, "response_format": {
        "type": "json_schema", "json_schema": {"name": "e", "schema": BIG_ENUM}}}])
    assert enum.status_code == 400 and enum.json()["error"]["code"] == "unsupported_schema"
    assert time.perf_counter() - started < 5
    ordinary, = _post(app, [{"model": runtime.model_id, "prompt": "Hello", "max_tokens": 4, "temperature": 0}])
    assert ordinary.status_code == 200 and ordinary.json()["usage"]["completion_tokens"] == 4
