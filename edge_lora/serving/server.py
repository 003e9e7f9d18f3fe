"""OpenAI-compatible HTTP API over a Runtime (Starlette; run with uvicorn by `edge-lora serve`).

`"model"` picks the adapter (vLLM's multi-LoRA convention): an adapter's name, or the base id
for no adapter. Generation runs in worker threads so the event loop keeps answering (health,
model list, other requests queueing for the runtime's context).

Who may drive it: a web page the user visits can send requests to 127.0.0.1 too (a `text/plain`
POST needs no CORS preflight; DNS rebinding lets it read the answers). So requests must name an
allowed Host (loopback names on a loopback bind), a foreign `Origin` is refused, bodies must be
`application/json`, adapters load only from the registry or an `--adapter-dir` the user named,
and no error carries an absolute path, file bytes, raw exception text or llama.cpp's log.

Load: at most `Runtime.n_contexts` requests generate at once; `ServerLimits.queue` more wait (in
the event loop, not in threads), first come first served; past that a 429 with `Retry-After`.
A client that disconnects cancels its request wherever it is: waiting, in prefill, generating.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import hmac
import json
import logging
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from edge_lora.converters.load_check import proc_fd_path
from edge_lora.core.chat_template import normalize_messages
from edge_lora.core.constants import MAX_STOP_STRINGS, MAX_TEMPERATURE, MAX_TOP_LOGPROBS
from edge_lora.core.errors import (AdapterMismatchError, ContextLengthError, EdgeLoraError, InputError,
                                   InputNotFoundError, InternalError, RegistryError)
from edge_lora.serving.registry import NAME_PATTERN, AdapterRegistry, check_name
from edge_lora.serving.runtime import (BusyError, Generation, GenerationStats, RequestDeadlineError, Runtime,
                                       TokenLogprob)
from edge_lora.serving.structured import Grammar, SchemaError

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024
# Names a loopback server answers to; a DNS-rebinding page sends its own name as Host.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
LOOPBACK_ADDRESSES = ("localhost", "127.0.0.1", "::1")
TENANT_KEY = "edge_lora_tenant"  # in the ASGI scope's state: which API key the request came with


@dataclass(frozen=True)
class ServerLimits:
    # Requests waiting for a context, beyond the Runtime.n_contexts generating; more get a 429.
    queue: int = 16
    # Adapters loaded at once (those given at start-up count); more loads get a 400.
    max_adapters: int = 16
    # Prompt characters (all messages' contents for a chat), refused before tokenizing.
    # None: 32 per context token; text averages about 4 characters a token, so nothing
    # refused here would have fit the context.
    max_prompt_chars: int | None = None
    # Request bodies held at once (being read, parsed, or waiting in the queue), in bytes as
    # sent; parsed JSON costs up to ~10x that. A body past it gets a 503 at once.
    body_budget_bytes: int = 4 * MAX_BODY_BYTES
    # Open connections; a new one past it closes the connection idle the longest (no request
    # under way), so idle sockets cannot lock others out. None: 4 x (contexts + queue), at least 64.
    max_connections: int | None = None
    header_timeout_s: float = 10.0  # request line and headers complete within this (slowloris)
    body_timeout_s: float = 30.0  # the whole body within this
    keep_alive_s: int = 5  # an idle keep-alive connection is closed after this
    retry_after_s: int = 1
    # A request (waiting, reading its prompt, generating) ends with an error after this long; the
    # decode loop checks it every step, so a stuck client or a runaway answer frees its slot.
    request_deadline_s: float = 600.0


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = dict(headers or {})

    def payload(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status, headers=self.headers)


def _internal() -> APIError:
    return APIError(500, "internal error (details in the server log)", type_="server_error", code="internal_error")


# An absolute path in a message (POSIX, ~, or a Windows drive): shown as its last component.
# Directory names may hold spaces ("/Users/alice smith/models/x.gguf"): a run of words is taken
# as part of the path as long as a separator follows it; the last component stops at a space.
_PATH_WORD = r"[^\s'\"`,;()/\\]+"
_ABSOLUTE_PATH = re.compile(rf"(?<![\w.])(?:~|[A-Za-z]:)?[/\\](?:{_PATH_WORD}(?: {_PATH_WORD})*[/\\])*"
                            r"[^\s'\"`,;()]*")


def _without_paths(text: str) -> str:
    return _ABSOLUTE_PATH.sub(lambda m: PurePath(m.group(0).replace("\\", "/")).name or "<path>", text)


def _from_library_error(exc: EdgeLoraError) -> APIError:
    """A library error as the client may see it. Bugs and failures inside llama.cpp (whose
    messages carry its log lines) are a generic 500; an error built from another exception's
    text keeps only its own words; no message keeps an absolute path. The log keeps it all."""
    if exc.exit_code != 2:
        logger.error("request failed: %s", exc.one_line())
        return _internal()
    text = exc.one_line()
    if exc.__cause__ is not None and not isinstance(exc.__cause__, EdgeLoraError):
        logger.warning("request refused: %s", text)
        text = text.split(": ", 1)[0] + " (details in the server log)"
    text = _without_paths(text)
    if isinstance(exc, (InputNotFoundError, RegistryError)):
        return APIError(404, text, type_="not_found_error", code="not_found")
    if isinstance(exc, ContextLengthError):
        return APIError(400, text, param="messages", code="context_length_exceeded")
    if isinstance(exc, RequestDeadlineError):
        return APIError(408, text, type_="timeout_error", code="deadline_exceeded")
    if isinstance(exc, BusyError):
        return APIError(503, text, type_="server_error", code="server_busy", headers={"Retry-After": "1"})
    return APIError(400, text)


# --- request parsing: every field checked for type and range; unknown fields ignored ---

def _number(body: dict, key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"{key} must be a number", param=key, code="invalid_type")
    if not (lo < value if lo_open else lo <= value) or value > hi:
        raise APIError(400, f"{key} must be between {lo} and {hi}, got {value}", param=key, code="invalid_value")
    return float(value)


def _integer(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{key} must be an integer", param=key, code="invalid_type")
    if not lo <= value <= hi:
        raise APIError(400, f"{key} must be between {lo} and {hi}, got {value}", param=key, code="invalid_value")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if (not isinstance(value, list) or len(value) > MAX_STOP_STRINGS
            or any(not isinstance(s, str) or not s for s in value)):
        raise APIError(400, f"stop must be a string or a list of up to {MAX_STOP_STRINGS} non-empty strings",
                       param="stop", code="invalid_value")
    return tuple(value)


def _sampling(body: dict, n_ctx: int) -> dict[str, Any]:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _integer({"max_tokens": max_tokens}, "max_tokens", 16, 0, n_ctx)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be a boolean", param="stream", code="invalid_type")
    _integer(body, "n", 1, 1, 1)  # one choice per request
    return {"max_tokens": max_tokens, "temperature": _number(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE),
            "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            "top_k": _integer(body, "top_k", 0, 0, 1_000_000),
            "seed": _integer(body, "seed", None, -(2**63), 2**64 - 1), "stop": _stop(body)}


def _boolean(body: dict, key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"{key} must be a boolean", param=key, code="invalid_type")
    return value


def _logprobs(body: dict, kind: str) -> int | None:
    """How many alternatives to report per token, or None for no log-probabilities. Chat takes
    OpenAI's ``logprobs: true`` + ``top_logprobs: n``; completions the legacy ``logprobs: n``."""
    if kind == "chat.completion":
        wanted = _boolean(body, "logprobs", False)
        top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
        if top is not None and not wanted:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        return (top or 0) if wanted else None
    return _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)


