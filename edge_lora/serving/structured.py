"""Structured output: a JSON schema (or "any JSON object") turned into a llama.cpp GBNF grammar
that the runtime enforces while sampling.

The conversion is llama-cpp-python's ``SchemaConverter`` (the Python port of llama.cpp's
json_schema_to_grammar). It silently ignores keywords it cannot express (``minimum``,
``uniqueItems``, ``not``, ...) and treats some loosely (``oneOf`` as ``anyOf``), which would give a
grammar that lets through answers the schema refuses. So the schema is walked here first: every
keyword is either one the converter enforces exactly in that position, an annotation, or a
``SchemaError`` naming it. Three of the converter's rules are corrected (see ``_Converter``).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llama_cpp import llama_grammar
from llama_cpp.llama_grammar import PRIMITIVE_RULES, STRING_FORMAT_RULES, BuiltinRule, SchemaConverter

from edge_lora.core.errors import RequestError

# Keywords that describe but do not constrain: allowed anywhere, dropped before conversion.
ANNOTATIONS = frozenset({"title", "description", "$schema", "$id", "$comment", "default", "examples",
                         "deprecated", "readOnly", "writeOnly", "$defs", "definitions"})
JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
# String formats whose rules match the format exactly ("date" with the rule below; the
# converter's "uuid1".."uuid5" do not check the version digit, so they are refused).
FORMATS = frozenset({"date", "time", "date-time", "uuid"})
# Bounds on repetition counts: the converter unrolls {m,n} into n nested optional groups, and
# llama.cpp's grammar parser recurses once per nesting level.
MAX_REPEAT = 256
# Bounds checked before any conversion (so before a context is taken): the converter's and the
# grammar compiler's work grows with them (an enum of 160k values cost ~30 s of CPU).
MAX_SCHEMA_BYTES = 64 * 1024  # the schema as compact JSON
MAX_ENUM_VALUES = 1024  # in one enum
MAX_SCHEMA_DEPTH = 64  # nested subschemas (the walker and the converter recurse)
MAX_GRAMMAR_BYTES = 256 * 1024  # the GBNF the schema becomes


class SchemaError(RequestError):
    """A JSON schema the grammar cannot enforce exactly."""


@dataclass(frozen=True)
class Grammar:
    """A GBNF grammar (root rule ``root``) and what it came from, for messages."""
    gbnf: str
    source: str  # "json_object" | "json_schema" | "gbnf"

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's ``{"type": "json_object"}``)."""
        return cls(_convert({"type": "object"}), "json_object")

    @classmethod
    def from_json_schema(cls, schema: object) -> Grammar:
        """The grammar of ``schema``; SchemaError naming the first keyword it cannot enforce."""
        return cls(_convert(check_schema(schema)), "json_schema")


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _matches_type(value: object, wanted: object) -> bool:
    types = wanted if isinstance(wanted, list) else [wanted]
    actual = _type_name(value)
    return actual in types or (actual == "integer" and "number" in types)


