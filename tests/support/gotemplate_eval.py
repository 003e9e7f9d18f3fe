"""A small evaluator for the subset of Go's text/template that Ollama chat templates use,
written from the text/template documentation (pkg.go.dev/text/template), so tests can render
a generated TEMPLATE and compare it with the Jinja chat template byte for byte.

Supported: text and ``{{ }}`` actions with ``{{-``/``-}}`` whitespace trimming, comments,
``if``/``else if``/``else``/``end``, ``range`` (with ``$i, $v :=``), variable declaration
``:=`` and assignment ``=`` with Go's block scoping, pipelines with ``|``, field chains
(``.Role``, ``$.System``, ``$m.Content``), string/number/bool literals, parenthesised
sub-expressions, and the builtins and, or, not, eq, ne, lt, le, gt, ge, len, index, slice,
print, printf. Anything else raises GoTemplateError, as Go's parser would refuse it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


class GoTemplateError(Exception):
    pass


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_SPACE = " \t\r\n"


def _lex(source: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", body)], trim markers applied to neighbouring text."""
    items: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for match in _ACTION.finditer(source):
        text = source[pos:match.start()]
        if trim_next:
            text = text.lstrip(_SPACE)
        if match.group(1):
            text = text.rstrip(_SPACE)
        items.append(("text", text))
        items.append(("action", match.group(2).strip()))
        trim_next = bool(match.group(3))
        pos = match.end()
    tail = source[pos:]
    if "{{" in tail:
        raise GoTemplateError("unclosed action")
    items.append(("text", tail.lstrip(_SPACE) if trim_next else tail))
    return [item for item in items if item != ("text", "")]


_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\\n]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<num>-?\d+(?:\.\d+)?)
  | (?P<decl>:=)
  | (?P<assign>=)
  | (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<lp>\()
  | (?P<rp>\))
  | (?P<pipe>\|)
  | (?P<comma>,)
