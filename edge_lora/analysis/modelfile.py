"""Ollama Modelfile generation (Ollama docs/modelfile.md).

FROM the GGUF (``./name.gguf`` when it sits beside the Modelfile, else absolute: Ollama resolves
relative paths against the Modelfile's directory), an optional ADAPTER, a TEMPLATE translated
per family (``edge_lora.analysis.go_template``), the family's stop strings, ``num_ctx`` from the fit
estimator, SYSTEM when given and LICENSE from the model's metadata. Model metadata is
untrusted: the chat template only selects one of our own Go templates, and the licence text is
checked before it is quoted.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edge_lora import __version__
from edge_lora.core.atomic import atomic_write_text, check_not_an_input, ensure_writable_dir
from edge_lora.core.chat_template import family_for
from edge_lora.core.errors import InputError
from edge_lora.core.gguf_check import GGUFInfo, check_adapter_fits, validate_gguf
from edge_lora.core.imatrix_file import calibration_of
from edge_lora.core.output_dir import OutputDir
from edge_lora.analysis.fit import adapter_info, default_ctx, fit_report, model_info
from edge_lora.analysis.go_template import GoFamily, family_for_jinja, go_family

MODELFILE_NAME = "Modelfile"

ADAPTER_CAVEAT = (
    "Ollama converts GGUF LoRA adapters only for some base architectures (llama and gemma2 are "
    "documented) and newer Ollama releases are reported to drop ADAPTER-based model creation; "
    "prefer a Modelfile FROM the merged model (edge-lora convert BASE --adapter PEFT).")

# Ollama docs/modelfile.md "Valid Parameters and Values", with the value type each takes.
PARAMETER_TYPES: dict[str, type] = {
    "num_ctx": int, "repeat_last_n": int, "repeat_penalty": float, "temperature": float,
    "seed": int, "stop": str, "num_predict": int, "top_k": int, "top_p": float, "min_p": float,
    "num_keep": int, "typical_p": float, "presence_penalty": float, "frequency_penalty": float,
    "num_batch": int, "num_gpu": int, "main_gpu": int, "use_mmap": bool, "num_thread": int,
}

MIN_RECOMMENDED_CTX = 512
MAX_LICENSE_CHARS = 64_000  # a licence longer than this in metadata is not a licence


@dataclass(frozen=True)
class ModelfileResult:
    text: str
    family: str
    num_ctx: int
    notes: list[str] = field(default_factory=list)  # caveats the CLI prints on stderr
    path: Path | None = None


def _comment_text(text: str) -> str:
    """Untrusted metadata on one comment line: no line breaks or control characters."""
    return "".join(c if c.isprintable() else "?" for c in text)[:200]


def _quote_path(path_text: str) -> str:
    if any(c in path_text for c in '"\n\r'):
        raise InputError(f"the path {path_text!r} contains a quote or newline, which a Modelfile cannot hold",
                         fix="rename the file or directory")
    return f'"{path_text}"' if any(c.isspace() or c == "#" for c in path_text) else path_text


def modelfile_path_text(target: Path, modelfile_dir: Path | None) -> str:
    """``./name`` when ``target`` is directly inside ``modelfile_dir``, else the absolute path."""
    # absolute(), not resolve(): a symlink placed beside the Modelfile stays a relative FROM.
    target = Path(os.path.abspath(target))
    if modelfile_dir is not None and target.parent == Path(os.path.abspath(modelfile_dir)):
        return _quote_path(f"./{target.name}")
    return _quote_path(str(target))


def _multiline(value: str, what: str) -> str:
    if '"""' in value:
        raise InputError(f'the {what} contains """, which ends a Modelfile multi-line value',
                         fix='remove the triple quote from the text')
    return f'"""{value}"""'


def _quoted_param(value: str) -> str:
    if any(c in value for c in '"\n\r'):
        raise InputError(f"the parameter value {value!r} contains a quote or newline",
                         fix="use a value without quotes or newlines")
    return f'"{value}"'