class _Walker:
    """Checks a schema against what the converter enforces, and returns it without annotations."""

    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root
        self.checked_refs: set[str] = set()

    def fail(self, path: str, what: str, fix: str | None = None) -> SchemaError:
        where = path or "/"
        return SchemaError(f"the JSON schema's {what} at {where} is not supported",
                           fix=fix or "remove it, or check the answer yourself")

    def walk(self, schema: object, path: str) -> dict[str, Any]:
        if path.count("/") > 2 * MAX_SCHEMA_DEPTH:
            raise SchemaError(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels",
                              fix="flatten it, or use $ref for recursive structures")
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise SchemaError(f"the JSON schema at {path or '/'} must be an object, "
                              f"got {json.dumps(schema)[:60]}", fix="give a JSON schema object")
        unknown_keys = [k for k in schema if not isinstance(k, str)]
        if unknown_keys:
            raise self.fail(path, "non-string key")
        body = {k: v for k, v in schema.items() if k not in ANNOTATIONS}
        for key in ("$defs", "definitions"):
            if key in schema and not isinstance(schema[key], dict):
                raise self.fail(f"{path}/{key}", f"{key!r} that is not an object")
        if "$ref" in body:
            return self._ref(body, path)
        if "oneOf" in body or "allOf" in body or "not" in body or "if" in body:
            keyword = next(k for k in ("oneOf", "allOf", "not", "if") if k in body)
            raise self.fail(path, f"keyword {keyword!r}",
                            fix="use anyOf" if keyword == "oneOf" else None)
        if "anyOf" in body:
            self._only(body, path, {"anyOf"}, "anyOf")
            alternatives = body["anyOf"]
            if not isinstance(alternatives, list) or not alternatives:
                raise self.fail(path, "anyOf that is not a non-empty list")
            return {"anyOf": [self.walk(s, f"{path}/anyOf/{i}") for i, s in enumerate(alternatives)]}
        kind = body.get("type")
        if kind is not None:
            kinds = kind if isinstance(kind, list) else [kind]
            if not kinds or any(k not in JSON_TYPES for k in kinds) or len(set(map(str, kinds))) != len(kinds):
                raise self.fail(path, f"type {json.dumps(kind)}", fix=f"use one of {', '.join(JSON_TYPES)}")
        if "const" in body or "enum" in body:
            return self._constants(body, path)
        if isinstance(kind, list):
            self._only(body, path, {"type"}, "a list of types")
            # The converter visits each type alone: {"type": t} with nothing else.
            return {"type": list(kind)} if len(kind) > 1 else self.walk({"type": kind[0]}, path)
        if kind is None:
            if not body:  # any JSON value
                return {"type": ["object", "array", "string", "number", "boolean", "null"]}
            kind = self._infer(body, path)
        if kind in ("object", "array", "string"):
            return getattr(self, f"_{kind}")(body, path)
        self._only(body, path, {"type"}, f"type {kind!r}")
        return {"type": kind}

    def _infer(self, body: dict, path: str) -> str:
        """The type a type-less schema constrains, judged by its keywords."""
        families = {"object": {"properties", "required", "additionalProperties"},
                    "array": {"items", "prefixItems", "minItems", "maxItems"},
                    "string": {"minLength", "maxLength", "format", "pattern"}}
        found = [k for k, words in families.items() if words & body.keys()]
        if len(found) != 1:
            raise self.fail(path, f"keywords {sorted(body)} without a \"type\"", fix="add \"type\"")
        return found[0]

    def _only(self, body: dict, path: str, allowed: set[str], context: str) -> None:
        extra = sorted(set(body) - allowed)
        if extra:
            raise self.fail(path, f"keyword {extra[0]!r} (next to {context})")

    def _count(self, body: dict, key: str, path: str) -> int | None:
        value = body.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(path, f"{key} {json.dumps(value)} (not a non-negative integer)")
        return value

    def _range(self, body: dict, path: str, lo_key: str, hi_key: str) -> None:
        lo, hi = self._count(body, lo_key, path) or 0, self._count(body, hi_key, path)
        if hi is not None and hi < lo:
            raise self.fail(path, f"{hi_key} below {lo_key}")
        if lo > MAX_REPEAT or (hi is not None and hi - lo > MAX_REPEAT):
            raise self.fail(path, f"{lo_key}/{hi_key} over {MAX_REPEAT}", fix=f"keep them at most {MAX_REPEAT}")

    # --- one method per type: what the converter enforces for it ---
    def _object(self, body: dict, path: str) -> dict:
        self._only(body, path, {"type", "properties", "required", "additionalProperties"}, "an object")
        properties = body.get("properties", {})
        if not isinstance(properties, dict):
            raise self.fail(path, "properties that is not an object")
        required = body.get("required", [])
        if not isinstance(required, list) or any(not isinstance(r, str) for r in required):
            raise self.fail(path, "required that is not a list of names")
        missing = [r for r in required if r not in properties]
        if missing:
            # The converter drops required names without a schema: the answer would lack them.
            raise self.fail(path, f"required property {missing[0]!r} without an entry in properties",
                            fix="describe it under properties")
        additional = body.get("additionalProperties", False if properties else True)
        if properties and additional is not False:
            # A free-form key could repeat a declared one with a value its schema refuses.
            raise self.fail(path, "additionalProperties next to properties",
                            fix="set \"additionalProperties\": false")
        out: dict[str, Any] = {"type": "object"}
        if properties:
            out["properties"] = {name: self.walk(sub, f"{path}/properties/{name}")
                                 for name, sub in properties.items()}
            out["required"] = list(dict.fromkeys(required))
            out["additionalProperties"] = False
        elif additional is False:
            out["additionalProperties"] = False
        elif additional is not True:
            out["additionalProperties"] = self.walk(additional, f"{path}/additionalProperties")
        return out

    def _array(self, body: dict, path: str) -> dict:
        if "prefixItems" in body:
            self._only(body, path, {"type", "prefixItems", "items"}, "prefixItems")
            if body.get("items", False) is not False:
                raise self.fail(path, "items next to prefixItems", fix="set \"items\": false")
            prefix = body["prefixItems"]
            if not isinstance(prefix, list) or not prefix:
                raise self.fail(path, "prefixItems that is not a non-empty list")
            return {"type": "array", "prefixItems": [self.walk(s, f"{path}/prefixItems/{i}")
                                                     for i, s in enumerate(prefix)]}
        self._only(body, path, {"type", "items", "minItems", "maxItems"}, "an array")
        if isinstance(body.get("items"), list):
            raise self.fail(path, "items as a list", fix="use prefixItems")
        self._range(body, path, "minItems", "maxItems")
        out: dict[str, Any] = {"type": "array", "items": self.walk(body.get("items", True), f"{path}/items")}
        for key in ("minItems", "maxItems"):
            if key in body:
                out[key] = body[key]
        return out

    def _string(self, body: dict, path: str) -> dict:
        if "pattern" in body:
            raise self.fail(path, "keyword 'pattern'", fix="use enum, or check the answer yourself")
        if "format" in body:
            self._only(body, path, {"type", "format"}, "format")
            if body["format"] not in FORMATS:
                raise self.fail(path, f"format {json.dumps(body['format'])}",
                                fix=f"supported formats: {', '.join(sorted(FORMATS))}")
            return {"type": "string", "format": body["format"]}
        self._only(body, path, {"type", "minLength", "maxLength"}, "a string")
        self._range(body, path, "minLength", "maxLength")
        return {"type": "string", **{k: body[k] for k in ("minLength", "maxLength") if k in body}}

    def _constants(self, body: dict, path: str) -> dict:
        key = "const" if "const" in body else "enum"
        self._only(body, path, {key, "type"}, key)
        values = [body["const"]] if key == "const" else body["enum"]
        if not isinstance(values, list) or not values:
            raise self.fail(path, "enum that is not a non-empty list")
        if len(values) > MAX_ENUM_VALUES:
            raise SchemaError(f"the JSON schema's enum at {path or '/'} has {len(values)} values; at most "
                              f"{MAX_ENUM_VALUES} are supported", fix="use a string, and check the answer yourself")
        for value in values:
            try:
                json.dumps(value, allow_nan=False)
            except ValueError:
                raise self.fail(path, f"{key} value that is not finite JSON") from None
            if "type" in body and not _matches_type(value, body["type"]):
                raise self.fail(path, f"{key} value {json.dumps(value)[:40]} of another type than "
                                      f"{json.dumps(body['type'])}")
            if isinstance(value, float) and not math.isfinite(value):
                raise self.fail(path, f"{key} value that is not finite")
        return {key: body[key]}

    def _ref(self, body: dict, path: str) -> dict:
        self._only(body, path, {"$ref"}, "$ref")
        ref = body["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise self.fail(path, f"$ref {json.dumps(ref)[:60]} (only local \"#/...\" references)")
        target: object = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise self.fail(path, f"$ref {ref!r} that points nowhere")
            target = target[part]
        if ref not in self.checked_refs:  # recursive schemas: check each target once
            self.checked_refs.add(ref)
            self.walk(target, ref[1:])
        return {"$ref": ref}


def check_schema(schema: object) -> dict[str, Any]:
    """``schema`` with annotations dropped, for the converter; SchemaError names the first
    keyword the grammar could not enforce exactly."""
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise SchemaError("the JSON schema must be an object", fix="give a JSON schema object")
    try:
        size = len(json.dumps(schema, separators=(",", ":"), allow_nan=True))
    except (TypeError, ValueError, RecursionError):
        raise SchemaError("the JSON schema is not plain JSON", fix="give a JSON schema object") from None
    if size > MAX_SCHEMA_BYTES:
        raise SchemaError(f"the JSON schema is {size} bytes; at most {MAX_SCHEMA_BYTES} are supported",
                          fix="shorten it (long enums, many properties)")
    walker = _Walker(schema)
    cleaned = walker.walk(schema, "")
    # $ref targets are converted from the original document: give the converter cleaned copies.
    for ref in sorted(walker.checked_refs):
        _set_pointer(cleaned, schema, ref, walker)
    return cleaned


def _set_pointer(cleaned: dict, original: dict, ref: str, walker: _Walker) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in ref[2:].split("/")]
    node: object = original
    for part in parts:
        node = node[part]  # type: ignore[index]  (checked by the walker)
    target = cleaned
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = walker.walk(node, ref[1:])


