"""An independent numpy forward pass with Hugging Face transformers semantics, and a PEFT merge
with PEFT semantics. Every correctness test compares the project's output against this.

Deliberately shares no code with the project's converters: weights are read with
`safetensors.numpy` (bf16, which numpy cannot name, is decoded here by bit shift), q/k stay in
HF's unpermuted layout and RoPE uses HF's rotate_half convention, so a wrong permutation in the
converter shows up as a logits mismatch. Arithmetic is float64 (reductions HF does in float32
are at least as exact here), weights keep their stored values.

Sources of the semantics: transformers' modeling_llama / modeling_mistral / modeling_qwen2 /
modeling_qwen3 / modeling_gemma3 / modeling_gemma2 / modeling_phi3 / modeling_granite /
modeling_smollm3, masking_utils (sliding window: kv > q - window), modeling_rope_utils (default,
linear, llama3, yarn, longrope) and configuration_utils' RoPE standardization (transformers 5
``rope_parameters``, 4.x top-level keys); PEFT's lora layer (scale alpha/r, rsLoRA
alpha/sqrt(r), get_pattern_key), dora.py (norm per output row) and save_and_load.py (key names).
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import load_file

# ----------------------------------------------------------------------------- loading


def _read_bf16_file(path: Path) -> dict[str, np.ndarray]:
    """safetensors.numpy cannot return bfloat16 (numpy has no such dtype): parse the header
    ourselves and widen bf16 to float32 exactly (bits << 16)."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    base = 8 + header_len
    np_types = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        values = np.frombuffer(raw, dtype=np_types[info["dtype"]], count=(end - start) // np.dtype(
            np_types[info["dtype"]]).itemsize, offset=base + start)
        if info["dtype"] == "BF16":
            values = (values.astype(np.uint32) << 16).view(np.float32)
        out[name] = values.reshape(info["shape"]).astype(np.float32)
    return out


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as float32 numpy arrays."""
    path = Path(path)
    try:
        tensors = load_file(str(path))
    except TypeError:  # "data type 'bfloat16' not understood"
        return _read_bf16_file(path)
    return {name: np.asarray(values, dtype=np.float32) for name, values in tensors.items()}


def load_checkpoint(ckpt_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json, all weights as float32) of an HF checkpoint, single file or sharded."""
    ckpt_dir = Path(ckpt_dir)
    config = json.loads((ckpt_dir / "config.json").read_text())
    index = ckpt_dir / "model.safetensors.index.json"
    weights: dict[str, np.ndarray] = {}
    if index.exists():
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            weights.update(load_safetensors(ckpt_dir / shard))
    else:
        weights.update(load_safetensors(ckpt_dir / "model.safetensors"))
    return config, weights


# ----------------------------------------------------------------------------- building blocks


