"""Ollama Modelfile generation: the documented grammar, Go templates that render exactly like
the Jinja chat templates, paths relative to the Modelfile, and typed errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from tests.support.gotemplate_eval import GoTemplateError, ollama_values, render_go_template
from tests.support.modelfile_grammar import ModelfileSyntaxError, parse_modelfile, resolve_modelfile_path

from edge_lora.core.chat_template import FAMILY_TEMPLATES, render_chat
from edge_lora.core.errors import InputError, InputNotFoundError, InvalidGGUFError
from edge_lora.analysis.go_template import GO_FAMILIES, detect_family
from edge_lora.core.manifest import Manifest
from edge_lora.core.output_dir import OutputDir
from edge_lora.analysis.modelfile import (ADAPTER_CAVEAT, render_modelfile, render_modelfile_result, write_modelfile,
                                 write_modelfile_for_output)

CONVERSATION = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What licence is this?"},
    {"role": "assistant", "content": "It is the Apache License 2.0."},
    {"role": "user", "content": "May I redistribute it?"},
]
NO_SYSTEM = CONVERSATION[1:]
EOS = {"mistral": "</s>"}

# Chat templates as published with real models (tokenizer_config.json), to check that family
# detection works on them and that our Go template renders what they render.
REAL_TEMPLATES = {
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
        "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "chatml": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "gemma": (
        "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n"
        "    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
        "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n"
        "    {%- set first_user_prefix = \"\" -%}\n    {%- set loop_messages = messages -%}\n{%- endif -%}\n"
        "{%- for message in loop_messages -%}\n"
        "    {%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}\n"
        "    {%- else -%}{%- set role = message['role'] -%}{%- endif -%}\n"
        "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
        "    {{- message['content'] | trim -}}\n    {{ '<end_of_turn>\n' }}\n{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}\n"),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"),
}


def _go(family: str, messages: list[dict[str, str]]) -> str:
    return render_go_template(GO_FAMILIES[family].go_template, ollama_values(messages))


def _jinja(template: str, family: str, messages: list[dict[str, str]]) -> str:
    return render_chat(template, messages, add_generation_prompt=True, bos_token="", eos_token=EOS.get(family, ""))


# --- Go template == Jinja template ---

@pytest.mark.parametrize("family", sorted(GO_FAMILIES))
@pytest.mark.parametrize("messages", [CONVERSATION, NO_SYSTEM, CONVERSATION[:2]], ids=["full", "no-system", "one-turn"])
def test_go_template_renders_like_the_family_jinja(family: str, messages: list[dict[str, str]]) -> None:
    expected = _jinja(FAMILY_TEMPLATES[family], family, messages)
    assert _go(family, messages) == expected
    assert messages[-1]["content"] in expected  # the comparison is over real content


@pytest.mark.parametrize("family", sorted(REAL_TEMPLATES))
def test_published_templates_are_detected_and_rendered_the_same(family: str) -> None:
    template = REAL_TEMPLATES[family]
    assert detect_family(template) == family
    messages = NO_SYSTEM if family == "mistral" else CONVERSATION  # Mistral v0.1 refuses a system role
    assert _go(family, messages) == _jinja(template, family, messages)


def test_gemma_go_template_exact_text() -> None:
    assert _go("gemma", CONVERSATION) == (
        "<start_of_turn>user\nYou answer in one short sentence.\n\nWhat licence is this?<end_of_turn>\n"
        "<start_of_turn>model\nIt is the Apache License 2.0.<end_of_turn>\n"
        "<start_of_turn>user\nMay I redistribute it?<end_of_turn>\n<start_of_turn>model\n")


def test_unknown_template_is_refused() -> None:
    with pytest.raises(InputError, match="not one of the families"):
        detect_family("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")


def test_go_evaluator_rejects_what_go_rejects() -> None:
    with pytest.raises(GoTemplateError):
        render_go_template("{{ if .System }}x", {"System": "s"})  # missing end
    with pytest.raises(GoTemplateError):
        render_go_template("{{ trim .System }}", {"System": "s"})  # not a builtin
    with pytest.raises(GoTemplateError):
        render_go_template("{{ $x = 1 }}", {})  # assignment before declaration
    assert render_go_template('{{- $a := 1 }} x {{- if eq $a 1 }} y {{ end -}} z', {}) == " x y z"


# --- the documented grammar ---

DOC_EXAMPLE = '''# a comment
FROM llama3.2
# sets the temperature to 1 [higher is more creative, lower is more coherent]
PARAMETER temperature 1
PARAMETER num_ctx 4096
parameter stop "<|eot_id|>"
SYSTEM """
You are Mario from Super Mario Bros, acting as an assistant.
"""
MESSAGE user Is Toronto in Canada?
MESSAGE assistant yes
'''


def test_grammar_accepts_the_documented_example() -> None:
    parsed = parse_modelfile(DOC_EXAMPLE)
    assert parsed.from_ == "llama3.2"
    assert parsed.parameter("temperature") == [1.0] and parsed.parameter("num_ctx") == [4096]
    assert parsed.parameter("stop") == ["<|eot_id|>"]
    assert parsed.system == "\nYou are Mario from Super Mario Bros, acting as an assistant.\n"
    assert parsed.messages == [("user", "Is Toronto in Canada?"), ("assistant", "yes")]


@pytest.mark.parametrize("text, problem", [
    ("PARAMETER temperature 1\n", "FROM is required"),
    ("FROM x\nPARAMETER context_size 4096\n", "unknown parameter"),
    ("FROM x\nPARAMETER num_ctx lots\n", "needs a int"),
    ("FROM x\nPARAMETER use_mmap maybe\n", "true or false"),
    ("FROM x\nADAPTER ./a.gguf\nADAPTER ./b.gguf\n", "only once"),
    ('FROM x\nSYSTEM """never closed\n', "unterminated"),
    ("FROM x\nINHERIT y\n", "unknown instruction"),
    ("FROM x\nMESSAGE tool hi\n", "MESSAGE role"),
    ('FROM x\nTEMPLATE """a""" trailing\n', "after the closing"),
])
def test_grammar_rejects_violations(text: str, problem: str) -> None:
    with pytest.raises(ModelfileSyntaxError, match=problem):
        parse_modelfile(text)


