"""Chat templates come from model files: a hostile one is stopped in bounded time and memory
with a typed error (TemplateLimitError), while real templates render exactly as in jinja's
plain sandbox."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_lora.core.chat_template import FAMILY_TEMPLATES, render_chat
from edge_lora.core.errors import RequestError, TemplateLimitError

MESSAGES = [{"role": "user", "content": "hi"}]
SECONDS = 0.5
# Each could take hours or gigabytes without the bounds; some fail in C where no hook runs.
HOSTILE: dict[str, str] = {
    "repeat_10GB": "{{ 'a' * 10**10 }}",
    "repeat_literal": "{{ 'a' * 10000000000 }}",
    "power": "{{ 9 ** (9 ** 9) }}",
    "int_squaring": "{% set ns = namespace(n=3) %}{% for i in range(100) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
    "range_1e9": "{% for i in range(10**9) %}x{% endfor %}",
    "nested_loops_silent": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested_loops_output": "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx{% endfor %}{% endfor %}",
    "buffered_output": "{% filter upper %}{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}"
                       "{% endfor %}{% endfilter %}",
    "string_loops": "{% set s = 'a' * 1000000 %}{% for c in s %}{% for d in s %}{% endfor %}{% endfor %}",
    "concat_doubling": "{% set ns = namespace(s='a') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "plus_doubling": "{% set ns = namespace(s='a') %}{% for i in range(100) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "replace_squaring": "{% set ns = namespace(s='a' * 1000) %}{% for i in range(10) %}"
                        "{% set ns.s = ns.s.replace('a', ns.s) %}{% endfor %}",
    "center": "{{ 'a' | center(1000000000) }}",
    "ljust": "{{ 'a'.ljust(1000000000) }}",
    "str_format_width": "{{ '{:>1000000000}'.format(1) }}",
    "percent_width": "{{ '%01000000000d' % 1 }}",
    "format_filter_width": "{{ '%01000000000d' | format(1) }}",
    "indent": "{% set s = 'a\n' * 1000000 %}{{ s | indent(100000) }}",
    "expandtabs": "{{ ('\t' * 100000).expandtabs(100000) }}",
    "shared_refs_string": "{% set s = 'a' * 1000000 %}{{ ([s] * 100000) | string }}",
    "shared_refs_output": "{% set s = 'a' * 1000000 %}{{ [s] * 100000 }}",
    "shared_refs_join": "{% set s = 'a' * 1000000 %}{{ ([s] * 100000) | join }}",
    "deep_compare": "{% set y1 = [[1] * 100000] * 100000 %}{% set y2 = [[1] * 100000] * 100000 %}{{ y1 == y2 }}",
    "literal_nesting": "{% set a = [1] * 100000 %}{% set b = [a,a,a,a,a,a,a,a,a,a] %}{% set c = [b,b,b,b,b,b,b,b,b,b] %}"
                       "{{ c == c | list }}",
    "tuple_hash": "{% set a = (1,) * 100000 %}{% set b = (a,a,a,a,a,a,a,a,a,a) %}{% set c = (b,b,b,b,b,b,b,b,b,b) %}"
                  "{{ {c: 1} }}",
    "sort_shared": "{% set x = [1] * 1000 %}{{ ([x] * 100000) | sort | length }}",
    "sum_quadratic": "{{ ([[1]] * 100000) | sum(start=[]) }}",
    "varargs_doubling": "{% macro f(n) %}{% if n %}{{ f(n-1, varargs, varargs) }}{% endif %}{% endmacro %}{{ f(60, 1) }}",
    "macro_exponential": "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(40) }}",
    "macro_exponential_silent": "{% macro f(n) %}{% if n %}{% set a = f(n-1) %}{% set b = f(n-1) %}{% endif %}"
                                "{% endmacro %}{{ f(40) }}",
    "call_block_exponential": "{% macro m() %}{{ caller() }}{{ caller() }}{% endmacro %}{% macro f(n) %}{% if n %}"
                              "{% call m() %}{{ f(n-1) }}{% endcall %}{% else %}x{% endif %}{% endmacro %}{{ f(40) }}",
    "macro_recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "tojson_indent": "{% set s = [[[[[[1]]]]]] * 10000 %}{{ s | tojson(indent=100000) }}",
    "wordwrap": "{{ ('a' * 3000000) | wordwrap(1) }}",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_template_stops_in_bounded_time(name: str) -> None:
    # This thread's CPU time: what the render cost, however busy the machine is (the deadline
    # itself is wall-clock, so a loaded machine only makes the render stop with less work done).
    started = time.thread_time()
    with pytest.raises(RequestError) as info:
        render_chat(HOSTILE[name], MESSAGES, seconds=SECONDS)
    elapsed = time.thread_time() - started
    assert elapsed < SECONDS + 2.5, f"{name} took {elapsed:.1f} s of CPU"
    # range(10**9) is the sandbox's own refusal; everything else is ours.
    assert isinstance(info.value, TemplateLimitError) or name == "range_1e9", info.value
    assert len(info.value.one_line().splitlines()) == 1


def test_hostile_templates_stay_in_bounded_memory() -> None:
    """All of them in one fresh process: its peak RSS stays far below what any would take."""
    script = (
        "import json, resource, sys\n"
        "from edge_lora.core.chat_template import render_chat\n"
        "from edge_lora.core.errors import RequestError\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for source in json.loads(sys.stdin.read()):\n"
        "    try:\n"
        "        render_chat(source, [{'role': 'user', 'content': 'hi'}], seconds=0.5)\n"
        "        sys.exit('rendered: ' + source)\n"
        "    except RequestError:\n"
        "        pass\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)\n")
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(list(HOSTILE.values())),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    growth = int(done.stdout.strip())
    assert growth < 400 * 1024 * 1024, f"peak RSS grew {growth / 1e6:.0f} MB"


def test_output_cap_and_custom_limits() -> None:
    source = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    conversation = [{"role": "user", "content": "x" * 1000}] * 10
    assert len(render_chat(source, conversation, max_chars=10_000)) == 10_000
    with pytest.raises(TemplateLimitError, match="more than 9,999 characters"):
        render_chat(source, conversation, max_chars=9_999)

    # Each limit is provoked with the other lifted, so which one a CPU reaches first does not
    # matter (a fast CPU ran the 1,000,000 iterations inside 0.2 s).
    started = time.thread_time()
    with pytest.raises(TemplateLimitError, match="longer than 0.2 s"):
        render_chat(HOSTILE["nested_loops_silent"], MESSAGES, seconds=0.2, loop_iterations=10**12)
    assert time.thread_time() - started < 2.5
    with pytest.raises(TemplateLimitError, match="more than 1,000,000 loop iterations"):
        render_chat(HOSTILE["nested_loops_silent"], MESSAGES, seconds=3600)  # the default iteration limit
    with pytest.raises(TemplateLimitError, match="more than 1,000 loop iterations"):
        render_chat(HOSTILE["nested_loops_silent"], MESSAGES, seconds=3600, loop_iterations=1000)
    loop = "{% for i in range(1000) %}x{% endfor %}"
    assert render_chat(loop, MESSAGES, seconds=3600, loop_iterations=1000) == "x" * 1000


def test_other_template_failures_are_request_errors() -> None:
    with pytest.raises(RequestError, match="ZeroDivisionError"):
        render_chat("{{ 1 / 0 }}", MESSAGES)
    with pytest.raises(RequestError, match="lipsum"):
        render_chat("{{ lipsum(1000000) }}", MESSAGES)  # a pure-Python loop no hook can stop


# A real Hugging Face chat template (Qwen2.5, with tool calls, loops, loop.last, tojson, +).
QWEN25 = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {{- tool_call.arguments | tojson }}\n"
    "        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n")
FEATURES = (
    "{% set ns = namespace(n=0, roles=[]) %}{% macro turn(m, i) %}[{{ i }}:{{ m.role | upper }}]"
    "{{ m.content | trim | truncate(40) }}{% endmacro %}"
    "{% for m in messages if m.role != 'system' %}{{ turn(m, loop.index) }}{% set ns.n = ns.n + m.content | length %}"
    "{% if loop.last %}|last{% endif %}{% endfor %}"
    "{{ messages | map(attribute='role') | unique | join(',') }} {{ ns.n }} {{ {'a': [1, 2], 'b': (3,)} | tojson }}"
    "{{ '%05d|%s' % (ns.n, 'x') }} {{ '{:>6}'.format('r') }} {{ (messages | selectattr('role', 'equalto', 'user') "
    "| list | length) * 2 }} {{ 'a-b-c'.split('-') | reverse | join }} {{ messages[-1]['content'][:5] ~ '…' }}"
    "{% for k, v in {'x': 1, 'y': 2} | dictsort %}{{ k }}={{ v }}{% endfor %}{{ 2 ** 10 }}")


def _conversation(turns: int) -> list[dict[str, str]]:
    out = [{"role": "system", "content": "Be brief."}]
    for i in range(turns):
        out.append({"role": "user", "content": f"question {i} " + "é日🙂 " * (i % 7)})
        out.append({"role": "assistant", "content": f"answer {i}"})
    return out


@pytest.mark.parametrize("name, source", [*FAMILY_TEMPLATES.items(), ("qwen2.5", QWEN25), ("features", FEATURES)])
def test_real_templates_render_as_in_the_plain_sandbox(name: str, source: str) -> None:
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    for conversation in (_conversation(1), _conversation(200)):
        expected = plain.from_string(source).render(messages=conversation, add_generation_prompt=True,
                                                    bos_token="<s>", eos_token="</s>")
        assert render_chat(source, conversation, bos_token="<s>", eos_token="</s>") == expected


def test_a_long_real_conversation_renders_quickly() -> None:
    # ~1.5M characters of conversation: far beyond a 128K-token context, still well in budget.
    conversation = _conversation(1)
    conversation += [{"role": "user", "content": "w" * 500_000}, {"role": "assistant", "content": "ok"}] * 3
    started = time.thread_time()
    text = render_chat(FAMILY_TEMPLATES["gemma"], conversation)
    # CPU time, not wall time: the margin under the default 2 s budget, whatever else runs.
    assert len(text) > 1_500_000 and time.thread_time() - started < 1.0


def test_concurrent_renders_have_their_own_budget() -> None:
    """A server renders in several threads: a hostile render running out of time does not
    charge a legitimate one rendering at the same time."""
    results: dict[str, object] = {}

    def hostile() -> None:
        try:
            # Loops unbounded: it runs its whole second beside the legitimate renders on any CPU.
            render_chat(HOSTILE["nested_loops_silent"], MESSAGES, seconds=1.0, loop_iterations=10**12)
        except TemplateLimitError as exc:
            results["hostile"] = exc

    worker = threading.Thread(target=hostile)
    worker.start()
    for _ in range(200):
        results["legit"] = render_chat(FAMILY_TEMPLATES["chatml"], _conversation(50), max_chars=20_000)
    worker.join()
    assert isinstance(results["hostile"], TemplateLimitError) and "longer than 1 s" in str(results["hostile"])
    assert str(results["legit"]).endswith("<|im_start|>assistant\n")
