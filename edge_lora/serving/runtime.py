"""The runtime: a quantized base loaded once (mmap) and LoRA adapters hot-applied per request.

Concurrency: requests take a context from a small pool; a context is used by one request at a
time. Its adapter set is switched at the start of each request while the request holds it, so
one request's adapters are never active during another's. Loading or unloading an adapter, and
closing, take every context first (drains go before waiting requests, and one drain at a time,
so two never split the pool) and hold the model lock, so llama.cpp's adapter set never changes
and nothing is freed under a running decode. A request's cancel event is seen while it waits
for a context, between prefill chunks and between tokens.

Prompt cache: each context remembers the tokens its KV cache holds and the adapter set (the
adapters and scales) they were computed under. A request reuses the longest prefix it shares
with a context's cache computed under the same adapter set and decodes only the rest; the pool
hands it the free context with the longest such prefix. Changing a context's adapter set clears
its cache. Reuse changes logits slightly (llama.cpp's kernels depend on batch shape), so
``cache_prompt=False`` keeps the exact mode: an empty cache and a full prefill, giving the same
tokens whether a request runs alone or among others.

Threads: the cores are shared by the requests decoding at the moment (each decode call asks),
so a lone request gets all of them and two overlapping ones half each. Flash attention is off:
its single-token kernel splits the KV cache by thread count, which would make a request's
tokens depend on how many others were running.
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_lora.core import constants
from edge_lora.core.chat_template import ChatPart, ChatTemplate, normalize_messages, render_chat_parts, template_for
from edge_lora.core.context_size import default_ctx
from edge_lora.core.errors import (ContextLengthError, InputNotFoundError, InternalError, InvalidGGUFError,
                                   RegistryError, RequestError)
from edge_lora.serving.llama_backend import (TOKEN_ATTR_CONTROL, TOKEN_ATTR_LSTRIP, TOKEN_ATTR_RSTRIP, TOKEN_ATTR_UNKNOWN,
                                     GrammarSampler, LlamaContext, LlamaModel, LoraAdapter)
from edge_lora.serving.structured import Grammar

# How long close() waits for running generations to stop before leaving their contexts to the
# process exit (freeing a context under a running decode would crash inside llama.cpp).
CLOSE_WAIT_S = 10.0
# What llama.cpp's tokenizer strips beside LSTRIP/RSTRIP tokens (C isspace).
_ASCII_SPACE = " \t\n\v\f\r"

logger = logging.getLogger(__name__)


@dataclass
class LoadedAdapter:
    name: str
    path: Path
    scale: float
    adapter: LoraAdapter
    # Never reused in this runtime, so an id a client holds (llama-server's "lora": [{"id"}])
    # cannot come to mean another adapter after an unload or a replacement.
    id: int


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability under the model (log-softmax of the raw
    logits the sampler drew from: before temperature, top-k/top-p and any grammar)."""
    token: int
    piece: bytes  # the token's bytes (a multi-byte character may span tokens)
    logprob: float
    top: tuple[tuple[int, bytes, float], ...]  # the most likely tokens there, most likely first
    offset: int  # where the token's text starts in the generated text, in characters


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    tokens: list[int] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prompt cache
    # With logprobs asked: one entry per token of the text yielded so far (appended before
    # each piece is yielded; tokens cut off by a stop string are left out).
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; n: each token's log-probability and the n most likely
    grammar: Grammar | None = None  # the answer must match it (structured output)

    def check(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise RequestError(f"max_tokens must be a non-negative integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= constants.MAX_TEMPERATURE:
            raise RequestError(f"temperature must be between 0 and {constants.MAX_TEMPERATURE:g}, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise RequestError(f"seed must be an integer, got {self.seed!r}")
        if len(self.stop) > constants.MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError(f"stop must be up to {constants.MAX_STOP_STRINGS} non-empty strings")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= constants.MAX_TOP_LOGPROBS):
            raise RequestError(f"logprobs must be an integer from 0 to {constants.MAX_TOP_LOGPROBS}, "
                               f"got {self.logprobs!r}")


def _check_finite(top_logit: float) -> None:
    # NaN/inf logits come from NaN weights in the model or an adapter (or an adapter alpha that
    # overflows); sampling from them would emit token 0 forever or fail inside numpy.
    if not np.isfinite(top_logit):
        raise InvalidGGUFError("the model produced NaN/inf logits: the model or an active adapter holds "
                               "non-finite weights or an overflowing alpha/scale",
                               fix="re-convert the model and adapter, or lower the adapter scale")


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
                 allow: Callable[[np.ndarray], np.ndarray] | None = None) -> int:
    """Greedy at temperature 0; otherwise top-k, then top-p (nucleus), then a seeded draw.
    ``allow`` (a grammar) maps candidate token ids to a mask of those that may come next: only
    they are considered, as if every other logit were -inf."""
    if params.temperature == 0.0 and allow is None:
        best = int(np.argmax(logits))  # argmax lands on the first NaN when there is one
        _check_finite(float(logits[best]))
        return best
    top = float(logits.max())  # NaN if any logit is
    _check_finite(top)
    # Tokens more than 30 nats below the best carry < 1e-13 probability each: leaving them out
    # changes no draw measurably and usually skips almost all of a 262k vocabulary. Compared
    # before dividing, so a tiny temperature keeps only the best (never inf - inf).
    window = 30.0 * (params.temperature or 1.0)
    candidates = np.flatnonzero(logits >= top - window)
    if allow is not None:
        quick = _quick_allowed_draw(logits, candidates, params, rng, allow)
        if quick is not None:
            return quick
        candidates = _allowed(logits, candidates, top - window, window, allow, widen=params.temperature > 0)
    if params.temperature == 0.0:
        return int(candidates[np.argmax(logits[candidates])])
    if params.top_k and params.top_k < candidates.size:
        candidates = candidates[np.argpartition(logits[candidates], -params.top_k)[-params.top_k:]]
    best = float(logits[candidates].max())
    weights = np.exp((logits[candidates].astype(np.float64) - best) / params.temperature)
    if params.top_p < 1.0:
        target = params.top_p * weights.sum()
        order = _heaviest_covering(weights, target)
        candidates, weights = candidates[order], weights[order]
        keep = int(np.searchsorted(np.cumsum(weights), target)) + 1
        candidates, weights = candidates[:keep], weights[:keep]
    return _draw(candidates, weights, rng)


GREEDY_PROBES = (1, 64)  # the best token, then the 64 best, before the whole window
REJECTION_DRAWS = 8  # unconstrained draws tried before masking the whole window


def _quick_allowed_draw(logits: np.ndarray, candidates: np.ndarray, params: SamplingParams,
                        rng: np.random.Generator, allow: Callable[[np.ndarray], np.ndarray]) -> int | None:
    """The grammar-constrained token without asking the grammar about the whole window (~70 ms a
    token at temperature 1 on a 262k vocabulary, as long as a decode): None when it cannot tell.

    Greedy: the best tokens in order; the first allowed one is the best allowed one. Sampling over
    the whole distribution (no top-k/top-p): rejection sampling — a draw from the unconstrained
    distribution that the grammar allows is a draw from the constrained one (the distribution
    renormalised over the allowed tokens), exactly. top-k/top-p apply after the mask, so they need it."""
    if params.temperature == 0.0:
        for size in GREEDY_PROBES:
            size = min(size, candidates.size)
            best = candidates[np.argpartition(-logits[candidates], size - 1)[:size]]
            best = best[np.lexsort((best, -logits[best]))]  # best first, ties by id (as argmax)
            ok = best[allow(best)]
            if ok.size:
                return int(ok[0])
            if size == candidates.size:
                break
        return None
    if params.top_k or params.top_p < 1.0:
        return None
    scaled = (logits[candidates].astype(np.float64) - float(logits[candidates].max())) / params.temperature
    cdf = np.cumsum(np.exp(scaled))
    for _ in range(REJECTION_DRAWS):
        token = candidates[min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), cdf.size - 1)]
        if allow(np.array([token]))[0]:
            return int(token)
    return None