# --- generated Modelfiles for the real Gemma model ---

@pytest.fixture
def gemma_beside(tmp_path: Path, gemma_q4_gguf: Path) -> Path:
    """The real Gemma GGUF linked into a fresh directory, as a convert output would hold it."""
    link = tmp_path / "out" / "gemma-3-270m-Q4_K_M.gguf"
    link.parent.mkdir()
    os.symlink(gemma_q4_gguf, link)
    return link


def test_merged_modelfile_parses_and_resolves_beside(gemma_beside: Path) -> None:
    result = write_modelfile(gemma_beside.parent, gemma_beside, system="Answer about licences.")
    assert result.path == gemma_beside.parent / "Modelfile"
    assert not list(gemma_beside.parent.glob("*.partial"))
    parsed = parse_modelfile(result.path.read_text())
    assert parsed.from_ == "./gemma-3-270m-Q4_K_M.gguf"
    assert resolve_modelfile_path(result.path, parsed.from_).samefile(gemma_beside)
    assert parsed.adapter is None and result.notes == []
    assert parsed.template == GO_FAMILIES["gemma"].go_template
    assert parsed.parameter("stop") == ["<end_of_turn>"]
    # num_ctx from the fit estimator: Gemma 3 270M fits 4096 (the default cap) on any test machine
    assert parsed.parameter("num_ctx") == [4096] == [result.num_ctx]
    assert parsed.system == "Answer about licences."
    assert parsed.licenses == ["gemma"]  # general.license of the real file


def test_modelfile_elsewhere_uses_an_absolute_path(tmp_path: Path, gemma_q4_gguf: Path) -> None:
    result = write_modelfile(tmp_path / "elsewhere" / "Modelfile", gemma_q4_gguf, num_ctx=2048)
    parsed = parse_modelfile(result.path.read_text())
    assert Path(parsed.from_).is_absolute()
    assert resolve_modelfile_path(result.path, parsed.from_).samefile(gemma_q4_gguf)
    assert parsed.parameter("num_ctx") == [2048]


