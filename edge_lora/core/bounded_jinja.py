"""A Jinja sandbox whose renders are bounded in time, output and memory.

jinja2's ImmutableSandboxedEnvironment stops a template from reaching Python internals, but not
from hanging or exhausting memory: ``{{ 'a' * 10**10 }}`` is folded at compile time into a 10 GB
string, nested ``range(100000)`` loops run for hours, ``{{ ([s] * 100000) | string }}``
stringifies 100,000 references to one big string. Chat templates come from model files, so a
render here is bounded four ways, all reported as ``TemplateLimitError``:

- time: a deadline, checked at every loop iteration, call, filter, operator, attribute or item
  access and output — the points between which a template can only do bounded work;
- output: the rendered text streams out of ``Template.generate`` and stops at ``max_chars``;
- memory: no string larger than ``max_chars`` or list longer than ``MAX_ITEMS`` is built — the
  growing operations (``*``, ``+``, ``%``, ``**``, ``~``, padding and joining filters and
  methods, stringifying a container) are checked *before* they allocate — and all the text a
  render produces (output, buffered macro output, concatenations, filter and call results) is
  charged to a budget of ``WORK_FACTOR * max_chars`` characters;
- loops: ``MAX_LOOP_ITERATIONS`` per render;
- structure: every list, tuple or dict a template creates (literals, operators, filter and call
  results, a macro's ``varargs``) holds at most ``MAX_DEEP_ITEMS`` items counted through nested
  containers, shared ones once per reference. Without this, ``x = [[1] * 10**5] * 10**5`` is
  cheap to build but comparing, sorting or hashing it runs 10**10 steps inside C, where no
  deadline can interrupt it; with it, every comparison, hash and sort costs at most that bound.

How: operators are intercepted (``intercepted_binops``, which also stops compile-time folding),
every call goes through ``call``, every filter is wrapped (``pass_context``, so none is folded at
compile time either), ``finalize`` sees every ``{{ }}`` output, and the parsed template is
rewritten so every ``for`` iterates through a counting generator and every ``~`` goes through
a checked join. The budget of the render in progress lives in a ContextVar, so concurrent
renders (server threads) each have their own.
"""

from __future__ import annotations

import contextvars
import inspect
import itertools
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from jinja2 import nodes, pass_context
from jinja2.filters import make_attrgetter
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

from edge_lora.core.errors import TemplateLimitError

# The rendered prompt: 128K tokens are ~0.5M characters; 4M leaves room for any real context.
MAX_RENDERED_CHARS = 4_000_000
RENDER_SECONDS = 2.0
WORK_FACTOR = 8  # characters produced per rendered character (Gemma's template: ~3)
MAX_ITEMS = 100_000  # the sandbox's own range() cap
MAX_LOOP_ITERATIONS = 1_000_000
MAX_INT_BITS = 4096
MAX_DEEP_ITEMS = 1_000_000
MAX_JSON_INDENT = 64
# Filters written in pure Python (no hook runs inside them) take at most this much text.
MAX_SLOW_FILTER_CHARS = 200_000
_SLOW_FILTERS = frozenset({"wordwrap", "urlize", "pprint"})
# A string inside a container, repr'd or JSON-encoded, can take 12 characters a character
# (an astral character as a surrogate pair of \u escapes).
_REPR_FACTOR = 12


@dataclass
class RenderBudget:
    deadline: float
    seconds: float
    max_chars: int
    work_left: int
    max_iterations: int = MAX_LOOP_ITERATIONS
    iterations_left: int = MAX_LOOP_ITERATIONS

    @classmethod
    def start(cls, max_chars: int = MAX_RENDERED_CHARS, seconds: float = RENDER_SECONDS,
              loop_iterations: int = MAX_LOOP_ITERATIONS) -> RenderBudget:
        return cls(time.monotonic() + seconds, seconds, max_chars, WORK_FACTOR * max_chars,
                   loop_iterations, loop_iterations)

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"the chat template ran longer than {self.seconds:g} s and was stopped",
                                     fix="use a model whose chat template is trustworthy")

    def charge(self, chars: int) -> None:
        self.work_left -= chars
        if self.work_left < 0:
            raise TemplateLimitError(
                f"the chat template produced more than {WORK_FACTOR * self.max_chars:,} characters and was stopped",
                fix="use a model whose chat template is trustworthy, or a shorter conversation")


