"""``edge-lora export vllm``: the base checkpoint a converted model came from and its adapters,
as a vLLM multi-LoRA deployment that answers to the same model ids as ``edge-lora serve``.

Everything is decided before anything is written (``plan_export``): the base (the HF checkpoint
the manifest records, or ``--base``), each adapter's source (the PEFT directory recorded in the
GGUF adapter when it is still there with the same hash, else a PEFT directory rebuilt from the
GGUF adapter), and what vLLM cannot serve faithfully (refused, one line each, naming the way
out). ``write_export`` then builds the directory beside its final path and publishes it whole.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from edge_lora.converters.architectures import ArchSpec, arch_spec_for
from edge_lora.converters.checkpoint import HFCheckpoint
from edge_lora.converters.peft import CONFIG_FILE, PICKLE_WEIGHTS, PeftAdapter
from edge_lora.converters.combine import write_peft_adapter
from edge_lora.converters.peft_export import copy_peft_scaled, peft_source_of, rebuild_from_gguf, scaled
from edge_lora.core.atomic import atomic_write_text, ensure_writable_dir
from edge_lora.core.bounded_json import JsonKind, read_json_object
from edge_lora.core.errors import AdapterError, EdgeLoraError, InputError, InputNotFoundError, OutputError
from edge_lora.core.gguf_check import GGUFInfo, validate_gguf
from edge_lora.core.output_dir import OutputDir
from edge_lora.core.progress import NullProgress, ProgressSink
from edge_lora.export import deploy
from edge_lora.export.plan import (DEFAULT_PORT, VLLM_MAX_LORA_RANKS, AdapterPlan, ExportPlan, Refusal,
                                   SourceKind)
from edge_lora.hub import resolve_local_or_hub
from edge_lora.serving.registry import NAME_PATTERN, AdapterRegistry, RegisteredAdapter
from edge_lora.state import last_output_dir

# Architectures vLLM 0.32 serves with LoRA (its model classes implementing SupportsLoRA) that
# edge-lora converts. SmolLM3 runs on vLLM's transformers backend, which also takes LoRA.
VLLM_LORA_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM",
    "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration", "Phi3ForCausalLM", "GraniteForCausalLM",
    "SmolLM3ForCausalLM"})
# The only modules_to_save vLLM loads (classification heads; PEFTHelper._validate_features).
VLLM_MODULES_TO_SAVE = ("classifier", "score")
MERGE_WAY_OUT = ("merge it into the base (PEFT's merge_and_unload, or `edge-lora convert BASE --adapter PEFT` "
                 "for the laptop) and serve the merged checkpoint as its own vLLM model")
# PEFT types other than LoRA: what to say (vLLM and llama.cpp apply LoRA adapters only).
NON_LORA_REFUSALS = {"IA3": "llama.cpp's LoRA runtime and vLLM cannot apply IA3; merge it instead"}
EXPORT_MARKER = "export.json"  # what the export wrote, read back by `--check` and by a re-export


def _refuse(name: str, what: str) -> AdapterError:
    return AdapterError(f"adapter {name}: {what}")


def _check_peft_for_vllm(name: str, peft_dir: Path, ckpt: HFCheckpoint) -> int:
    """Refuse what vLLM cannot serve faithfully; returns the adapter's largest rank."""
    raw = read_json_object(peft_dir / CONFIG_FILE, JsonKind.ADAPTER_CONFIG, missing_ok=True) or {}
    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type and peft_type != "LORA":
        raise _refuse(name, NON_LORA_REFUSALS.get(
            peft_type, f"it is a {peft_type} adapter; vLLM serves LoRA adapters only — {MERGE_WAY_OUT}"))
    adapter = PeftAdapter.open(peft_dir)
    if adapter.uses_dora:
        raise _refuse(name, f"DoRA: vLLM cannot apply the magnitude vector — {MERGE_WAY_OUT}")
    saved = [m for m in adapter.config.modules_to_save if m not in VLLM_MODULES_TO_SAVE]
    if saved:
        raise _refuse(name, f"modules_to_save {saved} (vLLM loads only classifier heads there) — {MERGE_WAY_OUT}")
    adapter.check_fits(ckpt)  # an adapter for another base: AdapterMismatchError
    rank = max(d.rank for d in adapter.deltas.values())
    _check_rank(name, rank)
    return rank


