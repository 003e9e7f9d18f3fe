"""The decode loop: one thread per model runs every request (continuous batching, llama-server's
slots, vLLM's scheduler).

Each step admits waiting requests into free slots, drops the cancelled and the expired ones, then
decodes: the running sequences that share an adapter set go into one ``llama_decode`` call (one
token each for those generating, chunks of prompt for those still reading theirs), and each other
adapter set gets its own call in the same step, the context's adapters switched between calls
(llama.cpp applies adapters per context). Prompt chunks fill what a step's batch has left after the
generating sequences, shortest prompt first, so a short request is answered while long prompts are
still being read. Sampling (grammar, logprobs, seeds, stop strings) is done per sequence right after
its call.

Prompt cache: every slot is a sequence of one unified KV cache and keeps what it computed after
its request ends. A request reuses the longest prefix a free slot holds that was computed under
the same adapter set **and the same cache scope** (the server's tenant: API key and
``cache_salt``), so a request never learns, from ``cached_tokens`` or from its speed, anything
about another scope's prompts.

Exact mode (``use_cache=False``): the request gets a context of its own (one sequence, empty
cache, the prompt read in ``n_batch`` chunks from position 0) and is decoded in calls of its own,
so its tokens do not depend on other traffic: the same as when it runs alone.

Bounded waits: a request past its deadline ends with ``RequestDeadlineError``; a cancelled request
(its client left, ``Generation.close()``) frees its slot at the next step. Adapter loads and unloads
pause the loop between steps (``paused``), waiting at most ``timeout`` seconds for it.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_lora.core.errors import EdgeLoraError, InternalError, RequestError
from edge_lora.serving.llama_backend import BatchedContext, GrammarSampler, LlamaContext, LlamaModel, LoraAdapter
from edge_lora.serving.sampling import (GenerationStats, LogprobTracker, SamplingParams, StopMatcher, TokenLogprob,
                                        sample_token)

logger = logging.getLogger(__name__)

# Prompt tokens a step reads while other requests run or wait: a step's time is what a request
# arriving meanwhile waits before its own first step, and what every generating sequence waits for
# its next token. A lone request reads n_batch at a time.
SHARED_PROMPT_CHUNK = 64

AdapterSet = tuple[tuple[LoraAdapter, float], ...]


class RequestDeadlineError(RequestError):
    """The request ran past its deadline (ServerLimits.request_deadline_s)."""


class BusyError(RequestError):
    """The loop did not reach a pause point in time (an adapter load or unload gave up)."""


# What a sequence hands to its reader: a piece of text (with its tokens' logprob entries), the
# end (with the last entries) or an error.
Item = tuple[str, Any, list[TokenLogprob]]


@dataclass(eq=False)
class SequenceRequest:
    """One request inside the loop. Everything but ``out`` and ``closed`` belongs to the loop."""
    tokens: list[int]
    adapters: AdapterSet
    params: SamplingParams
    rng: np.random.Generator
    stats: GenerationStats
    grammar: GrammarSampler | None
    allow: Callable[[np.ndarray], np.ndarray] | None
    use_cache: bool
    scope: str  # the prompt cache is shared only between requests of one scope
    deadline: float  # time.monotonic() after which it ends with RequestDeadlineError
    cancel: threading.Event | None = None
    on_done: Callable[[], None] | None = None  # called once by the loop when it lets go of the request
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    closed: threading.Event = field(default_factory=threading.Event)  # the reader went away
    # --- loop state ---
    slot: int = -1
    exact: LlamaContext | None = None
    fed: int = 0  # prompt tokens in the KV cache
    pending: int | None = None  # the sampled token still to decode
    order: int = 0

    def stopped(self) -> bool:
        return self.closed.is_set() or (self.cancel is not None and self.cancel.is_set())


@dataclass
class _Slot:
    scope: str = ""
    adapters: AdapterSet = ()
    last_used: int = 0
    request: SequenceRequest | None = None


class _Output:
    """A sequence's text so far: UTF-8 across token boundaries, stop strings held back, logprobs."""

    def __init__(self, request: SequenceRequest, model: LlamaModel) -> None:
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stopper = StopMatcher(request.params.stop)
        self.logprobs = (LogprobTracker(request.params.logprobs, model.token_piece)
                         if request.params.logprobs is not None else None)


