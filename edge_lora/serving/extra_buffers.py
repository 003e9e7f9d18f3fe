"""Whether ggml's extra buffer types (AMX; CPU repacking) are safe to use on this machine.

llama.cpp keeps matrix weights in "extra buffer types" when the CPU backend has a faster kernel
for their layout: AMX tiles on Xeons that advertise AMX, repacked 8x8 blocks for Q4_0/Q4_K/
IQ4_NL/MXFP4 on AVX2 (more types on ARM). On some VMs the CPU advertises AMX, the kernel grants
the tile permission, and ``tileloadd`` still traps: the first prompt batch kills the process with
SIGILL (REFERENCE.md "CPUs that advertise more than they run"). No flag tells; running it does.

So, once per machine: write a tiny model whose weights are every type the AMX and repack paths
take (shapes they accept: rows a multiple of 32, row lengths a multiple of 256), load it with
extra buffer types in a child process, decode a prompt batch (the AMX tile kernels run only for
more than one token) and one token, and compare the logits with a load without them. A child
that dies, hangs or disagrees means "not usable"; the verdict is cached per CPU model and flags,
kernel, llama-cpp-python version and native library build, and every model load asks
``use_extra_buffers()``. ``EDGE_LORA_NO_EXTRA_BUFFERS=1`` skips the probe and turns them off.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import re
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np

from edge_lora.core import constants
from edge_lora.core.atomic import atomic_write_text
from edge_lora.core.child_run import python_module_command, run_child
from edge_lora.hardware import cpu_identity

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 120.0
CACHE_FORMAT = 1
# Logits of the two paths differ by float summation order only; a wrong kernel is far off.
MAX_RELATIVE_DIFFERENCE = 0.02
CHILD_MODULE = "edge_lora.serving.extra_buffers"

VerdictSource = Literal["forced", "cached", "probe"]


@dataclass(frozen=True)
class ExtraBuffersVerdict:
    usable: bool
    source: VerdictSource
    reason: str  # why, in a few words
    buffer_types: tuple[str, ...] = ()  # extra buffer types the probe's load used, e.g. ("CPU_REPACK",)
    cache_file: Path | None = None

    def describe(self) -> str:
        """One line for `edge-lora doctor`."""
        if self.source == "forced":
            return f"off: forced by {constants.NO_EXTRA_BUFFERS_ENV}=1 (no probe)"
        where = ("probed now" if self.source == "probe" else "probe verdict") + \
            (f", cached in {self.cache_file}" if self.cache_file else "")
        if not self.usable:
            return f"off: {self.reason} ({where}); models load without them, prompts are slower"
        kinds = " + ".join(self.buffer_types) if self.buffer_types else "none apply on this CPU"
        return f"on ({kinds}): {self.reason} ({where})"

    def to_json(self) -> dict[str, Any]:
        return {"usable": self.usable, "source": self.source, "reason": self.reason,
                "buffer_types": list(self.buffer_types),
                "cache_file": str(self.cache_file) if self.cache_file else None}


# --- the verdict ---

def _native_library_stamp() -> str:
    """Size and mtime of the CPU backend library: a rebuild (llama-cpp-python compiles with
    -march=native) can change which kernels exist without changing the version."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return "missing"
    for directory in spec.submodule_search_locations:
        for lib in sorted(Path(directory, "lib").glob("*ggml-cpu*")):
            with contextlib.suppress(OSError):
                st = lib.stat()
                return f"{lib.name}:{st.st_size}:{st.st_mtime_ns}"
    return "unknown"


def machine_key() -> dict[str, str]:
    cpu = cpu_identity()
    try:
        llama_version = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        llama_version = "missing"
    return {
        "cpu_model": cpu.model,
        "cpu_flags": hashlib.sha256(" ".join(cpu.flags).encode()).hexdigest()[:16],
        "kernel": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "llama_cpp_python": llama_version,
        "native_library": _native_library_stamp(),
    }


