"""Perplexity and KL divergence in llama-perplexity's method, reduced as logits arrive.

Method (REFERENCE.md): tokenize the whole text once with BOS; cut it into windows of ``ctx``
tokens; the first token of every window is replaced by BOS; only the second half is scored —
logits at positions ctx/2 .. ctx-2 predict tokens ctx/2+1 .. ctx-1. Only those positions ask
llama.cpp for logits (the 262k-wide output layer is most of the compute for small models), and
each row is reduced to a few numbers in float64 at once, so memory never holds ctx x vocab.

KL divergence KL(base || candidate) needs the baseline's whole distribution for every scored
row. Storing it is too big (262,144 x 2,805 rows x 2 bytes = 1.5 GB for the default text), so:

* without a cache the baseline model is evaluated in lockstep with the candidate on the same
  windows and KLD is exact;
* that run stores, per scored row, the baseline's top-``CACHE_TOP_K`` token ids and
  log-probs, its argmax and its NLL, under
  ``constants.EDGE_LORA_CACHE/kld`` keyed by (baseline path, size, mtime, text hash, ctx).
  Later runs against the same baseline use the cache without loading the baseline; there the
  tail outside the top-k is merged into one bucket: KL = sum_{top-k} p(log p - log q) +
  m_p log(m_p / m_q). By the log-sum inequality this is a lower bound of the exact value; the
  tests measure it against the lockstep value (Q4_K_M vs F16 Gemma 3: 2.3% below, k=1024).
  Top-1 agreement from the cache is exact.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from time import perf_counter

import numpy as np

from edge_lora.core import constants
from edge_lora.core.atomic import atomic_open, ensure_writable_dir
from edge_lora.core.errors import InputError, InputNotFoundError, InvalidGGUFError
from edge_lora.core.progress import NullProgress, ProgressSink
from edge_lora.serving.llama_backend import LlamaContext, LlamaModel, LoraAdapter

CACHE_TOP_K = 1024
CACHE_FORMAT = 2
MIN_CTX = 16
AdapterSpec = Path | str | tuple[Path | str, float]


@dataclass(frozen=True)
class PerplexityResult:
    path: str
    ctx: int
    text_tokens: int  # tokens in the whole text (BOS included)
    tokens: int  # scored tokens
    windows: int
    ppl: float
    ppl_stderr: float
    seconds: float
    kld_base: str | None = None
    kld: float | None = None  # mean KL(base || this)
    kld_stderr: float | None = None
    kld_median: float | None = None
    kld_p99: float | None = None
    kld_max: float | None = None
    top1_agreement: float | None = None
    kld_exact: bool | None = None  # False when computed from the top-k baseline cache

    @property
    def tokens_per_second(self) -> float:
        return self.windows * self.ctx / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        """DESIGN.md ``ppl --json`` keys first, extra statistics after."""
        out = {"path": self.path, "ctx": self.ctx, "tokens": self.tokens, "ppl": self.ppl}
        if self.kld is not None:
            out["kld"] = self.kld
            out["top1_agreement"] = self.top1_agreement
        extra = {k: v for k, v in asdict(self).items() if k not in out and v is not None}
        out.update(extra)
        return out


def default_eval_text() -> str:
    """The shipped evaluation text (Apache-2.0 + MPL-2.0 licence texts; see data/eval/README.md)."""
    return files("edge_lora.data").joinpath("eval/apache-2.0-mpl-2.0.txt").read_text(encoding="utf-8")


def window_plan(n_tokens: int, ctx: int) -> tuple[int, int]:
    """(number of windows, first scored position) for llama-perplexity's split."""
    return n_tokens // ctx, ctx // 2


def log_softmax_row(logits: np.ndarray) -> np.ndarray:
    row = logits.astype(np.float64)
    top = row.max()
    return row - (top + math.log(np.exp(row - top).sum()))


# --- baseline cache ---

