"""``edge-lora export vllm --check URL``: does a server answer as edge-lora does?

For the base and every adapter the server lists, greedy completions of fixed prompts (the same
token ids on both sides) are compared with edge-lora's own run of the full-precision GGUF with
that adapter hot-applied at its registry scale. Per model: how many of the first K tokens agree,
the first divergence, and whether it is a near-tie (the two tokens' log-probabilities within
``NEAR_TIE`` on both sides: F16 weights against the server's dtype may pick either). A swapped
or mis-scaled adapter diverges early and not on a near-tie.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_lora.core.bounded_json import JsonKind, loads_json
from edge_lora.core.errors import EdgeLoraError, InputError, InputNotFoundError, RequestError
from edge_lora.core.output_dir import OutputDir
from edge_lora.core.progress import NullProgress, ProgressSink
from edge_lora.serving.registry import AdapterRegistry
from edge_lora.serving.runtime import Runtime
from edge_lora.state import last_output_dir

DEFAULT_PROMPTS = (
    "The licence grants every person the right to",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three most important things to check before signing a contract are",
)
DEFAULT_TOKENS = 16
NEAR_TIE = 0.05  # nats between the two candidates' log-probabilities, on both sides
TOP_LOGPROBS = 5
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
CHECK_CTX = 512
Token = int | str  # an id, or the token's text when the server does not give ids


@dataclass
class Divergence:
    prompt: int  # index into the prompts
    position: int  # generated-token index
    local_token: int | str | None  # an id (or its text, see ``Token``); None: the text ended there
    server_token: int | str | None
    near_tie: bool
    local_gap: float | None  # log p(local) - log p(server's token), in edge-lora's distribution
    server_gap: float | None  # the same difference in the server's distribution


@dataclass
class ModelCheck:
    model: str  # the id asked for ("model" in the request)
    adapter: str | None  # None: the base
    agreeing: int = 0
    compared: int = 0
    divergences: list[Divergence] = field(default_factory=list)  # at most one per prompt
    error: str | None = None

    @property
    def divergence(self) -> Divergence | None:
        """The first divergence that is not a near-tie, else the first near-tie."""
        return next((d for d in self.divergences if not d.near_tie), next(iter(self.divergences), None))

    @property
    def passed(self) -> bool:
        return self.error is None and all(d.near_tie for d in self.divergences)


@dataclass
class CheckReport:
    url: str
    tokens: int
    prompts: list[str]
    models: list[ModelCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.models) and all(m.passed for m in self.models)

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "tokens": self.tokens, "prompts": self.prompts, "passed": self.passed,
                "models": [{**asdict(m), "passed": m.passed,
                            "divergence": asdict(m.divergence) if m.divergence is not None else None}
                           for m in self.models]}


class ServerClient:
    """The few OpenAI-API calls the check makes (no SDK needed at run time)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0) -> None:
        self.base = url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        if not self.base.startswith(("http://", "https://")):
            raise InputError(f"--check {url!r} is not an http(s) URL", fix="give the server's URL, e.g. http://127.0.0.1:8000")
        self.api_key = api_key
        self.timeout = timeout

    def _call(self, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, headers=headers,
                                         method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 (http(s) only)
                raw = response.read(MAX_RESPONSE_BYTES + 1)
        except urllib.error.HTTPError as exc:
            detail = exc.read(2000).decode("utf-8", "replace")
            raise RequestError(f"{self.base}{path} answered {exc.code}: {detail[:300]}",
                               fix="check that the URL is the exported server and the model ids match") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise InputNotFoundError(f"cannot reach {self.base}{path}: {reason}",
                                     fix="start the server (./serve.sh) and give its URL") from None
        if len(raw) > MAX_RESPONSE_BYTES:
            raise RequestError(f"{self.base}{path} sent more than {MAX_RESPONSE_BYTES} bytes")
        try:
            return loads_json(raw, JsonKind.CACHE_RECORD, f"{self.base}{path}")  # bounded like any JSON we read
        except EdgeLoraError as exc:
            raise RequestError(f"{self.base}{path} did not answer JSON: {exc.message}",
                               fix="give the URL of an OpenAI-compatible server") from None

    def models(self) -> list[dict[str, Any]]:
        listing = self._call("/models")
        data = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(data, list):
            raise RequestError(f"{self.base}/models did not list models", fix="give the URL of an OpenAI-compatible server")
        return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]

    def greedy(self, model: str, prompt: list[int], max_tokens: int) -> tuple[list[Token], list[dict[Token, float]], str]:
        """(tokens, top log-probabilities per token, finish reason). Tokens are ids when the server
        honours vLLM's ``return_tokens_as_token_ids``, else their text (llama-server, edge-lora serve)."""
        answer = self._call("/completions", {
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "logprobs": TOP_LOGPROBS, "return_tokens_as_token_ids": True})
        try:
            choice = answer["choices"][0]
            logprobs = choice["logprobs"]
            tokens = [_token_id(t) for t in logprobs["tokens"]]
            tops = [{_token_id(k): float(v) for k, v in (top or {}).items()} for top in logprobs["top_logprobs"]]
            finish = str(choice.get("finish_reason"))
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise RequestError(f"{self.base}/completions answered without token ids and logprobs ({exc})",
                               fix="the check needs vLLM's return_tokens_as_token_ids and logprobs") from None
        return tokens, tops, finish