def _round_to_dtype(value: float, torch_dtype: str | None) -> float:
    """What `torch.tensor(value).to(dtype)` keeps (Gemma casts its sqrt(hidden) normalizer)."""
    if torch_dtype in ("bfloat16", "torch.bfloat16"):
        bits = int(np.array([value], dtype=np.float32).view(np.uint32)[0])
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return float(np.array([bits << 16], dtype=np.uint32).view(np.float32)[0])
    if torch_dtype in ("float16", "torch.float16"):
        return float(np.float16(value))
    return float(np.float32(value))


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, *, gemma: bool) -> np.ndarray:
    """Llama: w * x / rms(x).  Gemma: (1 + w) * x / rms(x)."""
    normed = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    w = weight.astype(np.float64)
    return normed * (1.0 + w if gemma else w)


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """x @ W.T for W [out, in]; chunked over output rows so a 262k-row head stays in memory."""
    n_out = weight.shape[0]
    if x.size * n_out < 20_000_000:
        # Small products: numpy's own loop. OpenBLAS threads on a busy 2-core machine (the test
        # suite runs beside other work) make a tiny GEMM ~50x slower than single-threaded.
        y = np.einsum("...i,oi->...o", x, weight.astype(np.float64), optimize=False)
    elif n_out <= 32768:
        y = x @ weight.astype(np.float64).T
    else:
        y = np.empty(x.shape[:-1] + (n_out,), dtype=np.float64)
        for start in range(0, n_out, 16384):
            y[..., start:start + 16384] = x @ weight[start:start + 16384].astype(np.float64).T
    if bias is not None:
        y = y + bias.astype(np.float64)
    return y


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """gelu_pytorch_tanh."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _yarn(inv_freq_base: np.ndarray, dim: int, base: float, params: Mapping[str, Any],
          config: Mapping[str, Any]) -> tuple[np.ndarray, float]:
    """modeling_rope_utils._compute_yarn_parameters (transformers 5; 4 agrees when factor is given)."""
    original = float(params.get("original_max_position_embeddings") or config["max_position_embeddings"])
    factor = params.get("factor")
    factor = float(config["max_position_embeddings"]) / original if factor is None else float(factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    interpolation = inv_freq_base / factor
    return interpolation * (1 - extrapolation) + inv_freq_base * extrapolation, float(attention)


def rope_inv_freq(head_dim: int, base: float, rope_scaling: Mapping[str, Any] | None,
                  config: Mapping[str, Any] | None = None, n_tokens: int = 0) -> np.ndarray:
    """Inverse frequencies of RoPE (``head_dim`` = the rotated dimensions); see ``rope_tables``."""
    return _rope_frequencies(head_dim, base, rope_scaling, config or {}, n_tokens)[0]


def _rope_frequencies(dim: int, base: float, rope_scaling: Mapping[str, Any] | None,
                      config: Mapping[str, Any], n_tokens: int) -> tuple[np.ndarray, float]:
    """modeling_rope_utils: default, linear (divide by factor), llama3 (wavelength bands), yarn
    (ramp between interpolation and extrapolation, attention factor) and longrope (per-dimension
    divisors, short or long by the sequence length, attention factor). Returns (inv_freq,
    attention_factor), the factor multiplying cos and sin."""
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if not rope_scaling:
        return inv_freq, 1.0
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(rope_scaling["factor"]), 1.0
    if kind == "llama3":
        factor = float(rope_scaling["factor"])
        low = float(rope_scaling["low_freq_factor"])
        high = float(rope_scaling["high_freq_factor"])
        old_ctx = float(rope_scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(is_medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(inv_freq, dim, base, rope_scaling, config)
    if kind in ("longrope", "su"):
        original = int(rope_scaling["original_max_position_embeddings"])
        factor = rope_scaling.get("factor")
        factor = float(config["max_position_embeddings"]) / original if factor is None else float(factor)
        attention = rope_scaling.get("attention_factor")
        if attention is None:
            attention = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
        # transformers picks one set for the whole forward pass: long when it reaches past the
        # pretraining length (dynamic_rope_update, seq_len = max position + 1).
        ext = rope_scaling["long_factor"] if n_tokens > original else rope_scaling["short_factor"]
        return inv_freq / np.asarray(ext, dtype=np.float64), float(attention)
    raise ValueError(f"reference: unsupported rope_scaling {rope_scaling!r}")


def rope_settings(config: Mapping[str, Any], layer_type: str) -> dict[str, Any]:
    """One layer type's RoPE parameters (rope_theta, rope_type and scaling fields) as transformers 5
    standardizes them from either config generation: 5.x ``rope_parameters`` (per layer type or
    global), else 4.x top-level ``rope_theta`` / ``rope_local_base_freq`` (Gemma 3's sliding
    layers) with ``rope_scaling`` (Gemma 3: global layers only). No base at all is an error here
    too: the reference never guesses one."""
    gemma3_local = _family(config) == "gemma3" and layer_type == "sliding_attention"
    parameters = config.get("rope_parameters")
    if parameters:
        nested = "full_attention" in parameters or "sliding_attention" in parameters
        entry = dict(parameters[layer_type] if nested else parameters)
    else:
        entry = {} if gemma3_local else dict(config.get("rope_scaling") or {})
    if "rope_theta" not in entry:
        entry["rope_theta"] = config["rope_local_base_freq" if gemma3_local else "rope_theta"]
    entry.setdefault("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if entry.get("rope_type", entry.get("type")) in ("llama3", "yarn", "longrope", "su"):
        # transformers 5 moves the pretraining length in; Phi-3's top-level value wins
        if "original_max_position_embeddings" in config:
            entry["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        entry.setdefault("original_max_position_embeddings", config["max_position_embeddings"])
    return entry


def rope_tables(config: Mapping[str, Any], layer_type: str, head_dim: int, n_tokens: int) -> tuple[np.ndarray, float]:
    """(inv_freq over the rotated dimensions, attention factor) for one layer type."""
    settings = rope_settings(config, layer_type)
    dim = int(head_dim * float(settings["partial_rotary_factor"]))
    return _rope_frequencies(dim, float(settings["rope_theta"]), settings, config, n_tokens)


def apply_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray, attention_factor: float = 1.0) -> np.ndarray:
    """HF rotate_half RoPE on [T, heads, head_dim]: x*cos + rotate_half(x)*sin with the
    frequencies repeated over both halves, on the first 2 * len(inv_freq) dimensions (partial
    rotary: the rest pass through); cos and sin carry the attention factor."""
    rot = 2 * len(inv_freq)
    freqs = positions[:, None].astype(np.float64) * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = (np.cos(emb) * attention_factor)[:, None, :], (np.sin(emb) * attention_factor)[:, None, :]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = np.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    return np.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)


def attention_mask(n_tokens: int, sliding_window: int | None) -> np.ndarray:
    """True where query i may see key j: causal, and within the window (i - j < window)."""
    q = np.arange(n_tokens)[:, None]
    k = np.arange(n_tokens)[None, :]
    allowed = k <= q
    if sliding_window is not None:
        allowed &= k > q - sliding_window
    return allowed


# ----------------------------------------------------------------------------- architectures

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "gemma2", "phi3", "granite", "smollm3")
GEMMA_FAMILIES = ("gemma2", "gemma3")


def _family(config: Mapping[str, Any]) -> str:
    model_type = config.get("model_type", "")
    if model_type in FAMILIES:
        return model_type
    if model_type == "gemma3_text":
        return "gemma3"
    raise ValueError(f"reference: unsupported model_type {model_type!r}")


def layer_types(config: Mapping[str, Any]) -> list[str]:
    n_layers = int(config["num_hidden_layers"])
    if config.get("layer_types"):
        return list(config["layer_types"])
    family = _family(config)
    if family in GEMMA_FAMILIES:
        default = 6 if family == "gemma3" else 2
        pattern = int(config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or default)
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    if family in ("mistral", "phi3") and config.get("sliding_window"):
        return ["sliding_attention"] * n_layers
    if family in ("qwen2", "qwen3", "smollm3") and config.get("use_sliding_window") and config.get("sliding_window"):
        max_window_layers = int(config.get("max_window_layers", n_layers))
        return ["sliding_attention" if i >= max_window_layers else "full_attention" for i in range(n_layers)]
    return ["full_attention"] * n_layers


def _rotary_layers(config: Mapping[str, Any]) -> list[bool]:
    """SmolLM3's NoPE layers: no_rope_layers[i] == 0 means layer i uses no rotary embedding."""
    n_layers = int(config["num_hidden_layers"])
    if _family(config) != "smollm3":
        return [True] * n_layers
    flags = config.get("no_rope_layers")
    if flags is None:
        interval = int(config.get("no_rope_layer_interval", 4))
        flags = [int((i + 1) % interval != 0) for i in range(n_layers)]
    return [bool(f) for f in flags]