def _response_format(body: dict) -> tuple[str, object] | None:
    """("json_object" | "json_schema", schema) from OpenAI's response_format; None for text.
    The schema is converted later, in a worker thread (a large one takes a while)."""
    value = body.get("response_format")
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise APIError(400, "response_format must be an object with a \"type\"", param="response_format",
                       code="invalid_value")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":  # llama-server also takes a "schema" here
        return ("json_schema", value["schema"]) if "schema" in value else ("json_object", None)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise APIError(400, "response_format.json_schema must be an object holding \"schema\"",
                           param="response_format", code="invalid_value")
        return "json_schema", spec.get("schema", {})  # no schema: any JSON value, as llama-server
    raise APIError(400, f"response_format type {kind!r} is not supported; use text, json_object or json_schema",
                   param="response_format", code="invalid_value")


def _grammar(response_format: tuple[str, object] | None) -> Grammar | None:
    if response_format is None:
        return None
    kind, schema = response_format
    try:
        return Grammar.json_object() if kind == "json_object" else Grammar.from_json_schema(schema)
    except SchemaError as exc:
        raise APIError(400, exc.one_line(), param="response_format", code="unsupported_schema") from exc


def _chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    def item(piece: bytes, logprob: float) -> dict[str, Any]:
        return {"token": piece.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(piece)}
    return {"content": [{**item(e.piece, e.logprob), "top_logprobs": [item(p, lp) for _, p, lp in e.top]}
                        for e in entries], "refusal": None}


def _completion_logprobs(entries: list[TokenLogprob], n_top: int) -> dict[str, Any]:
    """The legacy completions shape; text_offset counts characters of the generated text."""
    def text(piece: bytes) -> str:
        return piece.decode("utf-8", errors="replace")
    return {"tokens": [text(e.piece) for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{text(p): lp for _, p, lp in e.top} for e in entries] if n_top else None,
            "text_offset": [e.offset for e in entries]}


def _usage(stats: GenerationStats) -> dict[str, Any]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


