"""The runtime: a quantized base loaded once (mmap) and LoRA adapters hot-applied per request.

Concurrency: requests take a context from a small pool (the queue is the lock). A context's
adapter set is switched (and its KV cache cleared) at the start of each request while the
request holds the context exclusively, so one request's adapters are never active during
another's. Loading or unloading an adapter, and closing, take every context first (under one
lock, so two drains never split the pool between them) and hold the model lock, so llama.cpp's
adapter set never changes and nothing is freed under a running decode. A request's cancel event
is seen while it waits for a context, between prefill chunks and between tokens.
bench/runtime.py measured on 2 cores: one 2-thread context behind a lock serves 8
concurrent mixed-adapter clients at the same tokens/s as sequential requests, while two
1-thread contexts serve them 1.5-1.7x faster and a lone request is within ±10%. So
`serve` uses a pool of two (threads split between them); `run` (one user) uses one context.
Every request starts from an empty KV cache: reusing a cached prefix would make a request's
logits depend on what ran before it (llama.cpp's kernels differ by batch shape), and the
contract is that a request gives the same tokens whether made alone or among others.
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
import logging
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_lora.core import constants
from edge_lora.core.chat_template import ChatPart, ChatTemplate, normalize_messages, render_chat_parts, template_for
from edge_lora.core.context_size import default_ctx
from edge_lora.core.errors import (ContextLengthError, InputNotFoundError, InvalidGGUFError, RegistryError,
                              RequestError)
from edge_lora.llama_backend import (TOKEN_ATTR_CONTROL, TOKEN_ATTR_LSTRIP, TOKEN_ATTR_RSTRIP, TOKEN_ATTR_UNKNOWN,
                                     LlamaContext, LlamaModel, LoraAdapter)

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


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    tokens: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

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


def _check_finite(top_logit: float) -> None:
    # NaN/inf logits come from NaN weights in the model or an adapter (or an adapter alpha that
    # overflows); sampling from them would emit token 0 forever or fail inside numpy.
    if not np.isfinite(top_logit):
        raise InvalidGGUFError("the model produced NaN/inf logits: the model or an active adapter holds "
                               "non-finite weights or an overflowing alpha/scale",
                               fix="re-convert the model and adapter, or lower the adapter scale")


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise top-k, then top-p (nucleus), then a seeded draw."""
    if params.temperature == 0.0:
        best = int(np.argmax(logits))  # argmax lands on the first NaN when there is one
        _check_finite(float(logits[best]))
        return best
    top = float(logits.max())  # NaN if any logit is
    _check_finite(top)
    # Tokens more than 30 nats below the best carry < 1e-13 probability each: leaving them out
    # changes no draw measurably and usually skips almost all of a 262k vocabulary. Compared
    # before dividing, so a tiny temperature keeps only the best (never inf - inf).
    candidates = np.flatnonzero(logits >= top - 30.0 * params.temperature)
    if params.top_k and params.top_k < candidates.size:
        candidates = candidates[np.argpartition(logits[candidates], -params.top_k)[-params.top_k:]]
    weights = np.exp((logits[candidates].astype(np.float64) - top) / params.temperature)
    if params.top_p < 1.0:
        target = params.top_p * weights.sum()
        order = _heaviest_covering(weights, target)
        candidates, weights = candidates[order], weights[order]
        keep = int(np.searchsorted(np.cumsum(weights), target)) + 1
        candidates, weights = candidates[:keep], weights[:keep]
    return _draw(candidates, weights, rng)


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


