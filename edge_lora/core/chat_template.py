"""Chat templates: rendered only in Jinja's ImmutableSandboxedEnvironment, because a template
read from a GGUF file is untrusted code (llama-cpp-python CVE-2024-34359). Models without a
template (the real Gemma 3 270M GGUF has none) get their family's well-known format."""

from __future__ import annotations

import datetime
import functools
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jinja2

from edge_lora.core.bounded_jinja import (MAX_LOOP_ITERATIONS, MAX_RENDERED_CHARS, RENDER_SECONDS,
                                         BoundedSandboxEnvironment, RenderBudget, active_budget)
from edge_lora.core.errors import EdgeLoraError, RequestError, TemplateLimitError

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ ((first_user_prefix if loop.first else '') ~ message['content']) | trim }}"
    "<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}[INST] {{ (system if loop.first else '') ~ message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

# Phi-3 / Phi-3.5: role markers on their own line; Phi-4-mini: the same markers without newlines.
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

PHI4_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

GRANITE_TEMPLATE = (
    "{% for message in messages %}"
    "<|start_of_role|>{{ message['role'] }}<|end_of_role|>{{ message['content'] }}<|end_of_text|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>{% endif %}"
)

# Last resort for an unknown family with no template: plain role-prefixed turns.
PLAIN_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

FAMILY_TEMPLATES: dict[str, str] = {
    "gemma": GEMMA_TEMPLATE, "chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE,
    "mistral": MISTRAL_TEMPLATE, "phi3": PHI3_TEMPLATE, "phi4": PHI4_TEMPLATE, "granite": GRANITE_TEMPLATE,
    "plain": PLAIN_TEMPLATE,
}

ROLES = ("system", "user", "assistant")


class TemplateModel(Protocol):
    """What template_for needs from a model (LlamaModel satisfies it)."""

    @property
    def chat_template(self) -> str | None: ...
    @property
    def architecture(self) -> str: ...
    def token_id(self, text: str) -> int | None: ...


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    family: str  # "gguf" when read from the model, else the fallback family name


def family_for(architecture: str, has_token: Any) -> str:
    """Pick a fallback family from the architecture and the special tokens the vocabulary has."""
    arch = architecture.lower()
    if arch.startswith("gemma"):
        return "gemma"
    if has_token("<|im_start|>"):
        return "chatml"
    if has_token("<|start_header_id|>"):
        return "llama3"
    if arch in ("llama", "mistral") and has_token("[INST]"):
        return "mistral"
    if arch in ("qwen2", "qwen3"):
        return "chatml"
    if arch in ("llama", "mistral"):
        return "mistral"
    return "plain"


def template_for(model: TemplateModel) -> ChatTemplate:
    embedded = model.chat_template
    if embedded and embedded.strip():
        return ChatTemplate(embedded, "gguf")
    family = family_for(model.architecture, lambda t: model.token_id(t) is not None)
    return ChatTemplate(FAMILY_TEMPLATES[family], family)


