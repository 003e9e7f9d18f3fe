"""The runtime: a quantized base loaded once (mmap), LoRA adapters hot-applied per request, and
one decode loop (``scheduler.Scheduler``) that runs every request of the model.

Concurrency: ``n_contexts`` requests run at once, each in a slot of one batched context; every
step of the loop decodes the running requests of one adapter set in one batch (see
scheduler.py). More requests wait in the loop's queue, first come first served.

Adapters: loaded by name (``load_adapter``) or, with an ``adapter_resolver``, on first use: a
request naming a servable adapter that is not loaded loads it, and past ``max_adapters`` the least
recently used adapter that no request holds is freed (vLLM's and LoRAX's LRU). A request holds
(pins) its adapters from the moment it is accepted until the loop lets go of it, so an adapter is
never freed under it. Loading, unloading and evicting change llama.cpp's adapter set of the model,
which every decode reads, so they pause the loop between steps; that wait is bounded
(``ADMIN_WAIT_S``), and unloading an adapter that running requests use waits for them at most as
long, then fails with a clear error instead of waiting forever.

Prompt cache: each slot keeps what it computed, with the adapter set and the cache scope (the
server's tenant) it was computed under; a request reuses the longest prefix of a free slot of its
own scope and adapter set and decodes only the rest. Reuse changes logits slightly (llama.cpp's
kernels depend on batch shape), so ``cache_prompt=False`` keeps the exact mode: the request runs in
a context of its own, outside the shared batches, with an empty cache and a full prefill, giving
the same tokens whether it runs alone or among others.

Threads: the loop is the only thread decoding, so each decode call uses every core given
(``n_threads``). Flash attention is off: its single-token kernel splits the KV cache by thread
count, which would make a request's tokens depend on the thread setting.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_lora.core import constants
from edge_lora.core.chat_template import ChatPart, ChatTemplate, normalize_messages, render_chat_parts, template_for
from edge_lora.core.context_size import default_ctx
from edge_lora.core.errors import ContextLengthError, InputNotFoundError, RegistryError, RequestError
from edge_lora.serving.llama_backend import (TOKEN_ATTR_CONTROL, TOKEN_ATTR_LSTRIP, TOKEN_ATTR_RSTRIP, TOKEN_ATTR_UNKNOWN,
                                             BatchedContext, GrammarSampler, LlamaModel, LoraAdapter)
from edge_lora.serving.sampling import (Generation, GenerationStats, SamplingParams, StopMatcher, TokenLogprob,
                                        sample_token, token_logprobs)
from edge_lora.serving.scheduler import BusyError, RequestDeadlineError, Scheduler, SequenceRequest
from edge_lora.serving.structured import Grammar

__all__ = ["Runtime", "LoadedAdapter", "Generation", "GenerationStats", "SamplingParams", "TokenLogprob",
           "StopMatcher", "_StopMatcher", "sample_token", "token_logprobs", "BusyError", "RequestDeadlineError"]
_StopMatcher = StopMatcher  # the name tests and older callers use

# How long close() waits for the loop to stop before leaving the contexts to the process exit
# (freeing a context under a running decode would crash inside llama.cpp).
CLOSE_WAIT_S = 10.0
# How long an adapter load/unload/eviction waits for the loop to pause, or for the requests using
# an adapter being unloaded to end, before failing with BusyError.
ADMIN_WAIT_S = 30.0
# A request's default deadline (generate(deadline_s=None)); the server passes its own limit.
DEFAULT_DEADLINE_S = 3600.0
# What llama.cpp's tokenizer strips beside LSTRIP/RSTRIP tokens (C isspace).
_ASCII_SPACE = " \t\n\v\f\r"

logger = logging.getLogger(__name__)

# name -> (file, default scale) of a servable adapter, or None when there is no such adapter.
AdapterResolver = Callable[[str], "tuple[Path, float] | None"]


@dataclass(eq=False)
class LoadedAdapter:
    name: str
    path: Path
    scale: float
    adapter: LoraAdapter
    # Never reused in this runtime, so an id a client holds (llama-server's "lora": [{"id"}])
    # cannot come to mean another adapter after an unload or a replacement.
    id: int
    pins: int = 0  # requests holding it (accepted, not yet let go by the loop)
    last_used: float = 0.0
    retiring: bool = False  # being unloaded or replaced: no new request may pin it


class Runtime:
    def __init__(self, model_path: Path | str, n_ctx: int | None = None, seed: int = 0,
                 n_threads: int | None = None, n_batch: int = 512, n_contexts: int = 1,
                 prompt_cache: bool = True, *, adapter_resolver: AdapterResolver | None = None,
                 max_adapters: int | None = None) -> None:
        """``n_threads``: the cores the decode loop uses (default: all). ``n_contexts``: requests
        decoded together (slots). ``prompt_cache``: the default for each request's ``cache_prompt``.
        ``adapter_resolver``: finds a servable adapter by name, loaded on first use;
        ``max_adapters``: adapters loaded at once, the least recently used evicted (None: no limit)."""
        if not 1 <= n_contexts <= 256:
            raise RequestError("n_contexts must be between 1 and 256")
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
        self.n_contexts = n_contexts  # how many requests run at once
        self.n_threads = n_threads or constants.N_THREADS
        n_batch = max(1, min(n_batch, self.n_ctx))
        self._context = BatchedContext(self.model, self.n_ctx, n_contexts, n_batch=max(n_batch, n_contexts),
                                       n_threads=self.n_threads)
        self._scheduler = Scheduler(self.model, self._context, n_batch=n_batch, n_threads=self.n_threads)
        self._adapters: dict[str, LoadedAdapter] = {}
        self._adapters_lock = threading.Condition()
        self._adapter_ids = itertools.count()
        self._loading = threading.Lock()
        self.adapter_resolver = adapter_resolver
        self.max_adapters = max_adapters
        self._closing = threading.Event()
        self.template: ChatTemplate = template_for(self.model)
        self._markup_cache: dict[str, list[str | tuple[int, int]]] = {}
        self._request_numbers = itertools.count(1)  # next() is atomic: no two requests share a stream

    # --- lifetime ---
    def close(self) -> None:
        """Stop running generations at their next step, then free contexts, adapters and model."""
        if self._closing.is_set():
            return
        self._closing.set()
        if not self._scheduler.stop(CLOSE_WAIT_S):
            # The loop is still inside a decode (a long prompt chunk, a grammar): freeing the
            # model under it would crash, so the process exit frees it.
            logger.warning("a generation is still running; the model stays loaded until exit")
            return
        self._scheduler.close_contexts()
        for loaded in self._adapters.values():
            loaded.adapter.free()
        self._adapters.clear()
        self.model.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def scheduler(self) -> Scheduler:
        return self._scheduler

    # --- adapters ---
    def load_adapter(self, name: str, path: Path | str, scale: float = 1.0, *, fd: int | None = None) -> LoadedAdapter:
        """Load (or replace) adapter ``name``; validated against the base before llama.cpp sees it.
        Replacing waits (at most ADMIN_WAIT_S) for the requests using the old one to end. ``fd``:
        the file already opened (and checked) by the caller: that descriptor is validated and
        loaded, ``path`` only names it."""
        self._require_open()
        path = Path(path)
        if fd is None and not path.exists():
            raise InputNotFoundError(f"adapter file {path} does not exist", fix="check the path")
        with self._loading_slot():
            old = self.adapters.get(name)
            if old is not None:
                self._retire(old)
            else:
                self._evict_over_limit(keep=None, room_for=1)
            with self._scheduler.paused(ADMIN_WAIT_S):
                adapter = LoraAdapter(self.model, path, fd=fd)
                with self._adapters_lock:
                    loaded = self._adapters[name] = LoadedAdapter(name, path, float(scale), adapter,
                                                                  next(self._adapter_ids), last_used=time.monotonic())
                if old is not None:
                    self._scheduler.forget_adapter(old.adapter)
                    old.adapter.free()
        return loaded

    def unload_adapter(self, name: str) -> None:
        """Waits (at most ADMIN_WAIT_S) for the requests using it to end, then frees it."""
        self._require_open()
        loaded = self.adapters.get(name)
        if loaded is None:
            raise RegistryError(f"no adapter named {name!r} is loaded",
                                fix=f"loaded adapters: {', '.join(self.adapters) or 'none'}")
        self._retire(loaded)
        with self._scheduler.paused(ADMIN_WAIT_S):
            with self._adapters_lock:
                if self._adapters.get(name) is loaded:
                    del self._adapters[name]
            self._scheduler.forget_adapter(loaded.adapter)
            loaded.adapter.free()

    def _retire(self, loaded: LoadedAdapter) -> None:
        """Let no new request pin ``loaded`` and wait (bounded) until none holds it."""
        deadline = time.monotonic() + ADMIN_WAIT_S
        with self._adapters_lock:
            loaded.retiring = True
            while loaded.pins:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    loaded.retiring = False
                    self._adapters_lock.notify_all()
                    raise BusyError(f"adapter {loaded.name!r} is used by {loaded.pins} running request(s)",
                                    fix="retry once they finish")
                self._adapters_lock.wait(min(remaining, 0.1))

    def _require_open(self) -> None:
        if self._closing.is_set():
            raise RequestError("the model is being unloaded", fix="retry once the server is back")

    @property
    def adapters(self) -> dict[str, LoadedAdapter]:
        with self._adapters_lock:
            return dict(self._adapters)

    def _pin_adapters(self, adapters: Mapping[str, float | None] | None) -> tuple[list[LoadedAdapter],
                                                                                  list[tuple[LoraAdapter, float]]]:
        """The named adapters, loaded on first use when a resolver knows them, each pinned (call
        ``_unpin`` once the request is over); with their scales."""
        pinned: list[LoadedAdapter] = []
        active: list[tuple[LoraAdapter, float]] = []
        try:
            for name, scale in (adapters or {}).items():
                loaded = self._pin_one(name)
                pinned.append(loaded)
                value = loaded.scale if scale is None else float(scale)
                if not -100.0 <= value <= 100.0:
                    raise RequestError(f"adapter scale {value} for {name!r} is out of range (-100..100)")
                active.append((loaded.adapter, value))
        except BaseException:
            self._unpin(pinned)
            raise
        return pinned, active

    def _pin_one(self, name: str) -> LoadedAdapter:
        deadline = time.monotonic() + ADMIN_WAIT_S
        while True:
            with self._adapters_lock:
                loaded = self._adapters.get(name)
                if loaded is not None and not loaded.retiring:
                    loaded.pins += 1
                    loaded.last_used = time.monotonic()
                    return loaded
            source = self.adapter_resolver(name) if self.adapter_resolver is not None else None
            if source is None and loaded is None:
                raise RequestError(f"adapter {name!r} is not loaded",
                                   fix=f"loaded adapters: {', '.join(self.adapters) or 'none'}")
            if time.monotonic() > deadline:
                raise BusyError(f"adapter {name!r} is being replaced or unloaded", fix="retry shortly")
            if loaded is not None:  # retiring: wait for the replacement or the unload
                time.sleep(0.05)
                continue
            self._load_on_demand(name, *source)  # type: ignore[misc]

    def _load_on_demand(self, name: str, path: Path, scale: float) -> None:
        with self._loading_slot():
            with self._adapters_lock:
                if name in self._adapters:  # another request loaded it meanwhile
                    return
            self._evict_over_limit(keep=None, room_for=1)
            # Opened once, not following a link at the end: the file the resolver found is the one
            # validated and loaded (a symlink put in its place meanwhile is refused).
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                raise InputNotFoundError(f"adapter {name!r} cannot be opened", fix="check the adapter's file") from None
            try:
                with self._scheduler.paused(ADMIN_WAIT_S):
                    adapter = LoraAdapter(self.model, path, fd=fd)
                    with self._adapters_lock:
                        self._adapters[name] = LoadedAdapter(name, path, float(scale), adapter,
                                                             next(self._adapter_ids), last_used=time.monotonic())
            finally:
                os.close(fd)
        logger.info("adapter %s loaded on first use", name)

    @contextlib.contextmanager
    def _loading_slot(self) -> Iterator[None]:
        """One load (and the evictions making room for it) at a time, so two never both see room
        for one more; waited for at most ADMIN_WAIT_S."""
        if not self._loading.acquire(timeout=ADMIN_WAIT_S):
            raise BusyError("another adapter is being loaded", fix="retry shortly")
        try:
            yield
        finally:
            self._loading.release()

    def _evict_over_limit(self, keep: str | None, room_for: int = 0) -> None:
        """Free the least recently used adapters no request holds until ``room_for`` more fit."""
        if self.max_adapters is None:
            return
        while True:
            with self._adapters_lock:
                if len(self._adapters) + room_for <= self.max_adapters:
                    return
                idle = [a for a in self._adapters.values() if a.pins == 0 and not a.retiring and a.name != keep]
                if not idle:
                    if room_for:
                        raise BusyError(f"all {self.max_adapters} adapter slots are held by running requests",
                                        fix="retry shortly, or raise --max-adapters")
                    return
                victim = min(idle, key=lambda a: a.last_used)
                victim.retiring = True
            with self._scheduler.paused(ADMIN_WAIT_S):
                with self._adapters_lock:
                    if self._adapters.get(victim.name) is victim and victim.pins == 0:
                        del self._adapters[victim.name]
                        self._scheduler.forget_adapter(victim.adapter)
                        victim.adapter.free()
                        logger.info("adapter %s evicted (least recently used)", victim.name)
                    else:
                        victim.retiring = False

    def _unpin(self, pinned: Sequence[LoadedAdapter]) -> None:
        with self._adapters_lock:
            for loaded in pinned:
                loaded.pins -= 1
                loaded.last_used = time.monotonic()
            self._adapters_lock.notify_all()

    def _resolve_adapters(self, adapters: Mapping[str, float | None] | None) -> list[tuple[LoraAdapter, float]]:
        """The named loaded adapters with their scales (no pin, no load)."""
        active: list[tuple[LoraAdapter, float]] = []
        with self._adapters_lock:
            for name, scale in (adapters or {}).items():
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
                 grammar: Grammar | None = None, cache_prompt: bool | None = None,
                 cache_scope: str = "", deadline_s: float | None = None) -> Generation:
        """Generate after ``prompt`` (text or token ids). ``logprobs``: fill ``stats.logprobs``
        with each token's log-probability and the n most likely; ``grammar``: the answer must
        match it; ``cache_prompt``: reuse a cached prefix (default: the runtime's ``prompt_cache``);
        ``cache_scope``: only prefixes computed for the same scope are reused (a tenant);
        ``deadline_s``: the request ends with RequestDeadlineError after that many seconds."""
        self._require_open()
        tokens = self.tokenize_prompt(prompt)
        return self._start(tokens, adapters, SamplingParams(max_tokens, float(temperature), float(top_p),
                                                            int(top_k), seed, tuple(stop), logprobs, grammar),
                           cancel, cache_prompt, cache_scope, deadline_s)

    def chat(self, messages: Sequence[Mapping[str, Any]], adapters: Mapping[str, float | None] | None = None,
             max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, stop: Sequence[str] = (),
             cancel: threading.Event | None = None, *, logprobs: int | None = None,
             grammar: Grammar | None = None, cache_prompt: bool | None = None,
             cache_scope: str = "", deadline_s: float | None = None) -> Generation:
        self._require_open()
        tokens = self.render_messages(messages)
        return self._start(tokens, adapters, SamplingParams(max_tokens, float(temperature), float(top_p),
                                                            int(top_k), seed, tuple(stop), logprobs, grammar),
                           cancel, cache_prompt, cache_scope, deadline_s)

    def _start(self, tokens: list[int], adapters: Mapping[str, float | None] | None,
               params: SamplingParams, cancel: threading.Event | None,
               cache_prompt: bool | None = None, cache_scope: str = "",
               deadline_s: float | None = None) -> Generation:
        # Everything that can be refused is refused here, before the request is queued.
        params.check()
        if not tokens:
            raise RequestError("the prompt is empty", fix="give a non-empty prompt")
        if len(tokens) >= self.n_ctx:
            raise ContextLengthError(f"the prompt is {len(tokens)} tokens; the context holds {self.n_ctx}",
                                     fix="shorten the prompt or raise --ctx")
        if deadline_s is not None and not deadline_s > 0:
            raise RequestError(f"the deadline must be positive, got {deadline_s!r}")
        # Adapters are found (loaded on first use) now, so an unknown name is refused before anything streams.
        pinned, _ = self._pin_adapters(adapters)
        self._unpin(pinned)  # pinned again when the request is queued
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
        deadline = time.monotonic() + (DEFAULT_DEADLINE_S if deadline_s is None else deadline_s)
        return Generation(self._run(tokens, adapters, params, rng, stats, cancel, use_cache, grammar,
                                    cache_scope, deadline), stats)

    def _run(self, tokens: list[int], adapters: Mapping[str, float | None] | None, params: SamplingParams,
             rng: np.random.Generator, stats: GenerationStats, cancel: threading.Event | None,
             use_cache: bool, grammar: GrammarSampler | None, scope: str, deadline: float) -> Iterator[str]:
        """Queue the request in the decode loop on first iteration (a Generation never iterated
        takes no slot) and relay its text."""
        if cancel is not None and cancel.is_set():
            if grammar is not None:
                grammar.close()
            stats.finish_reason = "cancelled"
            return
        try:
            self._require_open()
            # Resolved (and pinned) again now: an adapter unloaded or replaced since _start is
            # then either gone (a clear error) or kept alive until the loop lets go of the request.
            pinned, active = self._pin_adapters(adapters)
        except BaseException:
            if grammar is not None:
                grammar.close()
            raise
        key = tuple((a, float(s)) for a, s in active if float(s) != 0.0)
        request = SequenceRequest(tokens=tokens, adapters=key, params=params, rng=rng, stats=stats, grammar=grammar,
                                  allow=self._grammar_filter(grammar) if grammar is not None else None,
                                  use_cache=use_cache, scope=scope, deadline=deadline, cancel=cancel,
                                  on_done=lambda: self._unpin(pinned))
        try:
            self._scheduler.submit(request)
        except BaseException:
            request.on_done = None
            self._unpin(pinned)
            if grammar is not None:
                grammar.close()
            raise
        yield from self._scheduler.relay(request)

    def _grammar_filter(self, grammar: GrammarSampler) -> Callable[[np.ndarray], np.ndarray]:
        # Control tokens print as nothing, so a grammar matching their spelled-out text
        # ("<start_of_turn>" inside a JSON string) would not match what the reader gets.
        control = self.model.control_tokens

        def allow(ids: np.ndarray) -> np.ndarray:
            return grammar.allowed(ids) & ~control[ids]
        return allow