def test_adapter_modelfile_parses_with_caveat(gemma_beside: Path, random_gemma_loras: tuple[Path, Path]) -> None:
    adapter = gemma_beside.parent / "adapter-a.gguf"
    os.symlink(random_gemma_loras[0], adapter)
    result = write_modelfile(gemma_beside.parent, gemma_beside, adapter_path=adapter, num_ctx=1024)
    parsed = parse_modelfile(result.path.read_text())
    assert parsed.adapter == "./adapter-a.gguf"
    assert resolve_modelfile_path(result.path, parsed.adapter).samefile(random_gemma_loras[0])
    assert ADAPTER_CAVEAT in result.notes


def test_modelfile_never_writes_over_its_model_or_adapter(tmp_path: Path, gemma_q4_gguf: Path,
                                                           random_gemma_loras: tuple[Path, Path]) -> None:
    # `modelfile --model m.gguf --out m.gguf` used to turn the model into a 600-byte Modelfile.
    # Only files under tmp_path are ever at risk here: a symlink is replaced, not its target.
    import shutil

    from edge_lora.core.errors import OutputError

    model = tmp_path / "m.gguf"
    model.symlink_to(gemma_q4_gguf)
    adapter = Path(shutil.copy(random_gemma_loras[0], tmp_path / "adapter.gguf"))
    before = adapter.read_bytes()
    for out in (model, adapter):
        with pytest.raises(OutputError, match="is an input of this command"):
            write_modelfile(out, model, adapter_path=adapter)
    assert model.is_symlink() and adapter.read_bytes() == before


def test_model_and_adapter_swapped_is_a_typed_error(gemma_q4_gguf: Path, random_gemma_loras: tuple[Path, Path]) -> None:
    with pytest.raises(InvalidGGUFError, match="adapter, not a model"):
        render_modelfile(random_gemma_loras[0], num_ctx=512)
    with pytest.raises(InputError, match="not a GGUF LoRA adapter"):
        render_modelfile(gemma_q4_gguf, adapter_path=gemma_q4_gguf, num_ctx=512)


def test_bad_values_are_typed_errors(gemma_q4_gguf: Path) -> None:
    with pytest.raises(InputError, match='"""'):
        render_modelfile(gemma_q4_gguf, system='a """ b', num_ctx=512)
    with pytest.raises(InputError, match="not an Ollama Modelfile parameter"):
        render_modelfile(gemma_q4_gguf, num_ctx=512, params={"context": 3})
    with pytest.raises(InputError, match="must be a number"):
        render_modelfile(gemma_q4_gguf, num_ctx=512, params={"temperature": "hot"})
    with pytest.raises(InputError, match="training context"):
        render_modelfile(gemma_q4_gguf, num_ctx=10**7)
    with pytest.raises(InputNotFoundError):
        render_modelfile(gemma_q4_gguf.parent / "missing.gguf", num_ctx=512)
    text = render_modelfile(gemma_q4_gguf, num_ctx=512, params={"temperature": 0.2, "seed": 7})
    parsed = parse_modelfile(text)
    assert parsed.parameter("temperature") == [0.2] and parsed.parameter("seed") == [7]


def _listing(directory: Path, merged: list[Path]) -> None:
    """A manifest.json listing ``merged`` as merged model files (sizes are not what these tests check)."""
    rows = [{"path": p.name, "format": "Q4_K_M", "kind": "merged", "bytes": 1, "bpw": 4.0, "sha256": ""}
            for p in merged]
    (directory / "manifest.json").write_text(json.dumps({"name": "gemma", "files": rows}))