def cache_file_for(key: dict[str, str], cache_dir: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    base = cache_dir if cache_dir is not None else constants.EDGE_LORA_CACHE / constants.NATIVE_CACHE_DIR
    return base / f"extra-buffers-{digest}.json"


def _read_cache(path: Path, key: dict[str, str]) -> ExtraBuffersVerdict | None:
    """A cached verdict, or None for a missing, unreadable, corrupt or foreign file (then the
    probe runs again and rewrites it)."""
    try:
        if path.stat().st_size > 64 * 1024:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("key") != key
            or not isinstance(data.get("usable"), bool) or not isinstance(data.get("reason"), str)):
        return None
    kinds = data.get("buffer_types", [])
    if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
        return None
    return ExtraBuffersVerdict(usable=data["usable"], source="cached", reason=data["reason"],
                               buffer_types=tuple(kinds), cache_file=path)


def _write_cache(path: Path, key: dict[str, str], verdict: ExtraBuffersVerdict, seconds: float) -> None:
    document = {"format": CACHE_FORMAT, "key": key, "usable": verdict.usable, "reason": verdict.reason,
                "buffer_types": list(verdict.buffer_types), "probed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "probe_seconds": round(seconds, 2)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(document, indent=1) + "\n")
    except OSError as exc:  # a read-only cache only costs a probe per process
        logger.debug("could not cache the extra-buffer verdict in %s: %s", path, exc)


def probe_verdict(*, child_command: Sequence[str] | None = None, timeout: float = PROBE_TIMEOUT_S,
                  ) -> tuple[ExtraBuffersVerdict, float]:
    """Run the probe now. ``child_command``: the argv to run instead of this module's child
    (the probe model's path is appended) — for tests, e.g. a child that kills itself."""
    with tempfile.TemporaryDirectory(prefix="edge-lora-probe-") as tmp:
        model = write_probe_model(Path(tmp) / "probe.gguf")
        command = [*child_command, str(model)] if child_command is not None else \
            python_module_command(CHILD_MODULE, [str(model)])
        result = run_child(command, timeout=timeout)
    if result.returncode != 0:
        detail = result.last_stderr_line()
        return ExtraBuffersVerdict(usable=False, source="probe",
                                   reason=f"the probe child {result.describe_failure()}"
                                          + (f": {detail}" if detail and result.returncode else "")), result.seconds
    try:
        report = json.loads(result.stdout.strip().splitlines()[-1])
        kinds = tuple(str(k) for k in report["buffer_types"])
        ok, why = bool(report["ok"]), str(report["reason"])
    except (ValueError, IndexError, KeyError, TypeError):
        return ExtraBuffersVerdict(usable=False, source="probe", reason="the probe child printed no verdict"), \
            result.seconds
    return ExtraBuffersVerdict(usable=ok, source="probe", reason=why, buffer_types=kinds), result.seconds


def extra_buffers_verdict(*, refresh: bool = False, child_command: Sequence[str] | None = None,
                          cache_dir: Path | None = None) -> ExtraBuffersVerdict:
    """Forced off by the environment, else the cached verdict for this machine, else a probe
    (cached for next time). Never raises for a crash of the probe: that is the "not usable"
    verdict."""
    if constants.NO_EXTRA_BUFFERS:
        return ExtraBuffersVerdict(usable=False, source="forced",
                                   reason=f"{constants.NO_EXTRA_BUFFERS_ENV} is set")
    key = machine_key()
    path = cache_file_for(key, cache_dir)
    if not refresh:
        cached = _read_cache(path, key)
        if cached is not None:
            return cached
    verdict, seconds = probe_verdict(child_command=child_command)
    verdict = ExtraBuffersVerdict(usable=verdict.usable, source="probe", reason=verdict.reason,
                                  buffer_types=verdict.buffer_types, cache_file=path)
    _write_cache(path, key, verdict, seconds)
    if not verdict.usable:
        logger.warning("ggml's extra buffer types (AMX / repacked weights) failed a probe on this CPU (%s); "
                       "models load without them, which is slower for prompts. `edge-lora doctor` shows this.",
                       verdict.reason)
    return verdict


_memo: ExtraBuffersVerdict | None = None
_memo_lock = threading.Lock()


def use_extra_buffers() -> bool:
    """What every model load passes as ``use_extra_bufts`` (one probe per machine, one cache read
    per process)."""
    global _memo
    if constants.NO_EXTRA_BUFFERS:
        return False
    with _memo_lock:
        if _memo is None:
            _memo = extra_buffers_verdict()
        return _memo.usable


# --- the probe model ---

QT = gguf.GGMLQuantizationType
# Byte offsets of the fp16 scale fields in one block of each type (ggml-common.h); the rest of a
# block is random bits, which is valid data for every one of these types.
_SCALE_OFFSETS: dict[QT, tuple[int, ...]] = {
    QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q8_0: (0,), QT.IQ4_NL: (0,),
    QT.Q2_K: (80, 82), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,), QT.IQ4_XS: (0,),
}
PROBE_N_EMBD, PROBE_N_FF, PROBE_N_VOCAB, PROBE_N_HEAD = 256, 512, 512, 4
# Every type ggml 0.3.36's AMX path (amx/common.h qtype_has_amx_kernels) or CPU repack path
# (repack.cpp ggml_repack_get_optimal_repack_type: x86 AVX2/AVX512, ARM NEON, RISC-V) takes,
# one per matrix: rows (ne[1]) are multiples of 32 and row lengths (ne[0]) of 256 everywhere.
_PROBE_LAYERS: tuple[dict[str, QT], ...] = (
    {"attn_q": QT.Q4_0, "attn_k": QT.Q4_K, "attn_v": QT.Q8_0, "attn_output": QT.Q6_K,
     "ffn_gate": QT.IQ4_NL, "ffn_up": QT.Q5_K, "ffn_down": QT.Q4_1},
    {"attn_q": QT.IQ4_XS, "attn_k": QT.Q2_K, "attn_v": QT.MXFP4, "attn_output": QT.Q4_K,
     "ffn_gate": QT.Q4_0, "ffn_up": QT.Q8_0, "ffn_down": QT.Q4_K},
)
_PROBE_OUTPUT_TYPE = QT.Q6_K


