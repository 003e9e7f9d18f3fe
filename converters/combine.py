"""Adapter arithmetic: PEFT's ``add_weighted_adapter`` in numpy, one module at a time.

Every ``combination_type`` computes what PEFT computes (``peft.tuners.lora.model`` and
``peft.utils.merge_utils``; compared with PEFT's own output in tests/data/adapter_arith):

- ``cat``: A' = [w₁s₁A₁; w₂s₂A₂; …], B' = [B₁ B₂ …], so B'A' = Σ wᵢ·sᵢ·BᵢAᵢ exactly (rank Σ rᵢ);
- ``linear``, ``ties``, ``dare_*``, ``magnitude_prune`` combine the A factors and the B factors
  *separately*, each with weight ±√|wᵢ·sᵢ| (the sign on A only). ``linear`` is therefore
  (Σ √wᵢ·Bᵢ)(Σ √wᵢ·Aᵢ), which has cross terms Bᵢ·Aⱼ: not the linear combination of the deltas
  unless there is a single adapter. Use ``cat`` (or ``svd``) for ΔW = Σ wᵢ·ΔWᵢ;
- ``*_svd`` apply the same merge to the full deltas ΔWᵢ = sᵢ·BᵢAᵢ, then keep the top
  ``svd_rank`` singular triplets: B' = U·S, A' = Vᵀ.

The new adapter has r = lora_alpha = its rank (scale 1), as PEFT's. PEFT copies the first
adapter's ``use_rslora``, which then scales the new adapter by √r; edge-lora writes
``use_rslora: false`` so the file means the combination computed (same tensors as PEFT's).

DARE's random pruning is PEFT's rule (each entry kept with probability ``density``, kept entries
divided by ``density``; density ≥ 1 prunes nothing) drawn from numpy's PCG64 seeded with ``seed``,
so a seed repeats exactly (PEFT draws from torch's global generator).
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edge_lora.converters.peft import CONFIG_FILE, KEY_PREFIX, LORA_A, LORA_B, WEIGHTS_FILE, LoraConfig, LoraDelta, PeftAdapter
from edge_lora.converters.safetensors_io import write_safetensors
from edge_lora.core.atomic import atomic_path, atomic_write_text, ensure_writable_dir
from edge_lora.core.errors import AdapterError, AdapterMismatchError, InputError


class Merge(enum.Enum):
    """How a list of task tensors becomes one (``peft.utils.merge_utils``)."""

    TASK_ARITHMETIC = "task_arithmetic"
    TIES = "ties"
    DARE_LINEAR = "dare_linear"
    DARE_TIES = "dare_ties"
    MAGNITUDE_PRUNE = "magnitude_prune"


class Space(enum.Enum):
    CAT = "cat"  # stack the factors (exact)
    FACTORS = "factors"  # merge the A's and the B's separately
    SVD = "svd"  # merge the full deltas, truncated SVD back to factors


@dataclass(frozen=True)
class Method:
    space: Space
    merge: Merge

    @property
    def needs_density(self) -> bool:
        return self.merge not in (Merge.TASK_ARITHMETIC,)

    @property
    def uses_sign(self) -> bool:
        return self.merge in (Merge.TIES, Merge.DARE_TIES)

    @property
    def random(self) -> bool:
        return self.merge in (Merge.DARE_LINEAR, Merge.DARE_TIES)


METHODS: dict[str, Method] = {
    "cat": Method(Space.CAT, Merge.TASK_ARITHMETIC),
    "linear": Method(Space.FACTORS, Merge.TASK_ARITHMETIC),
    "svd": Method(Space.SVD, Merge.TASK_ARITHMETIC),
    "ties": Method(Space.FACTORS, Merge.TIES),
    "ties_svd": Method(Space.SVD, Merge.TIES),
    "dare_linear": Method(Space.FACTORS, Merge.DARE_LINEAR),
    "dare_ties": Method(Space.FACTORS, Merge.DARE_TIES),
    "dare_linear_svd": Method(Space.SVD, Merge.DARE_LINEAR),
    "dare_ties_svd": Method(Space.SVD, Merge.DARE_TIES),
    "magnitude_prune": Method(Space.FACTORS, Merge.MAGNITUDE_PRUNE),
    "magnitude_prune_svd": Method(Space.SVD, Merge.MAGNITUDE_PRUNE),
}
DEFAULT_METHOD = "cat"
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class CombineOptions:
    method: str = DEFAULT_METHOD
    density: float | None = None
    majority_sign_method: str = "total"
    svd_rank: int | None = None
    seed: int = 0

    def check(self) -> Method:
        """The method, once every option is valid for it (one line naming what is not)."""
        method = METHODS.get(self.method)
        if method is None:
            raise InputError(f"unknown combination method {self.method!r}", fix=f"use one of {', '.join(METHODS)}")
        if self.majority_sign_method not in SIGN_METHODS:
            raise InputError(f"unknown majority sign method {self.majority_sign_method!r}",
                             fix=f"use one of {', '.join(SIGN_METHODS)}")
        if method.needs_density:
            if self.density is None:
                raise InputError(f"method {self.method} needs --density (the fraction of values kept, 0-1)",
                                 fix="give e.g. --density 0.5")
            if not (math.isfinite(self.density) and 0.0 <= self.density <= 1.0) or \
                    (method.random and self.density == 0.0):
                raise InputError(f"--density {self.density} is out of range for {self.method}",
                                 fix="give a fraction in (0, 1] for DARE, [0, 1] otherwise")
        elif self.density is not None:
            raise InputError(f"--density does not apply to method {self.method}",
                             fix="leave it out, or use ties, dare_* or magnitude_prune*")
        if self.svd_rank is not None:
            if method.space is not Space.SVD:
                raise InputError(f"--svd-rank does not apply to method {self.method}", fix="use an *svd method")
            if self.svd_rank <= 0:
                raise InputError(f"--svd-rank must be a positive integer, got {self.svd_rank}")
        if not 0 <= self.seed < 2**63:
            raise InputError(f"--seed must be a non-negative integer, got {self.seed}")
        return method


# ------------------------------------------------------------------ merge_utils, in numpy (float32)

def _magnitude_prune(tensor: np.ndarray, density: float) -> np.ndarray:
    """Keep the int(density·n) largest |values| (torch.topk), zero the rest."""
    if density >= 1:
        return tensor
    k = int(density * tensor.size)
    flat = tensor.reshape(-1)
    mask = np.zeros(flat.shape, dtype=tensor.dtype)
    if k > 0:
        mask[np.argpartition(-np.abs(flat), k - 1)[:k]] = 1
    return tensor * mask.reshape(tensor.shape)


def _random_prune(tensor: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """DARE: keep each value with probability density (Bernoulli), rescale kept ones by 1/density."""
    if density >= 1:
        return tensor
    keep = rng.random(tensor.shape) < density
    return (tensor * keep) / np.asarray(density, dtype=tensor.dtype)


def _majority_sign_mask(stacked: np.ndarray, method: str) -> np.ndarray:
    sign = np.sign(stacked)
    magnitude = stacked.sum(axis=0) if method == "total" else sign.sum(axis=0)
    majority = np.where(magnitude >= 0, 1, -1).astype(stacked.dtype)
    return sign == majority


def merge_task_tensors(tensors: Sequence[np.ndarray], weights: Sequence[float], method: Method,
                       options: CombineOptions, rng: np.random.Generator) -> np.ndarray:
    """One of merge_utils' task_arithmetic / ties / dare_linear / dare_ties / magnitude_prune."""
    density = options.density if options.density is not None else 1.0
    if method.merge in (Merge.TIES, Merge.MAGNITUDE_PRUNE):
        tensors = [_magnitude_prune(t, density) for t in tensors]
    elif method.random:
        tensors = [_random_prune(t, density, rng) for t in tensors]
    stacked = np.stack(tensors).astype(np.float32)
    w = np.asarray(weights, dtype=np.float32).reshape((-1,) + (1,) * (stacked.ndim - 1))
    weighted = stacked * w
    if not method.uses_sign:
        return weighted.sum(axis=0)
    mask = _majority_sign_mask(stacked, options.majority_sign_method)
    return (weighted * mask).sum(axis=0) / np.maximum(mask.sum(axis=0), 1).astype(np.float32)