_budget: contextvars.ContextVar[RenderBudget | None] = contextvars.ContextVar("edge_lora_render_budget", default=None)


def active_budget() -> contextvars.ContextVar[RenderBudget | None]:
    """The ContextVar a caller sets (``token = active_budget().set(budget)``) around a render."""
    return _budget


def _too_big(what: str) -> TemplateLimitError:
    return TemplateLimitError(f"the chat template tried to build {what} and was stopped",
                              fix="use a model whose chat template is trustworthy")


def _max_chars() -> int:
    budget = _budget.get()
    return budget.max_chars if budget is not None else MAX_RENDERED_CHARS


def _tick() -> None:
    budget = _budget.get()
    if budget is not None:
        budget.tick()


_CONTAINERS = (dict, list, tuple, set, frozenset, Namespace)


def _members(item: Any) -> Iterable[Any]:
    if isinstance(item, dict):
        return itertools.chain(item.keys(), item.values())
    if isinstance(item, Namespace):
        return (getattr(item, "_Namespace__attrs", {}),)
    return item  # type: ignore[no-any-return]


def _tree_total(value: Any, limit: int, own: Callable[[Any], int], leaf: Callable[[Any], int]) -> int:
    """``own(container)`` plus ``leaf(x)`` of every non-container member, summed through
    nested containers as if each reference were a copy — but each distinct container is
    walked once (memoized by identity), so ``[[s] * 10**5] * 10**5`` costs 2 x 10**5 steps, not
    10**10. Stops once past ``limit``. Iterative: nesting depth is free. (Templates cannot
    build cycles: the sandbox is immutable.)"""
    if not isinstance(value, _CONTAINERS):
        return leaf(value)
    totals: dict[int, int] = {}
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        item, expanded = stack.pop()
        if id(item) in totals:
            continue
        if not expanded:
            stack.append((item, True))
            stack.extend((m, False) for m in _members(item) if isinstance(m, _CONTAINERS) and id(m) not in totals)
            continue
        total = own(item)
        for member in _members(item):
            total += totals[id(member)] if isinstance(member, _CONTAINERS) else leaf(member)
            if total > limit:
                return total
        totals[id(item)] = total
    return totals[id(value)]


def _text_leaf(item: Any) -> int:
    # A repr'd or JSON-encoded string: quotes and escapes (see _REPR_FACTOR).
    if isinstance(item, str):
        return _REPR_FACTOR * len(item) + 2
    if isinstance(item, (bytes, bytearray)):
        return 4 * len(item) + 3
    if isinstance(item, bool) or item is None:
        return 5
    if isinstance(item, int):
        return item.bit_length() // 3 + 2
    if isinstance(item, float):
        return 25
    return 64  # Undefined, macros, loop objects, cyclers: short reprs


def _text_own(item: Any) -> int:
    return 16 if isinstance(item, Namespace) else 2 + 4 * len(item)


def _weight(value: Any, limit: int) -> int:
    """An upper bound on ``len(str(value))``, computed without building it."""
    if isinstance(value, str):
        return len(value)
    return _tree_total(value, limit, _text_own, _text_leaf)


def _deep_own(item: Any) -> int:
    return 0 if isinstance(item, Namespace) else len(item)


def _no_items(_leaf: Any) -> int:
    return 0


def _deep_items(value: Any, limit: int) -> int:
    """Items of ``value`` counted through nested containers, a shared one once per reference:
    what comparing, hashing, sorting or copying it costs."""
    return _tree_total(value, limit, _deep_own, _no_items)


def _check_deep(value: Any) -> None:
    if _deep_items(value, MAX_DEEP_ITEMS) > MAX_DEEP_ITEMS:
        raise _too_big(f"a structure of more than {MAX_DEEP_ITEMS:,} nested items")


def _check_chars(what: str, chars: int) -> None:
    if chars > _max_chars():
        raise _too_big(f"{what} of more than {_max_chars():,} characters")


def _check_weight(value: Any, what: str = "a string") -> int:
    limit = _max_chars()
    weight = _weight(value, limit)
    if weight > limit:
        raise _too_big(f"{what} of more than {limit:,} characters")
    return weight


def _check_items(n: int) -> None:
    if n > MAX_ITEMS:
        raise _too_big(f"a list of more than {MAX_ITEMS:,} items")