def normalize_messages(messages: Any) -> list[dict[str, str]]:
    """Check OpenAI-style messages; content may be a string or a list of text parts."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects")
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise RequestError(f"messages[{i}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise RequestError(f"messages[{i}].content parts must be text parts")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


def _raise_exception(message: str) -> None:
    raise RequestError(f"the chat template refused the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


# The same settings Hugging Face transformers renders chat templates with, so templates written
# for it (HF tokenizer_config.json -> GGUF tokenizer.chat_template) render identically; bounded
# in time, output and memory (core.bounded_jinja).
_environment = BoundedSandboxEnvironment(trim_blocks=True, lstrip_blocks=True,
                                         extensions=["jinja2.ext.loopcontrols"])
_environment.globals["raise_exception"] = _raise_exception
_environment.globals["strftime_now"] = _strftime_now


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    # Compiling Gemma's template takes ~3 ms, rendering it ~0.02 ms: compile once per template.
    return _environment.from_string(template)


def render_chat(template: str, messages: Any, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", *, max_chars: int = MAX_RENDERED_CHARS,
                seconds: float = RENDER_SECONDS, loop_iterations: int = MAX_LOOP_ITERATIONS) -> str:
    """Render ``messages`` with ``template`` in the sandbox: at most ``max_chars`` characters
    of output, ``seconds`` of time, ``loop_iterations`` loop iterations (TemplateLimitError
    past any); any failure of the template is a RequestError."""
    return _render(template, normalize_messages(messages), add_generation_prompt, bos_token, eos_token,
                   max_chars=max_chars, seconds=seconds, loop_iterations=loop_iterations)


def _render(template: str, checked: list[dict[str, str]], add_generation_prompt: bool,
            bos_token: str, eos_token: str, *, max_chars: int = MAX_RENDERED_CHARS,
            seconds: float = RENDER_SECONDS, loop_iterations: int = MAX_LOOP_ITERATIONS) -> str:
    budget = RenderBudget.start(max_chars, seconds, loop_iterations)
    token = active_budget().set(budget)
    try:
        compiled = _compiled(template)
        parts: list[str] = []
        produced = 0
        stream = compiled.generate(messages=checked, add_generation_prompt=add_generation_prompt,
                                   bos_token=bos_token, eos_token=eos_token)
        try:
            for part in stream:  # streamed, so a runaway template stops at the cap
                produced += len(part)
                if produced > max_chars:
                    raise TemplateLimitError(
                        f"the chat template rendered more than {max_chars:,} characters and was stopped",
                        fix="use a model whose chat template is trustworthy, or a shorter conversation")
                budget.tick()
                parts.append(part)
        finally:
            stream.close()
        return "".join(parts)
    except EdgeLoraError:
        raise
    except jinja2.exceptions.SecurityError as exc:
        raise RequestError(f"the chat template tried an unsafe operation and was stopped: {exc}",
                           fix="use a model whose chat template is trustworthy") from exc
    except jinja2.TemplateError as exc:
        raise RequestError(f"the chat template could not be rendered: {exc}",
                           fix="check the messages, or use a model with a working chat template") from exc
    except (MemoryError, RecursionError) as exc:
        raise TemplateLimitError(f"the chat template ran out of {'memory' if isinstance(exc, MemoryError) else 'stack'}"
                                 " and was stopped", fix="use a model whose chat template is trustworthy") from exc
    except Exception as exc:  # the template is untrusted code: any failure is its failure, not ours
        raise RequestError(f"the chat template failed: {type(exc).__name__}: {exc}",
                           fix="use a model with a working chat template") from exc
    finally:
        active_budget().reset(token)


# A message's content, as the template wrote it into the prompt (is_content=True), or the
# template's own text around it (False). Joined, the parts are exactly render_chat's output.
ChatPart = tuple[str, bool]


def render_chat_parts(template: str, messages: Any, add_generation_prompt: bool = True,
                      bos_token: str = "", eos_token: str = "") -> tuple[str, list[ChatPart] | None]:
    """The rendered prompt and where each message's content lies in it, so the caller can
    tokenize the template's markup (control tokens) apart from user text (plain text only).

    The template is rendered twice: with the real contents, and with each content replaced by a
    unique sentinel (private-use characters and digits, which `trim`/`upper` leave alone).
    Splitting the sentinel rendering gives the template's text between contents; the real
    rendering must be those pieces with each content (or its trimmed form, for templates that
    `| trim`) in between. A template that changes content in any other way (splits it, tests it,
    drops characters) gives None for the parts: the caller then cannot tell markup from content."""
    checked = normalize_messages(messages)
    text = _render(template, checked, add_generation_prompt, bos_token, eos_token)
    contents = [m["content"] for m in checked]
    nonce = "".join(secrets.choice("0123456789") for _ in range(12))
    if any(nonce in c for c in contents):  # 1 in 10^12 unless the text quotes it on purpose
        return text, None
    sentinel = re.compile(f"\ue000{nonce}:(\\d+)\ue001")
    marked = [{**m, "content": f"\ue000{nonce}:{i}\ue001"} for i, m in enumerate(checked)]
    try:
        pieces = sentinel.split(_render(template, marked, add_generation_prompt, bos_token, eos_token))
    except RequestError:  # the template tested the content (e.g. refused an empty one)
        return text, None
    return text, _locate_contents(text, pieces[0::2], [contents[int(i)] for i in pieces[1::2]])


def _locate_contents(text: str, markup: list[str], contents: list[str]) -> list[ChatPart] | None:
    """Split ``text`` as markup[0] content[0] markup[1] ... markup[n]; None if it is not that."""
    if not text.startswith(markup[0]):
        return None
    parts: list[ChatPart] = [(markup[0], False)]
    pos = len(markup[0])
    for content, after in zip(contents, markup[1:]):
        for written in dict.fromkeys((content, content.strip(), content.rstrip(), content.lstrip())):
            end = pos + len(written)
            if text.startswith(written, pos) and text.startswith(after, end):
                break
        else:
            return None
        parts += [(written, True), (after, False)]
        pos = end + len(after)
    return [(piece, is_content) for piece, is_content in parts if piece] if pos == len(text) else None