def _check_rank(name: str, rank: int) -> None:
    if rank > VLLM_MAX_LORA_RANKS[-1]:
        raise _refuse(name, f"rank {rank} is above {VLLM_MAX_LORA_RANKS[-1]}, the largest --max-lora-rank vLLM "
                            f"accepts — {MERGE_WAY_OUT}, or retrain it at a lower rank")


def _plan_adapter(entry: RegisteredAdapter, ckpt: HFCheckpoint, gguf_arch: str) -> AdapterPlan:
    """A registry entry (a GGUF adapter) or a PEFT directory given by path."""
    if entry.path.is_dir():
        rank = _check_peft_for_vllm(entry.name, entry.path, ckpt)
        return AdapterPlan(entry.name, SourceKind.PEFT, entry.path, entry.scale, rank, None)
    info = validate_gguf(entry.path, expect_type="adapter")
    if info.architecture != gguf_arch:
        raise _refuse(entry.name, f"it was made for a {info.architecture} model and the base is {gguf_arch} — "
                                  "export it with the base it was converted for")
    source = peft_source_of(info)
    spec = arch_spec_for(ckpt.config)
    if source is not None and source.usable and _same_modules(info, source.path, spec):
        rank = _check_peft_for_vllm(entry.name, source.path, ckpt)
        return AdapterPlan(entry.name, SourceKind.PEFT, source.path, entry.scale, rank, entry.path)
    try:
        rebuilt = rebuild_from_gguf(entry.path, spec)
    except EdgeLoraError as exc:
        raise _refuse(entry.name, exc.message + (f" — {exc.fix}" if exc.fix else "")) from exc
    rank = max(d.rank for d in rebuilt.deltas.values())
    _check_rank(entry.name, rank)
    return AdapterPlan(entry.name, SourceKind.GGUF, entry.path, entry.scale, rank, entry.path, rebuilt)


def _same_modules(info: GGUFInfo, peft_dir: Path, spec: ArchSpec) -> bool:
    """The recorded PEFT source adapts exactly the tensors the GGUF adapter does (the metadata is
    untrusted: a source that is some other adapter is not used, the GGUF is rebuilt instead)."""
    try:
        raw = read_json_object(peft_dir / CONFIG_FILE, JsonKind.ADAPTER_CONFIG)
        if str(raw.get("peft_type", "")).upper() != "LORA":
            return True  # refused by _check_peft_for_vllm, naming what it is
        adapter = PeftAdapter.open(peft_dir)
    except EdgeLoraError:
        return False
    adapted = {spec.gguf_name(name) for name in adapter.deltas}
    in_gguf = {r.name.removesuffix(".lora_a") for r in info.tensors if r.name.endswith(".lora_a")}
    return adapted == in_gguf


def _resolve_model_dir(model: Path | None) -> tuple[Path | None, OutputDir | None]:
    if model is None:
        remembered = last_output_dir()
        if remembered is None:
            return None, None
        model = remembered
    model = Path(model).expanduser()
    directory = model.parent if model.is_file() else model
    if not directory.is_dir():
        raise InputNotFoundError(f"model {model} does not exist", fix="pass --model CONVERTED_DIR or FILE.gguf")
    return directory, OutputDir.read(directory)