def _token_id(text: str) -> Token:
    if not isinstance(text, str):
        raise ValueError(f"token {text!r} is not a string")
    return int(text.removeprefix("token_id:")) if text.startswith("token_id:") else text


def read_prompts(path: Path | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read prompts from {path}: {exc}", fix="give a UTF-8 text file, one prompt a line") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"{path} holds no prompts", fix="write one prompt per line")
    return prompts


def reference_model(model: Path | None) -> Path:
    """The full-precision GGUF edge-lora compares with (the F16 of the converted directory)."""
    if model is None:
        model = last_output_dir()
        if model is None:
            raise InputError("no --model given and no converted model remembered",
                             fix="pass --model CONVERTED_DIR or its F16 .gguf")
    model = Path(model).expanduser()
    if model.is_file():
        return model
    reference = OutputDir.read(model).reference
    if reference is None:
        raise InputNotFoundError(f"{model} has no full-precision GGUF to compare with",
                                 fix="convert with --quant none or keep the F16 file")
    return reference.path


def _gap(tops: dict[Token, float], first: Token | None, second: Token | None) -> float | None:
    if first is None or second is None or first not in tops or second not in tops:
        return None
    return tops[first] - tops[second]


def compare(local: tuple[list[Token], list[dict[Token, float]]], server: tuple[list[Token], list[dict[Token, float]]],
            prompt: int, k: int) -> tuple[int, Divergence | None]:
    """(tokens agreeing before the first divergence, the divergence) over the first ``k``."""
    local_tokens, local_tops = local
    server_tokens, server_tops = server
    for i in range(k):
        a = local_tokens[i] if i < len(local_tokens) else None
        b = server_tokens[i] if i < len(server_tokens) else None
        if a is None and b is None:
            return i, None  # both ended here
        if a == b:
            continue
        local_gap = _gap(local_tops[i], a, b) if i < len(local_tops) else None
        server_gap = _gap(server_tops[i], b, a) if i < len(server_tops) else None
        near = local_gap is not None and server_gap is not None and local_gap <= NEAR_TIE and server_gap <= NEAR_TIE
        return i, Divergence(prompt, i, a, b, near, local_gap, server_gap)
    return k, None


def check_server(url: str, *, model: Path | None = None, prompts: Sequence[str] = DEFAULT_PROMPTS,
                 tokens: int = DEFAULT_TOKENS, registry: AdapterRegistry | None = None,
                 api_key: str | None = None, progress: ProgressSink = NullProgress()) -> CheckReport:
    if not 1 <= tokens <= 256:
        raise InputError(f"--tokens must be between 1 and 256, got {tokens}")
    registry = registry or AdapterRegistry()
    client = ServerClient(url, api_key)
    listed = client.models()
    adapters = [m["id"] for m in listed if m.get("parent")]
    bases = [m["id"] for m in listed if not m.get("parent")]
    if not bases:
        raise RequestError(f"{url} lists no base model", fix="give the URL of the exported server")
    report = CheckReport(url=url, tokens=tokens, prompts=list(prompts))
    checks = [ModelCheck(bases[0], None)] + [ModelCheck(name, name) for name in adapters]
    path = reference_model(model)
    progress.start("checking", len(checks) * len(prompts))
    with Runtime(path, n_ctx=CHECK_CTX, prompt_cache=False) as runtime:
        token_prompts = [runtime.tokenize_prompt(p) for p in prompts]
        for check in checks:
            report.models.append(check)
            active: dict[str, float | None] = {}
            if check.adapter is not None:
                entry = registry.get(check.adapter)
                if entry is None or not entry.exists:
                    check.error = (f"the server serves {check.adapter!r}, which is not a registered adapter "
                                   "here: nothing to compare it with")
                    continue
                runtime.load_adapter(entry.name, entry.path, entry.scale)
                active = {entry.name: entry.scale}
            try:
                for index, ids in enumerate(token_prompts):
                    generation = runtime.generate(ids, active, max_tokens=tokens, logprobs=TOP_LOGPROBS,
                                                  cache_prompt=False)
                    generation.text()
                    stats = generation.stats
                    server_tokens, server_tops, _finish = client.greedy(check.model, ids, tokens)
                    by_text = any(isinstance(t, str) for t in server_tokens)
                    local_tokens: list[Token] = [_text(runtime.model.token_piece(t)) if by_text else t
                                                 for t in stats.tokens]
                    local_tops = [{(_text(piece) if by_text else t): lp for t, piece, lp in entry_.top}
                                  for entry_ in stats.logprobs]
                    # vLLM reports the end-of-text token it stopped on; edge-lora does not.
                    while server_tokens and isinstance(server_tokens[-1], int) \
                            and runtime.model.is_eog(server_tokens[-1]):
                        server_tokens.pop()
                    agree, divergence = compare((local_tokens, local_tops), (server_tokens, server_tops),
                                                index, tokens)
                    check.agreeing += agree
                    check.compared += tokens
                    if divergence is not None:
                        check.divergences.append(divergence)
                    progress.advance(1, description=check.model)
            except RequestError as exc:
                check.error = exc.one_line()
            finally:
                if check.adapter is not None:
                    runtime.unload_adapter(check.adapter)
    progress.finish()
    return report


def format_report(report: CheckReport) -> str:
    rows = [("model", "adapter", "agree", "first divergence", "result")]
    for m in report.models:
        if m.error is not None:
            where, result = m.error, "FAIL"
        elif m.divergence is None:
            where, result = "-", "pass"
        else:
            d = m.divergence
            gaps = f"gaps {_fmt(d.local_gap)} / {_fmt(d.server_gap)} nats"
            where = (f"prompt {d.prompt + 1} token {d.position + 1}: edge-lora {_tok(d.local_token)} vs "
                     f"server {_tok(d.server_token)} ({'near-tie, ' if d.near_tie else ''}{gaps})")
            result = "pass (near-tie)" if d.near_tie else "FAIL"
        rows.append((m.model, m.adapter or "(base)", f"{m.agreeing}/{m.compared}", where, result))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    verdict = "every model agrees" if report.passed else "the server does not answer as edge-lora does"
    return "\n".join(lines + [f"{verdict} ({len(report.prompts)} prompts, first {report.tokens} tokens each)"])


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def _fmt(value: float | None) -> str:
    return "?" if value is None else f"{value:.3f}"


def _tok(token: int | str | None) -> str:
    return "end of text" if token is None else f"#{token}" if isinstance(token, int) else repr(token)