def _random_quant(qtype: QT, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows, cols // block, block_bytes), dtype=np.uint8)
    if qtype == QT.MXFP4:
        data[:, :, 0] = 118  # E8M0 shared exponent: 2**-9, small weights
    for offset in _SCALE_OFFSETS.get(qtype, ()):
        data[:, :, offset:offset + 2] = np.frombuffer(np.float16(2e-3).tobytes(), dtype=np.uint8)
    return data.reshape(rows, -1)


def write_probe_model(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama GGUF (~1 MB) with a 512-token SentencePiece-style vocabulary."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("edge-lora extra-buffer probe")
    w.add_context_length(256)
    w.add_embedding_length(PROBE_N_EMBD)
    w.add_block_count(len(_PROBE_LAYERS))
    w.add_feed_forward_length(PROBE_N_FF)
    w.add_head_count(PROBE_N_HEAD)
    w.add_head_count_kv(PROBE_N_HEAD)
    w.add_rope_dimension_count(PROBE_N_EMBD // PROBE_N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581w{i}" for i in range(PROBE_N_VOCAB - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (PROBE_N_VOCAB - 259)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(PROBE_N_VOCAB)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_tensor("token_embd.weight", rng.standard_normal((PROBE_N_VOCAB, PROBE_N_EMBD)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(PROBE_N_EMBD, np.float32))
    shapes = {"attn_q": (PROBE_N_EMBD, PROBE_N_EMBD), "attn_k": (PROBE_N_EMBD, PROBE_N_EMBD),
              "attn_v": (PROBE_N_EMBD, PROBE_N_EMBD), "attn_output": (PROBE_N_EMBD, PROBE_N_EMBD),
              "ffn_gate": (PROBE_N_FF, PROBE_N_EMBD), "ffn_up": (PROBE_N_FF, PROBE_N_EMBD),
              "ffn_down": (PROBE_N_EMBD, PROBE_N_FF)}  # numpy order: (rows, row length)
    for i, layer in enumerate(_PROBE_LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(PROBE_N_EMBD, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(PROBE_N_EMBD, np.float32))
        for name, qtype in layer.items():
            rows, cols = shapes[name]
            w.add_tensor(f"blk.{i}.{name}.weight", _random_quant(qtype, rows, cols, rng), raw_dtype=qtype)
    w.add_tensor("output.weight", _random_quant(_PROBE_OUTPUT_TYPE, PROBE_N_VOCAB, PROBE_N_EMBD, rng),
                 raw_dtype=_PROBE_OUTPUT_TYPE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --- the child ---

PROBE_PROMPT_TOKENS = 32  # a prompt batch: AMX's tile kernels run only for more than one token
_BUFFER_LINE = re.compile(r"\b([A-Za-z0-9_]+) model buffer size\b")
_PLAIN_BUFFERS = {"CPU", "CPU_Mapped", "CPU_Host"}


def _run_path(llama: Any, log: Any, model_path: str, extra: bool) -> tuple[list[list[float]], list[str]]:
    """Load with or without extra buffer types, decode a prompt batch then one token; the
    logits rows and the extra buffer types the loader reported."""
    log.lines.clear()
    params = llama.llama_model_default_params()
    params.n_gpu_layers = 0
    params.use_extra_bufts = extra
    params.load_mode = llama.LLAMA_LOAD_MODE_MMAP
    model = llama.llama_model_load_from_file(model_path.encode(), params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load the probe model: {log.errors()}")
    kinds = sorted({m.group(1) for m in _BUFFER_LINE.finditer(log.text())} - _PLAIN_BUFFERS)
    ctx_params = llama.llama_context_default_params()
    ctx_params.n_ctx = 64
    ctx_params.n_batch = ctx_params.n_ubatch = PROBE_PROMPT_TOKENS
    ctx_params.n_seq_max = 1
    ctx_params.n_threads = ctx_params.n_threads_batch = max(1, min(4, os.cpu_count() or 1))
    ctx = llama.llama_init_from_model(model, ctx_params)
    if not ctx:
        raise RuntimeError(f"llama.cpp could not create a context for the probe model: {log.errors()}")
    rows: list[list[float]] = []
    batch = llama.llama_batch_init(PROBE_PROMPT_TOKENS, 0, 1)
    steps = [list(range(3, 3 + PROBE_PROMPT_TOKENS)), [300]]
    pos = 0
    for tokens in steps:
        for k, token in enumerate(tokens):
            batch.token[k] = token
            batch.pos[k] = pos + k
            batch.n_seq_id[k] = 1
            batch.seq_id[k][0] = 0
            batch.logits[k] = 1
        batch.n_tokens = len(tokens)
        if llama.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed on the probe model")
        for k in (0, len(tokens) - 1):
            ptr = llama.llama_get_logits_ith(ctx, k)
            rows.append([ptr[i] for i in range(PROBE_N_VOCAB)])
        pos += len(tokens)
    llama.llama_batch_free(batch)
    llama.llama_free(ctx)
    llama.llama_model_free(model)
    return rows, kinds


def _relative_difference(got: list[list[float]], want: list[list[float]]) -> float:
    flat = [x for row in want for x in row]
    mean = sum(flat) / len(flat)
    scale = math.sqrt(sum((x - mean) ** 2 for x in flat) / len(flat)) or 1.0
    return max(abs(a - b) for ra, rb in zip(got, want) for a, b in zip(ra, rb)) / scale


def _child(model_path: str) -> dict[str, Any]:
    from edge_lora.converters.load_check import LlamaLog, import_llama_bindings

    llama = import_llama_bindings()
    log = LlamaLog(llama)
    llama.llama_backend_init()
    # The extra-buffer path first: if it traps, the child dies here and the parent knows.
    with_extra, kinds = _run_path(llama, log, model_path, extra=True)
    without, _ = _run_path(llama, log, model_path, extra=False)
    if not all(math.isfinite(x) for row in with_extra for x in row):
        return {"ok": False, "buffer_types": kinds, "reason": "the extra-buffer path gave NaN/inf logits"}
    difference = _relative_difference(with_extra, without)
    if not kinds:
        return {"ok": True, "buffer_types": kinds, "reason": "the probe ran; no extra buffer type applies"}
    if difference > MAX_RELATIVE_DIFFERENCE:
        return {"ok": False, "buffer_types": kinds,
                "reason": f"the extra-buffer path's logits differ by {difference:.3g} sigma"}
    return {"ok": True, "buffer_types": kinds,
            "reason": f"the probe ran them and matched the plain path's logits within {difference:.1e} sigma"}


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m edge_lora.serving.extra_buffers PROBE.gguf", file=sys.stderr)
        return 2
    try:
        report = _child(argv[0])
    except RuntimeError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
