"""Jinja chat template -> Ollama Go template, per model family.

Ollama renders prompts with Go's text/template over ``.System`` and ``.Messages`` (each with
``.Role`` and ``.Content``), not Jinja. Translating arbitrary Jinja is not possible, so we
recognise the family by its control-token markers and emit a Go template written to render
the family's conversation exactly as ``edge_lora.core.chat_template``'s Jinja template does (tests
render both and compare strings). Where one marker covers several layouts (Phi-3 vs Phi-4-mini)
or untranslatable templates (SmolLM3's dated, reasoning-mode system block inside ChatML), the
model's template must render a probe conversation exactly as the chosen family does. An
unrecognised template is refused: a wrong template silently degrades every answer, which is worse
than no Modelfile.

BOS is not in these templates: Ollama adds it while tokenizing (the model's add_bos_token), so
the Jinja side is compared with ``bos_token=""``. ``</s>`` in the Mistral template is the EOS
Ollama tokenizes as a control token, as in Ollama's own mistral templates.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_lora.core.errors import InputError

# Markers are checked in this order: Llama 3 templates may also mention [INST] in comments
# of converted models, never the reverse. A marker names a group of families.
FAMILY_MARKERS: tuple[tuple[str, str], ...] = (
    ("llama3", "<|start_header_id|>"),
    ("chatml", "<|im_start|>"),
    ("gemma", "<start_of_turn>"),
    ("granite", "<|start_of_role|>"),
    ("phi", "<|end|>"),
    ("mistral", "[INST]"),
)

# Groups whose templates differ in ways the marker cannot tell (Phi-3's newlines vs Phi-4-mini's
# none) or that untranslatable templates share (SmolLM3 wraps every system message in a dated
# metadata block inside ChatML markers): the model's own template must render a probe
# conversation exactly as one of these families does, or the family is refused.
VERIFIED_GROUPS: dict[str, tuple[str, ...]] = {"chatml": ("chatml",), "phi": ("phi3", "phi4"),
                                               "granite": ("granite",)}
PROBE_CONVERSATION = (
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Which licence is this?"},
    {"role": "assistant", "content": "Apache-2.0."},
    {"role": "user", "content": "May I copy it?"},
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


_PHI3 = (
    "{{- range .Messages }}<|{{ .Role }}|>\n"
    "{{ .Content }}<|end|>\n"
    "{{ end }}<|assistant|>\n"
)

_PHI4 = "{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>{{ end }}<|assistant|>"

_GRANITE = (
    "{{- range .Messages }}<|start_of_role|>{{ .Role }}<|end_of_role|>{{ .Content }}<|end_of_text|>\n"
    "{{ end }}<|start_of_role|>assistant<|end_of_role|>"
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
    "phi3": GoFamily("phi3", _PHI3, ("<|end|>", "<|user|>", "<|assistant|>", "<|endoftext|>")),
    "phi4": GoFamily("phi4", _PHI4, ("<|end|>", "<|user|>", "<|assistant|>", "<|endoftext|>")),
    "granite": GoFamily("granite", _GRANITE, ("<|end_of_text|>", "<|start_of_role|>")),
}

SUPPORTED_FAMILIES_TEXT = "Llama 3, ChatML/Qwen/SmolLM2, Gemma, Mistral, Phi-3/3.5, Phi-4-mini, Granite"


def detect_family(jinja_template: str) -> str:
    """The family of a Jinja chat template, from the control tokens it emits; for the groups in
    VERIFIED_GROUPS, the family whose own template renders the probe conversation identically."""
    for group, marker in FAMILY_MARKERS:
        if marker in jinja_template or (group == "phi" and "<|' + message['role'] + '|>" in jinja_template):
            return _verified(jinja_template, group) if group in VERIFIED_GROUPS else group
    raise InputError(
        "the model's chat template is not one of the families edge-lora can translate to an Ollama "
        f"Go template ({SUPPORTED_FAMILIES_TEXT})",
        fix="write the TEMPLATE for this model by hand (see Ollama's docs/template.md) or use a model "
            "of a supported family")


def _verified(jinja_template: str, group: str) -> str:
    from edge_lora.core.chat_template import FAMILY_TEMPLATES, render_chat
    from edge_lora.core.errors import RequestError

    try:
        rendered = render_chat(jinja_template, list(PROBE_CONVERSATION), bos_token="", eos_token="")
    except RequestError as exc:
        raise InputError(f"the model's chat template cannot render a conversation with a system message "
                         f"({exc.message})", fix="write the TEMPLATE for this model by hand") from exc
    for family in VERIFIED_GROUPS[group]:
        if rendered == render_chat(FAMILY_TEMPLATES[family], list(PROBE_CONVERSATION)):
            return family
    expected = render_chat(FAMILY_TEMPLATES[VERIFIED_GROUPS[group][0]], list(PROBE_CONVERSATION))
    at = next((i for i, (a, b) in enumerate(zip(rendered, expected)) if a != b), min(len(rendered), len(expected)))
    raise InputError(
        f"the model's chat template uses {group} markers but renders a conversation differently from every "
        f"{group} format edge-lora translates (from {rendered[max(0, at - 20):at + 40]!r}; e.g. a dated or "
        "reasoning-mode system block, which an Ollama template cannot reproduce)",
        fix="write the TEMPLATE for this model by hand (see Ollama's docs/template.md)")


def go_family(name: str) -> GoFamily:
    try:
        return GO_FAMILIES[name]
    except KeyError:
        raise InputError(f"no Ollama template for the chat family {name!r}",
                         fix=f"supported families: {SUPPORTED_FAMILIES_TEXT}") from None


def family_for_jinja(jinja_template: str) -> GoFamily:
    return go_family(detect_family(jinja_template))