def _parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    except RecursionError:  # e.g. 100,000 nested brackets: json's recursive parser gives up
        raise APIError(400, "the request body nests too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json"


# --- admission: a bounded queue in front of the runtime's contexts ---

class _Ticket:
    """One admitted request: holds its place until done() (idempotent, event-loop thread only)."""

    def __init__(self, gate: _Gate) -> None:
        self.gate = gate
        self.running = False
        self.finished = False
        self.in_thread = False  # a generation thread holds it and calls done() when it ends

    def close(self) -> None:
        """The request is over on the server's side (answered, failed or abandoned)."""
        if not self.in_thread:
            self.done()

    async def run_slot(self) -> None:
        """Wait (first come, first served) until fewer than the limit are generating."""
        gate = self.gate
        if gate.running < gate.running_limit and not gate.waiters:
            gate.running += 1
            self.running = True
            return
        turn = asyncio.get_running_loop().create_future()
        gate.waiters.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # granted as we were cancelled: pass it on
                self.running = True
                self.done()
            else:
                gate.waiters.remove(turn)
            raise
        self.running = True

    def done(self) -> None:
        if self.finished:
            return
        self.finished = True
        gate = self.gate
        gate.admitted -= 1
        if self.running:
            while gate.waiters:  # hand the slot to the next waiter, still counted as running
                turn = gate.waiters.popleft()
                if not turn.done():
                    turn.set_result(None)
                    return
            gate.running -= 1


class _Gate:
    def __init__(self, running_limit: int, queue: int) -> None:
        self.running_limit = running_limit
        self.capacity = running_limit + queue
        self.admitted = 0
        self.running = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def admit(self) -> _Ticket | None:
        if self.admitted >= self.capacity:
            return None
        self.admitted += 1
        return _Ticket(self)


async def _wait_for_disconnect(receive: Receive) -> None:
    """Returns when the client has gone (call once the request body has been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class OpenAIServer:
    def __init__(self, runtime: Runtime, registry: AdapterRegistry | None = None, *,
                 adapter_dir: Path | None = None, limits: ServerLimits = ServerLimits()) -> None:
        self.runtime = runtime
        self.registry = registry
        self.adapter_dir = None if adapter_dir is None else Path(adapter_dir).expanduser().resolve()
        self.limits = limits
        self.base_id = runtime.model_id
        self.created = int(time.time())
        self.max_prompt_chars = limits.max_prompt_chars or 32 * runtime.n_ctx
        self.gate = _Gate(runtime.n_contexts, limits.queue)
        # The gate lets at most n_contexts generations run, so this pool never queues; reusing its
        # threads (not one per request) keeps the allocator's per-thread arenas, and RSS, flat.
        self._workers = concurrent.futures.ThreadPoolExecutor(max_workers=runtime.n_contexts,
                                                              thread_name_prefix="edge-lora-generation")
        self._admin_lock = asyncio.Lock()  # loads and unloads one at a time (checks, then acts)
        self.body_bytes_held = 0  # request bodies read and not yet done with (body_budget_bytes)

    # --- bodies ---
    async def _read_body(self, request: Request) -> bytes:
        """The body, refused as soon as it passes MAX_BODY_BYTES: request.body() would first hold all
        of it (a 600 MB body took the server from 0.6 to 1.7 GB peak RSS before the 413). A body
        trickling in slower than body_timeout_s is a 408, so it cannot hold a connection forever.
        Every byte held counts against body_budget_bytes until the request's handler ends (_guard)."""
        too_large = APIError(413, f"request body over {MAX_BODY_BYTES} bytes", code="body_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        try:
            with anyio.fail_after(self.limits.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        raise too_large
                    self._hold_body_bytes(request, len(chunk))
                    chunks.append(chunk)
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.limits.body_timeout_s:g} s",
                           code="request_timeout", headers={"Connection": "close"}) from None
        return b"".join(chunks)

    def _hold_body_bytes(self, request: Request, n: int) -> None:
        """Count ``n`` more body bytes held by ``request`` (event-loop thread only)."""
        if self.body_bytes_held + n > self.limits.body_budget_bytes:
            raise APIError(503, "the server holds as many request bodies as it takes; retry shortly",
                           type_="server_error", code="server_busy",
                           headers={"Retry-After": str(self.limits.retry_after_s), "Connection": "close"})
        self.body_bytes_held += n
        request.state.body_bytes_held = getattr(request.state, "body_bytes_held", 0) + n

    def release_body_bytes(self, request: Request) -> None:
        self.body_bytes_held -= getattr(request.state, "body_bytes_held", 0)
        request.state.body_bytes_held = 0

    async def _json_body(self, request: Request) -> dict:
        # JSON only: a page can POST text/plain or a form to any address without a CORS preflight.
        if not _is_json(request.headers.get("content-type", "")):
            raise APIError(415, "the request body must be JSON sent with Content-Type: application/json",
                           code="unsupported_media_type")
        raw = await self._read_body(request)
        # Parsed in a worker thread: 8 MB of JSON takes the event loop ~0.1 s, during which no
        # other client would be answered.
        return await run_in_threadpool(_parse_body, raw)

    # --- adapters ---
    def _adapters_for(self, body: dict) -> dict[str, float | None]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(400, "model is required (the base id or an adapter name)", param="model",
                           code="missing_model")
        extra = body.get("adapters")  # extension: {"name": scale, ...} on top of "model"
        if extra is not None and (not isinstance(extra, dict) or any(
                not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float))
                for k, v in extra.items())):
            raise APIError(400, "adapters must map adapter names to numeric scales", param="adapters")
        loaded = self.runtime.adapters

        def servable(name: str) -> bool:  # loaded, or loaded on first use (registered, in --adapter-dir)
            return name in loaded or self._servable_file(name) is not None
        if model == self.base_id:
            chosen: dict[str, float | None] = {}
        elif servable(model):
            chosen = {model: None}
        else:
            raise APIError(404, f"the model {model!r} does not exist; GET /v1/models lists them",
                           type_="not_found_error", param="model", code="model_not_found")
        for name, scale in (extra or {}).items():
            if not servable(name):
                raise APIError(404, f"adapter {name!r} does not exist", type_="not_found_error",
                               param="adapters", code="model_not_found")
            chosen[name] = float(scale)
        lora = body.get("lora")  # llama-server's form: [{"id": id from /lora-adapters, "scale": s}]
        if lora is not None:
            by_id = {a.id: name for name, a in loaded.items()}
            if not isinstance(lora, list):
                raise APIError(400, "lora must be a list of {id, scale}", param="lora")
            for item in lora:
                if (not isinstance(item, dict) or isinstance(item.get("id"), bool)
                        or not isinstance(item.get("id"), int) or isinstance(item.get("scale"), bool)
                        or not isinstance(item.get("scale"), (int, float))):
                    raise APIError(400, "lora entries must be {\"id\": int, \"scale\": number}", param="lora")
                if item["id"] not in by_id:  # ids are never reused: an unloaded one stays unknown
                    raise APIError(404, f"no adapter with id {item['id']} is loaded (see /lora-adapters)",
                                   type_="not_found_error", param="lora", code="model_not_found")
                chosen[by_id[item["id"]]] = float(item["scale"])
        return chosen

    def _adapter_file(self, lora_path: str) -> tuple[Path, float, int]:
        """A registered adapter's file, or a file under --adapter-dir (symlinks resolved): never
        anything else, and the answer never says whether a file outside exists. Returns it opened:
        the descriptor is what gets checked (where the open file really lives) and later loaded,
        so a symlink swapped while the load waits for running requests changes nothing. The
        caller closes it."""
        registry = self.registry or AdapterRegistry()
        if NAME_PATTERN.fullmatch(lora_path):
            entry = registry.get(lora_path)
            if entry is not None:
                return entry.path, entry.scale, self._open_adapter(entry.path, Path(lora_path).name, None)
        refused = APIError(403, "lora_path must be a registered adapter name or a file name inside the server's "
                           "adapter directory" + ("" if self.adapter_dir else " (none was given: start the server "
                                                  "with --adapter-dir DIR)"),
                           type_="permission_error", param="lora_path", code="path_not_allowed")
        given = PurePath(lora_path)
        if (self.adapter_dir is None or lora_path.startswith("~") or ".." in given.parts
                or "\\" in lora_path or ":" in lora_path or "\0" in lora_path):
            raise refused
        candidate = (self.adapter_dir / given).resolve()  # an absolute path replaces the directory
        if not candidate.is_relative_to(self.adapter_dir):  # outside, or a symlink leading out
            raise refused
        return candidate, 1.0, self._open_adapter(candidate, given.name, refused)

    def _open_adapter(self, path: Path, shown: str, refused: APIError | None) -> int:
        """``path`` opened once, read-only; with ``refused`` (a file from --adapter-dir) the open
        file itself must be a regular file inside the directory (its /proc/self/fd link)."""
        not_found = APIError(404, f"no adapter file {shown!r} in the adapter directory", type_="not_found_error",
                             param="lora_path", code="not_found")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            raise (not_found if refused is not None else APIError(
                404, f"adapter file {shown!r} cannot be opened", type_="not_found_error", param="lora_path",
                code="not_found")) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise not_found
            if refused is not None and self.adapter_dir is not None:
                where = proc_fd_path(fd)
                real = Path(os.readlink(where)) if where else path.resolve()
                if not real.is_relative_to(self.adapter_dir):  # a directory on the way was swapped
                    raise refused
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _servable_files(self) -> dict[str, tuple[Path, float]]:
        """Adapters a request may name without a load call: the registered ones, and the adapter
        files directly inside --adapter-dir (``adapter-<name>.gguf`` or ``<name>.gguf``)."""
        found: dict[str, tuple[Path, float]] = {}
        if self.adapter_dir is not None:
            with contextlib.suppress(OSError):
                for path in sorted(self.adapter_dir.glob("*.gguf")):
                    name = path.name.removesuffix(".gguf").removeprefix("adapter-")
                    if NAME_PATTERN.fullmatch(name) and name != self.base_id:
                        resolved = path.resolve()
                        if resolved.is_relative_to(self.adapter_dir) and resolved.is_file():
                            found[name] = (resolved, 1.0)
        with contextlib.suppress(EdgeLoraError):
            for entry in (self.registry or AdapterRegistry()).list():
                if entry.name != self.base_id:
                    found[entry.name] = (entry.path, entry.scale)
        return found

    def _servable_file(self, name: str) -> tuple[Path, float] | None:
        """The file of a servable adapter ``name`` (the runtime's resolver: loaded on first use)."""
        if not NAME_PATTERN.fullmatch(name) or name == self.base_id:
            return None
        with contextlib.suppress(EdgeLoraError):
            entry = (self.registry or AdapterRegistry()).get(name)
            if entry is not None:
                return entry.path, entry.scale
        if self.adapter_dir is not None:
            for file_name in (f"adapter-{name}.gguf", f"{name}.gguf"):
                candidate = (self.adapter_dir / file_name).resolve()
                if candidate.is_relative_to(self.adapter_dir) and candidate.is_file():
                    return candidate, 1.0
        return None

    # --- routes ---
    async def models(self, request: Request) -> Response:
        """Every servable model: the base, the loaded adapters and those loaded on first use."""
        data = [{"id": self.base_id, "object": "model", "created": self.created, "owned_by": "edge-lora",
                 "root": self.base_id, "parent": None, "loaded": True}]
        loaded = self.runtime.adapters
        servable = await run_in_threadpool(self._servable_files)
        for name in sorted(set(loaded) | set(servable)):
            root = loaded[name].path.name if name in loaded else servable[name][0].name
            data.append({"id": name, "object": "model", "created": self.created, "owned_by": "edge-lora",
                         "root": root, "parent": self.base_id, "loaded": name in loaded})
        return JSONResponse({"object": "list", "data": data})

    async def lora_adapters(self, request: Request) -> Response:
        """llama-server's listing: ids usable in a request's "lora" field (stable: never reused)."""
        return JSONResponse([{"id": loaded.id, "name": name, "path": loaded.path.name, "scale": loaded.scale}
                             for name, loaded in self.runtime.adapters.items()])

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    def _check_prompt_size(self, chars: int) -> None:
        if chars > self.max_prompt_chars:
            raise APIError(400, f"the prompt is {chars} characters; this server takes at most "
                           f"{self.max_prompt_chars} (its context holds {self.runtime.n_ctx} tokens)",
                           param="prompt", code="context_length_exceeded")

    async def completions(self, request: Request) -> Response:
        body = await self._json_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
            if len(prompt) >= self.runtime.n_ctx:
                raise APIError(400, f"the prompt is {len(prompt)} tokens; the context holds {self.runtime.n_ctx}",
                               param="prompt", code="context_length_exceeded")
            prompt = [int(t) for t in prompt]
        elif not isinstance(prompt, str) or not prompt:
            raise APIError(400, "prompt must be a non-empty string, a one-string list or a list of token ids",
                           param="prompt", code="invalid_value")
        else:
            self._check_prompt_size(len(prompt))
        return await self._respond(request, body, "text_completion",
                                   lambda p, cancel: self.runtime.generate(prompt, cancel=cancel, **p))

    async def chat_completions(self, request: Request) -> Response:
        body = await self._json_body(request)
        messages = normalize_messages(body.get("messages"))
        self._check_prompt_size(sum(len(m["content"]) for m in messages))
        return await self._respond(request, body, "chat.completion",
                                   lambda p, cancel: self.runtime.chat(messages, cancel=cancel, **p))

    async def _respond(self, request: Request, body: dict, kind: str,
                       start: Callable[[dict, threading.Event], Generation]) -> Response:
        params = _sampling(body, self.runtime.n_ctx)
        stream = bool(body.get("stream", False))
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise APIError(400, "stream_options must be an object", param="stream_options", code="invalid_type")
        include_usage = stream and _boolean(options, "include_usage", False)
        params["adapters"] = self._adapters_for(body)
        params["logprobs"] = _logprobs(body, kind)
        params["cache_prompt"] = _boolean(body, "cache_prompt", True)  # llama-server's name
        salt = body.get("cache_salt", "")  # vLLM's name: only requests with the same salt share a cache
        if not isinstance(salt, str) or len(salt) > 1024:
            raise APIError(400, "cache_salt must be a string of at most 1024 characters", param="cache_salt")
        # The prompt cache is shared only within a tenant (API key) and salt: no cached_tokens
        # (or speed) tells one client anything about another's prompts.
        params["cache_scope"] = f"{request.scope.get('state', {}).get(TENANT_KEY, '')}\0{salt}"
        params["deadline_s"] = self.limits.request_deadline_s
        response_format = _response_format(body)
        model = body["model"]
        ticket = self.gate.admit()
        if ticket is None:
            raise APIError(429, f"the server is busy ({self.gate.capacity} requests running or waiting); retry shortly",
                           type_="rate_limit_error", code="server_busy",
                           headers={"Retry-After": str(self.limits.retry_after_s)})
        cancel = threading.Event()

        def begin() -> Generation:
            params["grammar"] = _grammar(response_format)
            return start(params, cancel)
        try:
            # Tokenizing, checking and schema conversion run in a thread: a huge prompt must not stall the loop.
            generation = await run_in_threadpool(begin)
        except BaseException:
            ticket.done()
            raise
        request_id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        events = self._run(request, generation, cancel, ticket)

        def close() -> None:  # runs even if the response never started (client gone at once)
            cancel.set()
            ticket.close()

        if stream:
            return _ClosingStream(self._sse(events, generation, kind, request_id, model, params["logprobs"],
                                            include_usage), close,
                                  media_type="text/event-stream",
                                  headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces: list[str] = []
        try:
            async for tag, value in events:
                if tag == "piece":
                    pieces.append(value[0])
                elif tag == "error":
                    raise value
                elif tag == "disconnected":
                    return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
        finally:
            await events.aclose()
            close()
        stats = generation.stats
        text = "".join(pieces)
        logprobs = self._logprobs_of(stats.logprobs, kind, params["logprobs"])
        if kind == "chat.completion":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": logprobs, "finish_reason": stats.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": stats.finish_reason}
        return JSONResponse({"id": request_id, "object": kind, "created": int(time.time()), "model": model,
                             "choices": [choice], "usage": _usage(stats)})

    @staticmethod
    def _logprobs_of(entries: list[TokenLogprob], kind: str, n_top: int | None) -> dict[str, Any] | None:
        if n_top is None:
            return None
        return _chat_logprobs(entries) if kind == "chat.completion" else _completion_logprobs(entries, n_top)

    async def _run(self, request: Request, generation: Generation, cancel: threading.Event,
                   ticket: _Ticket) -> AsyncIterator[tuple[str, Any]]:
        """Wait for a slot, generate in a thread, relay its pieces: ("piece", (text, log-probability
        entries of its tokens))..., then ("done", the remaining entries), ("error", EdgeLoraError)
        or ("disconnected", None). The client going
        away sets ``cancel`` at once, wherever the request is; the thread then stops at its next
        check and gives the slot back by itself."""
        loop = asyncio.get_running_loop()
        gone = asyncio.ensure_future(_wait_for_disconnect(request.receive))
        try:
            slot = asyncio.ensure_future(ticket.run_slot())
            await asyncio.wait({slot, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not slot.done():
                slot.cancel()
                await asyncio.gather(slot, return_exceptions=True)
            if gone.done():
                cancel.set()
                yield "disconnected", None
                return
            pieces: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

            def deliver(callback: Callable[..., None], *args: Any) -> None:
                try:
                    loop.call_soon_threadsafe(callback, *args)
                except RuntimeError:  # the loop closed (server shutting down)
                    pass

            def produce() -> None:
                sent = 0  # log-probability entries already attached to a piece
                try:
                    for piece in generation:
                        # Read here, while the generation waits at this piece: its tokens' entries are in.
                        entries = generation.stats.logprobs[sent:]
                        sent += len(entries)
                        deliver(pieces.put_nowait, ("piece", (piece, entries)))
                    deliver(pieces.put_nowait, ("done", generation.stats.logprobs[sent:]))
                except EdgeLoraError as exc:
                    deliver(pieces.put_nowait, ("error", exc))
                except Exception:  # a bug: without an "error" item the client would wait forever
                    logger.exception("generation failed")
                    deliver(pieces.put_nowait, ("error", InternalError("generation failed")))
                finally:
                    deliver(ticket.done)

            self._workers.submit(produce)
            ticket.in_thread = True  # produce's done() runs on this loop, so never before this line
            while True:
                item = asyncio.ensure_future(pieces.get())
                await asyncio.wait({item, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not item.done():
                    item.cancel()
                    cancel.set()
                    yield "disconnected", None
                    return
                tag, value = item.result()
                yield tag, value
                if tag != "piece":
                    return
        finally:
            cancel.set()  # a no-op once the generation is over; otherwise it stops at its next check
            gone.cancel()
            ticket.close()

    async def _sse(self, events: AsyncIterator[tuple[str, Any]], generation: Generation, kind: str,
                   request_id: str, model: str, n_top: int | None = None,
                   include_usage: bool = False) -> AsyncIterator[bytes]:
        created = int(time.time())
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"

        def chunk(text: str | None, finish: str | None, first: bool = False,
                  entries: list[TokenLogprob] | None = None) -> bytes:
            logprobs = self._logprobs_of(entries, kind, n_top) if entries else None
            if kind == "chat.completion":
                delta: dict[str, Any] = {}
                if first:
                    delta["role"] = "assistant"
                if text:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
            payload = {"id": request_id, "object": chunk_kind, "created": created, "model": model,
                       "choices": [choice]}
            if include_usage:
                payload["usage"] = None  # OpenAI: null on every chunk but the last
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        try:
            if kind == "chat.completion":
                yield chunk(None, None, first=True)
            async for tag, value in events:
                if tag == "piece":
                    yield chunk(value[0], None, entries=value[1])
                elif tag == "error":
                    yield b"data: " + json.dumps(_from_library_error(value).payload()).encode() + b"\n\n"
                    break
                elif tag == "disconnected":
                    return
                else:
                    yield chunk(None, generation.stats.finish_reason, entries=value)
                    if include_usage:
                        usage = {"id": request_id, "object": chunk_kind, "created": created, "model": model,
                                 "choices": [], "usage": _usage(generation.stats)}
                        yield b"data: " + json.dumps(usage).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            await events.aclose()  # sets the cancel event when the stream stops early

    async def load_lora_adapter(self, request: Request) -> Response:
        body = await self._json_body(request)
        name, lora_path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(lora_path, str) or not lora_path:
            raise APIError(400, "lora_name and lora_path are required strings", param="lora_name")
        try:
            check_name(name)
        except RegistryError as exc:
            raise APIError(400, exc.one_line(), param="lora_name", code="invalid_value") from exc
        if name == self.base_id:
            raise APIError(400, f"{name!r} is the base model's id", param="lora_name", code="invalid_value")
        async with self._admin_lock:
            loaded = self.runtime.adapters
            if name in loaded:
                raise APIError(400, f"an adapter named {name!r} is already loaded", param="lora_name",
                               code="already_loaded")
            # Past --max-adapters the least recently used idle adapter is evicted (503 when all are in use).
            path, scale, fd = await run_in_threadpool(self._adapter_file, lora_path)
            try:
                # Waits for running requests to release their contexts, so run it off the loop.
                await run_in_threadpool(functools.partial(self.runtime.load_adapter, name, path, scale, fd=fd))
            except EdgeLoraError as exc:
                raise _adapter_load_error(exc, name, path) from exc
            finally:
                os.close(fd)
        return JSONResponse({"status": "ok", "message": f"adapter {name!r} loaded"})

    async def unload_lora_adapter(self, request: Request) -> Response:
        body = await self._json_body(request)
        name = body.get("lora_name")
        if not isinstance(name, str):
            raise APIError(400, "lora_name is a required string", param="lora_name")
        async with self._admin_lock:
            if name not in self.runtime.adapters:
                raise APIError(404, f"no adapter named {name!r} is loaded", type_="not_found_error",
                               param="lora_name", code="not_found")
            await run_in_threadpool(self.runtime.unload_adapter, name)
        return JSONResponse({"status": "ok", "message": f"adapter {name!r} unloaded"})


class _ClosingStream(StreamingResponse):
    """A streamed answer that calls ``on_close`` however it ends, even when Starlette cancels it
    before the body iterator ever starts (the client went away at once)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _adapter_load_error(exc: EdgeLoraError, name: str, path: Path) -> APIError:
    """What a client may learn about an adapter file that did not load: its name and what kind
    of problem, never its directory, bytes or llama.cpp's words (those go to the log)."""
    logger.warning("loading adapter %r failed: %s", name, exc.one_line())
    if exc.exit_code != 2:
        return _internal()
    if isinstance(exc, InputNotFoundError):
        return APIError(404, f"adapter file {path.name!r} does not exist", type_="not_found_error",
                        param="lora_path", code="not_found")
    if isinstance(exc, AdapterMismatchError):
        return APIError(400, f"adapter file {path.name!r} does not fit this base model (details in the server log)",
                        param="lora_path", code="adapter_mismatch")
    if isinstance(exc, InputError):
        return APIError(400, f"adapter file {path.name!r} is not a valid GGUF LoRA adapter (details in the "
                        "server log)", param="lora_path", code="invalid_adapter")
    return _internal()


def _guard(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
    """Turn every failure into the OpenAI error shape (never a stack trace, never a 500 for bad input)."""
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except APIError as exc:
            return exc.response()
        except ClientDisconnect:  # gone while sending its body: nobody to answer
            return Response(status_code=499)
        except EdgeLoraError as exc:
            return _from_library_error(exc).response()
        except Exception:  # a bug: still answer in OpenAI's shape, and keep the details in the log
            logger.exception("request failed")
            return _internal().response()
        finally:
            request.app.state.server.release_body_bytes(request)  # its body is done with
    return wrapped


class _RequestGuard:
    """Who may talk to the server, checked before any route: an allowed Host (DNS rebinding), no
    foreign Origin (a page in the user's browser), the API key. Plain ASGI (not
    BaseHTTPMiddleware) so streamed responses and client disconnects pass through untouched."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str], api_key: str | Sequence[str] | None) -> None:
        self.app = app
        hosts = {h.lower() for h in allowed_hosts}
        self.any_host = "*" in hosts
        self.allowed_hosts = hosts - {"*"}
        keys = [] if api_key is None else [api_key] if isinstance(api_key, str) else list(api_key)
        self.expected = [f"Bearer {key}".encode() for key in keys]

    def _tenant(self, given: bytes) -> str | None:
        """Which key ``given`` is ("k<index>": each key is a tenant), None when none. Every key is
        compared, in constant time, so the answer's timing does not say which one matched."""
        match = None
        for index, expected in enumerate(self.expected):
            if hmac.compare_digest(given, expected) and match is None:
                match = f"k{index}"
        return match

    def _host_allowed(self, host: str) -> bool:
        if self.any_host or host in self.allowed_hosts:
            return True
        name, _, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
        return bool(port.isdigit() and name in self.allowed_hosts)  # a name allowed on any port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, bytes] = {}
        for key, value in scope.get("headers") or []:
            headers.setdefault(key, value)
        host = headers.get(b"host", b"").decode("latin-1").strip().lower()
        origin = headers.get(b"origin")
        error = None
        if not self._host_allowed(host):
            error = APIError(403, "this server does not answer to that Host header (start it with "
                             "--allowed-host NAME to add one)", type_="permission_error", code="host_not_allowed")
        elif origin is not None and origin.decode("latin-1").strip().lower() not in (
                f"http://{host}", f"https://{host}"):
            # Browsers send Origin with every cross-origin request (and "null" from sandboxes and
            # files); a page served from this very host and port is the only origin allowed.
            error = APIError(403, "cross-origin requests are refused", type_="permission_error",
                             code="origin_not_allowed")
        elif self.expected and (tenant := self._tenant(headers.get(b"authorization", b""))) is None:
            error = APIError(401, "missing or wrong API key", type_="authentication_error", code="invalid_api_key")
        elif self.expected:
            scope.setdefault("state", {})[TENANT_KEY] = tenant
        if error is not None:
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def loopback_hosts(port: int) -> list[str]:
    """Host header values a server on a loopback address answers to."""
    return [f"{name}:{port}" for name in LOOPBACK_HOSTS] + (list(LOOPBACK_HOSTS) if port == 80 else [])


def make_app(runtime: Runtime, registry: AdapterRegistry | None = None, api_key: str | Sequence[str] | None = None, *,
             allowed_hosts: Iterable[str] = LOOPBACK_HOSTS, adapter_dir: Path | None = None,
             limits: ServerLimits = ServerLimits()) -> Starlette:
    """``allowed_hosts``: Host header values answered ("name:port", or "name" for any port, or
    "*" for any); the default is the loopback names on any port. ``adapter_dir``: where
    load_lora_adapter may load files from (registered names always work). ``api_key``: one key,
    or several (each a tenant: the prompt cache is shared only within one). Registered adapters
    and files in ``adapter_dir`` load on first use, at most ``limits.max_adapters`` at once."""
    server = OpenAIServer(runtime, registry, adapter_dir=adapter_dir, limits=limits)
    runtime.adapter_resolver = server._servable_file
    runtime.max_adapters = limits.max_adapters
    routes = [
        Route("/health", _guard(server.health), methods=["GET"]),
        Route("/v1/models", _guard(server.models), methods=["GET"]),
        Route("/lora-adapters", _guard(server.lora_adapters), methods=["GET"]),
        Route("/v1/completions", _guard(server.completions), methods=["POST"]),
        Route("/v1/chat/completions", _guard(server.chat_completions), methods=["POST"]),
        Route("/v1/load_lora_adapter", _guard(server.load_lora_adapter), methods=["POST"]),
        Route("/v1/unload_lora_adapter", _guard(server.unload_lora_adapter), methods=["POST"]),
    ]
    middleware = [Middleware(_RequestGuard, allowed_hosts=list(allowed_hosts), api_key=api_key)]

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        return APIError(status, f"no route {request.method} {request.url.path}", type_="not_found_error"
                        if status == 404 else "invalid_request_error", code="not_found").response()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        server._workers.shutdown(wait=False)  # idle threads; a running generation finishes on its own

    app = Starlette(routes=routes, middleware=middleware, exception_handlers={404: not_found, 405: not_found},
                    lifespan=lifespan)
    app.state.server = server
    return app


# --- uvicorn: the same app with connection limits (what `edge-lora serve` and bench/soak.py run) ---

def uvicorn_config(app: Starlette, host: str, port: int, limits: ServerLimits = ServerLimits(),
                   log_level: str = "warning") -> Any:
    """A uvicorn.Config whose connections must send their request line and headers within
    header_timeout_s (uvicorn itself waits forever for a connection that sends nothing, and
    restarts its keep-alive timer on every byte), with 16 KiB of headers at most."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    header_timeout = limits.header_timeout_s
    server: OpenAIServer = app.state.server
    max_connections = limits.max_connections or max(64, 4 * server.gate.capacity)
    # Connections with no request under way (waiting for a request line or headers), oldest
    # first: what gives way when max_connections are open. Event-loop thread only.
    idle: dict[HeaderTimeoutProtocol, None] = {}
    open_count = [0]

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._header_timeout)
            idle[self] = None  # (re)inserted last: the most recently idle

        def _disarm(self) -> None:
            idle.pop(self, None)
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.cycle is None or self.cycle.response_complete:  # no request under way
                self.transport.close()  # connection_lost does h11's bookkeeping

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            open_count[0] += 1
            if open_count[0] > max_connections:
                # Full: the connection idle the longest gives way (80 idle sockets once made the
                # server answer 503 to everyone); with none idle, this one is refused.
                victim = next(iter(idle), None)
                if victim is not None:
                    victim._disarm()
                    victim.transport.close()
                else:
                    super().connection_made(transport)
                    self.transport.close()
                    return
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers are complete
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this connection gets the same time

        def connection_lost(self, exc: Exception | None) -> None:
            open_count[0] -= 1
            self._disarm()
            super().connection_lost(exc)

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=HeaderTimeoutProtocol,
                          timeout_keep_alive=limits.keep_alive_s, h11_max_incomplete_event_size=16 * 1024,
                          # uvicorn's own cap (connections + running requests, then 503s) sits
                          # above ours, which closes idle connections instead of refusing work
                          limit_concurrency=2 * max_connections + 16)


__all__ = ["APIError", "MAX_BODY_BYTES", "OpenAIServer", "ServerLimits", "loopback_hosts",
           "make_app", "uvicorn_config"]
