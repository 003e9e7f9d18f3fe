"""Opening the adapters a command names (``A[:W]``: PEFT directory or Hub id, GGUF adapter file,
or registered adapter name) and combining them: ``edge-lora adapter combine`` writes the result as
a PEFT adapter directory, ``edge-lora convert --adapter A:W --adapter B:W`` merges it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_lora.converters.checkpoint import HFCheckpoint
from edge_lora.converters.combine import CombineOptions, combine_adapters, write_peft_adapter
from edge_lora.converters.combine_gguf import combine_gguf_adapters
from edge_lora.converters.gguf_to_peft import peft_tensors_from_gguf_adapter
from edge_lora.converters.hf_to_gguf import TensorMerger, model_name_for
from edge_lora.converters.ia3 import Ia3Adapter, Ia3Merger, is_ia3_dir
from edge_lora.converters.merge import PeftMerger
from edge_lora.converters.peft import PeftAdapter
from edge_lora.core.atomic import check_not_an_input
from edge_lora.core.errors import InputError
from edge_lora.core.output_dir import adapter_file_name
from edge_lora.hub import resolve_local_or_hub
from edge_lora.serving.registry import NAME_PATTERN, AdapterRegistry, RegisteredAdapter, check_name


@dataclass(frozen=True)
class WeightedRef:
    ref: str
    weight: float | None  # None: not given (1.0, and a lone adapter merges as before)

    @property
    def label(self) -> str:
        return self.ref if self.weight is None else f"{self.ref}:{self.weight:g}"


def parse_weighted(text: str) -> WeightedRef:
    """``A`` or ``A:W``; a colon whose tail is not a number, or in a path that exists as
    written, is part of the reference."""
    if Path(str(text)).expanduser().exists():
        return WeightedRef(str(text), None)
    head, sep, tail = str(text).rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return WeightedRef(str(text), None)
        if not math.isfinite(weight):
            raise InputError(f"adapter weight {tail!r} in {text!r} is not a finite number",
                             fix="give A:W with W a number such as 0.5 or -1")
        return WeightedRef(head, weight)
    return WeightedRef(str(text), None)


def _gguf_file(ref: str) -> Path | None:
    """A GGUF adapter the reference names: a .gguf file, or a registered adapter name."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    if NAME_PATTERN.fullmatch(ref) and not path.exists() and AdapterRegistry().get(ref) is not None:
        return AdapterRegistry().resolve(ref).path
    return None


def open_lora(ref: str, base: HFCheckpoint | None) -> tuple[PeftAdapter, str]:
    """A LoRA adapter as PEFT tensors, and its display name. IA3 and other PEFT types are refused
    by ``PeftAdapter.open`` in one line; GGUF adapters need the base they were made for."""
    gguf_path = _gguf_file(ref)
    if gguf_path is not None:
        if base is None:
            raise InputError(f"{ref} is a GGUF adapter: rebuilding its PEFT tensors needs the base it was made for",
                             fix="give --base BASE (the HF checkpoint)")
        adapter = peft_tensors_from_gguf_adapter(gguf_path, base)
        return adapter, adapter.name
    adapter_dir = resolve_local_or_hub(ref, "adapter")
    return PeftAdapter.open(adapter_dir), model_name_for(ref, adapter_dir)


def combined_name(names: Sequence[str], weights: Sequence[float]) -> str:
    """``legal_0.5`` or ``legal_0.5+tone_-1``: names the combination in output file names."""
    return "+".join(f"{n}_{w:g}" for n, w in zip(names, weights))


def combine_refs(refs: Sequence[WeightedRef], options: CombineOptions, base: HFCheckpoint | None
                 ) -> tuple[PeftAdapter, str]:
    """Open and combine; with ``base``, every input and the result are checked against it."""
    options.check()
    opened = [open_lora(r.ref, base) for r in refs]
    weights = [1.0 if r.weight is None else r.weight for r in refs]
    if base is not None:
        for adapter, _ in opened:
            adapter.check_fits(base)
    name = combined_name([n for _, n in opened], weights)
    return combine_adapters([(a, w) for (a, _), w in zip(opened, weights)], options, name=name), name


@dataclass(frozen=True)
class CombineResult:
    out_dir: Path
    adapter: PeftAdapter
    inputs: list[WeightedRef]
    options: CombineOptions