# ------------------------------------------------------------------ checks across adapters

def _max_rank(config: LoraConfig) -> int:
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


def _base_name(adapter: PeftAdapter) -> str | None:
    ref = adapter.config.base_model_name_or_path
    return Path(ref.rstrip("/\\")).name.lower() if ref else None


def check_combinable(adapters: Sequence[PeftAdapter], method: Method, method_name: str) -> None:
    """Refuse, in one line naming the first difference, what PEFT refuses or cannot mean."""
    if not adapters:
        raise InputError("no adapters to combine", fix="give two or more adapters (or one with a weight)")
    first = adapters[0]
    for adapter in adapters:
        if adapter.uses_dora:
            raise AdapterError(f"adapter {adapter.name} is a DoRA adapter, which add_weighted_adapter cannot combine "
                               "(its magnitude vector is not additive)", fix="combine plain LoRA adapters")
        if adapter.replacements:
            raise AdapterError(f"adapter {adapter.name} replaces whole modules (modules_to_save: "
                               f"{next(iter(adapter.replacements))}), which cannot be combined",
                               fix="combine adapters without modules_to_save")
    for other in adapters[1:]:
        a, b = _base_name(first), _base_name(other)
        if a is not None and b is not None and a != b:
            raise AdapterMismatchError(f"adapters {first.name} and {other.name} were trained on different bases "
                                       f"({first.config.base_model_name_or_path} vs "
                                       f"{other.config.base_model_name_or_path})",
                                       fix="combine adapters of the same base model")
        if isinstance(first.config.target_modules, str) != isinstance(other.config.target_modules, str):
            raise AdapterMismatchError(f"adapters {first.name} and {other.name} give target_modules as a regex and "
                                       "as a list; PEFT cannot combine the two kinds",
                                       fix="re-save one adapter with the other kind of target_modules")
        missing = [m for m in first.deltas if m not in other.deltas]
        extra = [m for m in other.deltas if m not in first.deltas]
        if missing or extra:
            which, module = (other.name, missing[0]) if missing else (first.name, extra[0])
            raise AdapterMismatchError(f"adapters {first.name} and {other.name} target different modules: "
                                       f"{which} does not adapt {module.removesuffix('.weight')}",
                                       fix="combine adapters trained on the same target modules")
        for weight_name, delta in first.deltas.items():
            if other.deltas[weight_name].weight_shape != delta.weight_shape:
                raise AdapterMismatchError(
                    f"adapters {first.name} and {other.name} differ in shape at {delta.module}: "
                    f"{list(delta.weight_shape)} vs {list(other.deltas[weight_name].weight_shape)}",
                    fix="combine adapters of the same base model")
    if method.space is Space.FACTORS and len(adapters) > 1:
        ranks = {a.name: _max_rank(a.config) for a in adapters}
        if len(set(ranks.values())) > 1:
            raise AdapterMismatchError(
                f"method {method_name} needs adapters of one rank, got " +
                ", ".join(f"{n} r={r}" for n, r in ranks.items()),
                fix="use cat or an *svd method for adapters of different ranks")
        for weight_name, delta in first.deltas.items():
            for other in adapters[1:]:
                if other.deltas[weight_name].rank != delta.rank:
                    raise AdapterMismatchError(
                        f"method {method_name}: {delta.module} has rank {delta.rank} in {first.name} and "
                        f"{other.deltas[weight_name].rank} in {other.name} (rank_pattern)",
                        fix="use cat or an *svd method")