def _baseline_key(base: Path, text: str, ctx: int) -> str:
    stat = base.stat()
    ident = json.dumps([CACHE_FORMAT, str(base.resolve()), stat.st_size, stat.st_mtime_ns, ctx, CACHE_TOP_K,
                        hashlib.sha256(text.encode("utf-8")).hexdigest()])
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def _cache_path(key: str) -> Path:
    return constants.EDGE_LORA_CACHE / "kld" / f"{key}.npz"


@dataclass
class _BaselineRows:
    """Per scored row of the baseline: top-k ids / log-probs, argmax, NLL."""

    top_ids: np.ndarray  # (rows, k) int32
    top_logp: np.ndarray  # (rows, k) float32
    argmax: np.ndarray  # (rows,) int32
    nll: np.ndarray  # (rows,) float64
    identity: np.ndarray  # (2,) int64: n_vocab and a hash of the evaluated tokens

    @classmethod
    def empty(cls, rows: int, identity: np.ndarray) -> _BaselineRows:
        return cls(np.zeros((rows, CACHE_TOP_K), np.int32), np.zeros((rows, CACHE_TOP_K), np.float32),
                   np.zeros(rows, np.int32), np.zeros(rows), identity)

    def save(self, path: Path) -> None:
        ensure_writable_dir(path.parent)
        with atomic_open(path) as fh:  # a Ctrl-C leaves no partial cache file
            np.savez(fh, top_ids=self.top_ids, top_logp=self.top_logp,
                     argmax=self.argmax, nll=self.nll, identity=self.identity)

    @classmethod
    def load(cls, path: Path, rows: int, identity: np.ndarray) -> _BaselineRows | None:
        try:
            with np.load(path, allow_pickle=False) as data:
                loaded = cls(data["top_ids"], data["top_logp"], data["argmax"], data["nll"], data["identity"])
        except (OSError, KeyError, ValueError):
            return None  # a damaged cache is only a miss
        if loaded.nll.shape != (rows,) or loaded.top_ids.shape != (rows, CACHE_TOP_K):
            return None
        if not np.array_equal(loaded.identity, identity):
            return None  # another tokenizer or vocabulary: recompute in lockstep (which checks it)
        return loaded


def _kld_from_cache(base: _BaselineRows, r: int, cand_logp: np.ndarray) -> float:
    ids = base.top_ids[r]
    p_logp = base.top_logp[r].astype(np.float64)
    p = np.exp(p_logp)
    q_logp = cand_logp[ids]
    kl_top = float((p * (p_logp - q_logp)).sum())
    m_p = max(0.0, 1.0 - float(p.sum()))
    m_q = max(1e-300, 1.0 - float(np.exp(q_logp).sum()))
    return kl_top + (m_p * math.log(m_p / m_q) if m_p > 0 else 0.0)


# --- measurement ---

def _resolve_adapters(adapters: Iterable[AdapterSpec]) -> list[tuple[Path, float]]:
    out: list[tuple[Path, float]] = []
    for spec in adapters:
        path, scale = (spec if isinstance(spec, tuple) else (spec, 1.0))
        path = Path(path)
        # The same file twice would silently apply it at double scale (run refuses it too).
        if any(path.resolve() == seen.resolve() for seen, _ in out):
            raise InputError(f"adapter {path} given twice", fix="pass each adapter once")
        out.append((path, float(scale)))
    return out


def _check_finite(values: np.ndarray, source: str) -> None:
    # NaN/inf logits (NaN weights, an overflowing adapter alpha) would report PPL NaN with exit
    # code 0 and write NaN, which is not JSON, into --json output and manifest.json.
    if not np.isfinite(values).all():
        raise InvalidGGUFError(f"{source} produced NaN/inf logits: it holds non-finite weights or an "
                               f"overflowing adapter alpha/scale",
                               fix="re-convert the model and adapter, or lower the adapter scale")