class Runtime:
    def __init__(self, model_path: Path | str, n_ctx: int | None = None, seed: int = 0,
                 n_threads: int | None = None, n_batch: int = 512, n_contexts: int = 1) -> None:
        if n_contexts < 1:
            raise RequestError("n_contexts must be at least 1")
        self.model = LlamaModel(model_path)
        self.model_path = Path(model_path)
        self.model_id = self.model_path.name.removesuffix(".gguf")
        self.seed = seed
        self.n_ctx = n_ctx or default_ctx(self.model.n_ctx_train)
        if self.model.n_ctx_train and self.n_ctx > self.model.n_ctx_train:
            self.model.close()
            raise RequestError(f"context {self.n_ctx} exceeds the {self.model.n_ctx_train} tokens the model was "
                               f"trained for", fix=f"use --ctx {self.model.n_ctx_train} or less")
        self.n_contexts = n_contexts  # how many requests can generate at once
        threads = n_threads or max(1, constants.N_THREADS // n_contexts)
        self._contexts = [LlamaContext(self.model, self.n_ctx, n_batch=n_batch, n_threads=threads)
                          for _ in range(n_contexts)]
        self._free: queue.Queue[LlamaContext] = queue.Queue()
        for context in self._contexts:
            self._free.put(context)
        self._adapters: dict[str, LoadedAdapter] = {}
        self._adapters_lock = threading.Lock()
        self._adapter_ids = itertools.count()
        # Held while taking every context, so two drains (unloads, close) never split the pool.
        self._drain_lock = threading.Lock()
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
        taken = self._take_all_contexts(timeout=CLOSE_WAIT_S)
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
    def load_adapter(self, name: str, path: Path | str, scale: float = 1.0) -> LoadedAdapter:
        """Load (or replace) adapter ``name``; validated against the base before llama.cpp sees it.
        Waits for running generations: see _exclusive."""
        path = Path(path)
        if not path.exists():
            raise InputNotFoundError(f"adapter file {path} does not exist", fix="check the path")
        with self._exclusive():
            adapter = LoraAdapter(self.model, path)
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
        taken = self._take_all_contexts()
        try:
            with self.model._lock:
                yield
        finally:
            for context in taken:
                self._free.put(context)

    def _take_all_contexts(self, timeout: float | None = None) -> list[LlamaContext]:
        """Every context of the pool (fewer if ``timeout`` seconds pass first)."""
        taken: list[LlamaContext] = []
        with self._drain_lock:
            for _ in self._contexts:
                try:
                    taken.append(self._free.get(timeout=timeout))
                except queue.Empty:
                    break
        return taken

    def _acquire_context(self, cancel: threading.Event | None) -> LlamaContext | None:
        """A free context, or None when ``cancel`` is set first (the client went away)."""
        while True:  # polled, so a request waiting for a context notices close() and its cancel
            self._require_open()
            if cancel is not None and cancel.is_set():
                return None
            try:
                return self._free.get(timeout=0.05)
            except queue.Empty:
                pass

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
                 cancel: threading.Event | None = None) -> Generation:
        self._require_open()
        tokens = self.tokenize_prompt(prompt)
        return self._start(tokens, adapters, SamplingParams(max_tokens, float(temperature), float(top_p),
                                                            int(top_k), seed, tuple(stop)), cancel)

    def chat(self, messages: Sequence[Mapping[str, Any]], adapters: Mapping[str, float | None] | None = None,
             max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, stop: Sequence[str] = (),
             cancel: threading.Event | None = None) -> Generation:
        self._require_open()
        tokens = self.render_messages(messages)
        return self._start(tokens, adapters, SamplingParams(max_tokens, float(temperature), float(top_p),
                                                            int(top_k), seed, tuple(stop)), cancel)

    def _start(self, tokens: list[int], adapters: Mapping[str, float | None] | None,
               params: SamplingParams, cancel: threading.Event | None) -> Generation:
        # Everything that can be refused is refused here, before a context is taken.
        params.check()
        if not tokens:
            raise RequestError("the prompt is empty", fix="give a non-empty prompt")
        if len(tokens) >= self.n_ctx:
            raise ContextLengthError(f"the prompt is {len(tokens)} tokens; the context holds {self.n_ctx}",
                                     fix="shorten the prompt or raise --ctx")
        self._resolve_adapters(adapters)  # refuse unknown names now; resolved again once running
        stats = GenerationStats(prompt_tokens=len(tokens))
        if params.seed is None:
            rng = np.random.default_rng([self.seed, next(self._request_numbers)])
        else:
            # numpy takes only non-negative seeds; a negative one (llama.cpp's -1, an int64 from
            # the API) is read as its 64-bit two's complement, so every integer seed repeats.
            rng = np.random.default_rng(params.seed % (1 << 64) if params.seed < 0 else params.seed)
        return Generation(self._run(tokens, adapters, params, rng, stats, cancel), stats)

    def _run(self, tokens: list[int], adapters: Mapping[str, float | None] | None, params: SamplingParams,
             rng: np.random.Generator, stats: GenerationStats, cancel: threading.Event | None) -> Iterator[str]:
        context = self._acquire_context(cancel)
        if context is None:
            stats.finish_reason = "cancelled"
            return

        def cancelled() -> bool:
            return (cancel is not None and cancel.is_set()) or self._closing.is_set()

        # stats.finish_reason is set only when the generation is over, so readers can poll it.
        try:
            # Resolved while holding a context: an adapter unloaded or replaced since _start is
            # then either gone (a clear error) or kept alive until this context is returned.
            context.set_adapters(self._resolve_adapters(adapters))
            context.clear_kv()
            if params.max_tokens == 0:
                stats.finish_reason = "length"
                return
            if not context.decode(tokens, 0, "last", cancel=cancelled):  # a cancel is seen between prefill chunks
                stats.finish_reason = "cancelled"
                return
            pos = len(tokens)
            utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            stopper = _StopMatcher(params.stop)
            finish = "length"
            while True:
                if cancelled():
                    stats.finish_reason = "cancelled"
                    return
                token = sample_token(context.logits(), params, rng)
                if self.model.is_eog(token):
                    finish = "stop"
                    break
                stats.tokens.append(token)
                stats.completion_tokens += 1
                text, stopped = stopper.feed(utf8.decode(self.model.token_piece(token)))
                if stopped:
                    stats.finish_reason = "stop"
                if text:
                    yield text
                if stopped:
                    return
                # Stop when prompt + completion fill the context (the last token needs no slot).
                if stats.completion_tokens >= params.max_tokens or pos + 1 >= context.n_ctx:
                    break
                context.decode([token], pos, "last")
                pos += 1
            text, stopped = stopper.feed(utf8.decode(b"", final=True))
            tail = text + ("" if stopped else stopper.flush())
            stats.finish_reason = "stop" if stopped else finish
            if tail:
                yield tail
        finally:
            self._free.put(context)