def _charge_result(result: Any) -> Any:
    """A new object's size: capped, and charged to the render's budget."""
    if isinstance(result, (str, bytes, bytearray)):
        _check_chars("a string", len(result))
        size = len(result)
    elif isinstance(result, (list, tuple, dict, set, frozenset)):
        _check_items(len(result))
        _check_deep(result)
        size = len(result)
    else:
        return result
    budget = _budget.get()
    if budget is not None:
        budget.charge(size)
    return result


# --- format strings: '%09999999d' % 1 and '{:>9999999}'.format(1) allocate before returning ---
_NUMBER = re.compile(r"\d+")
_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _field_widths(fmt: str, braces: bool) -> Iterator[str]:
    """The widths and precisions written in ``fmt``'s fields (%-style or str.format-style)."""
    if braces:
        for _literal, _field, spec, _conversion in string.Formatter().parse(fmt):
            if spec:
                yield from _NUMBER.findall(spec)
    else:
        for match in _PERCENT_FIELD.finditer(fmt):
            yield from (g for g in match.groups() if g and g != "*")


def _check_format(fmt: str, args: Iterable[Any], braces: bool) -> None:
    limit = _max_chars()
    values = list(args)
    if any(len(w) > 9 or int(w) > limit for w in _field_widths(fmt, braces)) or any(
            isinstance(v, int) and abs(v) > limit for v in values):  # '*' and '{:{}}' widths come from args
        raise _too_big(f"a formatted field wider than {limit:,} characters")
    _check_chars("a formatted string", len(fmt) + sum(_check_weight(v) for v in values))


def _format_args(args: Any) -> list[Any]:
    if isinstance(args, tuple):
        return list(args)
    if isinstance(args, dict):
        return list(args.values())
    return [args]


# --- operators -----------------------------------------------------------------------------------

def _check_binop(operator: str, left: Any, right: Any) -> None:
    sequences = (str, bytes, list, tuple)
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, sequences) and isinstance(n, int):
                if isinstance(seq, (str, bytes)):
                    _check_chars("a string", len(seq) * max(n, 0))
                else:
                    _check_items(len(seq) * max(n, 0))
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _too_big(f"an integer of more than {MAX_INT_BITS} bits")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if left.bit_length() * right > MAX_INT_BITS:
                raise _too_big(f"an integer of more than {MAX_INT_BITS} bits")
    elif operator == "+":
        if isinstance(left, (str, bytes)) and isinstance(right, (str, bytes)):
            _check_chars("a string", len(left) + len(right))
        elif isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
            _check_items(len(left) + len(right))
    elif operator == "%" and isinstance(left, str):
        _check_format(left, _format_args(right), braces=False)


# --- methods called on strings -------------------------------------------------------------------

def _replaced_length(text: Any, old: Any, new: Any, count: Any = -1) -> int:
    if not (isinstance(text, str) and isinstance(old, str) and isinstance(new, str)):
        return 0
    hits = len(text) + 1 if old == "" else text.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * (len(new) - len(old))


def _joined_length(separator: Any, items: Iterable[Any]) -> int:
    values = list(items)
    _check_items(len(values))
    sep = len(separator) if isinstance(separator, str) else _weight(separator, _max_chars())
    return sum(_check_weight(v) for v in values) + sep * max(len(values) - 1, 0)


def _check_str_method(name: str, text: str | bytes, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if name in ("ljust", "rjust", "center", "zfill") and args and isinstance(args[0], int):
        _check_chars("a padded string", args[0])
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int):
            _check_chars("a string", len(text) * max(size, 1))
    elif name == "replace" and len(args) >= 2:
        _check_chars("a string", _replaced_length(text, *args[:3], *([kwargs["count"]] if "count" in kwargs else [])))
    elif name == "join" and args:
        _check_chars("a joined string", _joined_length(text, args[0]))
    elif name in ("format", "format_map") and isinstance(text, str):
        _check_format(text, [*args, *(a for m in args if isinstance(m, dict) for a in m.values()), *kwargs.values()],
                      braces=True)


# --- filters -------------------------------------------------------------------------------------