def _check_inputs(model_path: Path, kld_base: Path | None) -> None:
    for path in (model_path, kld_base):
        if path is not None and path.is_dir():
            raise InputError(f"{path} is a directory, not a model file", fix="give the path of a .gguf model file")
        if path is not None and not path.is_file():
            raise InputNotFoundError(f"model file {path} does not exist", fix="give the path of a .gguf model file")


def measure_perplexity(model_path: Path | str, text: str, ctx: int = 512, adapters: Sequence[AdapterSpec] = (),
                       kld_base: Path | str | None = None, progress: ProgressSink = NullProgress(),
                       n_batch: int = 512, n_threads: int | None = None,
                       max_windows: int | None = None, use_cache: bool = True) -> PerplexityResult:
    """Perplexity of ``model_path`` (with ``adapters`` hot-applied) on ``text``; with ``kld_base``
    also KL(base || model) and top-1 agreement. ``max_windows`` limits the work (tests)."""
    model_path = Path(model_path)
    base_path = Path(kld_base) if kld_base is not None else None
    _check_inputs(model_path, base_path)
    if ctx < MIN_CTX:
        raise InputError(f"context {ctx} is too small for perplexity", fix=f"use --ctx {MIN_CTX * 32} or more")
    started = perf_counter()
    with LlamaModel(model_path) as model:
        if ctx > model.n_ctx_train:
            raise InputError(f"context {ctx} is larger than the model's training context {model.n_ctx_train}",
                             fix=f"use --ctx {model.n_ctx_train} or less")
        tokens = model.tokenize(text, add_bos=True, special=False)
        n_windows, first = window_plan(len(tokens), ctx)
        if n_windows < 2:
            raise InputError(f"the text has {len(tokens)} tokens; perplexity at context {ctx} needs at least "
                             f"{2 * ctx} (two windows)", fix="give a longer --text or a smaller --ctx")
        if max_windows is not None:
            n_windows = max(1, min(n_windows, max_windows))
        rows_per_window = ctx - 1 - first
        n_rows = n_windows * rows_per_window
        bos = model.bos if model.bos >= 0 else tokens[0]

        evaluated = np.asarray(tokens[:n_windows * ctx], dtype=np.int32).tobytes()
        identity = np.array([model.n_vocab, int.from_bytes(hashlib.sha256(evaluated).digest()[:7], "little")],
                            dtype=np.int64)
        cached: _BaselineRows | None = None
        cache_file: Path | None = None
        if base_path is not None:
            cache_file = _cache_path(_baseline_key(base_path, text if max_windows is None
                                                   else f"{max_windows}\0{text}", ctx))
            cached = _BaselineRows.load(cache_file, n_rows, identity) if use_cache else None

        ctx_main = LlamaContext(model, n_ctx=ctx, n_batch=n_batch, n_threads=n_threads)
        specs = _resolve_adapters(adapters)
        loaded = [LoraAdapter(model, p) for p, _ in specs]
        ctx_main.set_adapters([(a, s) for a, (_, s) in zip(loaded, specs)])
        source = model_path.name + (" with its adapters" if specs else "")

        base_model = base_ctx = None
        fresh: _BaselineRows | None = None
        if base_path is not None and cached is None:
            base_model = LlamaModel(base_path)
            if base_model.n_vocab != model.n_vocab:
                base_model.close()
                raise InputError(f"{base_path.name} has {base_model.n_vocab} tokens in its vocabulary, "
                                 f"{model_path.name} has {model.n_vocab}",
                                 fix="compare against the F16 file of the same model")
            base_ctx = LlamaContext(base_model, n_ctx=ctx, n_batch=n_batch, n_threads=n_threads)
            fresh = _BaselineRows.empty(n_rows, identity)

        nll = np.zeros(n_rows)
        kld = np.zeros(n_rows) if base_path is not None else None
        same_top = np.zeros(n_rows, dtype=bool)
        progress.start(f"perplexity {model_path.name}", total=n_windows)
        try:
            for w in range(n_windows):
                window = list(tokens[w * ctx:(w + 1) * ctx])
                window[0] = bos
                _score_window(ctx_main, base_ctx, window, first, w * rows_per_window, nll, kld, same_top,
                              cached, fresh)
                rows = slice(w * rows_per_window, (w + 1) * rows_per_window)
                _check_finite(nll[rows], source)
                if fresh is not None and base_path is not None:
                    _check_finite(fresh.nll[rows], base_path.name)  # before it can reach the cache
                if kld is not None:
                    _check_finite(kld[rows], source)
                progress.advance(1)
        finally:
            progress.finish()
            if base_model is not None:
                base_model.close()
        if fresh is not None and cache_file is not None and use_cache:
            fresh.save(cache_file)

    seconds = perf_counter() - started
    mean_nll = float(nll.mean())
    ppl = math.exp(mean_nll)
    stderr = ppl * float(nll.std(ddof=1)) / math.sqrt(n_rows) if n_rows > 1 else 0.0
    result = PerplexityResult(path=str(model_path), ctx=ctx, text_tokens=len(tokens), tokens=n_rows,
                              windows=n_windows, ppl=ppl, ppl_stderr=stderr, seconds=seconds)
    if kld is None:
        return result
    return PerplexityResult(
        **{**asdict(result), "kld_base": str(base_path), "kld": float(kld.mean()),
           "kld_stderr": float(kld.std(ddof=1) / math.sqrt(n_rows)) if n_rows > 1 else 0.0,
           "kld_median": float(np.median(kld)), "kld_p99": float(np.percentile(kld, 99)),
           "kld_max": float(kld.max()), "top1_agreement": float(same_top.mean()),
           "kld_exact": cached is None})


