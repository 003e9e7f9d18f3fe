"""Input fuzzing of the real CLI: a corpus generated from valid seed files (tiny HF checkpoints
with tokenizer.json or tokenizer.model, a PEFT adapter, a model GGUF, a GGUF LoRA adapter),
each case one mutated file run through one command as a subprocess with a timeout.

What every case must show (issue 12 §5): no Python traceback, no death by a signal, no run over
the time limit, and a refusal is exactly one stderr line ``edge-lora: error: ...`` with exit 2.
Exit 0 (the mutation kept the input valid) is fine.

Time is judged on the CPU time of the case (the command and every child it ran): on a machine
shared with other jobs, wall time measures the neighbours. A case is also killed, and counted
over the limit, when its wall time passes ``wall_limit`` (a hang that burns no CPU).

``bench/fuzz.py`` runs >= 1,000 cases and prints the figures; ``tests/test_fuzz.py`` a short
seeded variant. Everything is derived from the seed: the same seed gives the same corpus.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]

COMMANDS = ("convert", "adapter convert", "adapters add", "fit", "ppl", "run")
# Share of the corpus per command (convert reads the most kinds of file).
COMMAND_WEIGHTS = {"convert": 0.30, "adapter convert": 0.15, "adapters add": 0.15, "fit": 0.14, "ppl": 0.13,
                   "run": 0.13}
PPL_TEXT = ("The quick brown fox jumps over the lazy dog. " * 8 + "\n"
            + "Licensed under the Apache License, Version 2.0; you may not use this file except in compliance. " * 6)


# --- seeds --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Seeds:
    hf_dirs: dict[str, Path]  # name -> HF checkpoint dir (llama spm json, qwen2 bpe, llama tokenizer.model)
    peft: Path
    model_gguf: Path
    adapter_gguf: Path
    text: Path


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes | int) -> bytes:
    key = _varint(number << 3 | wire)
    if wire == 0:
        return key + _varint(int(payload))  # type: ignore[arg-type]
    if wire == 5:
        return key + payload  # type: ignore[operator]
    return key + _varint(len(payload)) + payload  # type: ignore[arg-type]


def spm_model_bytes(pieces: list[tuple[str, float, int]]) -> bytes:
    """A SentencePiece ModelProto (pieces, BPE trainer spec with byte fallback, a normalizer
    spec with a dummy prefix), written independently of the converter's own writer."""
    body = b"".join(_field(1, 2, _field(1, 2, p.encode()) + _field(2, 5, struct.pack("<f", s)) + _field(3, 0, t))
                    for p, s, t in pieces)
    trainer = _field(3, 0, 2) + _field(35, 0, 1) + _field(40, 0, 0) + _field(41, 0, 1) + _field(42, 0, 2)
    normalizer = _field(1, 2, b"identity") + _field(3, 0, 1) + _field(4, 0, 0)
    return body + _field(2, 2, trainer) + _field(3, 2, normalizer)