# ------------------------------------------------------------------ the combination

def _new_rank(adapters: Sequence[PeftAdapter], method: Method, options: CombineOptions) -> int:
    ranks = [_max_rank(a.config) for a in adapters]
    if method.space is Space.CAT:
        return sum(ranks)
    if method.space is Space.SVD:
        return options.svd_rank or max(ranks)
    return ranks[0]


def _new_target_modules(adapters: Sequence[PeftAdapter]) -> list[str] | str | None:
    targets = [a.config.target_modules for a in adapters]
    if any(t is None for t in targets):
        return None
    if isinstance(targets[0], str):
        return "|".join(f"({t})" for t in targets)
    return sorted(set().union(*targets))  # type: ignore[arg-type]


def _combine_module(parts: Sequence[tuple[LoraDelta, float]], method: Method, options: CombineOptions,
                    new_rank: int, max_ranks: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    out_features, in_features = parts[0][0].weight_shape
    if method.space is Space.CAT:
        # Each adapter's slot is its max rank wide (PEFT allocates that); lower-rank modules leave zeros.
        a = np.zeros((new_rank, in_features), dtype=np.float32)
        b = np.zeros((out_features, new_rank), dtype=np.float32)
        at = 0
        for (delta, weight), width in zip(parts, max_ranks):
            a[at:at + delta.rank] = delta.lora_a * np.float32(weight * delta.scale)
            b[:, at:at + delta.rank] = delta.lora_b
            at += width
        return a, b
    if method.space is Space.FACTORS:
        weights_a, weights_b = [], []
        for delta, weight in parts:
            scaled = weight * delta.scale
            root = math.sqrt(abs(scaled))
            weights_a.append(root if scaled >= 0 else -root)
            weights_b.append(root)
        a = merge_task_tensors([d.lora_a for d, _ in parts], weights_a, method, options, rng)
        b = merge_task_tensors([d.lora_b for d, _ in parts], weights_b, method, options, rng)
        return a, b
    if new_rank > min(out_features, in_features):
        raise InputError(f"--svd-rank {new_rank} is larger than {parts[0][0].module} allows "
                         f"({min(out_features, in_features)})",
                         fix=f"give --svd-rank {min(out_features, in_features)} or less")
    if method.merge is Merge.TASK_ARITHMETIC:
        return _low_rank_svd(parts, new_rank)
    deltas = [(d.lora_b @ d.lora_a) * np.float32(d.scale) for d, _ in parts]
    merged = merge_task_tensors(deltas, [w for _, w in parts], method, options, rng)
    u, s, vh = np.linalg.svd(merged.astype(np.float64), full_matrices=False)
    return vh[:new_rank].astype(np.float32), (u[:, :new_rank] * s[:new_rank]).astype(np.float32)


def _low_rank_svd(parts: Sequence[tuple[LoraDelta, float]], new_rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``svd``: the truncated SVD of Σ wᵢ·sᵢ·BᵢAᵢ from its factors (QR of [B₁ B₂ …] and of
    [w₁s₁A₁; …]ᵀ, SVD of the small core): the same singular triplets as the SVD of the full
    delta PEFT takes, at a cost linear in the layer size. Beyond the sum's rank the singular
    values are 0 and the factors are written as zeros (PEFT's are arbitrary there; the product
    is the same)."""
    b = np.concatenate([d.lora_b.astype(np.float64) for d, _ in parts], axis=1)
    a = np.concatenate([d.lora_a.astype(np.float64) * (w * d.scale) for d, w in parts], axis=0)
    q_b, r_b = np.linalg.qr(b)
    q_a, r_a = np.linalg.qr(a.T)
    u, s, vh = np.linalg.svd(r_b @ r_a.T)
    keep = min(new_rank, s.shape[0])
    lora_b = np.zeros((b.shape[0], new_rank))
    lora_a = np.zeros((new_rank, a.shape[1]))
    lora_b[:, :keep] = (q_b @ u[:, :keep]) * s[:keep]
    lora_a[:keep] = vh[:keep] @ q_a.T
    return lora_a.astype(np.float32), lora_b.astype(np.float32)


def combine_adapters(inputs: Sequence[tuple[PeftAdapter, float]], options: CombineOptions = CombineOptions(),
                     *, name: str = "combined") -> PeftAdapter:
    """The combined adapter (in memory, ``path`` = Path(name)); the inputs are left untouched.
    One adapter is always combined with ``linear``, as PEFT does (ΔW = w·ΔW₁ then)."""
    options.check()
    method_name = options.method if len(inputs) > 1 else "linear"
    method = METHODS[method_name]
    adapters = [a for a, _ in inputs]
    for _, weight in inputs:
        if not math.isfinite(weight):
            raise InputError(f"adapter weight {weight} is not a finite number")
    check_combinable(adapters, method, method_name)
    rng = np.random.default_rng(options.seed)
    new_rank = _new_rank(adapters, method, options)
    max_ranks = [_max_rank(a.config) for a in adapters]
    deltas: dict[str, LoraDelta] = {}
    for weight_name, first in adapters[0].deltas.items():
        parts = [(a.deltas[weight_name], w) for a, w in inputs]
        lora_a, lora_b = _combine_module(parts, method, options, new_rank, max_ranks, rng)
        deltas[weight_name] = LoraDelta(module=first.module, lora_a=lora_a, lora_b=lora_b, scale=1.0)
    # A module whose rank is below the new r (rank_pattern inputs) keeps scale 1 through a pattern
    # of its own, so PEFT loads the file with the shapes it holds.
    odd = {re.escape(d.module): d.rank for d in deltas.values() if d.rank != new_rank}
    config = replace(adapters[0].config, r=new_rank, lora_alpha=float(new_rank), use_rslora=False,
                     rank_pattern=odd, alpha_pattern={k: float(v) for k, v in odd.items()},
                     target_modules=_new_target_modules(adapters), modules_to_save=[])
    return PeftAdapter(Path(name), config, deltas, {})


# ------------------------------------------------------------------ writing a PEFT adapter directory

def peft_config_json(adapter: PeftAdapter, base_model: str | None) -> dict:
    """adapter_config.json as PEFT writes it for a plain LoRA (the fields PEFT and vLLM read)."""
    c = adapter.config
    return {
        "alpha_pattern": c.alpha_pattern, "base_model_name_or_path": base_model, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layers_to_transform": c.layers_to_transform, "lora_alpha": c.lora_alpha, "lora_dropout": 0.0,
        "modules_to_save": None, "peft_type": "LORA", "r": c.r, "rank_pattern": c.rank_pattern,
        "target_modules": c.target_modules, "task_type": "CAUSAL_LM", "use_dora": False,
        "use_rslora": c.use_rslora,
    }


def write_peft_adapter(adapter: PeftAdapter, out_dir: Path | str, *, base_model: str | None = None) -> Path:
    """``out_dir/adapter_model.safetensors`` then ``adapter_config.json``, each written atomically.
    A delta whose scale differs from what the config gives its module has the ratio folded into B."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} is a file", fix="give a directory for the PEFT adapter")
    out_dir.mkdir(parents=True, exist_ok=True)
    ensure_writable_dir(out_dir)
    tensors: dict[str, np.ndarray] = {}
    for delta in adapter.deltas.values():
        expected = adapter.config.scale_for(delta.module)
        fold = np.float32(delta.scale / expected) if delta.scale != expected else np.float32(1.0)
        tensors[KEY_PREFIX + delta.module + LORA_A] = np.ascontiguousarray(delta.lora_a, dtype=np.float32)
        tensors[KEY_PREFIX + delta.module + LORA_B] = np.ascontiguousarray(delta.lora_b * fold, dtype=np.float32)
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        write_safetensors(tmp, tensors, {"format": "pt"})
    atomic_write_text(out_dir / CONFIG_FILE, json.dumps(peft_config_json(adapter, base_model), indent=2) + "\n")
    return out_dir