def _format_param(name: str, value: object) -> str:
    expected = PARAMETER_TYPES.get(name)
    if expected is None:
        raise InputError(f"{name!r} is not an Ollama Modelfile parameter",
                         fix=f"use one of: {', '.join(sorted(PARAMETER_TYPES))}")
    if expected is bool:
        if not isinstance(value, bool):
            raise InputError(f"parameter {name} must be true or false, not {value!r}")
        return "true" if value else "false"
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"parameter {name} must be an integer, not {value!r}")
        return str(value)
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise InputError(f"parameter {name} must be a number, not {value!r}")
        return repr(float(value))
    if not isinstance(value, str) or not value:
        raise InputError(f"parameter {name} must be a non-empty string, not {value!r}")
    return _quoted_param(value)


def _chat_family(model_path: Path, info: GGUFInfo) -> GoFamily:
    """From the embedded Jinja template when there is one, else the fallback family the runtime
    uses (edge_lora.core.chat_template.family_for) — which may need the vocabulary."""
    embedded = info.metadata.get("tokenizer.chat_template")
    if isinstance(embedded, str) and embedded.strip():
        return family_for_jinja(embedded)

    loaded: list = []

    def has_token(text: str) -> bool:
        if not loaded:  # only non-Gemma models without a template need the vocabulary loaded
            from edge_lora.serving.llama_backend import LlamaModel  # llama.cpp: loaded only when needed

            loaded.append(LlamaModel(model_path, info=info))
        return loaded[0].token_id(text) is not None

    try:
        family = family_for(info.architecture or "", has_token)
    finally:
        for model in loaded:
            model.close()
    if family not in ("gemma", "chatml", "llama3", "mistral"):
        raise InputError(f"{model_path.name} has no chat template and its architecture "
                         f"{info.architecture!r} has no known chat format",
                         fix="write the TEMPLATE for this model by hand (see Ollama's docs/template.md)")
    return go_family(family)


def recommended_num_ctx(model: Path | GGUFInfo, adapters: Sequence[Path | GGUFInfo] = ()) -> int:
    """The fit estimator's default context for this file, halved until it fits available RAM."""

    info = model_info(model)  # parsed once for every halving, not once per estimate
    adapter_infos = [adapter_info(a) for a in adapters]
    ctx = default_ctx(info)
    while True:
        report = fit_report([info], ctx=ctx, adapters=adapter_infos)
        if report.models[0].fits or ctx <= MIN_RECOMMENDED_CTX:
            return ctx
        ctx //= 2


def _license_text(info: GGUFInfo) -> str | None:
    value = info.metadata.get("general.license")
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if len(text) > MAX_LICENSE_CHARS or '"""' in text:
        return None
    if any(ord(c) < 32 and c not in "\n\t" for c in text):
        return None  # control characters in untrusted metadata: leave the licence out
    return text