class Scheduler:
    """The loop over a ``BatchedContext`` (one slot per sequence) and, for exact-mode requests,
    single-sequence contexts made on first use (at most one per slot)."""

    def __init__(self, model: LlamaModel, context: BatchedContext, *, n_batch: int, n_threads: int,
                 shared_chunk: int = SHARED_PROMPT_CHUNK, idle_poll_s: float = 0.05) -> None:
        self.model = model
        self.context = context
        self.n_slots = context.n_seq
        self.n_ctx = context.n_ctx
        self.n_batch = n_batch
        self.n_threads = n_threads
        self.shared_chunk = max(1, min(shared_chunk, n_batch))
        self.idle_poll_s = idle_poll_s
        self._slots = [_Slot() for _ in range(self.n_slots)]
        self._exact: list[LlamaContext | None] = [None] * self.n_slots
        self._waiting: collections.deque[SequenceRequest] = collections.deque()
        self._running: list[SequenceRequest] = []
        self._outputs: dict[int, _Output] = {}
        self._cond = threading.Condition()
        self._pause_requested = 0
        self._paused = False
        self._admin = threading.Lock()
        self._closing = False
        self._stamps = itertools.count(1)
        self._orders = itertools.count(1)
        self.steps = 0  # decode steps run (for tests and benchmarks)
        self._thread = threading.Thread(target=self._loop, name="edge-lora-decode-loop", daemon=True)
        self._thread.start()

    # --- the requests' side ---
    def submit(self, request: SequenceRequest) -> None:
        with self._cond:
            if self._closing:
                raise RequestError("the model is being unloaded", fix="retry once the server is back")
            request.order = next(self._orders)
            self._waiting.append(request)
            self._cond.notify_all()

    def relay(self, request: SequenceRequest) -> Iterator[str]:
        """Yield a submitted request's text; leaving early (close()) cancels it."""
        try:
            while True:
                kind, value, entries = request.out.get()
                request.stats.logprobs.extend(entries)
                if kind == "piece":
                    yield value
                elif kind == "end":
                    return
                else:
                    raise value
        finally:
            request.closed.set()
            with self._cond:
                self._cond.notify_all()

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) right now."""
        with self._cond:
            return len(self._running), len(self._waiting)

    # --- the administrator's side ---
    @contextlib.contextmanager
    def paused(self, timeout: float) -> Iterator[None]:
        """The loop stopped between steps (no decode runs) for the block; waits at most ``timeout``
        seconds for that, else BusyError."""
        deadline = time.monotonic() + timeout
        if not self._admin.acquire(timeout=max(0.0, timeout)):
            raise BusyError("another adapter load or unload is in progress", fix="retry shortly")
        try:
            with self._cond:
                self._pause_requested += 1
                self._cond.notify_all()
                while not (self._paused or not self._thread.is_alive()):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._pause_requested -= 1
                        self._cond.notify_all()
                        raise BusyError(f"the server did not reach a pause within {timeout:g} s (a long step is running)",
                                        fix="retry shortly")
                    self._cond.wait(remaining)
            try:
                yield
            finally:
                with self._cond:
                    self._pause_requested -= 1
                    self._cond.notify_all()
        finally:
            self._admin.release()

    def uses(self, adapter: LoraAdapter) -> bool:
        """Whether a running sequence's KV cache or step uses ``adapter`` (call while paused)."""
        return any(any(a is adapter for a, _ in r.adapters) for r in self._running)

    def forget_adapter(self, adapter: LoraAdapter) -> None:
        """Drop every free slot's cache computed under ``adapter`` (call while paused, before freeing it)."""
        for seq, slot in enumerate(self._slots):
            if slot.request is None and any(a is adapter for a, _ in slot.adapters):
                self.context.clear_seq(seq)
                slot.adapters = ()
        for context in self._exact:
            if context is not None and any(a is adapter for a, _ in context.adapters):
                context.set_adapters([])

    def stop(self, timeout: float) -> bool:
        """End every request (finish_reason "cancelled") and the loop; False when the loop is still
        inside a decode after ``timeout`` seconds (then nothing may be freed)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close_contexts(self) -> None:
        for context in self._exact:
            if context is not None:
                context.close()
        self.context.close()

    # --- the loop ---
    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closing:
                        break
                    if self._pause_requested:
                        self._paused = True
                        self._cond.notify_all()
                        while self._pause_requested and not self._closing:
                            self._cond.wait(self.idle_poll_s)
                        self._paused = False
                        continue
                    if self._waiting or self._running:
                        break
                    self._cond.wait(self.idle_poll_s)
                if self._closing:
                    waiting, self._waiting = list(self._waiting), collections.deque()
            if self._closing:
                for request in [*waiting, *self._running]:
                    self._finish(request, "cancelled")
                return
            try:
                self._step()
            except Exception as exc:  # a bug: fail the running requests, keep the loop alive
                logger.exception("decode step failed")
                for request in list(self._running):
                    self._fail(request, exc if isinstance(exc, EdgeLoraError) else InternalError("generation failed"))

    def _step(self) -> None:
        self._admit()
        now = time.monotonic()
        for request in list(self._running):
            if request.stopped():
                self._finish(request, "cancelled")
            elif now > request.deadline:
                self._fail(request, RequestDeadlineError("the request ran past its deadline",
                                                         fix="ask for fewer tokens, or raise the server's deadline"),
                           keep_cache=True)
        if not self._running:
            return
        self.context.set_threads(self.n_threads)
        groups: dict[AdapterSet, list[SequenceRequest]] = {}
        for request in self._running:
            if request.exact is None:
                groups.setdefault(request.adapters, []).append(request)
        for adapters, requests in groups.items():
            self._decode_group(adapters, requests)
        for request in [r for r in self._running if r.exact is not None]:
            self._decode_exact(request)
        self.steps += 1

    def _admit(self) -> None:
        with self._cond:
            candidates = list(self._waiting)
        now = time.monotonic()
        for request in candidates:
            if request.stopped() or now > request.deadline:
                with self._cond:
                    self._waiting.remove(request)
                if request.stopped():
                    self._finish(request, "cancelled", started=False)
                else:
                    self._fail(request, RequestDeadlineError("the request waited past its deadline",
                                                             fix="retry when the server is less busy"))
                continue
            seq = self._choose_slot(request)
            if seq is None:
                break
            with self._cond:
                self._waiting.remove(request)
            self._start(request, seq)

    def _choose_slot(self, request: SequenceRequest) -> int | None:
        """The free slot whose cache this prompt continues (same scope, same adapter set, a long
        enough shared prefix); else an empty one; else the least recently used."""
        best, best_key = None, None
        for seq, slot in enumerate(self._slots):
            if slot.request is not None:
                continue
            n_past = self.context.n_past(seq)
            if not request.use_cache:
                # Exact mode leaves the slot's cache alone: any free slot, one with its context made first.
                score = (int(self._exact[seq] is not None), 0)
            elif n_past == 0:
                score = (0, 1)  # taking an empty slot destroys no one's cache
            elif request.use_cache and slot.scope == request.scope and slot.adapters == request.adapters:
                n = self.context.reusable_prefix(seq, request.tokens)
                # Worth dropping the rest of that cache only when the prompt continues it (a next
                # chat turn, a shared system prompt), not for a chat template's first few tokens.
                score = (n, 0) if 2 * n >= min(n_past, len(request.tokens)) else (0, 0)
            else:
                score = (0, 0)
            key = (score, -slot.last_used)
            if best_key is None or key > best_key:
                best, best_key = seq, key
        return best

    def _start(self, request: SequenceRequest, seq: int) -> None:
        slot = self._slots[seq]
        slot.request = request
        request.slot = seq
        self._running.append(request)
        self._outputs[id(request)] = _Output(request, self.model)
        try:
            if request.use_cache:
                same = slot.scope == request.scope and slot.adapters == request.adapters
                reused = self.context.keep_prefix(seq, self.context.reusable_prefix(seq, request.tokens) if same else 0)
                slot.scope, slot.adapters = request.scope, request.adapters
            else:
                request.exact = self._exact_context(seq)
                request.exact.set_adapters(request.adapters)
                request.exact.clear_kv()
                reused = 0
            request.fed = reused
            request.stats.cached_tokens = reused
            if request.params.max_tokens == 0:
                self._finish(request, "length")
        except EdgeLoraError as exc:
            self._fail(request, exc)

    def _exact_context(self, seq: int) -> LlamaContext:
        context = self._exact[seq]
        if context is None:
            context = self._exact[seq] = LlamaContext(self.model, self.n_ctx, n_batch=self.n_batch,
                                                      n_threads=self.n_threads, flash_attn=False)
        return context

    def _decode_group(self, adapters: AdapterSet, requests: list[SequenceRequest]) -> None:
        parts: list[tuple[SequenceRequest, list[int]]] = []
        with self._cond:
            alone = len(self._running) == 1 and not self._waiting
        budget = self.context.n_batch if alone else min(self.context.n_batch, len(requests) + self.shared_chunk)
        for request in requests:
            if request.pending is not None:
                parts.append((request, [request.pending]))
                budget -= 1
        reading = sorted((r for r in requests if r.pending is None), key=lambda r: (len(r.tokens) - r.fed, r.order))
        for request in reading:
            if budget <= 0:
                break
            n = min(budget, len(request.tokens) - request.fed)
            parts.append((request, request.tokens[request.fed:request.fed + n]))
            budget -= n
        if not parts:
            return
        try:
            self.context.set_adapters(adapters)
            rows = self.context.decode([(r.slot, tokens) for r, tokens in parts])
        except EdgeLoraError as exc:
            for request, _ in parts:
                self._fail(request, exc)
            return
        for (request, tokens), row in zip(parts, rows):
            if request.pending is not None:
                request.pending = None
            else:
                request.fed += len(tokens)
                if request.fed < len(request.tokens):
                    continue
            self._sample(request, self.context.logits(row), self.context.n_past(request.slot))

    def _decode_exact(self, request: SequenceRequest) -> None:
        context = request.exact
        assert context is not None
        try:
            if request.pending is not None:
                pos = context.n_past
                context.decode([request.pending], pos, "last")
                request.pending = None
            else:
                # Whole n_batch chunks (the boundaries of a prompt read alone), so exact-mode tokens
                # do not depend on other traffic; that step is longer for the others.
                chunk = request.tokens[request.fed:request.fed + context.n_batch]
                last = request.fed + len(chunk) == len(request.tokens)
                # Chunks at the same boundaries, logits only after the prompt: as a whole-prompt decode alone.
                context.decode(chunk, request.fed, "last" if last else frozenset())
                request.fed += len(chunk)
                if not last:
                    return
        except EdgeLoraError as exc:
            self._fail(request, exc)
            return
        self._sample(request, context.logits(), context.n_past)

    def _sample(self, request: SequenceRequest, logits: np.ndarray, n_past: int) -> None:
        """Draw the next token after ``logits`` (``n_past`` tokens in the sequence's cache) and
        hand its text to the reader."""
        out = self._outputs[id(request)]
        stats = request.stats
        try:
            token = sample_token(logits, request.params, request.rng, request.allow)
            if self.model.is_eog(token):
                self._finish(request, "stop")
                return
            if request.grammar is not None:
                request.grammar.accept(token)
            stats.tokens.append(token)
            stats.completion_tokens += 1
            piece = self.model.token_piece(token)
            decoded = out.utf8.decode(piece)
            if out.logprobs is not None:
                out.logprobs.add(logits, token, piece, decoded)
        except EdgeLoraError as exc:
            self._fail(request, exc)
            return
        text, stopped = out.stopper.feed(decoded)
        entries = out.logprobs.release(len(text)) if out.logprobs is not None else []
        if text or entries:
            request.out.put(("piece", text, entries))
        if stopped:
            self._finish(request, "stop", flush=False)
            return
        # Stop when prompt + completion fill the context (the last token needs no slot).
        if stats.completion_tokens >= request.params.max_tokens or n_past + 1 >= self.n_ctx:
            self._finish(request, "length")
            return
        request.pending = token

    # --- ends ---
    def _finish(self, request: SequenceRequest, reason: str, *, flush: bool = True, started: bool = True) -> None:
        out = self._outputs.pop(id(request), None)
        entries: list[TokenLogprob] = []
        if out is not None and flush and reason != "cancelled":
            text, stopped = out.stopper.feed(out.utf8.decode(b"", final=True))
            tail = text + ("" if stopped else out.stopper.flush())
            entries = out.logprobs.release(len(tail), final=not stopped) if out.logprobs is not None else []
            reason = "stop" if stopped else reason
            if tail:
                request.out.put(("piece", tail, entries))
                entries = []
        request.stats.finish_reason = reason
        self._let_go(request, keep_cache=True)
        request.out.put(("end", None, entries))

    def _fail(self, request: SequenceRequest, exc: EdgeLoraError, *, keep_cache: bool = False) -> None:
        self._outputs.pop(id(request), None)
        self._let_go(request, keep_cache=keep_cache)
        request.out.put(("error", exc, []))

    def _let_go(self, request: SequenceRequest, *, keep_cache: bool) -> None:
        if request in self._running:
            self._running.remove(request)
            slot = self._slots[request.slot]
            slot.request = None
            slot.last_used = next(self._stamps)
            if request.exact is None and not keep_cache:
                self.context.clear_seq(request.slot)  # a failed request leaves nothing for another to reuse
        if request.grammar is not None:
            request.grammar.close()
        if request.on_done is not None:
            on_done, request.on_done = request.on_done, None
            on_done()
