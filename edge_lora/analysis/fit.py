"""Predict the peak RSS of running a GGUF with llama.cpp, and pick the format that fits RAM.

The prediction is for: a Python process that loads the file (mmap), creates one context of
``ctx`` tokens with batch ``n_batch`` and evaluates a prompt up to that context, asking for
the last token's logits (what ``run`` / ``serve`` do). Terms, all read from the GGUF header:

* weights: tensor data as mapped (every page is touched: Gemma-style tied embeddings are the
  output matrix) + a second copy of the tensors llama.cpp's CPU backend repacks into
  interleaved layouts on AVX2/NEON machines (Q4_0, Q4_K, IQ4_NL) — measured: a Q4_K_M file's
  load grows by exactly its Q4_K bytes, Q2_K's by its Q4_0 fallback bytes;
* KV cache: F16 K and V for every layer and every cell. llama.cpp's default
  (``swa_full = true``) gives sliding-window layers a full-size cache too — measured on
  Gemma 3 (the 8192-context cache is 151 MB, not the 25 MB of global layers alone);
* compute: activations per micro-batch token, the attention mask (n_ubatch x n_ctx F16 per
  micro-batch) and logits rows (n_vocab F32 each);
* overhead: the Python interpreter with numpy and llama.cpp loaded, plus llama.cpp's
  vocabulary tables (per token) and fixed runtime state.

Constants are calibrated by ``bench/fit.py`` (subprocess peak RSS on real files); on Gemma 3
270M every format at ctx 512 / 2048 / 8192 is predicted within 10% (tests/test_fit.py).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from edge_lora.core import context_size
from edge_lora.core.child_process import isolated_python
from edge_lora.core.errors import InputError, InputNotFoundError
from edge_lora.core.formats import format_of_file, quality_rank
from edge_lora.core.gguf_check import GGUFInfo, validate_gguf
from edge_lora.core.imatrix_file import calibration_of
from edge_lora.core.manifest import Manifest
from edge_lora.core.output_dir import OutputDir
from edge_lora.hardware import parse_system_info

MB = 1_000_000
# Measured: `python -c "import numpy, llama_cpp"` process before any model is loaded.
PROCESS_BASE_BYTES = 46 * MB
# Measured residual after load minus tensor bytes (Gemma 3, 262,144 tokens: 60.6 MB), split
# between llama.cpp's per-token vocabulary tables (strings, maps, piece cache) and the rest.
VOCAB_BYTES_PER_TOKEN = 150
RUNTIME_FIXED_BYTES = 21 * MB
KV_BYTES_PER_ELEMENT = 2  # F16 cache (llama.cpp default)
MASK_BYTES_PER_ELEMENT = 2  # F16 attention mask, n_ubatch x n_ctx
LOGITS_BYTES_PER_ELEMENT = 4
REPACKED_TYPES = frozenset({"Q4_0", "Q4_K", "IQ4_NL"})
KV_PAD = 256  # llama.cpp pads the number of KV cells

# Memory headroom: a model may use at most this share of available RAM to "fit"; up to all
# of it is "tight" (it runs, but leaves little for everything else on the laptop).
FIT_SHARE = 0.8

@dataclass(frozen=True)
class MemoryEstimate:
    file_bytes: int
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    overhead_bytes: int
    adapters_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class ModelFit:
    path: str
    format: str
    ctx: int
    estimate: MemoryEstimate
    verdict: str  # "fits" | "tight" | "no"
    recommended: bool
    kld: float | None = None
    calibrated: str | None = None  # the importance matrix it was quantized with (calibration_of)

    @property
    def fits(self) -> bool:
        return self.verdict != "no"

    @property
    def file_bytes(self) -> int:
        return self.estimate.file_bytes

    @property
    def kv_bytes(self) -> int:
        return self.estimate.kv_bytes

    @property
    def overhead_bytes(self) -> int:
        return self.estimate.overhead_bytes

    @property
    def total_bytes(self) -> int:
        return self.estimate.total_bytes

    def to_json(self) -> dict:
        return {"path": self.path, "format": self.format, "file_bytes": self.file_bytes,
                "kv_bytes": self.kv_bytes, "overhead_bytes": self.overhead_bytes, "total_bytes": self.total_bytes,
                "fits": self.fits, "recommended": self.recommended, "verdict": self.verdict,
                "weights_bytes": self.estimate.weights_bytes, "compute_bytes": self.estimate.compute_bytes,
                "adapters_bytes": self.estimate.adapters_bytes, "calibrated": self.calibrated}


@dataclass(frozen=True)
class FitReport:
    total_bytes: int
    available_bytes: int
    ctx: int
    models: list[ModelFit]

    @property
    def recommended(self) -> ModelFit | None:
        return next((m for m in self.models if m.recommended), None)

    @property
    def choice(self) -> ModelFit:
        """The file to use: the recommended one, else (nothing fits, even tightly) the smallest,
        the likeliest to run at all."""
        return self.recommended or min(self.models, key=lambda m: m.file_bytes)

    def to_json(self) -> dict:
        """DESIGN.md ``fit --json`` schema (extra per-model keys after the required ones)."""
        return {"ram": {"total_bytes": self.total_bytes, "available_bytes": self.available_bytes},
                "ctx": self.ctx, "models": [m.to_json() for m in self.models]}


def _int_meta(info: GGUFInfo, key: str, default: int | None = None) -> int | None:
    value = info.metadata.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, list)):
        return default
    if isinstance(value, list):  # per-layer arrays (e.g. OpenELM): the largest bounds the cache
        numbers = [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
        return max(numbers) if numbers else default
    return value


def _arch_int(info: GGUFInfo, suffix: str, default: int | None = None) -> int | None:
    return _int_meta(info, f"{info.architecture}.{suffix}", default)


def format_of(info: GGUFInfo) -> str:
    """The format name: from the file name (``<name>-Q4_K_M.gguf``) when it says, else from
    general.file_type."""
    fmt = format_of_file(info.path, info.file_type)
    return fmt.name if fmt is not None else "unknown"


def context_length(info: GGUFInfo) -> int | None:
    return _arch_int(info, "context_length")


def default_ctx(info: GGUFInfo) -> int:
    return context_size.default_ctx(context_length(info))


def _n_vocab(info: GGUFInfo) -> int:
    return info.array_length("tokenizer.ggml.tokens") or _arch_int(info, "vocab_size", 0) or 0


def _kv_bytes(info: GGUFInfo, ctx: int) -> int:
    n_layer = _arch_int(info, "block_count")
    n_head = _arch_int(info, "attention.head_count")
    n_embd = _arch_int(info, "embedding_length")
    if not n_layer or not n_head or not n_embd:
        raise InputError(f"{info.path.name} lacks block_count / head_count / embedding_length metadata",
                         fix="re-convert the model; its GGUF header is incomplete")
    n_head_kv = _arch_int(info, "attention.head_count_kv", n_head) or n_head
    key_len = _arch_int(info, "attention.key_length", n_embd // n_head) or n_embd // n_head
    value_len = _arch_int(info, "attention.value_length", n_embd // n_head) or n_embd // n_head
    cells = -(-ctx // KV_PAD) * KV_PAD
    return n_layer * n_head_kv * (key_len + value_len) * cells * KV_BYTES_PER_ELEMENT


def _compute_bytes(info: GGUFInfo, ctx: int, n_batch: int, logits_rows: int) -> int:
    n_embd = _arch_int(info, "embedding_length", 0) or 0
    n_ff = _arch_int(info, "feed_forward_length", 4 * n_embd) or 4 * n_embd
    n_ubatch = min(n_batch, ctx)
    cells = -(-ctx // KV_PAD) * KV_PAD
    activations = n_ubatch * 4 * (2 * n_ff + n_embd)  # F32 FFN intermediates dominate
    mask = n_ubatch * cells * MASK_BYTES_PER_ELEMENT
    logits = logits_rows * _n_vocab(info) * LOGITS_BYTES_PER_ELEMENT
    return activations + mask + logits


def _weights_bytes(info: GGUFInfo, repack: bool) -> int:
    weights = info.tensor_data_bytes
    if repack:  # the repacked copy lives beside the mapped pages it was read from
        weights += sum(t.n_bytes for t in info.tensors
                       if t.type_name in REPACKED_TYPES and len(t.shape) >= 2 and t.name != "token_embd.weight")
    return weights


def _cpu_repacks() -> bool:
    try:
        import llama_cpp  # loaded when an estimate is made, not when `fit` is imported (CLI start)
        features = parse_system_info(llama_cpp.llama_print_system_info().decode("utf-8", "replace"))
    except (ImportError, OSError):
        return True  # assume the common (x86 AVX2 / ARM NEON) case
    return bool(features.get("AVX2") or features.get("NEON") or features.get("AVX512"))


# A model file as a path, or its header already parsed by validate_gguf(path, expect_type="model"):
# parsing a 262k-token vocabulary costs ~30 ms, so callers that hold the header pass it on.
ModelSource = Path | str | GGUFInfo
AdapterSource = Path | str | GGUFInfo  # a header from validate_gguf(path, expect_type="adapter")


def model_info(source: ModelSource) -> GGUFInfo:
    if isinstance(source, GGUFInfo):
        return source
    path = Path(source)
    if not path.is_file():
        raise InputNotFoundError(f"model file {path} does not exist", fix="give a .gguf file or a converted directory")
    return validate_gguf(path, expect_type="model")


def adapter_info(source: AdapterSource) -> GGUFInfo:
    return source if isinstance(source, GGUFInfo) else validate_gguf(Path(source), expect_type="adapter")


def estimate_memory(model: ModelSource, ctx: int, adapters: Sequence[AdapterSource] = (), n_batch: int = 512,
                    logits_rows: int = 1, *, repack: bool | None = None) -> MemoryEstimate:
    """Predicted peak RSS of loading ``model`` and evaluating at ``ctx`` tokens.
    ``logits_rows``: how many logit rows one batch asks for (1 for generation)."""
    if ctx < 1 or n_batch < 1:
        raise InputError(f"context {ctx} and batch {n_batch} must be positive", fix="use --ctx 512 or more")
    info = model_info(model)
    trained = context_length(info)
    if trained and ctx > trained:
        raise InputError(f"context {ctx} is larger than {info.path.name}'s training context {trained}",
                         fix=f"use --ctx {trained} or less")
    adapters_bytes = sum(adapter_info(a).tensor_data_bytes for a in adapters)
    weights = _weights_bytes(info, _cpu_repacks() if repack is None else repack)
    kv = _kv_bytes(info, ctx)
    compute = _compute_bytes(info, ctx, n_batch, logits_rows)
    overhead = PROCESS_BASE_BYTES + RUNTIME_FIXED_BYTES + VOCAB_BYTES_PER_TOKEN * _n_vocab(info)
    total = weights + kv + compute + overhead + adapters_bytes
    return MemoryEstimate(file_bytes=info.file_bytes, weights_bytes=weights, kv_bytes=kv, compute_bytes=compute,
                          overhead_bytes=overhead, adapters_bytes=adapters_bytes, total_bytes=total)


# --- choosing a format ---

def model_infos(sources: Iterable[ModelSource]) -> list[GGUFInfo]:
    """The model files named (paths or parsed headers) or inside the named directories, each
    header parsed once."""
    infos: list[GGUFInfo] = []
    for raw in sources:
        if isinstance(raw, GGUFInfo):
            infos.append(raw)
            continue
        path = Path(raw).expanduser()
        if path.is_dir():
            infos.extend(_directory_models(path))
        elif path.is_file():
            infos.append(validate_gguf(path, expect_type="model"))
        else:
            raise InputNotFoundError(f"{path} does not exist", fix="give a .gguf file or a converted directory")
    if not infos:
        raise InputNotFoundError("no model GGUF files found", fix="run `edge-lora convert` first or name a .gguf file")
    return infos


def _directory_models(directory: Path) -> list[GGUFInfo]:
    try:
        output = OutputDir.read(directory)
    except InputError:
        output = OutputDir.by_file_names(directory)  # a damaged manifest costs the KLD ranking, not the estimate
    infos: list[GGUFInfo] = []
    for model in output.models:
        try:
            infos.append(validate_gguf(model.path, expect_type="model"))
        except InputError:
            continue  # an adapter or a damaged file in a directory is skipped; named directly it errors
    return infos


def _manifest_klds(files: Iterable[Path]) -> dict[Path, float]:
    """KLD per file from the manifest.json beside it, when measured (``edge-lora ppl --kld-base``)."""
    klds: dict[Path, float] = {}
    by_directory: dict[Path, list[Path]] = {}
    for f in files:
        by_directory.setdefault(f.parent, []).append(f)
    for directory, members in by_directory.items():
        try:
            manifest = Manifest.load(directory)  # empty when there is none
        except InputError:
            continue  # a damaged manifest costs the KLD ranking, not the estimate
        for f in members:
            # Looked up by bare name: only a row naming a file directly in this directory matches.
            row = manifest.file(f.name)
            if row is not None and row.kld is not None:
                klds[f] = float(row.kld)
    return klds


def verdict_for(total_bytes: int, available_bytes: int) -> str:
    if total_bytes <= available_bytes * FIT_SHARE:
        return "fits"
    return "tight" if total_bytes <= available_bytes else "no"


def fit_report(paths_or_dirs: Sequence[ModelSource] | ModelSource, ctx: int | None = None,
               available_bytes: int | None = None, adapters: Sequence[AdapterSource] = ()) -> FitReport:
    """Estimate every model file, judge it against available RAM and recommend exactly one:
    the best quality among those that fit (by measured KLD when every candidate has one,
    else by format), or among the tight ones when none fits comfortably. Parsed headers
    (``model_infos``) may stand for files: re-estimating at another ctx or RAM figure then
    reads no file but the manifest."""
    if isinstance(paths_or_dirs, (str, Path, GGUFInfo)):
        paths_or_dirs = [paths_or_dirs]
    infos = model_infos(paths_or_dirs)
    adapter_infos = [adapter_info(a) for a in adapters]  # once, not once per model
    memory = psutil.virtual_memory()
    available = int(memory.available if available_bytes is None else available_bytes)
    if ctx is None:
        ctx = min(default_ctx(i) for i in infos)
    klds = _manifest_klds(i.path for i in infos)
    repack = _cpu_repacks()
    rows: list[ModelFit] = []
    for info in infos:
        estimate = estimate_memory(info, ctx, adapter_infos, repack=repack)
        rows.append(ModelFit(path=str(info.path), format=format_of(info), ctx=ctx, estimate=estimate,
                             verdict=verdict_for(estimate.total_bytes, available), recommended=False,
                             kld=klds.get(info.path), calibrated=calibration_of(info)))
    rows.sort(key=lambda r: (quality_rank(r.format), r.path))  # best quality first, as users read tables
    choice = _choose(rows)
    models = [ModelFit(**{**_fields(r), "recommended": r is choice}) for r in rows]
    return FitReport(total_bytes=int(memory.total), available_bytes=available, ctx=ctx, models=models)


def _fields(row: ModelFit) -> dict:
    return {"path": row.path, "format": row.format, "ctx": row.ctx, "estimate": row.estimate,
            "verdict": row.verdict, "recommended": row.recommended, "kld": row.kld, "calibrated": row.calibrated}


def _choose(rows: list[ModelFit]) -> ModelFit | None:
    for verdict in ("fits", "tight"):
        candidates = [r for r in rows if r.verdict == verdict]
        if not candidates:
            continue
        if all(r.kld is not None for r in candidates):
            return min(candidates, key=lambda r: (r.kld, -r.total_bytes))
        return min(candidates, key=lambda r: (quality_rank(r.format), -r.total_bytes))
    return None


# --- measuring the real thing (calibration, tests, bench) ---

_MEASURE_SCRIPT = """
import sys
from edge_lora.serving.llama_backend import LlamaContext, LlamaModel
path, ctx, n_batch, fill = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
model = LlamaModel(path)
context = LlamaContext(model, n_ctx=ctx, n_batch=n_batch)
n = ctx if fill else min(n_batch, ctx)
tokens = [model.bos] + [1000 + i % 5000 for i in range(n - 1)]
context.decode(tokens, 0, "last")
# VmHWM, not ru_maxrss: ru_maxrss survives exec and reports a big parent's peak.
status = open("/proc/self/status").read().split("VmHWM:")[1].split()
print(int(status[0]) * 1024)
"""


def measure_peak_rss(gguf_path: Path | str, ctx: int, n_batch: int = 512, fill: bool = False) -> int:
    """Peak RSS (bytes) of a fresh Python process that loads the file, creates a context and
    decodes one batch (``fill``: the whole context). Linux only (/proc/self/status VmHWM)."""
    out = subprocess.run(isolated_python(_MEASURE_SCRIPT, str(gguf_path), str(ctx), str(n_batch), "1" if fill else "0"),
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise InputError(f"measuring {gguf_path} failed: {out.stderr.strip().splitlines()[-1:]}")
    return int(out.stdout.strip().splitlines()[-1])