def _allowed(logits: np.ndarray, candidates: np.ndarray, floor: float, window: float,
             allow: Callable[[np.ndarray], np.ndarray], widen: bool) -> np.ndarray:
    """The allowed tokens within ``window`` of the best allowed one. Asking the grammar about
    the whole vocabulary costs ~0.2 s, so it is asked about the likely tokens first and about the
    rest only when none of them is allowed (or, when sampling, when the window must widen)."""
    ok = candidates[allow(candidates)]
    if ok.size == 0:
        rest = np.flatnonzero(logits < floor)
        ok = rest[allow(rest)]
        if ok.size == 0:
            raise InternalError("the grammar allows no token of the vocabulary here")
        return ok[logits[ok] >= float(logits[ok].max()) - window]
    lower = float(logits[ok].max()) - window
    if widen and lower < floor:
        extra = np.flatnonzero((logits >= lower) & (logits < floor))
        ok = np.concatenate([ok, extra[allow(extra)]])
    return ok


def token_logprobs(logits: np.ndarray, token: int, n_top: int) -> tuple[float, list[tuple[int, float]]]:
    """log softmax(logits)[token] and the ``n_top`` most likely (token, log-probability), most
    likely first (ties by token id)."""
    top = float(logits.max())
    log_z = top + float(np.log(np.exp(logits - top, dtype=np.float32).sum(dtype=np.float64)))
    chosen = float(logits[token]) - log_z
    if not n_top:
        return chosen, []
    ids = np.argpartition(-logits, n_top - 1)[:n_top] if n_top < logits.size else np.arange(logits.size)
    ids = ids[np.lexsort((ids, -logits[ids]))]
    return chosen, [(int(i), float(logits[i]) - log_z) for i in ids]