def combine_to_dir(refs: Sequence[str | WeightedRef], out_dir: Path | str, options: CombineOptions = CombineOptions(),
                   *, base: str | Path | None = None) -> CombineResult:
    """``edge-lora adapter combine``: a PEFT adapter directory at ``out_dir``."""
    parsed = [r if isinstance(r, WeightedRef) else parse_weighted(r) for r in refs]
    if len(parsed) < 2 and (not parsed or parsed[0].weight is None):
        raise InputError("adapter combine needs two or more adapters, or one with a weight (A:W)",
                         fix="e.g. edge-lora adapter combine legal:0.5 tone:0.5 --out DIR")
    options.check()
    out_dir = Path(out_dir)
    for r in parsed:
        local = Path(r.ref).expanduser()
        if local.exists():
            check_not_an_input(out_dir / "adapter_model.safetensors", [local / "adapter_model.safetensors", local])
    if base is None:
        adapter, _ = combine_refs(parsed, options, None)
        base_ref = adapter.config.base_model_name_or_path  # the first input's, as PEFT copies its config
    else:
        with HFCheckpoint.open(resolve_local_or_hub(str(base), "model")) as ckpt:
            adapter, _ = combine_refs(parsed, options, ckpt)
        base_ref = str(base)
    write_peft_adapter(adapter, out_dir, base_model=base_ref)
    return CombineResult(out_dir, adapter, list(parsed), options)


@dataclass(frozen=True)
class MergePlan:
    """What ``convert --adapter ...`` merges: the merger, the LoRA to also write as a GGUF adapter
    (None for IA3), the name used in file names and the manifest's adapter description."""

    merger: TensorMerger
    lora: PeftAdapter | None
    name: str
    description: str


def plan_merge(adapter_refs: Sequence[str], base: HFCheckpoint, options: CombineOptions | None) -> MergePlan:
    """One adapter without a weight merges as given (LoRA, DoRA, modules_to_save or IA3); a weight,
    or several adapters, merge their combination (``options``, default ``cat``: Σ wᵢ·ΔWᵢ)."""
    refs = [parse_weighted(r) for r in adapter_refs]
    description = " + ".join(r.label for r in refs)
    if len(refs) == 1 and refs[0].weight is None:
        if options is not None:
            raise InputError(f"--method {options.method} applies to a combination, and one adapter without a weight "
                             "was given", fix="give two or more --adapter A:W, or a weight (--adapter A:0.5)")
        ref = refs[0].ref
        if _gguf_file(ref) is None:
            adapter_dir = resolve_local_or_hub(ref, "adapter")
            name = model_name_for(ref, adapter_dir)
            if is_ia3_dir(adapter_dir):
                ia3 = Ia3Adapter.open(adapter_dir)
                ia3.check_fits(base)
                return MergePlan(Ia3Merger(ia3), None, name, description)
            peft = PeftAdapter.open(adapter_dir)
            peft.check_fits(base)
            return MergePlan(PeftMerger(peft), peft, name, description)
        peft, name = open_lora(ref, base)
        peft.check_fits(base)
        return MergePlan(PeftMerger(peft), peft, name, description)
    combined, name = combine_refs(refs, options or CombineOptions(), base)
    combined.check_fits(base)
    return MergePlan(PeftMerger(combined), combined, name, description)


def combine_registered(name: str, inputs: Sequence[tuple[str, float]], options: CombineOptions = CombineOptions(),
                       *, registry: AdapterRegistry | None = None) -> RegisteredAdapter:
    """Combine registered (or GGUF file) adapters into ``<home>/adapters/adapter-<name>.gguf`` and
    register it under ``name`` (the TUI's "combine adapters"). No HF base is needed: see
    ``converters.combine_gguf``."""
    registry = registry or AdapterRegistry()
    check_name(name)
    if registry.get(name) is not None:
        raise InputError(f"an adapter named {name!r} is already registered", fix="pick another name")
    if len(inputs) < 2 and not (len(inputs) == 1 and inputs[0][1] != 1.0):
        raise InputError("combining needs two or more adapters, or one with a weight other than 1",
                         fix="e.g. legal:0.5 tone:0.5")
    paths = [(registry.resolve(ref).path, float(weight)) for ref, weight in inputs]
    out = registry.home / "adapters" / adapter_file_name(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    combine_gguf_adapters(paths, out, options, name=name)
    return registry.add(name, out, 1.0)