# Filters that never turn their input into text (they count, pick, sort or regroup it): the
# others may stringify a container, so its text size is checked first.
_STRUCTURAL_FILTERS = frozenset({
    "abs", "attr", "batch", "count", "d", "default", "dictsort", "first", "float", "groupby", "int",
    "items", "last", "length", "list", "map", "max", "min", "random", "reject", "rejectattr", "reverse",
    "round", "select", "selectattr", "slice", "sort", "sum", "unique",
})


# Filters whose arguments _filter_precheck reads (binding arguments costs ~10 us a call).
_PARAMETER_CHECKED = frozenset({"center", "indent", "tojson", "batch", "slice", "wordwrap", "replace", "join",
                                "format", "sum"})


def _filter_precheck(name: str, params: dict[str, Any]) -> None:
    value = params.get("value", params.get("s"))
    if name == "center":
        width = params.get("width", 80)
        if isinstance(width, int):
            _check_chars("a padded string", width)
    elif name == "indent":
        width = params.get("width", 4)
        indent = width if isinstance(width, int) else len(str(width))
        text = str(value) if isinstance(value, str) else ""
        _check_chars("an indented string", len(text) + max(indent, 0) * (text.count("\n") + 1))
    elif name == "tojson":
        indent = params.get("indent")
        if isinstance(indent, int) and indent > MAX_JSON_INDENT or isinstance(indent, str) and len(indent) > MAX_JSON_INDENT:
            raise _too_big(f"JSON indented by more than {MAX_JSON_INDENT}")
    elif name in ("batch", "slice"):
        count = params.get("linecount", params.get("slices"))
        if isinstance(count, int):
            _check_items(count)
    elif name == "wordwrap":
        text, width = str(value or ""), params.get("width", 79)
        wrap = params.get("wrapstring") or "\n"
        if isinstance(width, int) and isinstance(wrap, str):
            lines = len(text) // max(width, 1) + text.count("\n") + 1
            _check_chars("a wrapped string", len(text) + lines * len(wrap))
    elif name == "replace":
        _check_chars("a string", _replaced_length(value, params.get("old"), params.get("new"),
                                                   params.get("count") if params.get("count") is not None else -1))
    elif name == "join":
        _check_chars("a joined string", _joined_length(params.get("d", ""), params["items"]))
    elif name == "sum":
        items = value if isinstance(value, (list, tuple)) else []
        start = params.get("start", 0)
        if isinstance(start, (list, tuple)) or any(isinstance(v, (list, tuple)) for v in items):
            # sum() concatenates sequences one by one: it copies every prefix again
            running = copied = len(start) if isinstance(start, (list, tuple)) else 0
            for v in items:
                running += len(v) if isinstance(v, (list, tuple)) else 1
                copied += running
            if copied > 10 * MAX_DEEP_ITEMS:
                raise _too_big("a sum of lists that copies more than 10,000,000 items")
    elif name == "format" and isinstance(value, str):
        _check_format(value, [*params.get("args", ()), *params.get("kwargs", {}).values()], braces=False)
    if name in _SLOW_FILTERS and _weight(value, MAX_SLOW_FILTER_CHARS) > MAX_SLOW_FILTER_CHARS:
        raise _too_big(f"{name} output from more than {MAX_SLOW_FILTER_CHARS:,} characters")
    if name not in _STRUCTURAL_FILTERS and name not in ("join", "format"):
        _check_weight(value)


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    pass_arg = getattr(getattr(func, "jinja_pass_arg", None), "name", None)
    try:
        signature: inspect.Signature | None = inspect.signature(func)
    except (TypeError, ValueError):
        signature = None
    skip_first = pass_arg is not None

    @pass_context  # never run at compile time (jinja folds only filters without context)
    def bounded(context: Context, value: Any, *args: Any, **kwargs: Any) -> Any:
        _tick()
        params: dict[str, Any] = {"value": value}
        if signature is not None and name in _PARAMETER_CHECKED:
            try:
                bound = signature.bind_partial(*([None] if skip_first else []), value, *args, **kwargs)
                params = dict(bound.arguments)
                params.setdefault("value", value)
            except TypeError:
                pass  # jinja reports the bad call itself
        if name == "join":  # weigh what is joined: the items, or the attribute taken from each
            if not isinstance(value, (list, tuple, str, dict)):
                value = list(value)  # a map/select generator, consumed once: hand the filter the list
            attribute = params.get("attribute")
            getter = make_attrgetter(context.environment, attribute) if attribute is not None else None
            params["items"] = [getter(v) for v in value] if getter is not None else list(value)
        _filter_precheck(name, params)
        if pass_arg == "context":
            result = func(context, value, *args, **kwargs)
        elif pass_arg == "eval_context":
            result = func(context.eval_ctx, value, *args, **kwargs)
        elif pass_arg == "environment":
            result = func(context.environment, value, *args, **kwargs)
        else:
            result = func(value, *args, **kwargs)
        return _charge_result(result)

    return bounded