def _spm_from_tokenizer_json(ckpt: Path) -> None:
    """Replace a SentencePiece-style tokenizer.json by the equivalent tokenizer.model."""
    tj = json.loads((ckpt / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    items = sorted(vocab.items(), key=lambda kv: kv[1]) if isinstance(vocab, dict) else \
        [(piece, i) for i, (piece, _score) in enumerate(vocab)]
    specials = {a["content"] for a in tj.get("added_tokens", [])}
    pieces = []
    for rank, (piece, _) in enumerate(items):
        kind = 2 if piece == "<unk>" else 3 if piece in specials else 6 if piece.startswith("<0x") else 1
        pieces.append((piece, -float(rank), kind))
    (ckpt / "tokenizer.model").write_bytes(spm_model_bytes(pieces))
    (ckpt / "tokenizer.json").unlink()


def build_seeds(work: Path) -> Seeds:
    """Valid inputs every command accepts (built once per work directory)."""
    from edge_lora.converters.adapter_gguf import convert_adapter_to_gguf
    from edge_lora.converters.hf_to_gguf import convert_checkpoint
    from tests.support.model_fixtures import make_checkpoint, make_peft_adapter

    seeds = work / "seeds"
    done = seeds / "done"
    hf = {"llama-spm-json": seeds / "hf-llama", "qwen2-bpe": seeds / "hf-qwen2",
          "llama-spm-model": seeds / "hf-llama-spm-model"}
    result = Seeds(hf_dirs=hf, peft=seeds / "peft", model_gguf=seeds / "model-F16.gguf",
                   adapter_gguf=seeds / "adapter.gguf", text=seeds / "text.txt")
    if done.exists():
        return result
    shutil.rmtree(seeds, ignore_errors=True)
    seeds.mkdir(parents=True)
    make_checkpoint("llama", hf["llama-spm-json"])
    make_checkpoint("qwen2", hf["qwen2-bpe"])
    make_checkpoint("llama", hf["llama-spm-model"], seed=3)
    _spm_from_tokenizer_json(hf["llama-spm-model"])
    make_peft_adapter(hf["llama-spm-json"], result.peft, r=4, target_modules=("q_proj", "v_proj"))
    convert_checkpoint(hf["llama-spm-json"], result.model_gguf)
    convert_adapter_to_gguf(result.peft, hf["llama-spm-json"], result.adapter_gguf)
    result.text.write_text(PPL_TEXT)
    done.touch()
    return result


# --- mutations ----------------------------------------------------------------------------------

EDGE_INTS = [0, 1, -1, 2, 3, 7, 8, 31, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53, 2**63 - 1,
             2**64, -2**63, 10**30]
EDGE_FLOATS = [0.0, -0.0, 1e-30, -1.0, 0.5, 1e30, 1e308, math.inf, -math.inf, math.nan]
EDGE_STRINGS = ["", "x", "null", "\x00", "\u2581", "😀" * 3, "a" * 5000, "gpt2", "gpt-2",
                "llama", "BPE", "Unigram", "WordPiece", "WordLevel", "yarn", "dynamic", "linear", "longrope",
                "llama3", "default", "no-such-name", "../../etc/passwd", "<s>", "</s>", "<unk>"]
EDGE_CONTAINERS: list[Any] = [[], {}, [1, 2], {"a": 1}, [[[]]], [None], ["x"] * 3]


def _random_value(rng: random.Random, like: Any = None) -> Any:
    pools: list[list[Any]] = [EDGE_INTS, EDGE_FLOATS, EDGE_STRINGS, EDGE_CONTAINERS, [None, True, False]]
    if like is not None and rng.random() < 0.6:  # mostly keep the kind, change the value
        if isinstance(like, bool):
            return not like
        if isinstance(like, int):
            return rng.choice(EDGE_INTS + [like + 1, like - 1, like * 2, -like])
        if isinstance(like, float):
            return rng.choice(EDGE_FLOATS + [like * 10, -like])
        if isinstance(like, str):
            return rng.choice(EDGE_STRINGS + [like[::-1], like + like, like[: len(like) // 2]])
        if isinstance(like, list):
            return rng.choice([[], like[:1], like + like[:2], list(reversed(like))])
    return copy.deepcopy(rng.choice(rng.choice(pools)))


def _paths(obj: Any, prefix: tuple = (), limit: int = 4000) -> list[tuple]:
    """Every path to a value inside a JSON document (breadth-first, capped)."""
    out: list[tuple] = []
    queue = [(prefix, obj)]
    while queue and len(out) < limit:
        path, node = queue.pop(0)
        out.append(path)
        if isinstance(node, dict):
            queue.extend((path + (k,), v) for k, v in node.items())
        elif isinstance(node, list):
            queue.extend((path + (i,), v) for i, v in enumerate(node[:50]))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for part in path:
        obj = obj[part]
    return obj


def mutate_json_document(doc: Any, rng: random.Random, focus: Iterable[str] = ()) -> tuple[Any, str]:
    """One structural change: a value replaced, a key deleted or added, a list entry duplicated."""
    doc = copy.deepcopy(doc)
    paths = [p for p in _paths(doc) if p]
    focused = [p for p in paths if any(str(p[0]) == f or f in map(str, p) for f in focus)]
    if focused and rng.random() < 0.7:
        paths = focused
    if not paths:
        return _random_value(rng), "document replaced"
    path = rng.choice(paths)
    parent, key = _get(doc, path[:-1]), path[-1]
    op = rng.random()
    if op < 0.6:
        parent[key] = _random_value(rng, parent[key])
        return doc, f"{'.'.join(map(str, path))} = {str(parent[key])[:60]!r}"
    if op < 0.75:
        del parent[key]
        return doc, f"deleted {'.'.join(map(str, path))}"
    if op < 0.9 and isinstance(parent, list):
        parent.insert(int(key), copy.deepcopy(parent[key]))
        return doc, f"duplicated {'.'.join(map(str, path))}"
    if isinstance(parent, dict):
        new_key = rng.choice(["rope_scaling", "num_experts", "num_local_experts", "head_dim", "use_dora",
                              "rank_pattern", "modules_to_save", "layer_types", "tie_word_embeddings", "extra"])
        parent[new_key] = _random_value(rng)
        return doc, f"added {new_key} = {str(parent[new_key])[:60]!r}"
    parent[key] = _random_value(rng)
    return doc, f"{'.'.join(map(str, path))} replaced"


def mutate_json_file(path: Path, rng: random.Random, focus: Iterable[str] = ()) -> str:
    raw = path.read_bytes()
    op = rng.random()
    if op < 0.75:
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = {}
        mutated, what = mutate_json_document(doc, rng, focus)
        path.write_text(json.dumps(mutated, ensure_ascii=rng.random() < 0.5, allow_nan=True))
        return what
    if op < 0.83:
        cut = rng.randrange(0, max(1, len(raw)))
        path.write_bytes(raw[:cut])
        return f"truncated at {cut}/{len(raw)}"
    if op < 0.88:
        depth = rng.choice([100, 5000, 200000])
        path.write_bytes(b"[" * depth + b"]" * depth)
        return f"nested {depth} deep"
    if op < 0.92:
        path.write_bytes(b'{"vocab_size": ' + b"9" * rng.choice([20, 5000, 100000]) + b"}")
        return "huge integer literal"
    if op < 0.96:
        data = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
        return "bytes flipped"
    path.write_bytes(raw + b"\xff\xfe" + os.urandom(16))
    return "garbage appended"


def mutate_safetensors(path: Path, rng: random.Random) -> str:
    raw = path.read_bytes()
    (n,) = struct.unpack_from("<Q", raw, 0)
    header = json.loads(raw[8:8 + n])
    body = raw[8 + n:]
    op = rng.random()
    names = [k for k in header if k != "__metadata__"]
    if op < 0.5 and names:
        name = rng.choice(names)
        entry = header[name]
        what = rng.choice(["dtype", "shape", "data_offsets", "delete", "extra"])
        if what == "dtype":
            entry["dtype"] = rng.choice(["F64", "I8", "I32", "U8", "BOOL", "F8_E4M3", "XX", "F16", "BF16", "F32", 3])
        elif what == "shape":
            shape = entry["shape"]
            entry["shape"] = rng.choice([[], [0], shape[::-1], [d * 2 for d in shape], [-1] + shape[1:],
                                         shape + [1], [2**62] + shape[1:], ["a"]])
        elif what == "data_offsets":
            a, b = entry["data_offsets"]
            entry["data_offsets"] = rng.choice([[b, a], [a, b + 4], [a + 1, b + 1], [0, len(body) + 8],
                                                [a, a], [-4, b], [a, 2**63]])
        elif what == "delete":
            del header[name]
        else:
            header[name + ".extra"] = dict(entry)
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + body)
        return f"header {what} of {name}"
    if op < 0.6:
        new_n = rng.choice([0, 1, n - 1, n + 1, len(raw), 2**40, 2**64 - 1])
        path.write_bytes(struct.pack("<Q", new_n) + raw[8:])
        return f"header length {new_n}"
    if op < 0.75 and body:
        data = bytearray(raw)
        pattern = rng.choice([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\xff\xff", b"\x00\x7c"])
        for _ in range(rng.randint(1, 32)):
            at = 8 + n + rng.randrange(len(body))
            data[at:at + len(pattern)] = pattern
        path.write_bytes(bytes(data[:len(raw)]))
        return "NaN/inf written into tensor data"
    if op < 0.9:
        cut = rng.randrange(0, len(raw))
        path.write_bytes(raw[:cut])
        return f"truncated at {cut}/{len(raw)}"
    data = bytearray(raw)
    for _ in range(rng.randint(1, 16)):
        data[rng.randrange(8, 8 + n)] = rng.randrange(32, 127)
    path.write_bytes(bytes(data))
    return "header bytes flipped"


def mutate_binary(path: Path, rng: random.Random, header_bytes: int | None = None) -> str:
    raw = bytearray(path.read_bytes())
    limit = min(len(raw), header_bytes or len(raw))
    op = rng.random()
    if op < 0.45:
        for _ in range(rng.randint(1, 12)):
            raw[rng.randrange(limit)] = rng.randrange(256)
        path.write_bytes(bytes(raw))
        return "bytes flipped"
    if op < 0.65:
        cut = rng.randrange(0, len(raw))
        path.write_bytes(bytes(raw[:cut]))
        return f"truncated at {cut}/{len(raw)}"
    if op < 0.8:
        at = rng.randrange(0, max(1, limit - 8))
        raw[at:at + 8] = struct.pack("<Q", rng.choice([0, 1, 2**31, 2**32 + 1, 2**63, 2**64 - 1]))
        path.write_bytes(bytes(raw))
        return f"u64 at {at} replaced"
    if op < 0.9:
        start = rng.randrange(0, limit)
        path.write_bytes(bytes(raw[:start] + raw[start:start + rng.randint(1, 64)] * 2 + raw[start:]))
        return "bytes duplicated"
    path.write_bytes(bytes(raw) + os.urandom(rng.randint(1, 4096)))
    return "garbage appended"


# GGUF keys worth setting (llama.cpp asserts or branches on them); {a} is the architecture.
GGUF_INTERESTING_KEYS: list[tuple[str, Callable[[random.Random], Any]]] = [
    ("{a}.nextn_predict_layers", lambda r: r.choice([0, 1, 2, 3, 100])),
    ("{a}.expert_count", lambda r: r.choice([0, 1, 2, 8, 2000])),
    ("{a}.expert_used_count", lambda r: r.choice([0, 1, 2, 9, [2, 2], [2]])),
    ("{a}.expert_group_count", lambda r: r.choice([0, 1, 2, 3])),
    ("{a}.rope.scaling.type", lambda r: r.choice(["linear", "yarn", "dynamic", "su", "", "none", "longrope"])),
    ("{a}.rope.scaling.factor", lambda r: r.choice([0.0, -1.0, 1e30, math.nan, 8.0])),
    ("{a}.attention.head_count_kv", lambda r: r.choice([0, 1, 3, 5, 64, [1, 1]])),
    ("{a}.attention.head_count", lambda r: r.choice([0, 1, 3, 1000, [4, 4, 4]])),
    ("{a}.attention.key_length", lambda r: r.choice([0, 1, 7, 64, 2**20])),
    ("{a}.attention.value_length", lambda r: r.choice([0, 1, 7, 64])),
    ("{a}.rope.dimension_count", lambda r: r.choice([0, 1, 3, 64, 10**6])),
    ("{a}.feed_forward_length", lambda r: r.choice([0, 1, [64], [64, 64, 64]])),
    ("{a}.context_length", lambda r: r.choice([0, 1, 2**31 + 5, 2**32 - 1])),
    ("{a}.block_count", lambda r: r.choice([0, 1, 3, 513, 2**32 - 1])),
    ("{a}.embedding_length", lambda r: r.choice([0, 1, 7, 100, 2**31])),
    ("{a}.attention.sliding_window", lambda r: r.choice([0, 1, 2**31])),
    ("{a}.attention.layer_norm_rms_epsilon", lambda r: r.choice([0.0, -1.0, math.nan, math.inf, 1e-6])),
    ("tokenizer.ggml.pre", lambda r: r.choice(["gpt2", "gpt-2", "llama-bpe", "qwen2", "", "no-such-pre", "default"])),
    ("tokenizer.ggml.model", lambda r: r.choice(["gpt2", "llama", "bert", "t5", "rwkv", "none", "no_vocab", "x"])),
    ("tokenizer.ggml.bos_token_id", lambda r: r.choice([0, 1, 2**31, 2**32 - 1, 10**6])),
    ("tokenizer.ggml.eos_token_id", lambda r: r.choice([0, 2**32 - 1, 10**6])),
    ("tokenizer.ggml.add_bos_token", lambda r: r.choice([True, False])),
    ("tokenizer.ggml.add_eos_token", lambda r: r.choice([True, False])),
    ("general.alignment", lambda r: r.choice([0, 1, 3, 64, 2**31])),
    ("general.type", lambda r: r.choice(["model", "adapter", "", "vocab"])),
    ("adapter.lora.alpha", lambda r: r.choice([0.0, -1.0, math.nan, math.inf, 1e30, 16.0])),
    ("general.architecture", lambda r: r.choice(["llama", "qwen2", "gemma3", "bert", "", "no-such-arch", "clip"])),
]


def _gguf_value_type(value: Any) -> Any:
    import gguf

    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    if isinstance(value, int):
        return gguf.GGUFValueType.UINT32 if 0 <= value < 2**32 else gguf.GGUFValueType.INT64 if value < 0 \
            else gguf.GGUFValueType.UINT64
    if isinstance(value, float):
        return gguf.GGUFValueType.FLOAT32
    if isinstance(value, str):
        return gguf.GGUFValueType.STRING
    return gguf.GGUFValueType.ARRAY


def _read_gguf(path: Path) -> tuple[str, list[tuple[str, Any, Any, Any]], list[tuple[str, Any, Any]]]:
    """(arch, [(key, value, type, sub_type)], [(name, numpy data, ggml type)]) of a seed file."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    arch = ""
    kvs = []
    for f in reader.fields.values():
        if f.name.startswith("GGUF."):
            continue
        vtype = f.types[0]
        sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
        value = f.contents()
        if f.name == "general.architecture":
            arch = value
            continue
        kvs.append((f.name, value, vtype, sub))
    tensors = [(t.name, np.array(t.data), t.tensor_type) for t in reader.tensors]
    return arch, kvs, tensors


def mutate_gguf(path: Path, rng: random.Random) -> str:
    """Structured (metadata or tensor infos rewritten through gguf-py) or raw (header bytes)."""
    import gguf
    import numpy as np

    if rng.random() < 0.35:
        raw = path.read_bytes()
        return "raw: " + mutate_binary(path, rng, header_bytes=min(len(raw), 1 << 16))
    arch, kvs, tensors = _read_gguf(path)
    what = ""
    op = rng.random()
    if op < 0.45:
        key, make = rng.choice(GGUF_INTERESTING_KEYS)
        key = key.format(a=arch)
        value = make(rng)
        kvs = [kv for kv in kvs if kv[0] != key]
        if key == "general.architecture":
            arch = value
        else:
            sub = None
            if isinstance(value, list):
                sub = gguf.GGUFValueType.INT32
            kvs.append((key, value, _gguf_value_type(value), sub))
        what = f"{key} = {value!r}"
    elif op < 0.65 and kvs:
        index = rng.randrange(len(kvs))
        key, value, vtype, sub = kvs[index]
        if rng.random() < 0.3:
            del kvs[index]
            what = f"deleted {key}"
        elif isinstance(value, list) and value:
            choice = rng.random()
            if choice < 0.3:
                value = value[: rng.randrange(len(value))]
            elif choice < 0.6:
                i, j = rng.randrange(len(value)), rng.randrange(len(value))
                value = list(value)
                value[i] = value[j]
            else:
                value = list(value) + list(value[: rng.randint(1, 5)])
            kvs[index] = (key, value, vtype, sub)
            what = f"array {key} length/entries changed ({len(value)})"
        else:
            new = _random_value(rng, value)
            if isinstance(new, (dict, type(None))) or (isinstance(new, list) and not new):
                new = rng.choice(EDGE_STRINGS)
            if isinstance(new, list):
                new = [x for x in new if isinstance(x, int) and not isinstance(x, bool)] or ["x"]
            kvs[index] = (key, new, _gguf_value_type(new), gguf.GGUFValueType.INT32 if isinstance(new, list) and isinstance(new[0], int) else gguf.GGUFValueType.STRING if isinstance(new, list) else None)
            what = f"{key} = {str(new)[:60]!r}"
    else:
        index = rng.randrange(len(tensors))
        name, data, qtype = tensors[index]
        choice = rng.random()
        if choice < 0.25:
            del tensors[index]
            what = f"dropped tensor {name}"
        elif choice < 0.5 and data.ndim == 2:
            tensors[index] = (name, np.ascontiguousarray(data.reshape(data.shape[::-1])), qtype)
            what = f"tensor {name} shape transposed"
        elif choice < 0.7:
            tensors[index] = (name + rng.choice([".x", "", "_"]) if rng.random() < 0.5 else "blk.99.attn_q.weight",
                              data, qtype)
            what = f"tensor {name} renamed"
        elif choice < 0.85:
            tensors[index] = (name, data.astype(np.float32) if data.dtype != np.float32 else data.astype(np.float16),
                              None)
            what = f"tensor {name} type changed"
        else:
            bad = data.astype(np.float32).copy()
            bad.flat[rng.randrange(bad.size)] = rng.choice([np.nan, np.inf, 1e30])
            tensors[index] = (name, bad, None)
            what = f"tensor {name} has a NaN/inf/huge value"
    writer = gguf.GGUFWriter(str(path) + ".tmp", arch or "llama")
    for key, value, vtype, sub in kvs:
        try:
            writer._pack_val(value, vtype, add_vtype=True, sub_type=sub)  # packs only at write time
            writer.add_key_value(key, value, vtype, sub_type=sub)
        except (ValueError, TypeError, struct.error, OverflowError):
            continue
    for name, data, qtype in tensors:
        try:
            if qtype is not None and qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                writer.add_tensor(name, data, raw_dtype=qtype)
            else:
                writer.add_tensor(name, data)
        except ValueError:
            continue
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(str(path) + ".tmp", path)
    return what


# --- cases --------------------------------------------------------------------------------------

@dataclass
class Case:
    index: int
    command: str
    argv: list[str]
    mutated: str  # which file
    mutation: str  # what was done to it
    directory: Path


@dataclass
class Outcome:
    case: Case
    returncode: int | None  # None: killed at the wall-time limit
    seconds: float  # wall
    cpu_seconds: float  # user + system of the command and the children it waited for
    stderr: str
    verdict: str = ""  # accepted | refused | traceback | signal | timeout | bad-refusal

    def to_json(self) -> dict[str, Any]:
        return {"index": self.case.index, "command": self.case.command, "mutated": self.case.mutated,
                "mutation": self.case.mutation, "argv": self.case.argv, "returncode": self.returncode,
                "seconds": round(self.seconds, 2), "cpu_seconds": round(self.cpu_seconds, 2),
                "verdict": self.verdict, "stderr": self.stderr[-1500:]}


FAILURES = ("traceback", "signal", "timeout", "bad-refusal")


def classify(returncode: int | None, stderr: str, over_time: bool = False) -> str:
    if "Traceback (most recent call last)" in stderr:
        return "traceback"
    if returncode is None or over_time:
        return "timeout"
    if returncode < 0:
        return "signal"
    if returncode == 0:
        return "accepted"
    lines = [line for line in stderr.splitlines() if line.strip()]
    if returncode == 2 and len(lines) == 1 and lines[0].startswith("edge-lora: error: "):
        return "refused"
    return "bad-refusal"


def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)
    return dst


def make_case(index: int, command: str, seeds: Seeds, root: Path, rng: random.Random) -> Case:
    d = root / f"{index:05d}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    out = d / "out"
    if command == "convert":
        name = rng.choice(sorted(seeds.hf_dirs))
        if rng.random() < 0.15:  # the adapter is the mutated input, merged during convert
            peft = _copy(seeds.peft, d / "peft")
            target = rng.choice(["adapter_config.json", "adapter_model.safetensors"])
            mutation = _mutate_peft_file(peft / target, rng)
            return Case(index, command, ["convert", str(seeds.hf_dirs["llama-spm-json"]), "--adapter", str(peft),
                                         "--out", str(out), "--quant", "none"], f"peft/{target}", mutation, d)
        ckpt = _copy(seeds.hf_dirs[name], d / "ckpt")
        files = [p.name for p in sorted(ckpt.iterdir()) if p.is_file()]
        weights = {"config.json": 4, "tokenizer.json": 4, "tokenizer_config.json": 2, "model.safetensors": 4,
                   "tokenizer.model": 4, "generation_config.json": 1, "special_tokens_map.json": 1}
        choices = [f for f in files if f in weights]
        target = rng.choices(choices, weights=[weights[f] for f in choices])[0]
        path = ckpt / target
        if target.endswith(".safetensors"):
            mutation = mutate_safetensors(path, rng)
        elif target == "tokenizer.model":
            mutation = mutate_binary(path, rng)
        else:
            focus = {"tokenizer.json": ("model", "pre_tokenizer", "added_tokens", "normalizer", "decoder"),
                     "config.json": ("num_attention_heads", "num_key_value_heads", "hidden_size", "vocab_size",
                                     "num_hidden_layers", "intermediate_size", "rope_scaling", "head_dim",
                                     "architectures", "rope_theta", "rms_norm_eps", "max_position_embeddings")}
            mutation = mutate_json_file(path, rng, focus.get(target, ()))
        return Case(index, command, ["convert", str(ckpt), "--out", str(out), "--quant", "none"],
                    f"{name}/{target}", mutation, d)
    if command == "adapter convert":
        peft = _copy(seeds.peft, d / "peft")
        target = rng.choice(["adapter_config.json", "adapter_model.safetensors"])
        mutation = _mutate_peft_file(peft / target, rng)
        return Case(index, command, ["adapter", "convert", str(peft), "--base", str(seeds.hf_dirs["llama-spm-json"]),
                                     "--out", str(out / "adapter.gguf")], f"peft/{target}", mutation, d)
    if command == "adapters add":
        adapter = _copy(seeds.adapter_gguf, d / "adapter.gguf")
        mutation = mutate_gguf(adapter, rng)
        return Case(index, command, ["adapters", "add", "fuzzed", str(adapter)], "adapter.gguf", mutation, d)
    if command == "run" and rng.random() < 0.3:  # a mutated adapter on the valid model
        adapter = _copy(seeds.adapter_gguf, d / "adapter.gguf")
        mutation = mutate_gguf(adapter, rng)
        return Case(index, command, ["run", "--model", str(seeds.model_gguf), "--adapter", str(adapter), "--prompt",
                                     "Hello", "--max-tokens", "3", "--temperature", "0", "--ctx", "128"],
                    "adapter.gguf", mutation, d)
    model = _copy(seeds.model_gguf, d / "model.gguf")
    mutation = mutate_gguf(model, rng)
    argv = {"fit": ["fit", str(model)],
            "ppl": ["ppl", str(model), "--text", str(seeds.text), "--ctx", "64"],
            "run": ["run", "--model", str(model), "--prompt", "Hello", "--max-tokens", "3", "--temperature", "0",
                    "--ctx", "128"]}[command]
    return Case(index, command, argv, "model.gguf", mutation, d)


def _mutate_peft_file(path: Path, rng: random.Random) -> str:
    if path.suffix == ".safetensors":
        return mutate_safetensors(path, rng)
    return mutate_json_file(path, rng, ("r", "lora_alpha", "target_modules", "use_dora", "use_rslora",
                                        "rank_pattern", "alpha_pattern", "modules_to_save", "peft_type",
                                        "fan_in_fan_out", "bias", "layers_to_transform"))


def generate_cases(seeds: Seeds, root: Path, n: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    commands = list(COMMAND_WEIGHTS)
    weights = [COMMAND_WEIGHTS[c] for c in commands]
    # Every command gets its share, then the rest by weight, shuffled.
    plan = [c for c in commands for _ in range(int(n * COMMAND_WEIGHTS[c]))]
    plan += rng.choices(commands, weights=weights, k=n - len(plan))
    rng.shuffle(plan)
    return [make_case(i, command, seeds, root, random.Random(rng.getrandbits(64))) for i, command in enumerate(plan)]


def controls(seeds: Seeds, root: Path) -> list[Case]:
    """The unmutated seeds through every command: each must be accepted (exit 0), or the
    refusals above would prove nothing."""
    d = root / "controls"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    m, a, hf = str(seeds.model_gguf), str(seeds.adapter_gguf), seeds.hf_dirs
    argvs = {
        **{f"convert {k}": ["convert", str(v), "--out", str(d / k), "--quant", "none"] for k, v in hf.items()},
        "convert --adapter": ["convert", str(hf["llama-spm-json"]), "--adapter", str(seeds.peft), "--out",
                              str(d / "merged"), "--quant", "none"],
        "adapter convert": ["adapter", "convert", str(seeds.peft), "--base", str(hf["llama-spm-json"]), "--out",
                            str(d / "adapter.gguf")],
        "adapters add": ["adapters", "add", "control", a],
        "fit": ["fit", m],
        "ppl": ["ppl", m, "--text", str(seeds.text), "--ctx", "64"],
        "run": ["run", "--model", m, "--prompt", "Hello", "--max-tokens", "3", "--temperature", "0", "--ctx", "128"],
        "run --adapter": ["run", "--model", m, "--adapter", a, "--prompt", "Hello", "--max-tokens", "3",
                          "--temperature", "0", "--ctx", "128"],
    }
    return [Case(-1 - i, name, argv, "-", "none", d) for i, (name, argv) in enumerate(argvs.items())]


def run_case(case: Case, *, timeout: float, cache: Path, wall_limit: float | None = None) -> Outcome:
    """Run one case. ``timeout``: the CPU-second limit; ``wall_limit`` (default 6 x timeout): the
    wall time after which the case is killed. Call from one thread per process (the CPU time is
    this process's children's usage, before and after)."""
    env = {**os.environ, "EDGE_LORA_HOME": str(case.directory / "home"), "EDGE_LORA_CACHE": str(cache),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("EDGE_LORA_API_KEY", None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "edge_lora", *case.argv], capture_output=True, env=env,
                              timeout=wall_limit if wall_limit is not None else 6 * timeout,
                              cwd=case.directory, stdin=subprocess.DEVNULL)
        code: int | None = proc.returncode
        stderr = proc.stderr.decode("utf-8", errors="replace")
    except subprocess.TimeoutExpired as exc:
        code = None
        stderr = exc.stderr.decode("utf-8", errors="replace") if isinstance(exc.stderr, bytes) else ""
    seconds = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Outcome(case, code, seconds, cpu, stderr, classify(code, stderr, over_time=cpu > timeout))


# What stopped a refused case, by the words of its error line (first match wins).
REFUSAL_KINDS: list[tuple[str, str]] = [
    ("llama.cpp died by", "llama.cpp crashed in a check child (contained)"),
    ("llama.cpp timed out", "llama.cpp hung in a check child (contained)"),
    ("llama.cpp would abort", "header check: llama.cpp would abort on it"),
    ("llama.cpp cannot load", "llama.cpp refused it (in a check child)"),
    ("llama.cpp could not", "llama.cpp refused it (in process)"),
    ("not a valid GGUF", "GGUF header check"),
    ("safetensors", "safetensors check"),
    ("tokenizer", "tokenizer check"),
    ("config.json", "config.json check"),
    ("adapter", "adapter check"),
]


def refusal_kind(stderr: str) -> str:
    line = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    return next((kind for words, kind in REFUSAL_KINDS if words in line), "other typed error")


@dataclass
class Summary:
    outcomes: list[Outcome]
    by_command: dict[str, Counter[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for o in self.outcomes:
            self.by_command.setdefault(o.case.command, Counter())[o.verdict] += 1

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.verdict in FAILURES]

    def count(self, verdict: str) -> int:
        return sum(1 for o in self.outcomes if o.verdict == verdict)

    def refusals_by_kind(self) -> Counter[str]:
        return Counter(refusal_kind(o.stderr) for o in self.outcomes if o.verdict == "refused")

    def table(self) -> str:
        cols = ("accepted", "refused") + FAILURES
        head = f"{'command':<16}{'cases':>7}" + "".join(f"{c:>13}" for c in cols) + f"{'max cpu s':>10}{'max wall s':>11}"
        rows = [head, "-" * len(head)]
        for command in COMMANDS:
            counts = self.by_command.get(command, Counter())
            times = [o.seconds for o in self.outcomes if o.case.command == command]
            cpu = [o.cpu_seconds for o in self.outcomes if o.case.command == command]
            rows.append(f"{command:<16}{sum(counts.values()):>7}" + "".join(f"{counts[c]:>13}" for c in cols)
                        + f"{max(cpu, default=0):>10.1f}{max(times, default=0):>11.1f}")
        total = Counter(o.verdict for o in self.outcomes)
        rows.append(f"{'all':<16}{len(self.outcomes):>7}" + "".join(f"{total[c]:>13}" for c in cols)
                    + f"{max((o.cpu_seconds for o in self.outcomes), default=0):>10.1f}"
                    + f"{max((o.seconds for o in self.outcomes), default=0):>11.1f}")
        return "\n".join(rows)