def _decode_scored(ctx, window: list[int], first: int):
    """Decode ``window`` from position 0 in n_batch chunks, yielding (position, logits view) for
    the scored positions first..len-2 as each chunk completes (views die at the next chunk)."""
    ctx.clear_kv()
    n = len(window)
    for start in range(0, n, ctx.n_batch):
        chunk = window[start:start + ctx.n_batch]
        wanted = {i for i in range(len(chunk)) if first <= start + i <= n - 2}
        if wanted:
            ctx.decode(chunk, pos0=start, logits=wanted)
        else:
            ctx.decode(chunk, pos0=start, logits="last")  # nothing scored here: one row, ignored
        for i in sorted(wanted):
            yield start + i, ctx.logits(i)


def _score_window(ctx_main, base_ctx, window: list[int], first: int, row0: int, nll: np.ndarray,
                  kld: np.ndarray | None, same_top: np.ndarray, cached: _BaselineRows | None,
                  fresh: _BaselineRows | None) -> None:
    if base_ctx is None:
        for pos, logits in _decode_scored(ctx_main, window, first):
            r = row0 + pos - first
            logp = log_softmax_row(logits)
            nll[r] = -logp[window[pos + 1]]
            if cached is not None and kld is not None:
                kld[r] = _kld_from_cache(cached, r, logp)
                same_top[r] = int(np.argmax(logp)) == int(cached.argmax[r])
        return
    # Lockstep: the baseline goes first chunk by chunk so both logits views are alive together.
    assert kld is not None and fresh is not None
    base_rows = _decode_scored(base_ctx, window, first)
    for (pos, logits), (base_pos, base_logits) in zip(_decode_scored(ctx_main, window, first), base_rows):
        r = row0 + pos - first
        logq = log_softmax_row(logits)
        logp = log_softmax_row(base_logits)
        p = np.exp(logp)
        nll[r] = -logq[window[pos + 1]]
        kld[r] = float((p * (logp - logq)).sum())
        base_top = int(np.argmax(logp))
        same_top[r] = int(np.argmax(logq)) == base_top
        top = np.argpartition(logp, -CACHE_TOP_K)[-CACHE_TOP_K:]
        fresh.top_ids[r] = top
        fresh.top_logp[r] = logp[top]
        fresh.argmax[r] = base_top
        fresh.nll[r] = -logp[window[pos + 1]]
