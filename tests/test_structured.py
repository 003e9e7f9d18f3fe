"""Structured output: JSON schemas the grammar can enforce exactly are converted, every other
keyword is refused by name; on the real Gemma model (adapter hot-applied too) every sampled
answer parses and validates."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from edge_lora.core.errors import RequestError
from edge_lora.serving.llama_backend import GrammarSampler
from edge_lora.serving.runtime import Runtime
from edge_lora.serving.structured import Grammar, SchemaError, check_schema

# Bounded (maxLength, maxItems, enums), so every answer ends well within max_tokens.
CLAUSE_SCHEMA = {
    "type": "object",
    "title": "Clause summary",
    "properties": {
        "license": {"enum": ["Apache-2.0", "MIT", "GPL-3.0", "MPL-2.0", "other"]},
        "grants_patents": {"type": "boolean"},
        "clauses": {"type": "array", "maxItems": 3,
                    "items": {"type": "string", "minLength": 1, "maxLength": 24}},
        "term_years": {"type": ["integer", "null"]},
    },
    "required": ["license", "grants_patents", "clauses"],
    "additionalProperties": False,
}
PARTY_SCHEMA = {
    "$defs": {"party": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "role": {"enum": ["licensor", "licensee", "contributor"]}},
        "required": ["name", "role"]}},
    "type": "object",
    "properties": {"parties": {"type": "array", "items": {"$ref": "#/$defs/party"}, "minItems": 1, "maxItems": 2},
                   "signed": {"type": "string", "format": "date"},
                   "quote": {"type": "string", "maxLength": 30, "description": "may hold \\ and \" and newlines"}},
    "required": ["parties", "quote"],
}
LICENSE_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "permissive": {"type": "boolean"},
                   "obligations": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 40}}},
    "required": ["name", "permissive", "obligations"],
    "additionalProperties": False,
}
TUPLE_SCHEMA = {"type": "array", "prefixItems": [{"type": "number"}, {"const": "a\\b\"c\n"}], "items": False}


@pytest.mark.parametrize("schema,keyword", [
    ({"type": "integer", "minimum": 0}, "minimum"),
    ({"type": "number", "multipleOf": 2}, "multipleOf"),
    ({"type": "string", "pattern": "^a+$"}, "pattern"),
    ({"type": "string", "format": "email"}, "email"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "array", "contains": {"type": "string"}}, "contains"),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "oneOf"),
    ({"allOf": [{"type": "object"}]}, "allOf"),
    ({"not": {"type": "string"}}, "not"),
    ({"if": {"type": "string"}, "then": {"maxLength": 2}}, "if"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "patternProperties": {"^x": {}}},
     "patternProperties"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": True},
     "additionalProperties"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "'b'"),
    ({"type": "object", "minProperties": 1}, "minProperties"),
    ({"type": ["string", "integer"], "maxLength": 3}, "maxLength"),
    ({"anyOf": [{"type": "string"}], "type": "string"}, "type"),
    ({"$ref": "https://example.com/schema.json"}, "$ref"),
    ({"$ref": "#/$defs/missing"}, "points nowhere"),
    ({"type": "string", "nullable": True}, "nullable"),
    ({"type": "strnig"}, "strnig"),
    ({"type": "array", "items": [{"type": "string"}]}, "items as a list"),
    ({"type": "string", "maxLength": 100000}, "over 256"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "below"),
    ({"const": "x", "type": "integer"}, "another type"),
    ({"properties": {"a": {"type": "string"}}, "items": {}}, "without a \"type\""),
    ("not a schema", "must be an object"),
])
def test_keywords_the_grammar_cannot_enforce_are_refused_by_name(schema: object, keyword: str) -> None:
    with pytest.raises(SchemaError, match=keyword.replace("$", r"\$").replace("(", r"\(")) as info:
        Grammar.from_json_schema(schema)
    assert isinstance(info.value, RequestError)  # a 400 from the server, exit 2 from the CLI


def test_supported_schemas_convert_and_drop_annotations() -> None:
    cleaned = check_schema(CLAUSE_SCHEMA)
    assert "title" not in cleaned and cleaned["properties"]["clauses"]["items"]["maxLength"] == 24
    for schema in (CLAUSE_SCHEMA, PARTY_SCHEMA, TUPLE_SCHEMA, {}, True, {"type": "object"},
                   {"type": "object", "additionalProperties": {"type": "integer"}},
                   {"anyOf": [{"type": "null"}, {"type": "string", "format": "date-time"}]},
                   {"type": "string", "format": "uuid"}):
        assert "root ::=" in Grammar.from_json_schema(schema).gbnf
    assert Grammar.json_object().source == "json_object"


def test_grammar_masks_follow_the_schema(gemma_q4_gguf: Path) -> None:
    """Walks a few JSON texts through llama.cpp's grammar token by token (the model's own
    tokenization), so the corrected rules are checked where they are enforced."""
    from edge_lora.serving.llama_backend import LlamaModel

    with LlamaModel(gemma_q4_gguf) as model:
        def accepts(schema: object, text: str) -> bool:
            with GrammarSampler(model, Grammar.from_json_schema(schema).gbnf) as grammar:
                for token in model.tokenize(text, add_bos=False, special=False):
                    if not grammar.allowed(np.array([token], dtype=np.int32))[0]:
                        return False
                    grammar.accept(token)
                return bool(grammar.allowed(np.array([model.eos], dtype=np.int32))[0])  # complete

        assert accepts(TUPLE_SCHEMA, '[1.5, "a\\\\b\\"c\\n"]')
        assert not accepts(TUPLE_SCHEMA, '[1.5, "a\\b\\"c\\n"]')  # a backspace, not a backslash
        assert accepts(PARTY_SCHEMA, '{"parties": [{"name": "Bob", "role": "licensee"}], "quote": "a\\nb"}')
        assert not accepts(PARTY_SCHEMA, '{"parties": [{"name": "Bob", "role": "licensee"}], "quote": "a\nb"}')
        assert not accepts(PARTY_SCHEMA, '{"parties": [], "quote": "x"}')  # minItems 1
        assert not accepts(CLAUSE_SCHEMA, '{"license": "MIT", "grants_patents": true}')  # clauses required
        assert accepts(CLAUSE_SCHEMA, '{"license": "MIT", "grants_patents": true, "clauses": [], "term_years": 5}')
        with pytest.raises(RequestError, match="does not parse"):
            GrammarSampler(model, "root ::= undefined-rule")


@pytest.fixture(scope="module")
def legal_runtime(gemma_q4_gguf: Path, legal_adapter_gguf: Path) -> Iterator[Runtime]:
    rt = Runtime(gemma_q4_gguf, n_ctx=1024, seed=0)
    rt.load_adapter("legal", legal_adapter_gguf)
    yield rt
    rt.close()


@pytest.mark.slow
def test_fifty_sampled_answers_parse_and_validate(legal_runtime: Runtime) -> None:
    """Temperature 1 over the whole vocabulary, seeded, base and legal adapter: the grammar is
    what keeps every answer valid (unconstrained, the model rarely writes JSON at all). The
    schemas bound every string and array, so every answer must end within the budget; a bare
    {"type": "json_object"} cannot promise that (at temperature 1, seed 2 once wrote "$" past
    900 tokens inside a free string; OpenAI reports such a cut as finish_reason "length" too)."""
    cases = [(CLAUSE_SCHEMA, "Summarize the Apache License 2.0 as JSON."),
             (PARTY_SCHEMA, "Who are the parties of a software license? Answer in JSON."),
             (LICENSE_SCHEMA, "Describe the MIT license as a JSON object.")]
    grammars = [Grammar.from_json_schema(s) for s, _ in cases]
    failures = []
    for seed in range(50):
        (schema, question), grammar = cases[seed % 3], grammars[seed % 3]
        adapters = {"legal": 1.0} if seed % 2 else None
        gen = legal_runtime.chat([{"role": "user", "content": question}], adapters=adapters, grammar=grammar,
                                 max_tokens=400, temperature=1.0, seed=seed)
        text = gen.text()
        try:
            assert gen.stats.finish_reason == "stop", gen.stats.finish_reason
            answer = json.loads(text)
            jsonschema.validate(answer, schema,
                                format_checker=jsonschema.FormatChecker())
        except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
            failures.append((seed, text, str(exc)[:200]))
    assert not failures, failures
    # Unconstrained, the same requests are not JSON: the grammar is doing the work.
    free = [legal_runtime.chat([{"role": "user", "content": q}], max_tokens=40, temperature=1.0, seed=s).text()
            for s, (_, q) in enumerate(cases)]
    assert sum(_parses(t) for t in free) < len(free)


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def test_date_format_knows_month_lengths_and_leap_years(gemma_q4_gguf: Path) -> None:
    import datetime

    from edge_lora.serving.llama_backend import LlamaModel

    gbnf = Grammar.from_json_schema({"type": "string", "format": "date"}).gbnf
    with LlamaModel(gemma_q4_gguf) as model:
        def accepts(text: str) -> bool:
            with GrammarSampler(model, gbnf) as grammar:
                for token in model.tokenize(text, add_bos=False, special=False):
                    if not grammar.allowed(np.array([token], dtype=np.int32))[0]:
                        return False
                    grammar.accept(token)
                return bool(grammar.allowed(np.array([model.eos], dtype=np.int32))[0])

        def valid(date: str) -> bool:
            try:
                datetime.date.fromisoformat(date)
                return True
            except ValueError:
                return False

        dates = [f"{y}-{m}-{d}" for y in ("0000", "0004", "0100", "0400", "1900", "2000", "2023", "2024")
                 for m in ("00", "01", "02", "04", "12", "13") for d in ("00", "01", "28", "29", "30", "31", "32")]
        wrong = [d for d in dates if accepts(json.dumps(d)) != valid(d)]
        assert not wrong and sum(map(valid, dates)) > 50
