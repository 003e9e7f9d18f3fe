"""Per-sequence sampling: the token draw (greedy, top-k/top-p, grammar-filtered), log-probabilities,
stop strings and the text a generation yields. Used by the decode loop for each sequence on its own."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from edge_lora.core import constants
from edge_lora.core.errors import InternalError, InvalidGGUFError, RequestError
from edge_lora.serving.structured import Grammar



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


class StopMatcher:
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


class LogprobTracker:
    """Log-probabilities of the generated tokens, released with the text they belong to: a token
    whose text starts after a stop string's cut is never reported."""

    def __init__(self, n_top: int, piece_of: Callable[[int], bytes]) -> None:
        self.n_top, self.piece_of = n_top, piece_of
        self.pending: list[TokenLogprob] = []
        self.decoded_chars = 0  # characters of generated text so far (including held-back text)
        self.yielded_chars = 0

    def add(self, logits: np.ndarray, token: int, piece: bytes, decoded: str) -> None:
        chosen, top = token_logprobs(logits, token, self.n_top)
        self.pending.append(TokenLogprob(token, piece, chosen, tuple((t, self.piece_of(t), lp) for t, lp in top),
                                         self.decoded_chars))
        self.decoded_chars += len(decoded)

    def release(self, n_chars: int, final: bool = False) -> list[TokenLogprob]:
        """The entries of tokens whose text starts within the ``n_chars`` more characters yielded."""
        self.yielded_chars += n_chars
        ready = self.pending if final else [e for e in self.pending if e.offset < self.yielded_chars]
        self.pending = [] if final else self.pending[len(ready):]
        return ready