LOOP_FILTER = "_edge_lora_bounded_loop"
CONCAT_FILTER = "_edge_lora_bounded_concat"
LITERAL_FILTER = "_edge_lora_bounded_literal"


@pass_context
def _bounded_loop(context: Context, iterable: Any, static_chars: int) -> Iterator[Any]:
    budget = _budget.get()
    for item in iterable:
        if budget is not None:
            budget.tick()
            budget.iterations_left -= 1
            if budget.iterations_left < 0:
                raise TemplateLimitError(
                    f"the chat template ran more than {budget.max_iterations:,} loop iterations and was stopped",
                    fix="use a model whose chat template is trustworthy")
            budget.charge(static_chars)  # the body's literal text, output once an iteration
        yield item


@pass_context
def _bounded_concat(context: Context, parts: list[Any]) -> str:
    _tick()
    _check_chars("a string", sum(_check_weight(p) for p in parts))
    return _charge_result("".join(str(p) for p in parts))


@pass_context
def _bounded_literal(context: Context, value: Any) -> Any:
    """A list, tuple or dict literal: ``[y, y, y, y]`` nests ``y`` four times."""
    _tick()
    _check_deep(value)
    return value


@pass_context
def _finalize(context: Context, value: Any) -> Any:
    budget = _budget.get()
    if budget is not None:
        budget.tick()
        budget.charge(_check_weight(value, "output"))
    return value


def _literal_chars(body: list[nodes.Node]) -> int:
    """Characters of literal text a loop body outputs on one iteration (nested loops charge
    their own)."""
    total = 0
    stack: list[nodes.Node] = list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, nodes.TemplateData):
            total += len(node.data)
        elif isinstance(node, nodes.For):
            stack.extend(node.else_)
        else:
            stack.extend(node.iter_child_nodes())
    return total


class _Bounding(NodeTransformer):
    """Every ``for`` iterates through LOOP_FILTER, every ``~`` is CONCAT_FILTER, every list,
    tuple or dict literal passes LITERAL_FILTER."""

    def _literal(self, node: nodes.Expr) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Filter(node, LITERAL_FILTER, [], [], None, None, lineno=node.lineno)

    def visit_List(self, node: nodes.List) -> nodes.Node:
        return self._literal(node)

    def visit_Dict(self, node: nodes.Dict) -> nodes.Node:
        return self._literal(node)

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        if node.ctx != "load":  # an assignment target ({% for a, b in ... %}), not a value
            return self.generic_visit(node)  # type: ignore[no-any-return]
        return self._literal(node)

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, LOOP_FILTER, [nodes.Const(_literal_chars(node.body))], [],
                                 None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), CONCAT_FILTER, [], [], None, None,
                            lineno=node.lineno)


class BoundedSandboxEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(finalize=_finalize, **options)
        self.filters = {name: _bounded_filter(name, func) for name, func in self.filters.items()}
        self.filters[LOOP_FILTER] = _bounded_loop
        self.filters[CONCAT_FILTER] = _bounded_concat
        self.filters[LITERAL_FILTER] = _bounded_literal
        # lipsum(n=10**6) runs a pure-Python loop no hook can interrupt; no chat template uses it.
        self.globals.pop("lipsum", None)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        return _Bounding().visit(super()._parse(source, name, filename))  # type: ignore[no-any-return]

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _tick()
        _check_binop(operator, left, right)
        return _charge_result(super().call_binop(context, operator, left, right))

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _tick()
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(method, "__self__", None)
        if isinstance(owner, (str, bytes)):
            _check_str_method(getattr(method, "__name__", ""), owner, args, kwargs)
        _check_deep((args, kwargs))  # a macro keeps extra arguments as varargs / kwargs
        return _charge_result(super().call(__context, __obj, *args, **kwargs))