def _qkv(h: np.ndarray, weights: Mapping[str, np.ndarray], p: str, q_rows: int, kv_rows: int
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if p + "self_attn.qkv_proj.weight" in weights:  # Phi-3: one projection, rows [q | k | v]
        qkv = linear(h, weights[p + "self_attn.qkv_proj.weight"])
        return qkv[:, :q_rows], qkv[:, q_rows:q_rows + kv_rows], qkv[:, q_rows + kv_rows:]
    return tuple(linear(h, weights[p + f"self_attn.{n}_proj.weight"], weights.get(p + f"self_attn.{n}_proj.bias"))
                 for n in "qkv")  # type: ignore[return-value]


def gelu_f16_table(x: np.ndarray) -> np.ndarray:
    """ggml's CPU GELU (GGML_GELU_FP16): the input rounded to F16 indexes a table of F16 results;
    identity from 10 up, 0 from -10 down. Only for isolating that rounding in exactness checks."""
    rounded = gelu_tanh(x.astype(np.float16).astype(np.float64)).astype(np.float16).astype(np.float64)
    return np.where(x <= -10.0, 0.0, np.where(x >= 10.0, x, rounded))


def _mlp(h: np.ndarray, weights: Mapping[str, np.ndarray], p: str, gemma: bool,
         gelu: Any = gelu_tanh, record: Any = None) -> np.ndarray:
    if p + "mlp.gate_up_proj.weight" in weights:  # Phi-3: gate_up.chunk(2) -> (gate, up)
        gate_up = linear(h, weights[p + "mlp.gate_up_proj.weight"])
        gate, up = np.split(gate_up, 2, axis=-1)
    else:
        gate = linear(h, weights[p + "mlp.gate_proj.weight"], weights.get(p + "mlp.gate_proj.bias"))
        up = linear(h, weights[p + "mlp.up_proj.weight"], weights.get(p + "mlp.up_proj.bias"))
    act = gelu(gate) if gemma else silu(gate)
    if record is not None:
        record(act * up, p + "mlp.down_proj.weight")
    return linear(act * up, weights[p + "mlp.down_proj.weight"], weights.get(p + "mlp.down_proj.bias"))


def reference_logits(config: dict, weights: dict[str, np.ndarray], token_ids: list[int], *,
                     llama_cpp_gelu: bool = False,
                     linear_inputs: dict[str, list[np.ndarray]] | None = None) -> np.ndarray:
    """Logits [n_tokens, vocab] (float64) of a causal LM forward pass over `token_ids` at positions
    0..n-1, with transformers' semantics for llama, mistral, qwen2, qwen3, gemma3(_text), gemma2,
    phi3, granite and smollm3, from a config.json of either transformers generation.

    `config["torch_dtype"]` (transformers 5: "dtype") is taken as the dtype the model was loaded
    in; it matters only for Gemma's sqrt(hidden) normalizer, which HF casts to that dtype (bf16:
    sqrt(640) -> 25.25) while llama.cpp uses sqrtf(n_embd) (25.298). Pass torch_dtype="float32" to
    compare with llama.cpp on a model whose hidden size is not a power of 4. ``llama_cpp_gelu``:
    GELU through ggml's F16 table (gelu_f16_table), the one rounding an F32 llama.cpp run keeps.

    ``linear_inputs``, when given, receives the input rows [n_tokens, in] of every projection,
    appended under the weight's HF name (what an importance matrix sums the squares of)."""
    family = _family(config)
    gemma = family in GEMMA_FAMILIES
    granite = family == "granite"
    hidden = int(config["hidden_size"])
    n_heads = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    head_dim = int(config.get("head_dim") or hidden // n_heads)
    eps = float(config.get("rms_norm_eps", 1e-6))
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim != 1 or len(ids) == 0:
        raise ValueError("token_ids must be a non-empty list of ints")
    embed = weights["model.embed_tokens.weight"]
    if ids.min() < 0 or ids.max() >= embed.shape[0]:
        raise ValueError("token id outside the vocabulary")
    n_tokens = len(ids)
    positions = np.arange(n_tokens)

    x = embed[ids].astype(np.float64)
    if gemma:  # Gemma*ScaledWordEmbedding: sqrt(hidden) cast to the weights' dtype
        x = x * _round_to_dtype(math.sqrt(hidden), config.get("torch_dtype", config.get("dtype")))
    if granite:
        x = x * float(config.get("embedding_multiplier", 1.0))
    residual_multiplier = float(config.get("residual_multiplier", 1.0)) if granite else 1.0

    if gemma:
        scaling = float(config.get("query_pre_attn_scalar") or head_dim) ** -0.5
    elif granite:
        scaling = float(config.get("attention_multiplier", 1.0))
    else:
        scaling = head_dim ** -0.5
    softcap = config.get("attn_logit_softcapping") if gemma else None
    types = layer_types(config)
    rope = {t: rope_tables(config, t, head_dim, n_tokens) for t in set(types)}
    rotary = _rotary_layers(config)
    window = config.get("sliding_window")
    masks = {"full_attention": attention_mask(n_tokens, None),
             "sliding_attention": attention_mask(n_tokens, int(window) if window else None)}
    group = n_heads // n_kv

    def record(x_in: np.ndarray, *names: str) -> None:
        if linear_inputs is not None:
            for name in names:
                linear_inputs.setdefault(name, []).append(x_in)

    for i in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{i}."
        inv_freq, attention_factor = rope[types[i]]

        residual = x
        h = rms_norm(x, weights[p + "input_layernorm.weight"], eps, gemma=gemma)
        record(h, *(p + f"self_attn.{m}_proj.weight" for m in ("qkv",) if p + "self_attn.qkv_proj.weight" in weights),
               *(p + f"self_attn.{m}_proj.weight" for m in "qkv" if p + f"self_attn.{m}_proj.weight" in weights))
        q, k, v = _qkv(h, weights, p, n_heads * head_dim, n_kv * head_dim)
        q = q.reshape(n_tokens, n_heads, head_dim)
        k = k.reshape(n_tokens, n_kv, head_dim)
        v = v.reshape(n_tokens, n_kv, head_dim)
        if p + "self_attn.q_norm.weight" in weights:  # qwen3, gemma3: per-head RMSNorm before RoPE
            q = rms_norm(q, weights[p + "self_attn.q_norm.weight"], eps, gemma=gemma)
            k = rms_norm(k, weights[p + "self_attn.k_norm.weight"], eps, gemma=gemma)
        if rotary[i]:
            q = apply_rope(q, positions, inv_freq, attention_factor)
            k = apply_rope(k, positions, inv_freq, attention_factor)
        k = np.repeat(k, group, axis=1)  # GQA: query head j reads KV head j // group
        v = np.repeat(v, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) * scaling
        if softcap:
            scores = np.tanh(scores / softcap) * softcap
        scores = np.where(masks[types[i]][None], scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        attn = np.einsum("hqk,khd->qhd", probs, v).reshape(n_tokens, n_heads * head_dim)
        record(attn, p + "self_attn.o_proj.weight")
        attn = linear(attn, weights[p + "self_attn.o_proj.weight"], weights.get(p + "self_attn.o_proj.bias"))
        if gemma:
            attn = rms_norm(attn, weights[p + "post_attention_layernorm.weight"], eps, gemma=True)
        x = residual + attn * residual_multiplier

        residual = x
        norm_name = "pre_feedforward_layernorm" if gemma else "post_attention_layernorm"
        h = rms_norm(x, weights[p + norm_name + ".weight"], eps, gemma=gemma)
        record(h, *(p + f"mlp.{m}_proj.weight" for m in ("gate", "up", "gate_up") if p + f"mlp.{m}_proj.weight" in weights))
        mlp = _mlp(h, weights, p, gemma, gelu_f16_table if llama_cpp_gelu else gelu_tanh,
                   record if linear_inputs is not None else None)
        if gemma:
            mlp = rms_norm(mlp, weights[p + "post_feedforward_layernorm.weight"], eps, gemma=True)
        x = residual + mlp * residual_multiplier

    x = rms_norm(x, weights["model.norm.weight"], eps, gemma=gemma)
    head = weights.get("lm_head.weight")
    if head is None:
        if config.get("tie_word_embeddings") is False:
            raise ValueError("untied model without lm_head.weight")
        head = embed
    logits = linear(x, head)
    if granite:
        logits = logits / float(config.get("logits_scaling", 1.0))
    final_cap = config.get("final_logit_softcapping")
    if final_cap:
        logits = np.tanh(logits / final_cap) * final_cap
    return logits


# ----------------------------------------------------------------------------- PEFT


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first pattern key K with re.match(rf"(.*\\.)?({K})$", module)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def lora_scale(adapter_config: Mapping[str, Any], module: str, rank: int) -> float:
    """alpha / r, or alpha / sqrt(r) with use_rslora; alpha from alpha_pattern if a key matches.
    `rank` is the module's actual rank (rank_pattern already decided it: the tensor shape)."""
    alpha = float(_pattern_value(adapter_config.get("alpha_pattern") or {}, module,
                                 adapter_config.get("lora_alpha", 8)))
    return alpha / math.sqrt(rank) if adapter_config.get("use_rslora") else alpha / rank


def lora_delta(adapter_config: Mapping[str, Any], module: str, lora_a: np.ndarray,
               lora_b: np.ndarray) -> np.ndarray:
    """scale * B @ A in [out, in] orientation (lora_A is [r, in] and lora_B [out, r] even for
    fan_in_fan_out modules; only the base weight is stored transposed there)."""
    return lora_scale(adapter_config, module, lora_a.shape[0]) * (
        lora_b.astype(np.float64) @ lora_a.astype(np.float64))


def apply_peft(weights: dict[str, np.ndarray], adapter_dir: Path,
               config: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Return a copy of `weights` with a PEFT LoRA adapter merged as PEFT's merge_and_unload does.

    W' = W + s * B @ A; DoRA: W' = m / ||W + s*B@A||_row * (W + s*B@A) with the norm per output
    row (dora.py get_weight_norm: norm over dim=1 of [out, in]); lora_B.bias (lora_bias=True) adds
    s * bias; embedding LoRA (lora_embedding_A/B) adds s * (B @ A).T; modules_to_save tensors
    replace the base weights outright. Tensors with no known meaning raise ValueError."""
    adapter_dir = Path(adapter_dir)
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"reference: unsupported peft_type {adapter_config.get('peft_type')!r}")
    tensors = load_safetensors(adapter_dir / "adapter_model.safetensors")
    merged = dict(weights)
    prefix = "base_model.model."
    fan_in_fan_out = bool(adapter_config.get("fan_in_fan_out"))
    used: set[str] = set()
    linear_modules = sorted({name[len(prefix):-len(".lora_A.weight")] for name in tensors
                             if name.startswith(prefix) and name.endswith(".lora_A.weight")})
    for module in linear_modules:
        key = prefix + module
        a, b = tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"]
        used.update({key + ".lora_A.weight", key + ".lora_B.weight"})
        weight_name = module + ".weight"
        if weight_name not in merged:
            raise KeyError(f"adapter targets {weight_name}, which the base does not have")
        base = merged[weight_name].astype(np.float64)
        base_oi = base.T if fan_in_fan_out else base
        combined = base_oi + lora_delta(adapter_config, module, a, b)
        magnitude = tensors.get(key + ".lora_magnitude_vector")
        if magnitude is not None:
            used.add(key + ".lora_magnitude_vector")
            row_norm = np.linalg.norm(combined, axis=1)
            combined = (magnitude.astype(np.float64) / row_norm)[:, None] * combined
        elif adapter_config.get("use_dora"):
            raise KeyError(f"use_dora is set but {key}.lora_magnitude_vector is missing")
        merged[weight_name] = (combined.T if fan_in_fan_out else combined).astype(np.float32)
        lora_bias = tensors.get(key + ".lora_B.bias")
        if lora_bias is not None:  # lora_bias=True: bias' = bias + scale * lora_B.bias
            used.add(key + ".lora_B.bias")
            scale = lora_scale(adapter_config, module, a.shape[0])
            base_bias = merged.get(module + ".bias", np.zeros(lora_bias.shape, dtype=np.float32))
            merged[module + ".bias"] = (base_bias.astype(np.float64) + scale * lora_bias).astype(np.float32)
    # Embedding LoRA (PEFT's lora.Embedding): A [r, num_embeddings], B [dim, r], ΔW = s * (B @ A).T
    embedding_modules = sorted({name[len(prefix):-len(".lora_embedding_A")] for name in tensors
                                if name.startswith(prefix) and name.endswith(".lora_embedding_A")})
    for module in embedding_modules:
        key = prefix + module
        a, b = tensors[key + ".lora_embedding_A"], tensors[key + ".lora_embedding_B"]
        used.update({key + ".lora_embedding_A", key + ".lora_embedding_B"})
        weight_name = module + ".weight"
        if weight_name not in merged:
            raise KeyError(f"adapter targets {weight_name}, which the base does not have")
        delta = lora_delta(adapter_config, module, a, b).T
        merged[weight_name] = (merged[weight_name].astype(np.float64) + delta).astype(np.float32)
    # modules_to_save: full trained weights saved as base_model.model.<module>.<param>
    for name, values in tensors.items():
        if name in used:
            continue
        if not name.startswith(prefix) or "lora_" in name:
            raise ValueError(f"reference: adapter tensor {name} has no known PEFT meaning")
        merged[name[len(prefix):]] = values.astype(np.float32)
    return merged


def straightforward_perplexity(path: Path, text: str, n_ctx: int = 512) -> tuple[float, int]:
    """llama-perplexity's method done the plain way, as an independent check of
    ``edge_lora.analysis.perplexity``: ``Llama(logits_all=True)``, BOS replaces each window's first token,
    the second half of each window is scored. Returns (perplexity, windows)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=2, verbose=False)
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - n_ctx + 1, n_ctx):
        window = list(tokens[start:start + n_ctx])
        window[0] = llm.token_bos()
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[n_ctx // 2:n_ctx - 1], dtype=np.float32)
        peak = logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(logits - peak).sum(axis=1, dtype=np.float64)) + peak[:, 0]
        targets = np.asarray(window[n_ctx // 2 + 1:n_ctx])
        nll += float((log_z - logits[np.arange(len(targets)), targets]).sum())
        count += len(targets)
    llm.close()
    return math.exp(nll / count), count // (n_ctx // 2 - 1)


def apply_ia3(weights: dict[str, np.ndarray], adapter_dir: Path) -> dict[str, np.ndarray]:
    """Return a copy of `weights` with a PEFT IA3 adapter merged as PEFT's merge_and_unload does:
    W' = W * ia3_l with ia3_l [out, 1] (rows; the bias too) or, for feedforward_modules, [1, in]
    (columns; the bias is untouched). Checked against PEFT itself in tests/test_adapter_arith.py."""
    adapter_dir = Path(adapter_dir)
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if adapter_config.get("peft_type") != "IA3":
        raise ValueError(f"reference: not an IA3 adapter: {adapter_config.get('peft_type')!r}")
    merged = dict(weights)
    prefix, suffix = "base_model.model.", ".ia3_l"
    for name, vector in load_safetensors(adapter_dir / "adapter_model.safetensors").items():
        if not (name.startswith(prefix) and name.endswith(suffix)):
            raise ValueError(f"reference: IA3 tensor {name} has no known meaning")
        module = name[len(prefix):-len(suffix)]
        vector = vector.astype(np.float64)
        merged[module + ".weight"] = (merged[module + ".weight"].astype(np.float64) * vector).astype(np.float32)
        if vector.shape[1] == 1 and module + ".bias" in merged:
            merged[module + ".bias"] = (merged[module + ".bias"] * vector[:, 0]).astype(np.float32)
    return merged


def make_ia3_adapter(weights: Mapping[str, np.ndarray], out_dir: Path, *, targets: tuple[str, ...],
                     feedforward: tuple[str, ...], seed: int = 5, spread: float = 0.3) -> Path:
    """An IA3 adapter as PEFT's save_pretrained writes it (ia3_l [out, 1], or [1, in] for
    feedforward modules), with values 1 + spread·N(0, 1) (as after training)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for name, w in sorted(weights.items()):
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or w.ndim != 2 or module.rsplit(".", 1)[-1] not in targets:
            continue
        ff = module.rsplit(".", 1)[-1] in feedforward
        shape = (1, w.shape[1]) if ff else (w.shape[0], 1)
        tensors[f"base_model.model.{module}.ia3_l"] = (1.0 + spread * rng.standard_normal(shape)).astype(np.float32)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "IA3", "target_modules": list(targets), "feedforward_modules": list(feedforward),
              "fan_in_fan_out": False, "init_ia3_weights": True, "inference_mode": True, "modules_to_save": None,
              "task_type": "CAUSAL_LM", "base_model_name_or_path": None}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    return out_dir