def _base_checkpoint(base: str | None, output: OutputDir | None, model_dir: Path | None) -> tuple[str, Path]:
    """(what vLLM is given, the local checkpoint directory) — refused in one line when vLLM
    could not load it."""
    ref = base or (output.manifest.base if output is not None else "")
    if not ref:
        raise InputError(f"{model_dir or 'the model'} does not record the Hugging Face checkpoint it was converted "
                         "from, and vLLM cannot serve a GGUF alone",
                         fix="pass --base HF_DIR|HUB_ID (the checkpoint the model was converted from)")
    local = Path(ref).expanduser()
    if not local.is_dir() and model_dir is not None and not local.is_absolute() and (model_dir / ref).is_dir():
        local = model_dir / ref
    path = resolve_local_or_hub(str(local) if local.is_dir() else ref, "model")
    if not (path / "config.json").is_file():
        raise InputError(f"base {ref} has no config.json; vLLM loads Hugging Face checkpoints",
                         fix="pass --base HF_DIR|HUB_ID (the checkpoint the model was converted from)")
    if not any(path.glob("*.safetensors")):
        pickled = any((path / n).exists() for n in ("pytorch_model.bin", "model.pt", *PICKLE_WEIGHTS)) \
            or any(path.glob("*.bin"))
        raise InputError(f"base {ref} has {'only pickled weights' if pickled else 'no safetensors weights'}, "
                         "which vLLM is not given: pickles can run code when loaded",
                         fix="pass --base a checkpoint saved as safetensors (save_pretrained(safe_serialization=True))")
    served = str(path.resolve()) if local.is_dir() else ref
    return served, path


def _served_names(output: OutputDir | None, path: Path) -> list[str]:
    """`edge-lora serve` answers to the GGUF file's stem: every model file of the directory, the
    full-precision reference first (vLLM reports the first name in /v1/models)."""
    if output is None:
        return [path.name]
    models = list(output.models)
    reference = output.reference
    if reference is not None:
        models.sort(key=lambda m: m.path != reference.path)
    names = [m.path.name.removesuffix(".gguf") for m in models]
    return list(dict.fromkeys(names)) or [output.name]


def _candidates(adapter_args: Sequence[str] | None, registry: AdapterRegistry, gguf_arch: str) -> list[RegisteredAdapter]:
    if not adapter_args:
        return [e for e in registry.list() if e.architecture == gguf_arch]
    chosen = []
    for arg in adapter_args:
        path = Path(arg).expanduser()
        if path.is_dir():  # a PEFT directory given directly
            name = path.resolve().name
            if not NAME_PATTERN.fullmatch(name):
                raise InputError(f"adapter directory name {name!r} is not a usable model id",
                                 fix="rename the directory (letters, digits, '.', '_', '-')")
            chosen.append(RegisteredAdapter(name, path.resolve(), 1.0, None))
        else:
            chosen.append(registry.resolve(arg))
    names = [c.name for c in chosen]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise InputError(f"adapter name {duplicate!r} is given twice", fix="give each adapter once")
    return chosen


def plan_export(out_dir: Path | str, *, model: Path | None = None, base: str | None = None,
                adapters: Sequence[str] | None = None, max_loras: int | None = None,
                tensor_parallel_size: int = 1, replicas: int = 1, port: int = DEFAULT_PORT,
                registry: AdapterRegistry | None = None) -> ExportPlan:
    """Decide everything; read adapters but write nothing. Adapters named explicitly that vLLM
    cannot take raise (nothing is exported); found in the registry, they are listed as refused."""
    for value, flag in ((tensor_parallel_size, "--tensor-parallel-size"), (replicas, "--replicas")):
        if value < 1:
            raise InputError(f"{flag} must be at least 1, got {value}")
    if max_loras is not None and max_loras < 1:
        raise InputError(f"--max-loras must be at least 1, got {max_loras}")
    if not 1 <= port <= 65535:
        raise InputError(f"--port must be between 1 and 65535, got {port}")
    registry = registry or AdapterRegistry()
    model_dir, output = _resolve_model_dir(model)
    if output is not None and output.kind == "merged":
        raise InputError(f"{model_dir} holds a merged model (base + {output.manifest.adapter}); vLLM would serve the "
                         "plain base under its name",
                         fix="export the plain base's conversion (edge-lora convert BASE --out DIR) with adapters, "
                             "or serve the merged checkpoint as its own vLLM model")
    served_base, ckpt_dir = _base_checkpoint(base, output, model_dir)
    plan_adapters: list[AdapterPlan] = []
    refused: list[Refusal] = []
    with HFCheckpoint.open(ckpt_dir) as ckpt:
        architecture = (ckpt.raw_config.get("architectures") or ["?"])[0]
        if architecture not in VLLM_LORA_ARCHITECTURES:
            raise InputError(f"vLLM does not serve {architecture} with LoRA adapters",
                             fix=f"use one of {', '.join(sorted(VLLM_LORA_ARCHITECTURES))}, or keep serving it "
                                 "with `edge-lora serve`")
        gguf_arch = arch_spec_for(ckpt.config).gguf_arch_name
        if output is not None and output.manifest.architecture and output.manifest.architecture != gguf_arch:
            raise InputError(f"--base is a {gguf_arch} checkpoint but {model_dir} holds a "
                             f"{output.manifest.architecture} model", fix="pass the base the model was converted from")
        for entry in _candidates(adapters, registry, gguf_arch):
            try:
                if not entry.exists and not entry.path.is_dir():
                    raise InputNotFoundError(f"adapter {entry.name}: {entry.path} no longer exists",
                                             fix=f"register it again or remove it (edge-lora adapters remove {entry.name})")
                plan_adapters.append(_plan_adapter(entry, ckpt, gguf_arch))
            except EdgeLoraError as exc:
                if adapters:
                    raise
                refused.append(Refusal(entry.name, exc.one_line()))
    served = _served_names(output, ckpt_dir)
    clash = next((a.name for a in plan_adapters if a.name in served), None)
    if clash is not None:
        raise InputError(f"adapter {clash!r} has the base model's name", fix="register it under another name")
    return ExportPlan(out_dir=Path(out_dir), base=served_base, base_is_local=Path(served_base).is_absolute(),
                      architecture=architecture, served_names=served, adapters=plan_adapters, refused=refused,
                      max_loras=max_loras or max(1, len(plan_adapters)), tensor_parallel_size=tensor_parallel_size,
                      replicas=replicas, port=port, model_dir=model_dir)