# JSON strings may not hold raw control characters (U+0000-U+001F): the converter's 0.3.36
# "char" rule allows them, so a newline inside a string would make the answer unparseable.
_JSON_CHAR = BuiltinRule(r'[^"\\\x7F\x00-\x1F] | [\\] (["\\bfnrt/] | "u" [0-9a-fA-F]{4})', [])


# The converter's date allows 31 days in every month; this one knows month lengths and leap
# years (Gregorian: every 4th year, centuries only when divisible by 400) and that year 0000 is none.
_DAY = {31: '("0" [1-9] | [12] [0-9] | "3" [01])', 30: '("0" [1-9] | [12] [0-9] | "30")',
        28: '("0" [1-9] | "1" [0-9] | "2" [0-8])'}
_YEAR = '([1-9] [0-9] [0-9] [0-9] | "0" [1-9] [0-9] [0-9] | "00" [1-9] [0-9] | "000" [1-9])'
_LEAP_YEAR = ('([0-9] [0-9] ("0" [48] | [2468] [048] | [13579] [26])'
              ' | ("0" [48] | [2468] [048] | [13579] [26]) "00")')
_DATE = BuiltinRule(f'{_YEAR} "-" (("0" [13578] | "1" [02]) "-" {_DAY[31]} | ("0" [469] | "11") "-" {_DAY[30]}'
                    f' | "02-" {_DAY[28]}) | {_LEAP_YEAR} "-02-29"', [])
