"""Jinja chat template -> Ollama Go template, per model family.

Ollama renders prompts with Go's text/template over ``.System`` and ``.Messages`` (each with
``.Role`` and ``.Content``), not Jinja. Translating arbitrary Jinja is not possible, so we
recognise the family by its control-token markers and emit a Go template written to render
the family's conversation exactly as ``edge_lora.core.chat_template``'s Jinja template does (tests
render both and compare strings). An unrecognised template is refused: a wrong template
silently degrades every answer, which is worse than no Modelfile.

BOS is not in these templates: Ollama adds it while tokenizing (the model's add_bos_token), so
the Jinja side is compared with ``bos_token=""``. ``</s>`` in the Mistral template is the EOS
Ollama tokenizes as a control token, as in Ollama's own mistral templates.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_lora.core.errors import InputError

# Markers are checked in this order: Llama 3 templates may also mention [INST] in comments
# of converted models, never the reverse.
FAMILY_MARKERS: tuple[tuple[str, str], ...] = (
    ("llama3", "<|start_header_id|>"),
    ("chatml", "<|im_start|>"),
    ("gemma", "<start_of_turn>"),
    ("mistral", "[INST]"),
)

# The first message, when it is a system message, becomes a prefix of the next turn (Gemma and
# Mistral have no system role); `$prefix` carries it one turn, as Jinja's `loop.first` does.
_GEMMA = (
    '{{- $prefix := "" }}\n'
    "{{- range $i, $m := .Messages }}\n"
    '{{- if and (eq $i 0) (eq $m.Role "system") }}\n'
    '{{- $prefix = printf "%s\\n\\n" $m.Content }}\n'
    '{{- else }}<start_of_turn>{{ if eq $m.Role "assistant" }}model{{ else }}{{ $m.Role }}{{ end }}\n'
    "{{ $prefix }}{{ $m.Content }}<end_of_turn>\n"
    '{{ $prefix = "" }}\n'
    "{{- end }}\n"
    "{{- end }}<start_of_turn>model\n"
)

_CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)

_LLAMA3 = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n"
    "\n"
    "{{ .Content }}<|eot_id|>\n"
    "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n"
    "\n"
)

_MISTRAL = (
    '{{- $prefix := "" }}\n'
    "{{- range $i, $m := .Messages }}\n"
    '{{- if and (eq $i 0) (eq $m.Role "system") }}\n'
    '{{- $prefix = printf "%s\\n\\n" $m.Content }}\n'
    "{{- else }}\n"
    '{{- if eq $m.Role "user" }}[INST] {{ $prefix }}{{ $m.Content }} [/INST]\n'
    '{{- else if eq $m.Role "assistant" }}{{ $m.Content }}</s>\n'
    "{{- end }}\n"
    '{{- $prefix = "" }}\n'
    "{{- end }}\n"
    "{{- end }}"
)


@dataclass(frozen=True)
class GoFamily:
    name: str
    go_template: str
    stop: tuple[str, ...]  # strings that end the assistant's turn (PARAMETER stop)


GO_FAMILIES: dict[str, GoFamily] = {
    "gemma": GoFamily("gemma", _GEMMA, ("<end_of_turn>",)),
    "chatml": GoFamily("chatml", _CHATML, ("<|im_end|>", "<|im_start|>")),
    "llama3": GoFamily("llama3", _LLAMA3, ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")),
    "mistral": GoFamily("mistral", _MISTRAL, ("[INST]", "[/INST]", "</s>")),
}

SUPPORTED_FAMILIES_TEXT = "Llama 3, ChatML/Qwen, Gemma, Mistral"


def detect_family(jinja_template: str) -> str:
    """The family of a Jinja chat template, from the control tokens it emits."""
    for family, marker in FAMILY_MARKERS:
        if marker in jinja_template:
            return family
    raise InputError(
        "the model's chat template is not one of the families edge-lora can translate to an Ollama "
        f"Go template ({SUPPORTED_FAMILIES_TEXT})",
        fix="write the TEMPLATE for this model by hand (see Ollama's docs/template.md) or use a model "
            "of a supported family")


def go_family(name: str) -> GoFamily:
    try:
        return GO_FAMILIES[name]
    except KeyError:
        raise InputError(f"no Ollama template for the chat family {name!r}",
                         fix=f"supported families: {SUPPORTED_FAMILIES_TEXT}") from None


def family_for_jinja(jinja_template: str) -> GoFamily:
    return go_family(detect_family(jinja_template))