def _heaviest_covering(weights: np.ndarray, target: float) -> np.ndarray:
    """Indices of the heaviest weights, heaviest first, enough to sum to ``target``. Sorting a
    262k vocabulary costs ~30 ms a token; a nucleus almost always lies in the top few hundred."""
    window = 1024
    while window < weights.size:
        part = np.argpartition(weights, -window)[-window:]
        order = part[np.argsort(-weights[part], kind="stable")]
        if weights[order].sum() >= target:
            return order
        window *= 8
    return np.argsort(-weights, kind="stable")


def _draw(order: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> int:
    cdf = np.cumsum(weights)
    # side="right" never lands on a zero weight; min() guards the u * total == total rounding edge.
    return int(order[min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), order.size - 1)])


class _StopMatcher:
    """Streams text while holding back any tail that could be the start of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        first = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if first >= 0:
            out, self.pending = self.pending[:first], ""
            return out, True
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Generation:
    """An iterator of text pieces; ``stats`` is filled in as it runs. Holding it holds a
    context: iterate to the end or call close()."""

    def __init__(self, pieces: Iterator[str], stats: GenerationStats) -> None:
        self._pieces = pieces
        self.stats = stats

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()  # type: ignore[attr-defined]

    def text(self) -> str:
        return "".join(self._pieces)


class ContextPool:
    """The runtime's contexts and the cores they share. A request takes the free context whose
    KV cache serves it best (``score``; ties: the least recently used, so recent caches stay);
    drains (adapter unloads, close) take every context and go before waiting requests."""

    def __init__(self, contexts: Sequence[LlamaContext], thread_budget: int) -> None:
        self.contexts = list(contexts)
        self.thread_budget = max(1, thread_budget)
        self._free = list(contexts)
        self._cond = threading.Condition()
        self._drain_lock = threading.Lock()  # one drain at a time, so two never split the pool
        self._draining = 0
        self._decoding: set[int] = set()  # ids of contexts decoding for a request right now
        self._stamps = itertools.count(1)
        self._last_used = {id(c): 0 for c in contexts}
        for context in self.contexts:
            context.thread_policy = self.threads_each

    def acquire(self, score: Callable[[LlamaContext], tuple[int, ...]], closing: threading.Event,
                cancel: threading.Event | None = None) -> LlamaContext | None:
        """The free context ``score`` likes best, or None when ``cancel`` is set first (the
        client went away)."""
        with self._cond:
            while True:  # polled, so a request waiting for a context notices close() and its cancel
                if closing.is_set():
                    raise RequestError("the model is being unloaded", fix="retry once the server is back")
                if cancel is not None and cancel.is_set():
                    return None
                if self._free and not self._draining:
                    best = max(self._free, key=lambda c: (score(c), -self._last_used[id(c)]))
                    self._free.remove(best)
                    return best
                self._cond.wait(0.05)

    def release(self, context: LlamaContext) -> None:
        with self._cond:
            self._decoding.discard(id(context))
            self._last_used[id(context)] = next(self._stamps)
            self._free.append(context)
            self._cond.notify_all()

    def take_all(self, timeout: float | None = None) -> list[LlamaContext]:
        """Every context of the pool (only the free ones if ``timeout`` seconds pass first)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._drain_lock, self._cond:
            self._draining += 1
            try:
                while len(self._free) < len(self.contexts):
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        break
                    self._cond.wait(remaining)
                taken, self._free = self._free, []
                return taken
            finally:
                self._draining -= 1

    def give_back(self, contexts: Sequence[LlamaContext]) -> None:
        with self._cond:
            self._free.extend(contexts)
            self._cond.notify_all()

    # --- threads ---
    def decoding(self, context: LlamaContext, active: bool) -> None:
        """Count ``context`` among those sharing the cores (not while its request waits on its reader)."""
        with self._cond:
            (self._decoding.add if active else self._decoding.discard)(id(context))

    def threads_each(self) -> int:
        """Threads for the next decode: the cores split between the requests decoding now."""
        with self._cond:
            return max(1, self.thread_budget // max(1, len(self._decoding)))


class Runtime:
    def __init__(self, model_path: Path | str, n_ctx: int | None = None, seed: int = 0,
                 n_threads: int | None = None, n_batch: int = 512, n_contexts: int = 1,
                 prompt_cache: bool = True) -> None:
        """``n_threads``: the cores shared by the running requests (default: all). ``n_contexts``:
        requests served at once. ``prompt_cache``: the default for each request's ``cache_prompt``."""
        if n_contexts < 1:
            raise RequestError("n_contexts must be at least 1")
        self.model = LlamaModel(model_path)
        self.model_path = Path(model_path)
        self.model_id = self.model_path.name.removesuffix(".gguf")
        self.seed = seed
        self.prompt_cache = prompt_cache
        self.n_ctx = n_ctx or default_ctx(self.model.n_ctx_train)
        if self.model.n_ctx_train and self.n_ctx > self.model.n_ctx_train:
            self.model.close()
            raise RequestError(f"context {self.n_ctx} exceeds the {self.model.n_ctx_train} tokens the model was "
                               f"trained for", fix=f"use --ctx {self.model.n_ctx_train} or less")
        self.n_contexts = n_contexts  # how many requests can generate at once
        budget = n_threads or constants.N_THREADS
        self._contexts = [LlamaContext(self.model, self.n_ctx, n_batch=n_batch, n_threads=budget, flash_attn=False)
                          for _ in range(n_contexts)]
        self._pool = ContextPool(self._contexts, budget)
        self._adapters: dict[str, LoadedAdapter] = {}
        self._adapters_lock = threading.Lock()
        self._adapter_ids = itertools.count()
        self._closing = threading.Event()
        self.template: ChatTemplate = template_for(self.model)
        self._markup_cache: dict[str, list[str | tuple[int, int]]] = {}
        self._request_numbers = itertools.count(1)  # next() is atomic: no two requests share a stream

    # --- lifetime ---
    def close(self) -> None:
        """Stop running generations at their next token, then free contexts, adapters and model."""
        if self._closing.is_set():
            return
        self._closing.set()
        taken = self._pool.take_all(timeout=CLOSE_WAIT_S)
        if len(taken) < len(self._contexts):
            # A generation still holds a context (abandoned mid-stream, or a long prompt still
            # decoding): freeing the model under it would crash, so the process exit frees it.
            logger.warning("a generation is still running; the model stays loaded until exit")
            return
        for context in taken:
            context.close()
        for loaded in self._adapters.values():
            loaded.adapter.free()
        self._adapters.clear()
        self.model.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- adapters ---
    def load_adapter(self, name: str, path: Path | str, scale: float = 1.0, *, fd: int | None = None) -> LoadedAdapter:
        """Load (or replace) adapter ``name``; validated against the base before llama.cpp sees it.
        Waits for running generations: see _exclusive. ``fd``: the file already opened (and
        checked) by the caller: that descriptor is validated and loaded, ``path`` only names it."""
        path = Path(path)
        if fd is None and not path.exists():
            raise InputNotFoundError(f"adapter file {path} does not exist", fix="check the path")
        with self._exclusive():
            adapter = LoraAdapter(self.model, path, fd=fd)
            with self._adapters_lock:
                old = self._adapters.get(name)
                loaded = self._adapters[name] = LoadedAdapter(name, path, float(scale), adapter,
                                                              next(self._adapter_ids))
            if old is not None:
                old.adapter.free()
        return loaded

    def unload_adapter(self, name: str) -> None:
        """Waits for running generations: see _exclusive."""
        if name not in self.adapters:  # refused without waiting for a drain
            raise RegistryError(f"no adapter named {name!r} is loaded",
                                fix=f"loaded adapters: {', '.join(self._adapters) or 'none'}")
        with self._exclusive():
            with self._adapters_lock:
                loaded = self._adapters.pop(name, None)
            if loaded is None:
                raise RegistryError(f"no adapter named {name!r} is loaded",
                                    fix=f"loaded adapters: {', '.join(self._adapters) or 'none'}")
            loaded.adapter.free()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Every context taken and the model lock held. llama_adapter_lora_init and _free change
        the model's adapter set, which every context's graph reads while it decodes (e.g. for
        its node count), so neither may run while any context decodes."""
        self._require_open()
        taken = self._pool.take_all()
        try:
            with self.model._lock:
                yield
        finally:
            self._pool.give_back(taken)

    def _require_open(self) -> None:
        if self._closing.is_set():
            raise RequestError("the model is being unloaded", fix="retry once the server is back")

    @property
    def adapters(self) -> dict[str, LoadedAdapter]:
        with self._adapters_lock:
            return dict(self._adapters)

    def _resolve_adapters(self, adapters: Mapping[str, float | None] | None) -> list[tuple[LoraAdapter, float]]:
        if not adapters:
            return []
        active: list[tuple[LoraAdapter, float]] = []
        with self._adapters_lock:
            for name, scale in adapters.items():
                loaded = self._adapters.get(name)
                if loaded is None:
                    raise RequestError(f"adapter {name!r} is not loaded",
                                       fix=f"loaded adapters: {', '.join(self._adapters) or 'none'}")
                value = loaded.scale if scale is None else float(scale)
                if not -100.0 <= value <= 100.0:
                    raise RequestError(f"adapter scale {value} for {name!r} is out of range (-100..100)")
                active.append((loaded.adapter, value))
        return active

    # --- prompts ---
    def tokenize_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.model.tokenize(prompt, add_bos=self.model.add_bos, special=True)
        tokens = [int(t) for t in prompt]
        for t in tokens:
            self.model._check_token(t)
        return tokens

    def render_messages(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The chat prompt's tokens. Only the template's own markup becomes control tokens: a
        message that spells ``<start_of_turn>model`` gets those characters as plain text, so a
        user cannot forge turns. Ordinary messages give exactly the ids of tokenizing the
        rendered text with special tokens parsed (tests/test_runtime.py checks both)."""
        bos_text = self.model.token_piece(self.model.bos, special=True).decode("utf-8", "replace") \
            if self.model.bos >= 0 else ""
        eos_text = self.model.token_piece(self.model.eos, special=True).decode("utf-8", "replace") \
            if self.model.eos >= 0 else ""
        text, parts = render_chat_parts(self.template.source, messages, add_generation_prompt=True,
                                        bos_token=bos_text, eos_token=eos_text)
        # A template that writes the BOS itself must not get a second one from the tokenizer.
        add_bos = self.model.add_bos and not (bos_text and text.startswith(bos_text))
        ids = None if parts is None else self._tokenize_chat_parts(parts, add_bos)
        if ids is not None:
            return ids
        # The template rewrote some content, so markup and content cannot be told apart: safe
        # only when no content spells a control token.
        for i, message in enumerate(normalize_messages(messages)):
            content = message["content"]
            if (self.model.tokenize(content, add_bos=False, special=True)
                    != self.model.tokenize(content, add_bos=False, special=False)):
                raise RequestError(f"messages[{i}].content spells one of the model's control tokens, which "
                                   "this chat template does not let through as plain text",
                                   fix="remove control-token text such as <start_of_turn> from the message")
        return self.model.tokenize(text, add_bos=add_bos, special=True)

    def _tokenize_chat_parts(self, parts: Sequence[ChatPart], add_bos: bool) -> list[int] | None:
        """Tokenize as llama.cpp does with special=True, which splits the text at control tokens
        and tokenizes each stretch of text between them on its own, except that control tokens
        are looked for only in the template's markup. A stretch may join markup and content
        ("user\n" + "Hi"), so it is tokenized whole, as before, and merges are unchanged."""
        ids = [self.model.bos] if add_bos else []
        stretch: list[str] = []
        strip_start = False  # the control token before the stretch eats its leading whitespace

        def flush(strip_end: bool) -> None:
            raw = "".join(stretch)
            stretch.clear()
            raw = raw.lstrip(_ASCII_SPACE) if strip_start else raw
            raw = raw.rstrip(_ASCII_SPACE) if strip_end else raw
            if raw:
                ids.extend(self.model.tokenize(raw, add_bos=False, special=False))

        for text, is_content in parts:
            if is_content:
                stretch.append(text)
                continue
            pieces = self._markup_pieces(text)
            if pieces is None:
                return None
            for piece in pieces:
                if isinstance(piece, str):
                    stretch.append(piece)
                    continue
                token, attr = piece
                flush(strip_end=bool(attr & TOKEN_ATTR_LSTRIP))
                ids.append(token)
                strip_start = bool(attr & TOKEN_ATTR_RSTRIP)
        flush(strip_end=False)
        return ids

    def _markup_pieces(self, text: str) -> list[str | tuple[int, int]] | None:
        """Template markup split into text and (control token, attributes), in order."""
        cached = self._markup_cache.get(text)
        if cached is not None:
            return cached
        pieces: list[str | tuple[int, int]] = []
        pos = 0
        for token in self.model.tokenize(text, add_bos=False, special=True):
            attr = self.model.token_attr(token)
            if not attr & (TOKEN_ATTR_CONTROL | TOKEN_ATTR_UNKNOWN):
                continue
            spelled = self.model.token_piece(token, special=True).decode("utf-8", "replace")
            at = text.find(spelled, pos) if spelled else -1
            if at < 0:
                return None
            pieces += [text[pos:at], (token, attr)]
            pos = at + len(spelled)
        pieces.append(text[pos:])
        pieces = [p for p in pieces if p != ""]
        if len(self._markup_cache) >= 256:  # markup is a handful of strings per template
            self._markup_cache.clear()
        self._markup_cache[text] = pieces
        return pieces

    # --- generation ---
    def generate(self, prompt: str | Sequence[int], adapters: Mapping[str, float | None] | None = None,
                 max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stop: Sequence[str] = (),
                 cancel: threading.Event | None = None, *, logprobs: int | None = None,
                 grammar: Grammar | None = None, cache_prompt: bool | None = None) -> Generation:
        """Generate after ``prompt`` (text or token ids). ``logprobs``: fill ``stats.logprobs``
        with each token's log-probability and the n most likely; ``grammar``: the answer must
        match it; ``cache_prompt``: reuse a cached prefix (default: the runtime's ``prompt_cache``)."""
        self._require_open()
        tokens = self.tokenize_prompt(prompt)
        return self._start(tokens, adapters, SamplingParams(max_tokens, float(temperature), float(top_p),
                                                            int(top_k), seed, tuple(stop), logprobs, grammar),
                           cancel, cache_prompt)

    def chat(self, messages: Sequence[Mapping[str, Any]], adapters: Mapping[str, float | None] | None = None,
             max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, stop: Sequence[str] = (),
             cancel: threading.Event | None = None, *, logprobs: int | None = None,
             grammar: Grammar | None = None, cache_prompt: bool | None = None) -> Generation:
        self._require_open()
        tokens = self.render_messages(messages)
        return self._start(tokens, adapters, SamplingParams(max_tokens, float(temperature), float(top_p),
                                                            int(top_k), seed, tuple(stop), logprobs, grammar),
                           cancel, cache_prompt)

    def _start(self, tokens: list[int], adapters: Mapping[str, float | None] | None,
               params: SamplingParams, cancel: threading.Event | None,
               cache_prompt: bool | None = None) -> Generation:
        # Everything that can be refused is refused here, before a context is taken.
        params.check()
        if not tokens:
            raise RequestError("the prompt is empty", fix="give a non-empty prompt")
        if len(tokens) >= self.n_ctx:
            raise ContextLengthError(f"the prompt is {len(tokens)} tokens; the context holds {self.n_ctx}",
                                     fix="shorten the prompt or raise --ctx")
        self._resolve_adapters(adapters)  # refuse unknown names now; resolved again once running
        # Parsed now, so a bad grammar is refused before anything streams.
        grammar = GrammarSampler(self.model, params.grammar.gbnf) if params.grammar is not None else None
        stats = GenerationStats(prompt_tokens=len(tokens))
        if params.seed is None:
            rng = np.random.default_rng([self.seed, next(self._request_numbers)])
        else:
            # numpy takes only non-negative seeds; a negative one (llama.cpp's -1, an int64 from
            # the API) is read as its 64-bit two's complement, so every integer seed repeats.
            rng = np.random.default_rng(params.seed % (1 << 64) if params.seed < 0 else params.seed)
        use_cache = self.prompt_cache if cache_prompt is None else bool(cache_prompt) and self.prompt_cache
        return Generation(self._run(tokens, adapters, params, rng, stats, cancel, use_cache, grammar), stats)

    def _take_context(self, tokens: list[int], adapters: Mapping[str, float | None] | None,
                      use_cache: bool, cancel: threading.Event | None) -> LlamaContext | None:
        """The free context whose cache this prompt continues (the longest usable prefix computed
        under this adapter set; a cache computed under another set is never used); else an
        empty one; else the least recently used. None when ``cancel`` is set first."""
        try:
            wanted = tuple((a, float(s)) for a, s in self._resolve_adapters(adapters) if float(s) != 0.0)
        except RequestError:
            wanted = None  # unloaded since _start: _run reports it once it holds a context

        def preference(context: LlamaContext) -> tuple[int, int]:
            if context.n_past == 0:
                return 0, 1  # taking an empty context destroys no one's cache
            if not use_cache or context.adapters != wanted:
                return 0, 0
            n = context.reusable_prefix(tokens)
            # Taking a context drops the part of its cache this prompt does not share: worth it
            # when the prompt continues that cache (a next chat turn, a regenerated answer, a
            # long shared system prompt), not for a chat template's first few tokens.
            return (n, 0) if 2 * n >= min(context.n_past, len(tokens)) else (0, 0)
        return self._pool.acquire(preference, self._closing, cancel)

    def _run(self, tokens: list[int], adapters: Mapping[str, float | None] | None, params: SamplingParams,
             rng: np.random.Generator, stats: GenerationStats, cancel: threading.Event | None,
             use_cache: bool, grammar: GrammarSampler | None) -> Iterator[str]:
        context = self._take_context(tokens, adapters, use_cache, cancel)
        if context is None:
            if grammar is not None:
                grammar.close()
            stats.finish_reason = "cancelled"
            return
        pool = self._pool

        def cancelled() -> bool:
            return (cancel is not None and cancel.is_set()) or self._closing.is_set()

        # stats.finish_reason is set only when the generation is over, so readers can poll it.
        try:
            # Resolved while holding a context: an adapter unloaded or replaced since _start is
            # then either gone (a clear error) or kept alive until this context is returned.
            context.set_adapters(self._resolve_adapters(adapters))  # a new set clears the cache
            reused = context.keep_prefix(context.reusable_prefix(tokens) if use_cache else 0)
            stats.cached_tokens = reused
            if params.max_tokens == 0:
                stats.finish_reason = "length"
                return
            pool.decoding(context, True)
            # A cancel is seen between prefill chunks; the chunks done stay cached for a retry.
            if not context.decode(tokens[reused:], reused, "last", cancel=cancelled):
                stats.finish_reason = "cancelled"
                return
            pos = len(tokens)
            utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            stopper = _StopMatcher(params.stop)
            allow = self._grammar_filter(grammar) if grammar is not None else None
            logprobs = (_LogprobTracker(params.logprobs, stats, self.model.token_piece)
                        if params.logprobs is not None else None)
            finish = "length"
            while True:
                if cancelled():
                    stats.finish_reason = "cancelled"
                    return
                logits = context.logits()
                token = sample_token(logits, params, rng, allow)
                if self.model.is_eog(token):
                    finish = "stop"
                    break
                if grammar is not None:
                    grammar.accept(token)
                stats.tokens.append(token)
                stats.completion_tokens += 1
                piece = self.model.token_piece(token)
                decoded = utf8.decode(piece)
                if logprobs is not None:
                    logprobs.add(logits, token, piece, decoded)
                text, stopped = stopper.feed(decoded)
                if logprobs is not None:
                    logprobs.release(len(text))
                if stopped:
                    stats.finish_reason = "stop"
                if text:
                    pool.decoding(context, False)  # the reader's time is not a decode
                    yield text
                    pool.decoding(context, True)
                if stopped:
                    return
                # Stop when prompt + completion fill the context (the last token needs no slot).
                if stats.completion_tokens >= params.max_tokens or pos + 1 >= context.n_ctx:
                    break
                context.decode([token], pos, "last")
                pos += 1
            text, stopped = stopper.feed(utf8.decode(b"", final=True))
            tail = text + ("" if stopped else stopper.flush())
            if logprobs is not None:
                logprobs.release(len(tail), final=not stopped)
            stats.finish_reason = "stop" if stopped else finish
            if tail:
                pool.decoding(context, False)
                yield tail
        except Exception:
            context.clear_kv()  # a failed request leaves nothing for another to reuse
            raise
        finally:
            if grammar is not None:
                grammar.close()
            pool.release(context)

    def _grammar_filter(self, grammar: GrammarSampler) -> Callable[[np.ndarray], np.ndarray]:
        # Control tokens print as nothing, so a grammar matching their spelled-out text
        # ("<start_of_turn>" inside a JSON string) would not match what the reader gets.
        control = self.model.control_tokens

        def allow(ids: np.ndarray) -> np.ndarray:
            return grammar.allowed(ids) & ~control[ids]
        return allow


class _LogprobTracker:
    """Log-probabilities of the generated tokens, handed to ``stats.logprobs`` as their text is
    yielded: a token whose text starts after a stop string's cut is never reported."""

    def __init__(self, n_top: int, stats: GenerationStats, piece_of: Callable[[int], bytes]) -> None:
        self.n_top, self.stats, self.piece_of = n_top, stats, piece_of
        self.pending: list[TokenLogprob] = []
        self.decoded_chars = 0  # characters of generated text so far (including held-back text)
        self.yielded_chars = 0

    def add(self, logits: np.ndarray, token: int, piece: bytes, decoded: str) -> None:
        chosen, top = token_logprobs(logits, token, self.n_top)
        self.pending.append(TokenLogprob(token, piece, chosen, tuple((t, self.piece_of(t), lp) for t, lp in top),
                                         self.decoded_chars))
        self.decoded_chars += len(decoded)

    def release(self, n_chars: int, final: bool = False) -> None:
        self.yielded_chars += n_chars
        ready = self.pending if final else [e for e in self.pending if e.offset < self.yielded_chars]
        self.stats.logprobs.extend(ready)
        self.pending = [] if final else self.pending[len(ready):]