_REPLACED = {id(PRIMITIVE_RULES["char"]): _JSON_CHAR, id(STRING_FORMAT_RULES["date"]): _DATE}


class _Converter(SchemaConverter):
    def _format_literal(self, literal: str) -> str:
        # 0.3.36 leaves backslashes unescaped, so an enum value "a\\b" would become "a\b" (a backspace).
        escaped = (literal.replace("\\", "\\\\").replace('"', '\\"')
                   .replace("\n", "\\n").replace("\r", "\\r"))
        return f'"{escaped}"'

    def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
        return super()._add_primitive(name, _REPLACED.get(id(rule), rule))


def _repetition(item_rule: str, min_items: int, max_items: int | None, separator_rule: str | None = None,
                item_rule_is_literal: bool = False) -> str:
    """The converter's repetition as GBNF's ``{m,n}`` (llama.cpp's own converter does the same):
    0.3.36 unrolls ``maxLength: 30`` into 30 nested optional groups, deeper than llguidance's
    Lark front end nests. Same language either way."""
    def times(lo: int, hi: int | None) -> str:
        if (lo, hi) == (0, None):
            return "*"
        if (lo, hi) == (1, None):
            return "+"
        if (lo, hi) == (0, 1):
            return "?"
        return f"{{{lo},{'' if hi is None else hi}}}"

    if max_items == 0:
        return ""
    if not separator_rule:
        return f"({item_rule}){times(min_items, max_items)}"
    more = "" if max_items == 1 else f" ({separator_rule} {item_rule}){times(max(min_items - 1, 0), None if max_items is None else max_items - 1)}"
    body = f"{item_rule}{more}"
    return f"({body})" if min_items > 0 else f"({body})?"


_conversion_lock = threading.Lock()  # the repetition builder is swapped module-wide while converting


def _convert(schema: dict[str, Any]) -> str:
    converter = _Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    with _conversion_lock:
        original = llama_grammar._build_repetition
        llama_grammar._build_repetition = _repetition
        try:
            converter.resolve_refs(schema, "")
            converter.visit(schema, "")
        finally:
            llama_grammar._build_repetition = original
    gbnf = converter.format_grammar()
    if len(gbnf) > MAX_GRAMMAR_BYTES:
        raise SchemaError(f"the JSON schema makes a grammar of {len(gbnf)} bytes; at most {MAX_GRAMMAR_BYTES} "
                          "are supported", fix="simplify it (fewer long enums or nested bounded lengths)")
    return gbnf
