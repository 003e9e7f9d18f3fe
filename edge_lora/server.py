"""OpenAI-compatible HTTP API over a Runtime (Starlette; run with uvicorn by `edge-lora serve`).

`"model"` picks the adapter (vLLM's multi-LoRA convention): an adapter's name, or the base id
for no adapter. Generation runs in worker threads so the event loop keeps answering (health,
model list, other requests queueing for the runtime's context).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from edge_lora.core.constants import MAX_STOP_STRINGS, MAX_TEMPERATURE, MAX_TOP_LOGPROBS
from edge_lora.core.errors import ContextLengthError, EdgeLoraError, InputNotFoundError, InternalError, RegistryError
from edge_lora.registry import AdapterRegistry, check_name
from edge_lora.runtime import Generation, GenerationStats, Runtime, TokenLogprob
from edge_lora.structured import Grammar, SchemaError

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def _from_library_error(exc: EdgeLoraError) -> APIError:
    text = exc.one_line()
    if isinstance(exc, (InputNotFoundError, RegistryError)):
        return APIError(404, text, type_="not_found_error", code="not_found")
    if isinstance(exc, ContextLengthError):
        return APIError(400, text, param="messages", code="context_length_exceeded")
    if exc.exit_code != 2:
        return APIError(500, text, type_="server_error", code="internal_error")
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


async def _read_body(request: Request) -> bytes:
    """The body, refused as soon as it passes MAX_BODY_BYTES: request.body() would first hold all
    of it (a 600 MB body took the server from 0.6 to 1.7 GB peak RSS before the 413)."""
    too_large = APIError(413, f"request body over {MAX_BODY_BYTES} bytes", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _json_body(request: Request) -> dict:
    raw = await _read_body(request)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    except RecursionError:  # e.g. 100,000 nested brackets: json's recursive parser gives up
        raise APIError(400, "the request body nests too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


class OpenAIServer:
    def __init__(self, runtime: Runtime, registry: AdapterRegistry | None = None) -> None:
        self.runtime = runtime
        self.registry = registry
        self.base_id = runtime.model_id
        self.created = int(time.time())

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
        if model == self.base_id:
            chosen: dict[str, float | None] = {}
        elif model in loaded:
            chosen = {model: None}
        else:
            raise APIError(404, f"the model {model!r} does not exist; available: "
                           f"{', '.join([self.base_id, *loaded])}", type_="not_found_error",
                           param="model", code="model_not_found")
        for name, scale in (extra or {}).items():
            if name not in loaded:
                raise APIError(404, f"adapter {name!r} is not loaded", type_="not_found_error",
                               param="adapters", code="model_not_found")
            chosen[name] = float(scale)
        lora = body.get("lora")  # llama-server's form: [{"id": index in load order, "scale": s}]
        if lora is not None:
            names = list(loaded)
            if not isinstance(lora, list):
                raise APIError(400, "lora must be a list of {id, scale}", param="lora")
            for item in lora:
                if (not isinstance(item, dict) or isinstance(item.get("id"), bool)
                        or not isinstance(item.get("id"), int) or isinstance(item.get("scale"), bool)
                        or not isinstance(item.get("scale"), (int, float))):
                    raise APIError(400, "lora entries must be {\"id\": int, \"scale\": number}", param="lora")
                if not 0 <= item["id"] < len(names):
                    raise APIError(404, f"no adapter with id {item['id']}", type_="not_found_error",
                                   param="lora", code="model_not_found")
                chosen[names[item["id"]]] = float(item["scale"])
        return chosen

    # --- routes ---
    async def models(self, request: Request) -> Response:
        data = [{"id": self.base_id, "object": "model", "created": self.created, "owned_by": "edge-lora",
                 "root": self.base_id, "parent": None}]
        for name, loaded in self.runtime.adapters.items():
            data.append({"id": name, "object": "model", "created": self.created, "owned_by": "edge-lora",
                         "root": str(loaded.path), "parent": self.base_id})
        return JSONResponse({"object": "list", "data": data})

    async def lora_adapters(self, request: Request) -> Response:
        """llama-server's listing: ids usable in a request's "lora" field."""
        return JSONResponse([{"id": i, "name": name, "path": str(loaded.path), "scale": loaded.scale}
                             for i, (name, loaded) in enumerate(self.runtime.adapters.items())])

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def completions(self, request: Request) -> Response:
        body = await _json_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
            prompt = [int(t) for t in prompt]
        elif not isinstance(prompt, str) or not prompt:
            raise APIError(400, "prompt must be a non-empty string, a one-string list or a list of token ids",
                           param="prompt", code="invalid_value")
        return await self._respond(body, "text_completion",
                                   lambda p, cancel: self.runtime.generate(prompt, cancel=cancel, **p))

    async def chat_completions(self, request: Request) -> Response:
        body = await _json_body(request)
        messages = body.get("messages")
        return await self._respond(body, "chat.completion",
                                   lambda p, cancel: self.runtime.chat(messages, cancel=cancel, **p))

    async def _respond(self, body: dict, kind: str,
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
        response_format = _response_format(body)
        model = body["model"]
        cancel = threading.Event()

        def begin() -> Generation:
            params["grammar"] = _grammar(response_format)
            return start(params, cancel)
        # Tokenizing, checking and schema conversion run in a thread: a huge prompt must not stall the loop.
        generation = await run_in_threadpool(begin)
        request_id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        if stream:
            return StreamingResponse(self._sse(generation, cancel, kind, request_id, model, params["logprobs"],
                                               include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text = await run_in_threadpool(generation.text)
        stats = generation.stats
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

    async def _sse(self, generation: Generation, cancel: threading.Event, kind: str, request_id: str,
                   model: str, n_top: int | None = None, include_usage: bool = False) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def produce() -> None:
            sent = 0  # log-probability entries already attached to a piece
            try:
                for piece in generation:
                    # Read here, while the generation waits at this piece: its tokens' entries are in.
                    entries = generation.stats.logprobs[sent:]
                    sent += len(entries)
                    loop.call_soon_threadsafe(pieces.put_nowait, ("piece", (piece, entries)))
                loop.call_soon_threadsafe(pieces.put_nowait, ("done", generation.stats.logprobs[sent:]))
            except EdgeLoraError as exc:
                loop.call_soon_threadsafe(pieces.put_nowait, ("error", exc))
            except Exception as exc:  # a bug: without an "error" item the client would wait forever
                logger.exception("generation failed")
                loop.call_soon_threadsafe(pieces.put_nowait, ("error", InternalError(f"generation failed: {exc!r}")))

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

        worker = loop.run_in_executor(None, produce)
        try:
            if kind == "chat.completion":
                yield chunk(None, None, first=True)
            while True:
                tag, value = await pieces.get()
                if tag == "piece":
                    yield chunk(value[0], None, entries=value[1])
                elif tag == "error":
                    err = _from_library_error(value)
                    yield b"data: " + json.dumps({"error": {"message": err.message, "type": err.type,
                                                            "param": err.param, "code": err.code}}).encode() + b"\n\n"
                    break
                else:
                    yield chunk(None, generation.stats.finish_reason, entries=value)
                    if include_usage:
                        usage = {"id": request_id, "object": chunk_kind, "created": created, "model": model,
                                 "choices": [], "usage": _usage(generation.stats)}
                        yield b"data: " + json.dumps(usage).encode() + b"\n\n"
                    break
            yield b"data: [DONE]\n\n"
        finally:
            # A client that went away stops the generation at its next token; the worker then
            # returns the context by itself, so nothing here waits for it.
            cancel.set()
            worker.add_done_callback(lambda f: f.exception())  # retrieve, so no "never retrieved" warning

    async def load_lora_adapter(self, request: Request) -> Response:
        body = await _json_body(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str) or not path:
            raise APIError(400, "lora_name and lora_path are required strings", param="lora_name")
        try:
            check_name(name)
        except RegistryError as exc:
            raise APIError(400, exc.one_line(), param="lora_name", code="invalid_value") from exc
        if name == self.base_id:
            raise APIError(400, f"{name!r} is the base model's id", param="lora_name", code="invalid_value")
        if name in self.runtime.adapters:
            raise APIError(400, f"an adapter named {name!r} is already loaded", param="lora_name",
                           code="already_loaded")
        registry = self.registry or AdapterRegistry()
        entry = await run_in_threadpool(registry.resolve, path)
        await run_in_threadpool(self.runtime.load_adapter, name, entry.path, entry.scale)
        return JSONResponse({"status": "ok", "message": f"adapter {name!r} loaded"})

    async def unload_lora_adapter(self, request: Request) -> Response:
        body = await _json_body(request)
        name = body.get("lora_name")
        if not isinstance(name, str):
            raise APIError(400, "lora_name is a required string", param="lora_name")
        if name not in self.runtime.adapters:
            raise APIError(404, f"no adapter named {name!r} is loaded", type_="not_found_error",
                           param="lora_name", code="not_found")
        # Waits for running requests to release their contexts, so run it off the loop.
        await run_in_threadpool(self.runtime.unload_adapter, name)
        return JSONResponse({"status": "ok", "message": f"adapter {name!r} unloaded"})


def _guard(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
    """Turn every failure into the OpenAI error shape (never a stack trace, never a 500 for bad input)."""
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except APIError as exc:
            return exc.response()
        except EdgeLoraError as exc:
            return _from_library_error(exc).response()
        except Exception:  # a bug: still answer in OpenAI's shape, and keep the details in the log
            logger.exception("request failed")
            return APIError(500, "internal error (details in the server log)", type_="server_error",
                            code="internal_error").response()
    return wrapped


class _APIKeyMiddleware:
    """Plain ASGI (not BaseHTTPMiddleware) so streamed responses and client disconnects pass
    through untouched."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = APIError(401, "missing or wrong API key", type_="authentication_error",
                                    code="invalid_api_key").response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def make_app(runtime: Runtime, registry: AdapterRegistry | None = None, api_key: str | None = None) -> Starlette:
    server = OpenAIServer(runtime, registry)
    routes = [
        Route("/health", _guard(server.health), methods=["GET"]),
        Route("/v1/models", _guard(server.models), methods=["GET"]),
        Route("/lora-adapters", _guard(server.lora_adapters), methods=["GET"]),
        Route("/v1/completions", _guard(server.completions), methods=["POST"]),
        Route("/v1/chat/completions", _guard(server.chat_completions), methods=["POST"]),
        Route("/v1/load_lora_adapter", _guard(server.load_lora_adapter), methods=["POST"]),
        Route("/v1/unload_lora_adapter", _guard(server.unload_lora_adapter), methods=["POST"]),
    ]
    middleware = [Middleware(_APIKeyMiddleware, api_key=api_key)] if api_key else []

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        return APIError(status, f"no route {request.method} {request.url.path}", type_="not_found_error"
                        if status == 404 else "invalid_request_error", code="not_found").response()

    app = Starlette(routes=routes, middleware=middleware, exception_handlers={404: not_found, 405: not_found})
    app.state.server = server
    return app
