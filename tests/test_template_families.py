"""Chat-template families of the newer architectures in the Modelfile step: Phi-3/3.5 and
Phi-4-mini (the same markers, with and without newlines) and Granite are translated to Go
templates that render like the models' own templates; SmolLM3, whose template wraps every system
message in a dated, reasoning-mode metadata block, is refused with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_lora.converters.hf_to_gguf import convert_checkpoint
from edge_lora.core.chat_template import FAMILY_TEMPLATES, render_chat
from edge_lora.core.errors import InputError
from edge_lora.analysis.go_template import GO_FAMILIES, detect_family
from edge_lora.analysis.modelfile import render_modelfile_result
from tests.support.gotemplate_eval import ollama_values, render_go_template
from tests.support.model_fixtures import (CHATML_TEMPLATE, GEMMA2_TEMPLATE, GRANITE_TEMPLATE, PHI3_TEMPLATE,
                                          PHI4_TEMPLATE, SMOLLM3_TEMPLATE, make_checkpoint)
from tests.support.modelfile_grammar import parse_modelfile

CONVERSATION = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What licence is this?"},
    {"role": "assistant", "content": "It is the Apache License 2.0."},
    {"role": "user", "content": "May I redistribute it?"},
]

# Qwen3's template (abridged to the paths a plain conversation takes): ChatML with reasoning
# handling that a conversation without <think> blocks never reaches.
QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' %}{%- set ns.multi_step_tool = false %}"
    "{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- set content = message.content %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- if loop.index0 > ns.last_query_index and loop.last %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n\\n</think>\\n\\n' + content }}{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

PUBLISHED = {"phi3": PHI3_TEMPLATE, "phi4": PHI4_TEMPLATE, "granite": GRANITE_TEMPLATE}


def _go(family: str, messages: list[dict[str, str]]) -> str:
    return render_go_template(GO_FAMILIES[family].go_template, ollama_values(messages))


@pytest.mark.parametrize("family", sorted(PUBLISHED))
@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:], CONVERSATION[:2]],
                         ids=["full", "no-system", "one-turn"])
def test_go_template_renders_like_the_family_and_the_published_template(family: str,
                                                                       messages: list[dict[str, str]]) -> None:
    go = _go(family, messages)
    assert go == render_chat(FAMILY_TEMPLATES[family], messages)
    assert messages[-1]["content"] in go
    if family != "granite" or messages[0]["role"] == "system":  # Granite 3.1+ add a dated default system turn
        assert go == render_chat(PUBLISHED[family], messages, bos_token="", eos_token="")
    assert detect_family(PUBLISHED[family]) == family


def test_phi_variants_are_told_apart_by_what_they_render() -> None:
    assert _go("phi3", CONVERSATION[1:2]) == "<|user|>\nWhat licence is this?<|end|>\n<|assistant|>\n"
    assert _go("phi4", CONVERSATION[1:2]) == "<|user|>What licence is this?<|end|><|assistant|>"
    # Phi-4-mini builds its markers from the role name: no "<|user|>" in the template's source.
    assert "<|user|>" not in PHI4_TEMPLATE and detect_family(PHI4_TEMPLATE) == "phi4"


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, QWEN3_TEMPLATE], ids=["qwen2-smollm2", "qwen3"])
def test_chatml_templates_that_render_chatml_are_translated(template: str) -> None:
    assert detect_family(template) == "chatml"
    assert _go("chatml", CONVERSATION) == render_chat(template, CONVERSATION)


@pytest.mark.parametrize("template, group", [
    (SMOLLM3_TEMPLATE, "chatml"),
    (PHI3_TEMPLATE.replace("'<|end|>\n'", "'<|end|>\n\n'"), "phi"),
    (GRANITE_TEMPLATE.replace("<|end_of_role|>' + message['content']", "<|end_of_role|>\\n' + message['content']"),
     "granite"),
], ids=["smollm3", "phi-other-layout", "granite-other-layout"])
def test_look_alike_templates_that_render_otherwise_are_refused(template: str, group: str) -> None:
    assert template not in PUBLISHED.values()
    with pytest.raises(InputError, match=f"uses {group} markers but renders a conversation differently") as err:
        detect_family(template)
    assert err.value.fix and "by hand" in err.value.fix


@pytest.mark.parametrize("arch, family", [("phi3", "phi4"), ("granite", "granite"), ("gemma2", "gemma"),
                                          ("smollm3", None)])
def test_modelfile_for_converted_models(tmp_path: Path, arch: str, family: str | None) -> None:
    """The Modelfile step on an F16 converted from each newer architecture (with the chat template
    its tokenizer ships): translated, or refused in one clear line for SmolLM3."""
    ckpt = make_checkpoint(arch, tmp_path / arch.replace("phi3", "phi-mini"), n_layers=1)
    model = convert_checkpoint(ckpt, tmp_path / "model-F16.gguf")
    if family is None:
        with pytest.raises(InputError, match="chatml markers but renders") as err:
            render_modelfile_result(model, num_ctx=64, modelfile_dir=tmp_path)
        assert "\n" not in err.value.one_line()
        return
    result = render_modelfile_result(model, num_ctx=64, modelfile_dir=tmp_path)
    parsed = parse_modelfile(result.text)
    assert result.family == family and parsed.template == GO_FAMILIES[family].go_template
    assert parsed.parameter("stop") == list(GO_FAMILIES[family].stop)


def test_gemma2_template_refuses_a_system_turn_but_the_family_renders_the_rest() -> None:
    assert detect_family(GEMMA2_TEMPLATE) == "gemma"
    assert _go("gemma", CONVERSATION[1:]) == render_chat(GEMMA2_TEMPLATE, CONVERSATION[1:], bos_token="")