def render_modelfile_result(model_path: Path | str | GGUFInfo, *, adapter_path: Path | str | None = None,
                            system: str | None = None, num_ctx: int | None = None,
                            modelfile_dir: Path | str | None = None,
                            params: Mapping[str, object] | None = None) -> ModelfileResult:
    """``model_path``: a GGUF path, or its header from validate_gguf(path, expect_type="model")."""
    info = model_info(model_path)
    model_path = info.path
    directory = Path(modelfile_dir) if modelfile_dir is not None else None
    family = _chat_family(model_path, info)
    notes: list[str] = []
    adapters: tuple[GGUFInfo, ...] = ()
    if adapter_path is not None:
        adapters = (adapter_info(adapter_path),)
        check_adapter_fits(info, adapters[0])
        notes.append(ADAPTER_CAVEAT)

    trained = info.metadata.get(f"{info.architecture}.context_length")
    if num_ctx is None:
        num_ctx = recommended_num_ctx(info, adapters)
    elif isinstance(num_ctx, bool) or not isinstance(num_ctx, int) or num_ctx < 1:
        raise InputError(f"num_ctx must be a positive integer, not {num_ctx!r}")
    elif isinstance(trained, int) and num_ctx > trained:
        raise InputError(f"num_ctx {num_ctx} is larger than the model's training context {trained}",
                         fix=f"use {trained} or less")

    lines = [f"# Ollama Modelfile written by edge-lora {__version__} for {model_path.name}",
             f"# chat format: {family.name}. Create the model with: ollama create NAME -f Modelfile"]
    calibration = calibration_of(info)
    if calibration is not None:
        lines.append(f"# quantized with the importance matrix {_comment_text(calibration)}")
    lines.append(f"FROM {modelfile_path_text(model_path, directory)}")
    if adapters:
        lines.append("# " + ADAPTER_CAVEAT)
        lines.append(f"ADAPTER {modelfile_path_text(adapters[0].path, directory)}")
    lines.append(f"TEMPLATE {_multiline(family.go_template, 'chat template')}")
    extra = dict(params or {})
    for name in ("num_ctx", "stop"):
        if name in extra:
            raise InputError(f"pass {name} through its own argument, not params")
    for stop in family.stop:
        lines.append(f"PARAMETER stop {_format_param('stop', stop)}")
    lines.append(f"PARAMETER num_ctx {_format_param('num_ctx', num_ctx)}")
    for name, value in extra.items():
        lines.append(f"PARAMETER {name} {_format_param(name, value)}")
    if system is not None:
        lines.append(f"SYSTEM {_multiline(system, 'system prompt')}")
    license_text = _license_text(info)
    if license_text is not None:
        lines.append(f"LICENSE {_multiline(license_text, 'licence')}")
    elif "general.license" in info.metadata:
        notes.append("the model's general.license metadata was left out: it is not plain text")
    return ModelfileResult(text="\n".join(lines) + "\n", family=family.name, num_ctx=num_ctx, notes=notes)


def render_modelfile(model_path: Path | str | GGUFInfo, *, adapter_path: Path | str | None = None,
                     system: str | None = None, num_ctx: int | None = None,
                     modelfile_dir: Path | str | None = None, params: Mapping[str, object] | None = None) -> str:
    return render_modelfile_result(model_path, adapter_path=adapter_path, system=system, num_ctx=num_ctx,
                                   modelfile_dir=modelfile_dir, params=params).text


def write_modelfile(out_path: Path | str, model_path: Path | str | GGUFInfo, *, adapter_path: Path | str | None = None,
                    system: str | None = None, num_ctx: int | None = None,
                    params: Mapping[str, object] | None = None) -> ModelfileResult:
    """Render for the Modelfile's own directory and write it atomically."""
    out_path = Path(out_path)
    if out_path.is_dir():
        out_path = out_path / MODELFILE_NAME
    ensure_writable_dir(out_path.parent)
    check_not_an_input(out_path, [model_path.path if isinstance(model_path, GGUFInfo) else model_path, adapter_path])
    result = render_modelfile_result(model_path, adapter_path=adapter_path, system=system, num_ctx=num_ctx,
                                     modelfile_dir=out_path.parent, params=params)
    atomic_write_text(out_path, result.text)
    return ModelfileResult(text=result.text, family=result.family, num_ctx=result.num_ctx,
                           notes=result.notes, path=out_path)


def write_modelfile_for_output(output: OutputDir) -> Path | None:
    """Convert's hand-off: a ``Modelfile`` beside an output set, FROM the format the fit estimator
    recommends among its model files (merged ones when there are: Ollama's ADAPTER path is
    unreliable). Returns the path written (None when the set holds no model file)."""
    # Each header parsed once: the estimate and the Modelfile both read the chosen one.
    infos = {m.path: validate_gguf(m.path, expect_type="model") for m in output.models if m.kind == output.kind}
    if not infos:
        return None
    choice = Path(fit_report(list(infos.values())).choice.path)
    return write_modelfile(output.directory / MODELFILE_NAME, infos[choice]).path