def _write_adapter(plan: AdapterPlan, out: Path, base_model: str) -> None:
    if plan.kind is SourceKind.PEFT:
        copy_peft_scaled(plan.source, out, scale=plan.scale, base_model=base_model)
    else:
        assert plan.rebuilt is not None  # planned as a GGUF rebuild
        write_peft_adapter(scaled(plan.rebuilt, plan.scale), out, base_model=base_model)


def write_export(plan: ExportPlan, progress: ProgressSink = NullProgress()) -> Path:
    """Write the directory beside its final path, then publish it whole (replacing an earlier
    export there; refusing any other non-empty directory)."""
    out = plan.out_dir.expanduser().resolve()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / EXPORT_MARKER).is_file())):
        raise OutputError(f"{out} exists and is not an earlier vLLM export", fix="choose another --out directory")
    ensure_writable_dir(out.parent)
    staging = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        progress.start("exporting adapters", max(1, len(plan.adapters)))
        for adapter in plan.adapters:
            _write_adapter(adapter, staging / "adapters" / adapter.name, plan.base)
            progress.advance(1, description=adapter.name)
        progress.finish()
        for name, text in deploy.render_all(plan).items():
            atomic_write_text(staging / name, text)
        (staging / "serve.sh").chmod(0o755)
        atomic_write_text(staging / EXPORT_MARKER, json.dumps(export_record(plan), indent=2) + "\n")
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        if out.exists():
            out.rename(old)  # an earlier export (or an empty directory) gives way only as a whole
        try:
            staging.rename(out)
        except OSError:
            if old.exists():
                old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise OutputError(f"could not write the export to {out}: {exc.strerror or exc}",
                          fix="check the directory's permissions and free space") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def export_record(plan: ExportPlan) -> dict[str, object]:
    """What `--json` prints and export.json keeps: enough for `--check` to find the local side."""
    return {
        "base": plan.base, "architecture": plan.architecture, "served_model_names": plan.served_names,
        "model_dir": str(plan.model_dir) if plan.model_dir is not None else None,
        "max_lora_rank": plan.max_lora_rank, "max_loras": plan.max_loras,
        "tensor_parallel_size": plan.tensor_parallel_size, "replicas": plan.replicas, "port": plan.port,
        "adapters": [{"name": a.name, "source": a.kind.value, "path": str(a.source), "rank": a.rank,
                      "scale": a.scale, "gguf": str(a.gguf) if a.gguf is not None else None}
                     for a in plan.adapters],
        "refused": [{"name": r.name, "reason": r.reason} for r in plan.refused],
    }