""", re.X)

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "0": "\0"}


def _unescape(body: str) -> str:
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            nxt = body[i + 1]
            if nxt not in _ESCAPES:
                raise GoTemplateError(f"unsupported escape \\{nxt}")
            out.append(_ESCAPES[nxt])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _tokens(expr: str) -> list[tuple[str, str]]:
    pos, out = 0, []
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            raise GoTemplateError(f"bad syntax at {expr[pos:]!r}")
        kind = m.lastgroup or ""
        if kind != "ws":
            out.append((kind, m.group()))
        pos = m.end()
    return out


# --- expression AST: ("lit", v) | ("field", [names]) | ("var", name, [names]) | ("call", fn, [args]) | ("pipe", [cmds])

def _parse_pipeline(toks: list[tuple[str, str]], i: int, stop: set[str]) -> tuple[Any, int]:
    commands = []
    while True:
        args = []
        while i < len(toks) and toks[i][0] not in stop and toks[i][0] != "pipe":
            arg, i = _parse_operand(toks, i)
            args.append(arg)
        if not args:
            raise GoTemplateError("missing command")
        commands.append(args)
        if i < len(toks) and toks[i][0] == "pipe":
            i += 1
            continue
        return ("pipe", commands), i


def _parse_operand(toks: list[tuple[str, str]], i: int) -> tuple[Any, int]:
    kind, text = toks[i]
    if kind == "str":
        return ("lit", _unescape(text[1:-1])), i + 1
    if kind == "raw":
        return ("lit", text[1:-1]), i + 1
    if kind == "num":
        return ("lit", float(text) if "." in text else int(text)), i + 1
    if kind == "field":
        return ("field", [p for p in text.split(".") if p]), i + 1
    if kind == "var":
        head, *rest = text.split(".")
        return ("var", head, rest), i + 1
    if kind == "ident":
        if text in ("true", "false"):
            return ("lit", text == "true"), i + 1
        if text == "nil":
            return ("lit", None), i + 1
        return ("fn", text), i + 1
    if kind == "lp":
        inner, j = _parse_pipeline(toks, i + 1, {"rp"})
        if j >= len(toks) or toks[j][0] != "rp":
            raise GoTemplateError("unclosed parenthesis")
        return inner, j + 1
    raise GoTemplateError(f"unexpected {text!r}")


def _parse_expr(expr: str) -> Any:
    toks = _tokens(expr)
    pipe, i = _parse_pipeline(toks, 0, set())
    if i != len(toks):
        raise GoTemplateError(f"unexpected {toks[i][1]!r}")
    return pipe


# --- statement tree

@dataclass
class _Node:
    kind: str  # text | out | decl | assign | if | range
    text: str = ""
    expr: Any = None
    names: list[str] = field(default_factory=list)
    body: list[_Node] = field(default_factory=list)
    orelse: list[_Node] = field(default_factory=list)


_DECL = re.compile(r"^(\$[A-Za-z0-9_]*)\s*(:=|=)\s*(.+)$", re.S)
_RANGE_VARS = re.compile(r"^(\$[A-Za-z0-9_]*)\s*(?:,\s*(\$[A-Za-z0-9_]*))?\s*:=\s*(.+)$", re.S)


def _parse(items: list[tuple[str, str]]) -> list[_Node]:
    pos = 0

    def block(terminators: tuple[str, ...]) -> tuple[list[_Node], str]:
        nonlocal pos
        nodes: list[_Node] = []
        while pos < len(items):
            kind, body = items[pos]
            pos += 1
            if kind == "text":
                nodes.append(_Node("text", text=body))
                continue
            if body.startswith("/*"):
                if not body.endswith("*/"):
                    raise GoTemplateError("unclosed comment")
                continue
            word = body.split(None, 1)[0] if body else ""
            if word in ("end", "else") and word in terminators:
                return nodes, body
            if word in ("end", "else"):
                raise GoTemplateError(f"unexpected {{{{{body}}}}}")
            if word == "if":
                nodes.append(parse_if(body[2:].strip()))
            elif word == "range":
                nodes.append(parse_range(body[5:].strip()))
            elif word in ("with", "define", "template", "block", "break", "continue"):
                raise GoTemplateError(f"{word} is outside the supported subset")
            elif m := _DECL.match(body):
                nodes.append(_Node("decl" if m.group(2) == ":=" else "assign",
                                   names=[m.group(1)], expr=_parse_expr(m.group(3))))
            else:
                nodes.append(_Node("out", expr=_parse_expr(body)))
        if terminators:
            raise GoTemplateError("missing {{end}}")
        return nodes, ""

    def parse_if(cond: str) -> _Node:
        node = _Node("if", expr=_parse_expr(cond))
        node.body, term = block(("end", "else"))
        if term.startswith("else"):
            rest = term[4:].strip()
            if rest.startswith("if "):
                node.orelse = [parse_if(rest[3:].strip())]  # else if: the nested if consumes {{end}}
            elif rest:
                raise GoTemplateError(f"bad else: {term!r}")
            else:
                node.orelse, term = block(("end",))
        return node

    def parse_range(spec: str) -> _Node:
        names: list[str] = []
        if m := _RANGE_VARS.match(spec):
            names = [n for n in (m.group(1), m.group(2)) if n]
            spec = m.group(3)
        node = _Node("range", expr=_parse_expr(spec), names=names)
        node.body, term = block(("end", "else"))
        if term.startswith("else"):
            node.orelse, _ = block(("end",))
        return node

    nodes, _ = block(())
    return nodes


def _truth(value: Any) -> bool:
    if value is None or value is False:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0
    if isinstance(value, (str, list, tuple, dict)):
        return len(value) > 0
    return True


def _get_field(value: Any, names: list[str]) -> Any:
    for name in names:
        if isinstance(value, dict):
            if name not in value:
                raise GoTemplateError(f"can't evaluate field {name}")
            value = value[name]
        else:
            raise GoTemplateError(f"can't evaluate field {name} in {type(value).__name__}")
    return value


def _go_str(value: Any) -> str:
    if value is None:
        return "<no value>"
    if value is True or value is False:
        return "true" if value else "false"
    return str(value)


def _printf(fmt: str, *args: Any) -> str:
    out, i, n = [], 0, 0
    while i < len(fmt):
        c = fmt[i]
        if c == "%" and i + 1 < len(fmt):
            verb = fmt[i + 1]
            if verb == "%":
                out.append("%")
            elif verb in "sdv":
                out.append(_go_str(args[n]))
                n += 1
            elif verb == "q":
                out.append('"' + _go_str(args[n]).replace("\\", "\\\\").replace('"', '\\"') + '"')
                n += 1
            else:
                raise GoTemplateError(f"printf verb %{verb} unsupported")
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _slice(value: Any, *bounds: int) -> Any:
    if len(bounds) > 2:
        raise GoTemplateError("slice: 3-index form unsupported")
    lo = bounds[0] if bounds else 0
    hi = bounds[1] if len(bounds) > 1 else len(value)
    if not 0 <= lo <= hi <= len(value):
        raise GoTemplateError("slice: index out of range")
    return value[lo:hi]


def _index(value: Any, *keys: Any) -> Any:
    for key in keys:
        try:
            value = value[key]
        except (IndexError, KeyError, TypeError) as exc:
            raise GoTemplateError(f"index: {exc}") from exc
    return value


def _eq(a: Any, *others: Any) -> bool:
    if not others:
        raise GoTemplateError("eq: missing argument")
    return any(a == b for b in others)


_FUNCS = {
    "not": lambda a: not _truth(a),
    "eq": _eq,
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b, "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
    "len": len,
    "index": _index,
    "slice": _slice,
    "print": lambda *a: "".join(_go_str(x) for x in a),
    "printf": _printf,
}


class _Scope:
    def __init__(self, dollar: Any) -> None:
        self.frames: list[dict[str, Any]] = [{"$": dollar}]

    def get(self, name: str) -> Any:
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise GoTemplateError(f"undefined variable {name}")

    def set(self, name: str, value: Any) -> None:
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise GoTemplateError(f"undefined variable {name}")


def _eval(expr: Any, dot: Any, scope: _Scope) -> Any:
    kind = expr[0]
    if kind == "lit":
        return expr[1]
    if kind == "field":
        return _get_field(dot, expr[1]) if expr[1] else dot
    if kind == "var":
        return _get_field(scope.get(expr[1]), expr[2])
    if kind == "pipe":
        result: Any = None
        for n, command in enumerate(expr[1]):
            extra = [result] if n > 0 else []
            head = command[0]
            if head[0] == "fn":
                name = head[1]
                if name in ("and", "or"):
                    args = [*command[1:]]
                    values = [lambda a=a: _eval(a, dot, scope) for a in args] + [lambda r=r: r for r in extra]
                    result = _and_or(name, values)
                    continue
                if name not in _FUNCS:
                    raise GoTemplateError(f'function "{name}" not defined')
                args = [_eval(a, dot, scope) for a in command[1:]] + extra
                try:
                    result = _FUNCS[name](*args)
                except TypeError as exc:
                    raise GoTemplateError(f"{name}: {exc}") from exc
            else:
                if len(command) > 1 or extra:
                    raise GoTemplateError("can't give argument to non-function")
                result = _eval(head, dot, scope)
        return result
    raise GoTemplateError(f"cannot evaluate {kind}")


def _and_or(name: str, thunks: list) -> Any:
    """Go 1.18+: and/or stop at the first falsy/truthy argument and return it."""
    if not thunks:
        raise GoTemplateError(f"{name}: missing arguments")
    value: Any = None
    for thunk in thunks:
        value = thunk()
        if (name == "and") != _truth(value):
            return value
    return value


def _exec(nodes: list[_Node], dot: Any, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.text)
        elif node.kind == "out":
            out.append(_go_str(_eval(node.expr, dot, scope)))
        elif node.kind == "decl":
            scope.frames[-1][node.names[0]] = _eval(node.expr, dot, scope)
        elif node.kind == "assign":
            scope.set(node.names[0], _eval(node.expr, dot, scope))
        elif node.kind == "if":
            branch = node.body if _truth(_eval(node.expr, dot, scope)) else node.orelse
            scope.frames.append({})
            _exec(branch, dot, scope, out)
            scope.frames.pop()
        elif node.kind == "range":
            seq = _eval(node.expr, dot, scope)
            if isinstance(seq, dict):
                pairs = sorted(seq.items())
            elif isinstance(seq, (list, tuple)):
                pairs = list(enumerate(seq))
            elif seq is None:
                pairs = []
            else:
                raise GoTemplateError(f"range can't iterate over {type(seq).__name__}")
            if not pairs:
                scope.frames.append({})
                _exec(node.orelse, dot, scope, out)
                scope.frames.pop()
            for key, item in pairs:
                frame: dict[str, Any] = {}
                if len(node.names) == 1:
                    frame[node.names[0]] = item
                elif len(node.names) == 2:
                    frame[node.names[0]], frame[node.names[1]] = key, item
                scope.frames.append(frame)
                _exec(node.body, item, scope, out)
                scope.frames.pop()


def render_go_template(source: str, data: dict[str, Any]) -> str:
    tree = _parse(_lex(source))
    out: list[str] = []
    _exec(tree, data, _Scope(data), out)
    return "".join(out)


def ollama_values(messages: list[dict[str, str]]) -> dict[str, Any]:
    """What Ollama passes a .Messages template (server/template: System = the system messages
    joined, Messages with Role/Content; Prompt and Response empty in this mode)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"System": system, "Prompt": "", "Response": "", "Tools": [],
            "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