def test_pipeline_hook_writes_modelfile_for_the_merged_model(gemma_beside: Path) -> None:
    _listing(gemma_beside.parent, [gemma_beside])
    written = write_modelfile_for_output(OutputDir.read(gemma_beside.parent))
    assert written == gemma_beside.parent / "Modelfile"
    assert parse_modelfile(written.read_text()).from_ == f"./{gemma_beside.name}"
    nothing = OutputDir(gemma_beside.parent, Manifest(gemma_beside.parent), models=(), adapters=())
    assert write_modelfile_for_output(nothing) is None


def test_pipeline_hook_and_default_num_ctx_parse_each_file_once(gemma_beside: Path, gemma_q4_gguf: Path,
                                                                 random_gemma_loras: tuple[Path, Path],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # ~30 ms per Gemma header: the hook estimates every candidate, then renders the chosen one.
    from tests.support.gguf_parses import count_parses

    second = gemma_beside.parent / "gemma-3-270m-copy-Q4_K_M.gguf"
    os.symlink(gemma_q4_gguf, second)
    _listing(gemma_beside.parent, [gemma_beside, second])
    output = OutputDir.read(gemma_beside.parent)
    parsed = count_parses(monkeypatch)
    assert write_modelfile_for_output(output) == gemma_beside.parent / "Modelfile"
    assert sorted(p.name for p in parsed) == sorted([gemma_beside.name, second.name])
    parsed.clear()
    render_modelfile_result(gemma_beside, adapter_path=random_gemma_loras[0])  # num_ctx from the estimator
    assert sorted(p.name for p in parsed) == sorted([gemma_beside.name, random_gemma_loras[0].name])


# --- synthetic GGUFs of the other families ---

def _tiny_gguf(path: Path, arch: str, *, chat_template: str | None, license_text: str | None = None) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(8192)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    if license_text is not None:
        writer.add_license(license_text)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("family, arch", [("llama3", "llama"), ("chatml", "qwen2"), ("mistral", "llama")])
def test_family_from_the_embedded_template(tmp_path: Path, family: str, arch: str) -> None:
    licence = "Line one of the licence.\nLine two."
    model = _tiny_gguf(tmp_path / "m.gguf", arch, chat_template=REAL_TEMPLATES[family], license_text=licence)
    result = render_modelfile_result(model, num_ctx=2048, modelfile_dir=tmp_path)
    parsed = parse_modelfile(result.text)
    assert result.family == family
    assert parsed.template == GO_FAMILIES[family].go_template
    assert parsed.parameter("stop") == list(GO_FAMILIES[family].stop)
    assert parsed.licenses == [licence]
    assert parsed.from_ == "./m.gguf"


def test_unknown_family_model_is_refused(tmp_path: Path) -> None:
    model = _tiny_gguf(tmp_path / "m.gguf", "llama", chat_template="{{ messages[0]['content'] }}")
    with pytest.raises(InputError, match="not one of the families"):
        render_modelfile(model, num_ctx=512)


def test_hostile_licence_is_left_out(tmp_path: Path) -> None:
    model = _tiny_gguf(tmp_path / "m.gguf", "qwen2", chat_template=REAL_TEMPLATES["chatml"],
                       license_text='MIT"""\nFROM /etc/passwd\n"""')
    result = render_modelfile_result(model, num_ctx=512)
    parsed = parse_modelfile(result.text)
    assert parsed.licenses == [] and Path(parsed.from_).name == "m.gguf"
    assert any("license" in note for note in result.notes)


# --- CLI ---

def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_lora", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ})


def test_cli_writes_a_modelfile(gemma_beside: Path) -> None:
    done = _cli("modelfile", "--model", str(gemma_beside), "--out", str(gemma_beside.parent), "--ctx", "1024")
    assert done.returncode == 0, done.stderr
    parsed = parse_modelfile((gemma_beside.parent / "Modelfile").read_text())
    assert parsed.parameter("num_ctx") == [1024]
    assert "ollama create" in done.stderr


def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    model = _tiny_gguf(tmp_path / "m.gguf", "llama", chat_template="{{ messages }}")
    for args in (["--model", str(tmp_path / "missing.gguf")], ["--model", str(model), "--ctx", "512"]):
        done = _cli("modelfile", *args)
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("edge-lora: error:")
        assert "Traceback" not in done.stderr
