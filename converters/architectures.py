"""The per-architecture table: HF names -> GGUF names, metadata from config.json, transforms.

An architecture is data: one ``ArchEntry`` per HF architecture says which tensors each layer
must have, which GGUF metadata keys come from which config fields, and which transforms apply
(Llama q/k row permutation, Gemma norm weight + 1, tied embeddings). Names and keys come from
gguf-py (``gguf.MODEL_ARCH``, ``gguf.get_tensor_name_map``, ``gguf.Keys``), matching what
llama.cpp's ``convert_hf_to_gguf.py`` writes for the same architecture, so llama.cpp loads the
file and computes the same logits as the HF model. The writer never sees architecture names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import gguf
import numpy as np

from edge_lora.core.errors import InvalidCheckpointError, UnsupportedArchitectureError

K = gguf.Keys
VT = gguf.GGUFValueType

# (key, value, value type): what gguf_output writes, without knowing what it means.
MetadataItem = tuple[str, Any, gguf.GGUFValueType]
Config = dict[str, Any]

# HF tensors that carry no weights llama.cpp needs (recomputed buffers).
IGNORED_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
LM_HEAD = "lm_head.weight"


# llama.cpp's LLAMA_MAX_LAYERS. A hostile num_hidden_layers (1e9) would otherwise make the
# expected-tensor table (and Gemma 3's layer-type list) allocate forever before any shape check.
MAX_LAYERS = 512


def _int(config: Config, key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidCheckpointError(f"config.json field {key!r} must be a positive integer, got {value!r}",
                                     fix="fix or re-download config.json")
    return value


def _float(config: Config, key: str, default: float | None = None) -> float:
    value = config.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise InvalidCheckpointError(f"config.json field {key!r} must be a positive number, got {value!r}",
                                     fix="fix or re-download config.json")
    return float(value)


@dataclass(frozen=True)
class Dims:
    """The shape facts every architecture shares, validated once."""

    hidden: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: Config, default_head_dim: int | None = None) -> Dims:
        hidden = _int(config, "hidden_size")
        heads = _int(config, "num_attention_heads")
        kv_heads = _int(config, "num_key_value_heads", heads)
        if heads % kv_heads:
            raise InvalidCheckpointError(
                f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})",
                fix="fix config.json")
        head_dim_default = default_head_dim if default_head_dim is not None else hidden // heads
        head_dim = config.get("head_dim") or head_dim_default
        layers = _int(config, "num_hidden_layers")
        if layers > MAX_LAYERS:  # checked before anything iterates over the layers
            raise InvalidCheckpointError(f"config.json num_hidden_layers is {layers}; llama.cpp supports at most "
                                         f"{MAX_LAYERS}", fix="fix or re-download config.json")
        return cls(hidden=hidden, layers=layers,
                   ffn=_int(config, "intermediate_size"), heads=heads, kv_heads=kv_heads,
                   head_dim=_int({"head_dim": head_dim}, "head_dim"), vocab=_int(config, "vocab_size"))


def permute_qk_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``permute``: HF stores each head's rotary halves as [first half | second
    half]; GGUF Llama wants them interleaved. Works on any block of whole heads (rows first)."""
    rows = weights.shape[0]
    if rows % n_head or (rows // n_head) % 2:
        raise ValueError(f"cannot permute {rows} rows into {n_head} heads")
    return (weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


# --- RoPE settings, from either config generation ------------------------------------------------
# transformers 4 writes top-level ``rope_theta`` (Gemma 3: also ``rope_local_base_freq``) and a
# ``rope_scaling`` object; transformers 5 writes ``rope_parameters`` holding rope_theta, rope_type
# and the scaling fields, per layer type when the model's layers differ
# (``{"sliding_attention": {...}, "full_attention": {...}}``). A config whose RoPE base cannot be
# read is refused: a default base converts without error and drifts from the model as positions grow.

ROPE_LAYER_TYPES = ("full_attention", "sliding_attention")
# Scaling kinds that extend the pretraining context (transformers moves the pretraining length,
# original_max_position_embeddings, into their parameters).
ROPE_KINDS_WITH_ORIGINAL_CONTEXT = ("llama3", "yarn", "longrope")


@dataclass(frozen=True)
class Rope:
    """The rotary embedding of one layer type."""

    theta: float
    kind: str  # "default", "linear", "yarn", "llama3", "longrope"
    params: Config  # the scaling fields as written (factor, low_freq_factor, long_factor, ...)
    rotary_dims: int  # rotated dimensions per head (head_dim * partial_rotary_factor)
    original_context: int | None  # pretraining context of the context-extending kinds


def _rope_error(what: str) -> InvalidCheckpointError:
    return InvalidCheckpointError(f"config.json {what}", fix="fix or re-download config.json (RoPE settings)")


def read_rope(config: Config, dims: Dims, layer_type: str = "full_attention", *,
              legacy_theta_key: str = "rope_theta", legacy_scaling: bool = True) -> Rope:
    """The RoPE of ``layer_type`` layers, as transformers 4 and 5 both read it.
    ``legacy_theta_key``: the transformers 4 key holding this layer type's base;
    ``legacy_scaling``: whether transformers 4's ``rope_scaling`` applies to these layers."""
    parameters = config.get("rope_parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise _rope_error(f"rope_parameters must be an object, got {str(parameters)[:80]}")
    if parameters:
        nested = [k for k in parameters if k in ROPE_LAYER_TYPES]
        entry = parameters.get(layer_type) if nested else parameters
        if nested and entry is None:
            raise _rope_error(f"rope_parameters has no {layer_type!r} entry (it has {', '.join(nested)})")
        where = f"rope_parameters[{layer_type!r}]" if nested else "rope_parameters"
    else:
        scaling = config.get("rope_scaling") if legacy_scaling else None
        entry = scaling if scaling is not None else {}
        where = "rope_scaling"
    if not isinstance(entry, dict):
        raise _rope_error(f"{where} must be an object, got {str(entry)[:80]}")
    # transformers 5 fills a missing rope_theta in rope_parameters from a top-level key.
    theta = entry.get("rope_theta", config.get(legacy_theta_key))
    if theta is None:
        raise _rope_error(f"states no RoPE base for its {layer_type.replace('_', ' ')} layers (neither "
                          f"{legacy_theta_key} nor rope_parameters.rope_theta)")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not math.isfinite(theta) or theta <= 1:
        raise _rope_error(f"RoPE base (rope_theta) must be a number above 1, got {theta!r}")
    kind = entry.get("rope_type", entry.get("type")) or "default"
    if not isinstance(kind, str):
        raise _rope_error(f"{where}.rope_type must be a string, got {kind!r}")
    partial = entry.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if not isinstance(partial, (int, float)) or isinstance(partial, bool) or not 0 < partial <= 1:
        raise _rope_error(f"partial_rotary_factor must be in (0, 1], got {partial!r}")
    rotary_dims = int(dims.head_dim * partial)
    if rotary_dims < 2 or rotary_dims % 2:
        raise _rope_error(f"rotates {rotary_dims} dimensions per head, not an even number >= 2")
    kind = kind.lower()
    original = None
    if kind in ROPE_KINDS_WITH_ORIGINAL_CONTEXT:
        # Phi-3 keeps its pretraining length at the top level; transformers prefers it there.
        value = config.get("original_max_position_embeddings", entry.get("original_max_position_embeddings"))
        value = value if value is not None else config.get("max_position_embeddings")
        original = _int({"original_max_position_embeddings": value}, "original_max_position_embeddings") \
            if value is not None else None
    return Rope(theta=float(theta), kind=kind, params=entry, rotary_dims=rotary_dims, original_context=original)


def _positive(params: Config, key: str, what: str, default: float | None = None) -> float:
    value = params.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise _rope_error(f"{what} {key} must be a positive number, got {value!r}")
    return float(value)


def _rope_metadata(arch: str, rope: Rope, config: Config, allowed: tuple[str, ...]
                   ) -> tuple[list[MetadataItem], dict[str, np.ndarray]]:
    """freq_base, the rotated dimensions and the scaling of ``rope``, written as llama.cpp reads
    them (and as convert_hf_to_gguf.py writes them), or a refusal for a kind ``arch`` cannot run."""
    items: list[MetadataItem] = [(K.Rope.FREQ_BASE.format(arch=arch), rope.theta, VT.FLOAT32),
                                 (K.Rope.DIMENSION_COUNT.format(arch=arch), rope.rotary_dims, VT.UINT32)]
    if rope.kind == "default":
        return items, {}
    if rope.kind not in allowed:
        raise UnsupportedArchitectureError(
            f"RoPE scaling {rope.kind!r} is not supported for {arch} (supported: {', '.join(allowed) or 'none'})",
            fix="remove the RoPE scaling from config.json if the model does not need a long context")
    what = f"{rope.kind} RoPE scaling"
    if rope.kind != "linear" and rope.original_context is None:
        raise _rope_error(f"{what} needs original_max_position_embeddings (or max_position_embeddings)")
    if rope.kind == "linear":
        return items + [(K.Rope.SCALING_TYPE.format(arch=arch), gguf.RopeScalingType.LINEAR.value, VT.STRING),
                        (K.Rope.SCALING_FACTOR.format(arch=arch), _positive(rope.params, "factor", what), VT.FLOAT32)], {}
    if rope.kind == "yarn":
        return items + _yarn_metadata(arch, rope, config), {}
    if rope.kind == "longrope":
        return items + _longrope_metadata(arch, rope, config), _longrope_factors(rope)
    # llama3: no scaling keys; per-frequency divisors go into a rope_freqs tensor.
    factor = _positive(rope.params, "factor", what)
    low = _positive(rope.params, "low_freq_factor", what)
    high = _positive(rope.params, "high_freq_factor", what)
    old_ctx = rope.original_context
    if high == low:
        raise _rope_error("llama3 RoPE scaling has high_freq_factor == low_freq_factor")
    dim = rope.rotary_dims
    freqs = 1.0 / (rope.theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / float(freq)
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    return items, {name: np.asarray(factors, dtype=np.float32)}


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_metadata(arch: str, rope: Rope, config: Config) -> list[MetadataItem]:
    """YaRN as transformers computes it. llama.cpp multiplies cos/sin by
    rope.scaling.attn_factor * (1 + 0.1 ln factor); transformers by its attention_factor (given,
    or from mscale / mscale_all_dim, or 1 + 0.1 ln factor), so attn_factor carries the ratio."""
    assert rope.original_context is not None
    params = rope.params
    if params.get("factor") is None:  # transformers 5: the context extension ratio
        factor = _int(config, "max_position_embeddings") / rope.original_context
    else:
        factor = _positive(params, "factor", "yarn RoPE scaling")
    if params.get("truncate", True) is not True:
        raise UnsupportedArchitectureError("yarn RoPE scaling with truncate=false is not supported by llama.cpp "
                                           "(it always rounds the correction range)",
                                           fix="use a checkpoint with the default yarn settings")
    attention = params.get("attention_factor")
    if attention is None:
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if mscale and mscale_all
                     else _yarn_mscale(factor))
    attention = _positive({"attention_factor": attention}, "attention_factor", "yarn RoPE scaling")
    items: list[MetadataItem] = [
        (K.Rope.SCALING_TYPE.format(arch=arch), gguf.RopeScalingType.YARN.value, VT.STRING),
        (K.Rope.SCALING_FACTOR.format(arch=arch), float(factor), VT.FLOAT32),
        (K.Rope.SCALING_ORIG_CTX_LEN.format(arch=arch), rope.original_context, VT.UINT32),
        (K.Rope.SCALING_ATTN_FACTOR.format(arch=arch), attention / _yarn_mscale(factor), VT.FLOAT32),
    ]
    for key, gguf_key in (("beta_fast", K.Rope.SCALING_YARN_BETA_FAST), ("beta_slow", K.Rope.SCALING_YARN_BETA_SLOW)):
        if params.get(key):
            items.append((gguf_key.format(arch=arch), _positive(params, key, "yarn RoPE scaling"), VT.FLOAT32))
    return items


def _longrope_metadata(arch: str, rope: Rope, config: Config) -> list[MetadataItem]:
    """LongRoPE (Phi-3 "su"/"longrope"): per-dimension divisors for short and long contexts, and
    a cos/sin factor from the context extension. transformers 4 derives the extension from
    max_position_embeddings / original_max_position_embeddings, 5 prefers a given ``factor``:
    a factor that disagrees with the ratio is refused, as the two would compute different models."""
    assert rope.original_context is not None
    ratio = _int(config, "max_position_embeddings") / rope.original_context
    factor = rope.params.get("factor")
    if factor is not None and not math.isclose(_positive(rope.params, "factor", "longrope"), ratio, rel_tol=1e-6):
        raise UnsupportedArchitectureError(
            f"longrope factor {factor} differs from max_position_embeddings / original_max_position_embeddings "
            f"({ratio:g}); transformers 4 and 5 disagree on which applies", fix="remove factor from the RoPE scaling")
    attention = rope.params.get("attention_factor")
    if attention is None:
        attention = math.sqrt(1 + math.log(ratio) / math.log(rope.original_context)) if ratio > 1 else 1.0
    return [(K.Rope.SCALING_ATTN_FACTOR.format(arch=arch),
             _positive({"attention_factor": attention}, "attention_factor", "longrope"), VT.FLOAT32),
            (K.Rope.SCALING_ORIG_CTX_LEN.format(arch=arch), rope.original_context, VT.UINT32)]


def _longrope_factors(rope: Rope) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key, tensor in (("long_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG),
                        ("short_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)):
        values = rope.params.get(key)
        if (not isinstance(values, list) or len(values) != rope.rotary_dims // 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                           for v in values)):
            raise _rope_error(f"longrope {key} must be {rope.rotary_dims // 2} positive numbers (one per rotated "
                              f"dimension pair), got {str(values)[:80]}")
        out[gguf.TENSOR_NAMES[tensor] + ".weight"] = np.asarray(values, dtype=np.float32)
    return out


# --- per-architecture metadata -----------------------------------------------------------------

def _common_metadata(arch: str, config: Config, dims: Dims, context_length: int) -> list[MetadataItem]:
    return [
        (K.LLM.CONTEXT_LENGTH.format(arch=arch), context_length, VT.UINT32),
        (K.LLM.EMBEDDING_LENGTH.format(arch=arch), dims.hidden, VT.UINT32),
        (K.LLM.BLOCK_COUNT.format(arch=arch), dims.layers, VT.UINT32),
        (K.LLM.FEED_FORWARD_LENGTH.format(arch=arch), dims.ffn, VT.UINT32),
        (K.Attention.HEAD_COUNT.format(arch=arch), dims.heads, VT.UINT32),
        (K.Attention.HEAD_COUNT_KV.format(arch=arch), dims.kv_heads, VT.UINT32),
        (K.Attention.KEY_LENGTH.format(arch=arch), dims.head_dim, VT.UINT32),
        (K.Attention.VALUE_LENGTH.format(arch=arch), dims.head_dim, VT.UINT32),
        (K.Attention.LAYERNORM_RMS_EPS.format(arch=arch), _float(config, "rms_norm_eps", 1e-6), VT.FLOAT32),
    ]


def _llama_like_metadata(arch: str, config: Config, dims: Dims, allowed_scaling: tuple[str, ...],
                         context_length: int) -> tuple[list[MetadataItem], dict[str, np.ndarray]]:
    rope, tensors = _rope_metadata(arch, read_rope(config, dims), config, allowed_scaling)
    return (_common_metadata(arch, config, dims, context_length) + rope
            + [(K.LLM.VOCAB_SIZE.format(arch=arch), dims.vocab, VT.UINT32)]), tensors


def _window_capped_context(config: Config, context: int) -> int:
    """llama.cpp runs these architectures without a sliding window. Attention over at most
    ``sliding_window`` tokens equals full attention, so the context is capped there (exact)."""
    if config.get("sliding_window") is not None and config.get("use_sliding_window", True) is not False:
        return min(context, _int(config, "sliding_window"))
    return context


def _llama_metadata(arch: str, config: Config, dims: Dims) -> tuple[list[MetadataItem], dict[str, np.ndarray]]:
    if config.get("mlp_bias"):
        raise UnsupportedArchitectureError("Llama checkpoints with mlp_bias are not supported",
                                           fix="use a checkpoint without MLP biases")
    context = _window_capped_context(config, _int(config, "max_position_embeddings", 4096))
    return _llama_like_metadata(arch, config, dims, ("linear", "yarn", "llama3"), context)


def _qwen_metadata(arch: str, config: Config, dims: Dims) -> tuple[list[MetadataItem], dict[str, np.ndarray]]:
    if config.get("use_sliding_window"):
        raise UnsupportedArchitectureError(
            "Qwen checkpoints with use_sliding_window=true are not supported (llama.cpp has no "
            "per-layer sliding window for Qwen)", fix="set use_sliding_window to false in config.json")
    context = _int(config, "max_position_embeddings", 32768)
    return _llama_like_metadata(arch, config, dims, ("linear", "yarn"), context)


def _alternating_layer_types(config: Config, dims: Dims, period: int, arch_name: str) -> None:
    """llama.cpp fixes the sliding/full pattern (every ``period``-th layer full): a config whose
    layer_types (or sliding_window_pattern) says otherwise is refused."""
    expected = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(dims.layers)]
    layer_types = config.get("layer_types")
    pattern = config.get("sliding_window_pattern")
    if (layer_types is not None and layer_types != expected) or (
            layer_types is None and pattern is not None and pattern != period):
        raise UnsupportedArchitectureError(
            f"{arch_name} layer pattern differs from llama.cpp's ({period - 1} sliding layer(s), then 1 global)",
            fix=f"use a checkpoint with the standard {arch_name} layer pattern")


GEMMA3_SWA_PERIOD = 6  # llama.cpp hard-codes: every 6th layer global, the rest sliding
GEMMA3_LOCAL_ROPE_BASE = 10000.0  # llama.cpp's sliding-layer base when a file has no freq_base_swa


def _gemma3_metadata(arch: str, config: Config, dims: Dims) -> tuple[list[MetadataItem], dict[str, np.ndarray]]:
    # llama.cpp fixes several Gemma 3 choices instead of reading them; refuse configs that
    # differ rather than writing a file that computes something else.
    if config.get("attn_logit_softcapping") is not None:
        raise UnsupportedArchitectureError("Gemma 3 with attn_logit_softcapping is not supported by llama.cpp",
                                           fix="set attn_logit_softcapping to null")
    scalar = config.get("query_pre_attn_scalar", dims.head_dim)
    if scalar != dims.head_dim:
        raise UnsupportedArchitectureError(
            f"Gemma 3 query_pre_attn_scalar {scalar} differs from head_dim {dims.head_dim}; llama.cpp "
            "scales attention by 1/sqrt(head_dim)", fix="use a checkpoint with query_pre_attn_scalar = head_dim")
    _alternating_layer_types(config, dims, GEMMA3_SWA_PERIOD, "Gemma 3")
    # Sliding layers: their own base (gemma3.rope.freq_base_swa) and never scaled in llama.cpp.
    local = read_rope(config, dims, "sliding_attention", legacy_theta_key="rope_local_base_freq",
                      legacy_scaling=False)
    if local.kind != "default":
        raise UnsupportedArchitectureError(
            f"Gemma 3 with {local.kind} RoPE scaling on its sliding-window layers is not supported (llama.cpp "
            "scales only the global layers)", fix="scale only the full-attention layers' RoPE")
    items = _common_metadata(arch, config, dims, _int(config, "max_position_embeddings", 131072)) + [
        (K.Attention.SLIDING_WINDOW.format(arch=arch), _int(config, "sliding_window", 4096), VT.UINT32),
        (K.Rope.FREQ_BASE_SWA.format(arch=arch), local.theta, VT.FLOAT32),
    ]
    softcap = config.get("final_logit_softcapping")
    if softcap is not None:
        items.append((K.LLM.FINAL_LOGIT_SOFTCAPPING.format(arch=arch), _float(config, "final_logit_softcapping"),
                      VT.FLOAT32))
    # Gemma 3 applies linear rope scaling to its global layers only, as llama.cpp does.
    rope, tensors = _rope_metadata(arch, read_rope(config, dims, legacy_theta_key="rope_theta"), config, ("linear",))
    if local.rotary_dims != dims.head_dim:
        raise UnsupportedArchitectureError("Gemma 3 with partial rotary embeddings is not supported",
                                           fix="use a checkpoint that rotates whole heads")
    return items + rope, tensors


def _gemma2_metadata(arch: str, config: Config, dims: Dims) -> tuple[list[MetadataItem], dict[str, np.ndarray]]:
    """Gemma 2: llama.cpp always soft-caps attention and final logits (50 and 30 when a file
    does not say) and scales queries by 1/sqrt(head_dim), or by 1/sqrt(hidden/heads) for its
    46-layer 27B; sliding and global layers alternate, sharing one RoPE."""
    caps = []
    for key, gguf_key in (("attn_logit_softcapping", K.LLM.ATTN_LOGIT_SOFTCAPPING),
                          ("final_logit_softcapping", K.LLM.FINAL_LOGIT_SOFTCAPPING)):
        if config.get(key) is None:
            raise UnsupportedArchitectureError(
                f"Gemma 2 without {key} is not supported: llama.cpp's gemma2 always soft-caps",
                fix=f"use a checkpoint with {key} set (Gemma 2 releases use 50 and 30)")
        caps.append((gguf_key.format(arch=arch), _float(config, key), VT.FLOAT32))
    llama_cpp_scalar = dims.hidden // dims.heads if dims.layers == 46 else dims.head_dim
    scalar = config.get("query_pre_attn_scalar", 256)
    if scalar != llama_cpp_scalar:
        raise UnsupportedArchitectureError(
            f"Gemma 2 query_pre_attn_scalar {scalar} differs from the {llama_cpp_scalar} llama.cpp scales "
            f"queries by for a {dims.layers}-layer model", fix="use a checkpoint of a released Gemma 2 shape")
    _alternating_layer_types(config, dims, 2, "Gemma 2")
    rope, tensors = _rope_metadata(arch, read_rope(config, dims), config, ("linear",))
    if int(rope[1][1]) != dims.head_dim:
        raise UnsupportedArchitectureError("Gemma 2 with partial rotary embeddings is not supported",
                                           fix="use a checkpoint that rotates whole heads")
    return (_common_metadata(arch, config, dims, _int(config, "max_position_embeddings", 8192)) + rope + caps
            + [(K.Attention.SLIDING_WINDOW.format(arch=arch), _int(config, "sliding_window", 4096), VT.UINT32)]), tensors


def _phi3_metadata(arch: str, config: Config, dims: Dims) -> tuple[list[MetadataItem], dict[str, np.ndarray]]:
    """Phi-3 / 3.5 / Phi-4-mini: fused projections, partial rotary, LongRoPE. llama.cpp's phi3
    runs without a sliding window, so the context is capped at it (exact, as for Mistral)."""
    if dims.heads * dims.head_dim != dims.hidden:
        raise UnsupportedArchitectureError(
            f"Phi-3 with heads x head_dim ({dims.heads} x {dims.head_dim}) != hidden_size ({dims.hidden}) is not "
            "supported by llama.cpp", fix="use a checkpoint of a released Phi-3 shape")
    context = _window_capped_context(config, _int(config, "max_position_embeddings", 4096))
    rope = read_rope(config, dims)
    if rope.kind in ("su", "yarn"):  # transformers reads Phi-3's older names as longrope
        rope = replace(rope, kind="longrope", original_context=rope.original_context or _int(
            config, "original_max_position_embeddings", _int(config, "max_position_embeddings", 4096)))
    items, tensors = _rope_metadata(arch, rope, config, ("longrope",))
    return _common_metadata(arch, config, dims, context) + items, tensors


def _granite_metadata(arch: str, config: Config, dims: Dims) -> tuple[list[MetadataItem], dict[str, np.ndarray]]:
    """Granite 3.x dense: Llama with four multipliers. llama.cpp skips a residual or attention
    scale of 0 (and has no head_dim), so those are refused rather than run differently."""
    if config.get("mlp_bias"):
        raise UnsupportedArchitectureError("Granite checkpoints with mlp_bias are not supported",
                                           fix="use a checkpoint without MLP biases")
    if config.get("head_dim") not in (None, dims.hidden // dims.heads):
        raise UnsupportedArchitectureError(
            f"Granite head_dim {config.get('head_dim')} differs from hidden_size / num_attention_heads; llama.cpp's "
            "granite has no separate head size", fix="use a checkpoint of a released Granite shape")
    items, tensors = _llama_like_metadata(arch, config, dims, ("linear", "yarn", "llama3"),
                                          _int(config, "max_position_embeddings", 4096))
    for key, gguf_key in (("embedding_multiplier", K.LLM.EMBEDDING_SCALE),
                          ("residual_multiplier", K.LLM.RESIDUAL_SCALE),
                          ("attention_multiplier", K.Attention.SCALE),
                          ("logits_scaling", K.LLM.LOGIT_SCALE)):
        items.append((gguf_key.format(arch=arch), _float(config, key, 1.0), VT.FLOAT32))
    return items, tensors


SMOLLM3_NO_ROPE_STEP = 4  # llama.cpp hard-codes: every 4th layer has no RoPE


def _smollm3_metadata(arch: str, config: Config, dims: Dims) -> tuple[list[MetadataItem], dict[str, np.ndarray]]:
    """SmolLM3: Llama whose every 4th layer is NoPE, a pattern llama.cpp fixes; the config's
    no_rope_layers must say the same."""
    expected = [int((i + 1) % SMOLLM3_NO_ROPE_STEP != 0) for i in range(dims.layers)]
    flags = config.get("no_rope_layers")
    interval = config.get("no_rope_layer_interval", SMOLLM3_NO_ROPE_STEP)
    if (flags is not None and flags != expected) or (flags is None and interval != SMOLLM3_NO_ROPE_STEP):
        raise UnsupportedArchitectureError(
            "SmolLM3 NoPE layers differ from llama.cpp's (every 4th layer without RoPE)",
            fix="use a checkpoint with the standard SmolLM3 no_rope_layers")
    if config.get("use_sliding_window"):
        raise UnsupportedArchitectureError("SmolLM3 with use_sliding_window=true is not supported by llama.cpp",
                                           fix="set use_sliding_window to false in config.json")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise UnsupportedArchitectureError(f"SmolLM3 checkpoints with {key} are not supported",
                                               fix=f"use a checkpoint without {key}")
    return _llama_like_metadata(arch, config, dims, ("linear", "yarn"), _int(config, "max_position_embeddings", 65536))


# --- the table ----------------------------------------------------------------------------------

LLAMA_LAYER = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
               "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
               "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
QKV_BIAS = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
QK_NORM = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
GEMMA_FFN_NORMS = ("pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight")
# Phi-3 fuses q/k/v ([q | k | v] rows, llama.cpp's attn_qkv splits the same way) and gate/up
# ([gate | up] rows: llama.cpp's ffn_up of 2 x n_ff feeds a swiglu taking its first half as gate).
PHI3_LAYER = ("input_layernorm.weight", "self_attn.qkv_proj.weight", "self_attn.o_proj.weight",
              "post_attention_layernorm.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight")


@dataclass(frozen=True)
class TextOnlyView:
    """How a multimodal checkpoint is read as its language model alone (what llama.cpp's
    convert_hf_to_gguf.py does: the text model becomes a plain text GGUF, the vision tower and
    projector go to a separate mmproj file, which edge-lora does not write)."""

    text_architecture: str  # the ARCH_TABLE entry the language model converts as
    text_config_key: str  # the text hyper-parameters live under config[text_config_key]
    # Fields the nested config may omit; the text config class's defaults.
    text_config_defaults: Config
    # (checkpoint name prefix, name the text architecture uses); both transformers layouts.
    prefix_renames: tuple[tuple[str, str], ...]
    # Modules that are not part of the text model: their tensors are never read.
    skipped_prefixes: tuple[str, ...]

    def flatten_config(self, config: Config) -> Config:
        """The text model's config, as config.json of ``text_architecture``: defaults < top level
        (token ids, tie_word_embeddings) < text_config."""
        nested = config.get(self.text_config_key)
        if not isinstance(nested, dict):
            # transformers would build its default text model and ignore flat text fields.
            raise UnsupportedArchitectureError(
                f"{config.get('architectures', ['?'])[0]} config.json has no {self.text_config_key!r} object "
                f"(flat text hyper-parameters are a {self.text_architecture} config)",
                fix=f"nest the text fields under {self.text_config_key!r}, or set architectures to "
                    f"[\"{self.text_architecture}\"]")
        top = {k: v for k, v in config.items() if not k.endswith("_config")}
        return {**self.text_config_defaults, **top, **nested, "architectures": [self.text_architecture]}

    def text_name(self, name: str) -> str | None:
        """The text architecture's name for a checkpoint (or PEFT module) name; None for a
        vision/projector one; anything else unchanged (so unknown tensors stay errors)."""
        if name.startswith(self.skipped_prefixes):
            return None
        for prefix, replacement in self.prefix_renames:
            if name.startswith(prefix):
                return replacement + name[len(prefix):]
        return name


@dataclass(frozen=True)
class ArchEntry:
    hf_architecture: str
    gguf_arch: gguf.MODEL_ARCH
    layer_tensors: Callable[[Config], tuple[str, ...]]
    metadata: Callable[[str, Config, Dims], tuple[list[MetadataItem], dict[str, np.ndarray]]]
    permute_qk: bool = False  # Llama: interleave rotary halves (llama.cpp's permute)
    norm_plus_one: bool = False  # Gemma: RMSNorm computes x * (1 + w); llama.cpp wants 1 + w
    tied_default: bool = False  # tie_word_embeddings when config.json does not say
    default_head_dim: int | None = None
    text_only: TextOnlyView | None = None  # a multimodal checkpoint converted as its text model
    tied_only: bool = False  # llama.cpp always reuses token_embd as the output (no output.weight)


def _llama_layer(config: Config) -> tuple[str, ...]:
    return LLAMA_LAYER + (QKV_BIAS + ("self_attn.o_proj.bias",) if config.get("attention_bias") else ())


GEMMA3_TEXT_ONLY = TextOnlyView(
    text_architecture="Gemma3ForCausalLM",
    text_config_key="text_config",
    # Gemma3TextConfig defaults the released configs rely on: transformers writes a nested
    # config's fields only where they differ from its class defaults, so the 4B text_config has
    # no vocab_size and no RoPE bases (these, in both generations). The other defaults
    # (head_dim, ...) are the Gemma3ForCausalLM entry's. llama.cpp trims token_embd to the
    # tokenizer's size when vocab_size is absent (262144 of 262208 rows: the rest are never
    # produced by the tokenizer); we keep all rows and pad the GGUF vocab to vocab_size with
    # [PAD] tokens instead, which loads and computes the same logits for every real token.
    text_config_defaults={"vocab_size": 262208, "hidden_activation": "gelu_pytorch_tanh",
                          "rope_theta": 1_000_000.0, "rope_local_base_freq": GEMMA3_LOCAL_ROPE_BASE},
    prefix_renames=(("language_model.model.", "model."),  # transformers < 4.52
                    ("language_model.lm_head.", "lm_head."),
                    ("model.language_model.", "model.")),  # transformers >= 4.52
    skipped_prefixes=("vision_tower.", "multi_modal_projector.",
                      "model.vision_tower.", "model.multi_modal_projector."),
)

ARCH_TABLE: dict[str, ArchEntry] = {
    "LlamaForCausalLM": ArchEntry("LlamaForCausalLM", gguf.MODEL_ARCH.LLAMA, _llama_layer,
                                  _llama_metadata, permute_qk=True),
    # llama.cpp converts Mistral (dense) as the llama architecture.
    "MistralForCausalLM": ArchEntry("MistralForCausalLM", gguf.MODEL_ARCH.LLAMA, _llama_layer,
                                    _llama_metadata, permute_qk=True),
    "Qwen2ForCausalLM": ArchEntry("Qwen2ForCausalLM", gguf.MODEL_ARCH.QWEN2,
                                  lambda c: LLAMA_LAYER + QKV_BIAS, _qwen_metadata),
    "Qwen3ForCausalLM": ArchEntry("Qwen3ForCausalLM", gguf.MODEL_ARCH.QWEN3,
                                  lambda c: LLAMA_LAYER + QK_NORM, _qwen_metadata),
    "Gemma3ForCausalLM": ArchEntry("Gemma3ForCausalLM", gguf.MODEL_ARCH.GEMMA3,
                                   lambda c: LLAMA_LAYER + QK_NORM + GEMMA_FFN_NORMS, _gemma3_metadata,
                                   norm_plus_one=True, tied_default=True, default_head_dim=256),
    # Gemma 2 2B/9B/27B: sandwich norms, soft-capping; rotate-half RoPE (no permutation)
    "Gemma2ForCausalLM": ArchEntry("Gemma2ForCausalLM", gguf.MODEL_ARCH.GEMMA2,
                                   lambda c: LLAMA_LAYER + GEMMA_FFN_NORMS, _gemma2_metadata,
                                   norm_plus_one=True, tied_default=True, default_head_dim=256, tied_only=True),
    # Phi-3, Phi-3.5-mini, Phi-4-mini: fused projections written fused, rotate-half RoPE
    "Phi3ForCausalLM": ArchEntry("Phi3ForCausalLM", gguf.MODEL_ARCH.PHI3, lambda c: PHI3_LAYER, _phi3_metadata),
    # Granite 3.x dense: Llama layout (q/k permuted) with multipliers
    "GraniteForCausalLM": ArchEntry("GraniteForCausalLM", gguf.MODEL_ARCH.GRANITE, _llama_layer,
                                    _granite_metadata, permute_qk=True),
    # SmolLM3: Llama layout (q/k permuted) with NoPE layers
    "SmolLM3ForCausalLM": ArchEntry("SmolLM3ForCausalLM", gguf.MODEL_ARCH.SMOLLM3, lambda c: LLAMA_LAYER,
                                    _smollm3_metadata, permute_qk=True, tied_default=True),
}
# Gemma 3 4B/12B/27B: llama.cpp converts the language model as plain gemma3 (Gemma3ForCausalLM).
ARCH_TABLE["Gemma3ForConditionalGeneration"] = replace(
    ARCH_TABLE["Gemma3ForCausalLM"], hf_architecture="Gemma3ForConditionalGeneration", text_only=GEMMA3_TEXT_ONLY)
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(ARCH_TABLE)


def _distinct_text_only_views() -> tuple[TextOnlyView, ...]:
    views: list[TextOnlyView] = []
    for entry in ARCH_TABLE.values():
        if entry.text_only is not None and entry.text_only not in views:
            views.append(entry.text_only)
    return tuple(views)


# Every multimodal layout: a PEFT adapter does not say which base it was trained on.
TEXT_ONLY_VIEWS: tuple[TextOnlyView, ...] = _distinct_text_only_views()


def text_only_view(config: Config) -> TextOnlyView | None:
    """The text-only view for a multimodal architecture named in config.json, else None."""
    architectures = config.get("architectures") or []
    name = architectures[0] if isinstance(architectures, list) and architectures else None
    entry = ARCH_TABLE.get(name) if isinstance(name, str) else None
    return entry.text_only if entry is not None else None


@dataclass
class ArchSpec:
    """One table entry bound to one config.json."""

    entry: ArchEntry
    config: Config
    dims: Dims
    gguf_arch_name: str
    tied: bool
    _name_map: gguf.TensorNameMap = field(repr=False)

    # -- names --
    def expected_shapes(self, *, separate_head: bool = False) -> dict[str, tuple[int, ...]]:
        """Every HF tensor the converted model is written with, with its shape (HF layout).
        ``separate_head``: lm_head is written even when the embeddings are tied (an adapter
        replaces it, which unties them)."""
        d = self.dims
        q_rows, kv_rows = d.heads * d.head_dim, d.kv_heads * d.head_dim
        per_layer = {
            "input_layernorm.weight": (d.hidden,), "post_attention_layernorm.weight": (d.hidden,),
            "pre_feedforward_layernorm.weight": (d.hidden,), "post_feedforward_layernorm.weight": (d.hidden,),
            "self_attn.q_proj.weight": (q_rows, d.hidden), "self_attn.k_proj.weight": (kv_rows, d.hidden),
            "self_attn.v_proj.weight": (kv_rows, d.hidden), "self_attn.o_proj.weight": (d.hidden, q_rows),
            "self_attn.q_proj.bias": (q_rows,), "self_attn.k_proj.bias": (kv_rows,),
            "self_attn.v_proj.bias": (kv_rows,), "self_attn.o_proj.bias": (d.hidden,),
            "self_attn.q_norm.weight": (d.head_dim,), "self_attn.k_norm.weight": (d.head_dim,),
            "mlp.gate_proj.weight": (d.ffn, d.hidden), "mlp.up_proj.weight": (d.ffn, d.hidden),
            "mlp.down_proj.weight": (d.hidden, d.ffn),
            "self_attn.qkv_proj.weight": (q_rows + 2 * kv_rows, d.hidden), "mlp.gate_up_proj.weight": (2 * d.ffn, d.hidden),
        }
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (d.vocab, d.hidden),
                                              "model.norm.weight": (d.hidden,)}
        for layer in range(d.layers):
            for suffix in self.entry.layer_tensors(self.config):
                shapes[f"model.layers.{layer}.{suffix}"] = per_layer[suffix]
        if not self.tied or (separate_head and not self.entry.tied_only):
            shapes[LM_HEAD] = (d.vocab, d.hidden)
        return shapes

    def is_ignored(self, hf_name: str) -> bool:
        """HF tensors that are deliberately not converted (recomputed buffers, and lm_head
        when embeddings are tied: llama.cpp then reuses token_embd)."""
        return bool(IGNORED_TENSORS.search(hf_name)) or (self.tied and hf_name == LM_HEAD)

    def gguf_name(self, hf_name: str) -> str | None:
        return self._name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    # -- transforms --
    def _permute_heads(self, hf_name: str) -> int | None:
        if not self.entry.permute_qk:
            return None
        if re.search(r"self_attn\.q_proj(\.(weight|bias))?$", hf_name):
            return self.dims.heads
        if re.search(r"self_attn\.k_proj(\.(weight|bias))?$", hf_name):
            return self.dims.kv_heads
        return None

    def row_granularity(self, hf_name: str) -> int:
        """Row blocks handed to ``transform`` must be multiples of this (whole heads)."""
        return self.dims.head_dim if self._permute_heads(hf_name) is not None else 1

    def transform(self, hf_name: str, array: np.ndarray) -> np.ndarray:
        """Rows-wise transform of a block of rows (float32, whole heads for q/k)."""
        heads = self._permute_heads(hf_name)
        if heads is not None:
            block_heads = array.shape[0] // self.dims.head_dim
            array = permute_qk_rows(array, block_heads)
        if self.entry.norm_plus_one and hf_name.endswith("norm.weight"):
            array = array.astype(np.float32) + np.float32(1.0)
        return array

    def transform_lora_b(self, hf_module: str, lora_b: np.ndarray) -> np.ndarray:
        """The same row transform for a LoRA B [out, r] of module ``hf_module`` (no suffix):
        permuting W's rows permutes (B @ A)'s rows, i.e. B's rows."""
        heads = self._permute_heads(hf_module)
        return permute_qk_rows(lora_b, heads) if heads is not None else lora_b

    def metadata(self) -> tuple[list[MetadataItem], dict[str, np.ndarray]]:
        """GGUF metadata items and extra GGUF-named F32 tensors (llama3 rope_freqs)."""
        return self.entry.metadata(self.gguf_arch_name, self.config, self.dims)


def arch_spec_for(config: Config) -> ArchSpec:
    architectures = config.get("architectures") or []
    name = architectures[0] if isinstance(architectures, list) and architectures else None
    entry = ARCH_TABLE.get(name) if isinstance(name, str) else None
    if entry is None:
        raise UnsupportedArchitectureError(
            f"architecture {name!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
            fix="convert a checkpoint of a supported architecture")
    if entry.text_only is not None:
        config = entry.text_only.flatten_config(config)
        entry = ARCH_TABLE[entry.text_only.text_architecture]
    dims = Dims.from_config(config, entry.default_head_dim)
    tied = config.get("tie_word_embeddings", entry.tied_default)
    if not isinstance(tied, bool):  # bool("false") is True: lm_head would be dropped silently
        raise InvalidCheckpointError(f"config.json field 'tie_word_embeddings' must be true or false, got {tied!r}",
                                     fix="fix or re-download config.json")
    if entry.tied_only and not tied:
        raise UnsupportedArchitectureError(
            f"{entry.hf_architecture} with an untied lm_head is not supported: llama.cpp's "
            f"{gguf.MODEL_ARCH_NAMES[entry.gguf_arch]} always reuses the input embeddings as the output",
            fix="use a checkpoint with tie_word_embeddings true")
    return ArchSpec(entry=entry, config=config, dims=dims,
                    gguf_arch_name=gguf.MODEL_ARCH_NAMES[entry.gguf_arch], tied=bool(tied),
                    _name_map=gguf.get_tensor_name_map(entry.gguf_arch, dims.layers))
