"""Typed thin wrapper over llama-cpp-python's low-level (ctypes) API.

Why low-level rather than ``llama_cpp.Llama``: we need per-request LoRA sets on one loaded
base (``llama_set_adapters_lora``), logits views without copies for perplexity, and
deterministic freeing. Every file is pre-parsed by ``gguf_check`` before llama.cpp sees it, a
model file this machine has not loaded before is loaded in a child process first (an abort in
llama.cpp's loader ends the child, not us), and every index we hand to llama.cpp is checked
here first, so bad input becomes a typed error instead of a crash inside C.
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import ctypes
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np

from edge_lora.converters.load_check import check_loads, proc_fd_path
from edge_lora.core import constants
from edge_lora.core.errors import AdapterError, InternalError, InvalidGGUFError, RequestError
from edge_lora.core.gguf_check import FileIdentity, GGUFInfo, check_adapter_fits, check_adapter_values, validate_gguf
from edge_lora.serving.extra_buffers import use_extra_buffers

import llama_cpp.llama_cpp as llama  # noqa: E402  (heavy: imported only by modules that run models)

logger = logging.getLogger(__name__)

LogitsRequest = Literal["last", "all"] | set[int] | frozenset[int]
EvalCallback = llama.ggml_backend_sched_eval_callback  # bool (*)(ggml_tensor *, bool ask, void *)

# llama.h's token attributes: tokenizing with special=True splits text at CONTROL and UNKNOWN
# tokens (USER_DEFINED ones always); LSTRIP/RSTRIP tokens eat the whitespace beside them.
TOKEN_ATTR_UNKNOWN = llama.LLAMA_TOKEN_ATTR_UNKNOWN
TOKEN_ATTR_CONTROL = llama.LLAMA_TOKEN_ATTR_CONTROL
TOKEN_ATTR_LSTRIP = llama.LLAMA_TOKEN_ATTR_LSTRIP
TOKEN_ATTR_RSTRIP = llama.LLAMA_TOKEN_ATTR_RSTRIP

# --- logging: llama.cpp prints pages of loader chatter on stderr; keep it quiet, but remember
# the last lines so a failed load can say why (in the log and the CLI's message; the server
# never puts them in an answer). One buffer per thread: llama.cpp calls the callback on the
# thread that made the failing call, so two requests never read each other's lines. ---
_recent_log = threading.local()


def _thread_log() -> collections.deque[str]:
    lines = getattr(_recent_log, "lines", None)
    if lines is None:
        lines = _recent_log.lines = collections.deque(maxlen=20)
    return lines


@llama.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level in (3, 4):  # ggml: 3 WARN, 4 ERROR — kept for error messages
        _thread_log().append(text.decode("utf-8", errors="replace").strip())


_backend_ready = False
_backend_lock = threading.Lock()


def _ensure_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama.llama_log_set(_log_callback, ctypes.c_void_p(0))
            llama.llama_backend_init()
            _backend_ready = True


def _last_log_lines(n: int = 3) -> str:
    lines = _thread_log()
    text = "; ".join(line for line in list(lines)[-n:] if line)
    lines.clear()
    return text


def _clear_log() -> None:
    _thread_log().clear()


_Handle = TypeVar("_Handle", bound="_NativeHandle")


class _NativeHandle:
    """Deterministic release of a llama.cpp object: ``close()``, a ``with`` block, or (as a
    last resort) garbage collection."""

    def close(self) -> None:
        raise InternalError(f"{type(self).__name__} does not define close()")

    def __enter__(self: _Handle) -> _Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the ctypes module may be gone
            self.close()


def model_params(*, extra_buffers: bool | None = None) -> llama.llama_model_params:
    """The parameters every model is loaded with: CPU, mmap, and ggml's extra buffer types
    only where the probe showed they run (``extra_buffers`` overrides, for benchmarks)."""
    params = llama.llama_model_default_params()
    params.n_gpu_layers = 0  # CPU: the machines this is for
    params.load_mode = llama.LLAMA_LOAD_MODE_MMAP  # pages shared, loaded once
    params.use_extra_bufts = use_extra_buffers() if extra_buffers is None else extra_buffers
    return params


def _changed(path: Path) -> InvalidGGUFError:
    return InvalidGGUFError(f"{path} was replaced or modified while it was being loaded",
                            fix="wait until whatever writes the file has finished, then run again")


@contextlib.contextmanager
def _pinned(path: Path, validated: FileIdentity | None,
            opened: int | None = None) -> collections.abc.Iterator[tuple[int, FileIdentity, str]]:
    """Open ``path`` once and yield (descriptor, identity, the name llama.cpp should open): the
    descriptor's /proc/self/fd name, so llama.cpp reads the very file that was validated, whatever
    the path names meanwhile. Refuses a file that is not the validated one, before and after.
    ``opened``: a descriptor the caller opened (and checked) already; used (duplicated) instead
    of opening ``path`` again, and afterwards the descriptor, not the path, must be unchanged."""
    try:
        fd = (os.dup(opened) if opened is not None
              else os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
    except OSError as exc:
        raise InvalidGGUFError(f"cannot open {path}: {exc.strerror or exc}",
                               fix="check the path and its permissions") from exc
    try:
        identity = FileIdentity.of(os.fstat(fd))
        if validated is not None and identity != validated:
            raise _changed(path)
        yield fd, identity, proc_fd_path(fd) or str(path)
        try:
            now = os.fstat(fd) if opened is not None else os.stat(path)
            unchanged = FileIdentity.of(now) == identity
        except OSError:
            unchanged = False
        if not unchanged:
            raise _changed(path)
    finally:
        os.close(fd)


def load_model_file(path: Path, info: GGUFInfo, *, extra_buffers: bool | None = None) -> llama.llama_model_p:
    """The one way a model file reaches llama.cpp in this process: the file validated (``info``)
    is the file loaded — it is opened once, compared with what was validated, proven to load in
    a child process unless this very file (same inode, size, mtime) already was, loaded through
    its descriptor, and the path is checked again afterwards, so a file swapped at any point
    between the check and the load is refused."""
    _ensure_backend()
    ptr = None
    try:
        with _pinned(path, info.identity) as (fd, identity, name):
            check_loads(path, depth="model", fd=fd, identity=identity,
                        fix="the file is corrupt or not a model llama.cpp supports; re-convert or re-download it")
            params = model_params(extra_buffers=extra_buffers)
            _clear_log()
            ptr = llama.llama_model_load_from_file(name.encode(), params)
            if not ptr:
                detail = _last_log_lines()
                raise InvalidGGUFError(f"llama.cpp could not load {path}" + (f": {detail}" if detail else ""),
                                       fix="check that the file is a complete model GGUF for a supported architecture")
    except BaseException:
        if ptr:
            llama.llama_model_free(ptr)
        raise
    return ptr


class LlamaModel(_NativeHandle):
    """A GGUF model loaded with mmap. Owns contexts and adapters made from it: closing the
    model closes them first, so no native object outlives its model."""

    def __init__(self, path: Path | str, *, info: GGUFInfo | None = None, extra_buffers: bool | None = None) -> None:
        self.path = Path(path)
        self.info = info or validate_gguf(self.path, expect_type="model")
        self._ptr = load_model_file(self.path, self.info, extra_buffers=extra_buffers)
        self._vocab = llama.llama_model_get_vocab(self._ptr)
        self.n_vocab: int = llama.llama_vocab_n_tokens(self._vocab)
        self.n_ctx_train: int = llama.llama_model_n_ctx_train(self._ptr)
        self.bos: int = llama.llama_vocab_bos(self._vocab)
        self.eos: int = llama.llama_vocab_eos(self._vocab)
        self.add_bos: bool = bool(llama.llama_vocab_get_add_bos(self._vocab))
        # Positions a sliding-window attention layer looks back (0: no such layers).
        self.n_swa: int = int(llama.llama_model_n_swa(self._ptr))
        self._dependents: weakref.WeakSet[LlamaContext | BatchedContext | LoraAdapter | GrammarSampler] = weakref.WeakSet()
        # WeakSet iteration fails ("set changed size") when another thread adds to it meanwhile
        # (a request's grammar sampler while an adapter is freed): every add and copy holds this.
        self._dependents_lock = threading.RLock()  # reentrant: a collected adapter frees itself from any frame
        # Held while an adapter is created or freed (llama.cpp changes the model's adapter set);
        # reentrant so a caller draining every context can hold it around both.
        self._lock = threading.RLock()
        self._control: np.ndarray | None = None
        self._guidance_tokenizer = None
        self._guidance_lock = threading.Lock()  # not _lock: building takes seconds, adapters need not wait

    # --- lifetime ---
    @property
    def ptr(self) -> llama.llama_model_p:
        if not self._ptr:
            raise InternalError("the model was already closed")
        return self._ptr

    @property
    def closed(self) -> bool:
        return not self._ptr

    def _register(self, dependent: LlamaContext | BatchedContext | LoraAdapter | GrammarSampler) -> None:
        with self._dependents_lock:
            self._dependents.add(dependent)

    def dependents(self) -> list[LlamaContext | BatchedContext | LoraAdapter | GrammarSampler]:
        """A snapshot of the live objects made from this model (safe while others are added)."""
        with self._dependents_lock:
            return list(self._dependents)

    def close(self) -> None:
        if getattr(self, "_ptr", None):
            for dependent in self.dependents():
                dependent.close()
            self._guidance_tokenizer = None  # it holds the vocabulary's pointer
            llama.llama_model_free(self._ptr)
            self._ptr = None

    # --- vocabulary ---
    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        """``special=True`` parses control tokens written as text (``<start_of_turn>``), which
        chat templates rely on; pass False for untrusted user text inside a template."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate: undecodable argv bytes, or "\udcff" in JSON
            raise RequestError(f"the text is not valid Unicode (a lone surrogate at character {exc.start})",
                               fix="pass UTF-8 text") from None
        capacity = len(data) + 8
        buf = (llama.llama_token * capacity)()
        n = llama.llama_tokenize(self._vocab_ptr(), data, len(data), buf, capacity, add_bos, special)
        if n < 0:
            capacity = -n
            buf = (llama.llama_token * capacity)()
            n = llama.llama_tokenize(self._vocab_ptr(), data, len(data), buf, capacity, add_bos, special)
        if n < 0:
            raise RequestError(f"text of {len(data)} bytes could not be tokenized",
                               fix="shorten the prompt")
        return list(buf[:n])

    def _vocab_ptr(self) -> llama.llama_vocab_p:
        self.ptr  # raises if closed
        return self._vocab

    def _check_token(self, token: int) -> None:
        if not 0 <= token < self.n_vocab:
            raise RequestError(f"token id {token} is outside the vocabulary (0..{self.n_vocab - 1})",
                               fix="pass token ids from this model's tokenizer")

    def token_piece(self, token: int, special: bool = False) -> bytes:
        """Raw bytes of one token (may be part of a multi-byte UTF-8 character). Control
        tokens render as empty unless ``special``."""
        self._check_token(token)
        buf = ctypes.create_string_buffer(64)
        n = llama.llama_token_to_piece(self._vocab_ptr(), token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(self._vocab_ptr(), token, buf, -n, 0, special)
        return buf.raw[:max(n, 0)]


    def token_attr(self, token: int) -> int:
        """llama.cpp's attribute bits of a token (TOKEN_ATTR_CONTROL, ...)."""
        self._check_token(token)
        return int(llama.llama_vocab_get_attr(self._vocab_ptr(), token))

    def detokenize(self, ids: Sequence[int], special: bool = False) -> str:
        return b"".join(self.token_piece(t, special) for t in ids).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama.llama_vocab_is_eog(self._vocab_ptr(), token))

    @property
    def control_tokens(self) -> np.ndarray:
        """A boolean mask over the vocabulary: control tokens that are not end-of-generation
        (``<start_of_turn>``, ``<bos>``, ...). They print as nothing, so a grammar that matched
        their spelled-out text would not match what the reader gets. Built once (~0.1 s)."""
        with self._lock:
            if self._control is None:
                vocab = self._vocab_ptr()
                self._control = np.fromiter(
                    (bool(llama.llama_vocab_is_control(vocab, t)) and not llama.llama_vocab_is_eog(vocab, t)
                     for t in range(self.n_vocab)), dtype=bool, count=self.n_vocab)
            return self._control

    def guidance_tokenizer(self):  # -> llguidance.LLTokenizer (imported lazily: grammars only)
        """llguidance's view of this vocabulary: every token's bytes, control tokens marked
        (a 0xFF prefix, llguidance's convention) so no grammar text matches them, and every
        end-of-generation token ends an answer. Built once per model (llguidance.llamacpp's
        builder, without its deprecated per-token call that warns 262k times)."""
        with self._guidance_lock:
            if self._guidance_tokenizer is None:
                from llguidance import LLTokenizer

                vocab = self._vocab_ptr()
                buf = ctypes.create_string_buffer(4096)
                tokens: list[bytes] = []
                for token in range(self.n_vocab):
                    n = llama.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
                    if n < 0:
                        buf = ctypes.create_string_buffer(-n)
                        n = llama.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
                    piece = buf.raw[:max(n, 0)]
                    attr = llama.llama_vocab_get_attr(vocab, token)
                    if attr & llama.LLAMA_TOKEN_ATTR_CONTROL or (
                            attr & llama.LLAMA_TOKEN_ATTR_USER_DEFINED and piece.startswith(b"<")
                            and piece.endswith(b">")):
                        piece = b"\xff" + piece
                    tokens.append(piece)
                eog = [t for t in range(self.n_vocab) if llama.llama_vocab_is_eog(vocab, t)]
                tokenize = ctypes.cast(llama._lib.llama_tokenize, ctypes.c_void_p).value  # the C function
                self._guidance_tokenizer = LLTokenizer.from_llamacpp(  # type: ignore[attr-defined]
                    tokens=tokens, vocab_ptr=vocab, tokenize_fptr=tokenize, eos_token=eog or [self.eos],
                    slices=None)
            return self._guidance_tokenizer

    def token_id(self, text: str) -> int | None:
        """The id of a single (special) token spelled ``text``, or None."""
        ids = self.tokenize(text, add_bos=False, special=True)
        return ids[0] if len(ids) == 1 else None

    # --- metadata ---
    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = llama.llama_model_meta_val_str(self.ptr, key.encode(), buf, 4096)
        if n < 0:
            return None
        if n >= 4096:
            buf = ctypes.create_string_buffer(n + 1)
            llama.llama_model_meta_val_str(self.ptr, key.encode(), buf, n + 1)
        return buf.value.decode("utf-8", errors="replace")

    @property
    def metadata(self) -> dict:
        return self.info.metadata

    @property
    def architecture(self) -> str:
        return self.info.architecture or ""

    @property
    def chat_template(self) -> str | None:
        raw = llama.llama_model_chat_template(self.ptr, None)
        return raw.decode("utf-8", errors="replace") if raw else None


class LoraAdapter(_NativeHandle):
    """A GGUF LoRA adapter loaded for one model. Checked against the model's tensors in
    Python first (llama.cpp's own check only logs and returns NULL)."""

    def __init__(self, model: LlamaModel, path: Path | str, *, fd: int | None = None) -> None:
        """``fd``: the adapter file, opened (and checked) by the caller: it is validated and
        loaded, never ``path`` (which then only names it), so a symlink swapped meanwhile
        changes nothing. The caller keeps and closes it."""
        self.path = Path(path)
        self.model = model
        self.info = validate_gguf(self.path, expect_type="adapter", fd=fd)
        check_adapter_fits(model.info, self.info)
        _clear_log()
        self._ptr = None
        try:
            with _pinned(self.path, self.info.identity, fd) as (fd, _identity, name):
                check_adapter_values(self.info, fd)
                with model._lock:
                    self._ptr = llama.llama_adapter_lora_init(model.ptr, name.encode())
        except InvalidGGUFError as exc:
            if self._ptr:
                llama.llama_adapter_lora_free(self._ptr)
                self._ptr = None
            raise AdapterError(exc.message, fix=exc.fix) from None
        if not self._ptr:
            detail = _last_log_lines()
            raise AdapterError(f"llama.cpp could not load adapter {self.path}" + (f": {detail}" if detail else ""),
                               fix="re-convert the adapter for this base model")
        model._register(self)

    @property
    def ptr(self) -> llama.llama_adapter_lora_p:
        if not self._ptr:
            raise InternalError(f"adapter {self.path.name} was already freed")
        return self._ptr

    @property
    def closed(self) -> bool:
        return not self._ptr

    def free(self) -> None:
        if getattr(self, "_ptr", None):
            # Contexts still pointing at this adapter must drop it first.
            for dependent in self.model.dependents():
                if isinstance(dependent, (LlamaContext, BatchedContext)):
                    dependent._forget_adapter(self)
            with self.model._lock:
                if not self.model.closed:
                    llama.llama_adapter_lora_free(self._ptr)
                self._ptr = None

    def close(self) -> None:
        self.free()


class _ContextHandle(_NativeHandle):
    """What a single-sequence context and a batched one share: the llama.cpp context's lifetime,
    its thread count, and its active adapter set (adapters apply to a whole llama.cpp context)."""

    model: LlamaModel
    n_threads: int
    _ptr: llama.llama_context_p | None
    _batch: llama.llama_batch
    _adapters: tuple[tuple[LoraAdapter, float], ...]

    @property
    def ptr(self) -> llama.llama_context_p:
        if not self._ptr:
            raise InternalError("the context was already closed")
        return self._ptr

    def close(self) -> None:
        if getattr(self, "_ptr", None):
            llama.llama_batch_free(self._batch)
            llama.llama_free(self._ptr)
            self._ptr = None
            self._adapters = ()

    def set_threads(self, n_threads: int) -> None:
        """Threads for the next decodes (llama.cpp reads them at each decode call)."""
        n_threads = max(1, int(n_threads))
        if n_threads != self.n_threads:
            llama.llama_set_n_threads(self.ptr, n_threads, n_threads)
            self.n_threads = n_threads

    @property
    def adapters(self) -> tuple[tuple[LoraAdapter, float], ...]:
        return self._adapters

    def _switch_adapters(self, adapters: Iterable[tuple[LoraAdapter, float]]) -> bool:
        """Make exactly these adapters (with scales) active; True when the set changed."""
        wanted = tuple((a, float(s)) for a, s in adapters if float(s) != 0.0)
        for adapter, _ in wanted:
            if adapter.model is not self.model:
                raise AdapterError(f"adapter {adapter.path.name} was loaded for another model")
            adapter.ptr  # raises if freed
        if wanted == self._adapters:
            return False
        n = len(wanted)
        if n:
            ptrs = (llama.llama_adapter_lora_p_ctypes * n)(*[a.ptr for a, _ in wanted])
            scales = (ctypes.c_float * n)(*[s for _, s in wanted])
            rc = llama.llama_set_adapters_lora(self.ptr, ptrs, n, scales)
        else:
            rc = llama.llama_set_adapters_lora(self.ptr, None, 0, None)
        if rc != 0:
            raise InternalError(f"llama.cpp refused the adapter set (code {rc})")
        self._adapters = wanted
        return True

    def _forget_adapter(self, adapter: LoraAdapter) -> None:
        if self._ptr and any(a is adapter for a, _ in self._adapters):
            self.set_adapters([(a, s) for a, s in self._adapters if a is not adapter])


class LlamaContext(_ContextHandle):
    """One inference context (KV cache) on a model: single sequence, batched decode. It
    remembers which token sits at each cached position, so a later prompt can keep the
    prefix it shares with them (``reusable_prefix``, ``keep_prefix``)."""

    def __init__(self, model: LlamaModel, n_ctx: int, n_batch: int = 512, n_threads: int | None = None,
                 *, flash_attn: bool | None = None, swa_full: bool = True,
                 eval_callback: EvalCallback | None = None) -> None:
        """``flash_attn``: None lets llama.cpp choose (on for CPU). Its single-token kernel splits
        the KV cache across threads, so logits then depend on the thread count; off, they do not.
        ``swa_full``: sliding-window layers keep every position (llama.cpp's default), so the
        cache can be cut anywhere; off, they keep ~n_swa + n_batch and a cut may be refused.
        ``eval_callback`` (a ``llama.ggml_backend_sched_eval_callback``) observes graph nodes
        as llama.cpp computes them (``edge_lora.analysis.imatrix``); the context keeps it alive."""
        if n_ctx < 8:
            raise RequestError(f"context size {n_ctx} is too small", fix="use --ctx 512 or more")
        if n_batch < 1:
            raise RequestError(f"batch size {n_batch} must be positive")
        self.model = model
        self.n_ctx = n_ctx
        self.n_batch = min(n_batch, n_ctx)
        params = llama.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = 1
        self.n_threads = n_threads or constants.N_THREADS
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads
        params.no_perf = True
        if flash_attn is not None:
            params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.swa_full = swa_full
        self._eval_callback = eval_callback  # llama.cpp holds only the function pointer
        if eval_callback is not None:
            params.cb_eval = eval_callback
            params.cb_eval_user_data = None
        _clear_log()
        self._ptr = llama.llama_init_from_model(model.ptr, params)
        if not self._ptr:
            detail = _last_log_lines()
            raise InternalError(f"llama.cpp could not create a context of {n_ctx} tokens"
                                + (f": {detail}" if detail else ""))
        self._batch = llama.llama_batch_init(self.n_batch, 0, 1)
        self._adapters: tuple[tuple[LoraAdapter, float], ...] = ()
        # Logit rows of earlier chunks of a multi-chunk decode (copied: llama.cpp reuses its buffer).
        self._saved: dict[int, np.ndarray] = {}
        self._last_rows: dict[int, int] = {}  # token index in the decode call -> row in last chunk
        self._tokens: list[int] = []  # the token at each position held in the KV cache (0..n-1)
        # Asked before every llama_decode call, so a long prefill re-splits the cores as requests come and go.
        self.thread_policy: Callable[[], int] | None = None
        model._register(self)

    # --- KV cache ---
    @property
    def n_past(self) -> int:
        """Positions 0..n_past-1 are in the KV cache."""
        return len(self._tokens)

    @property
    def cached_tokens(self) -> tuple[int, ...]:
        return tuple(self._tokens)

    def clear_kv(self) -> None:
        llama.llama_memory_clear(llama.llama_get_memory(self.ptr), True)
        self._tokens = []

    def remove_kv_from(self, pos: int) -> bool:
        """Drop cached positions >= pos (to reuse a shared prompt prefix). False when the cache
        cannot cut there (then call clear_kv)."""
        if pos <= 0:
            self.clear_kv()
            return True
        if pos >= len(self._tokens):
            return True
        if not self._window_kept_before(pos):
            return False
        ok = bool(llama.llama_memory_seq_rm(llama.llama_get_memory(self.ptr), 0, pos, -1))
        if ok:
            del self._tokens[pos:]
        return ok

    def _window_kept_before(self, pos: int) -> bool:
        """Whether a token decoded at ``pos`` would find every cached key it attends to.
        A sliding-window cache (Gemma 3's local layers, swa_full off) holds only the last
        n_swa + n_ubatch positions; seq_rm still "succeeds" when the window before the cut is
        gone, so the check is ours: llama-server's rule, the cache must still hold position
        pos - n_swa (all positions between its smallest and largest are guaranteed present)."""
        if self.model.n_swa <= 0:
            return True
        pos_min = llama.llama_memory_seq_pos_min(llama.llama_get_memory(self.ptr), 0)
        return 0 <= pos_min <= max(0, pos - self.model.n_swa)

    def reusable_prefix(self, tokens: Sequence[int]) -> int:
        """How many leading ``tokens`` the KV cache already holds and can keep: their common
        prefix with the cached tokens, less at least one token (the last prompt token is always
        decoded, for its logits); 0 when the cache cannot be cut there."""
        limit = min(len(self._tokens), len(tokens) - 1)
        n = 0
        while n < limit and self._tokens[n] == tokens[n]:
            n += 1
        if n == 0 or (n < len(self._tokens) and not self._window_kept_before(n)):
            return 0
        return n

    def keep_prefix(self, n: int) -> int:
        """Keep the first ``n`` cached positions and drop the rest; returns how many were kept
        (0 after clearing the cache when it cannot be cut at ``n``)."""
        if n > 0 and self.remove_kv_from(n):
            return min(n, len(self._tokens))
        self.clear_kv()
        return 0

    # --- adapters ---
    def set_adapters(self, adapters: Iterable[tuple[LoraAdapter, float]]) -> bool:
        """Make exactly these adapters (with scales) active. Returns True when the set changed,
        in which case the KV cache was cleared (it was computed under other weights)."""
        if not self._switch_adapters(adapters):
            return False
        self.clear_kv()
        return True

    # --- decoding ---
    def decode(self, tokens: Sequence[int], pos0: int = 0, logits: LogitsRequest = "last",
               cancel: Callable[[], bool] | None = None) -> bool:
        """Evaluate ``tokens`` at positions pos0.. in chunks of n_batch. Afterwards
        ``logits(i)`` gives the logits after token i of this call (i in the request).
        ``cancel`` is asked before each chunk: when it says True the decode stops there and
        returns False (the chunks done stay in the KV cache); otherwise returns True."""
        n = len(tokens)
        if n == 0:
            raise RequestError("nothing to decode", fix="give a non-empty prompt")
        if pos0 < 0 or pos0 + n > self.n_ctx:
            raise RequestError(f"{pos0 + n} tokens do not fit the context of {self.n_ctx} tokens",
                               fix="shorten the prompt or raise --ctx")
        for t in tokens:
            self.model._check_token(int(t))
        if pos0 > self.n_past:
            raise RequestError(f"decode at position {pos0} leaves a gap after the {self.n_past} cached tokens")
        if pos0 < self.n_past and not self.remove_kv_from(pos0):
            raise RequestError(f"the KV cache cannot be cut at position {pos0}",
                               fix="call clear_kv() and decode from position 0")
        if logits == "last":
            wanted: set[int] = {n - 1}
        elif logits == "all":
            wanted = set(range(n))
        else:
            wanted = {int(i) for i in logits}
            if any(not 0 <= i < n for i in wanted):
                raise RequestError(f"logit indices must lie in 0..{n - 1}")
        self._saved = {}
        self._last_rows = {}
        batch = self._batch
        for start in range(0, n, self.n_batch):
            if cancel is not None and cancel():
                return False
            chunk = tokens[start:start + self.n_batch]
            rows: dict[int, int] = {}
            for k, token in enumerate(chunk):
                batch.token[k] = int(token)
                batch.pos[k] = pos0 + start + k
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = 0
                want = (start + k) in wanted
                batch.logits[k] = 1 if want else 0
                if want:
                    rows[start + k] = k
            batch.n_tokens = len(chunk)
            if self.thread_policy is not None:
                self.set_threads(self.thread_policy())
            rc = llama.llama_decode(self.ptr, batch)
            if rc == 0:
                self._tokens.extend(int(t) for t in chunk)
            else:
                self.clear_kv()  # a failed batch may leave part of it in the cache
                if rc == 1:
                    raise RequestError("the KV cache is full", fix="shorten the prompt or raise --ctx")
                raise InternalError(f"llama_decode failed with code {rc}: {_last_log_lines()}")
            is_last_chunk = start + self.n_batch >= n
            if is_last_chunk:
                self._last_rows = rows
            else:
                for index, row in rows.items():
                    self._saved[index] = self._row(row).copy()
        return True

    def _row(self, row: int) -> np.ndarray:
        ptr = llama.llama_get_logits_ith(self.ptr, row)
        if not ptr:
            raise InternalError(f"llama.cpp returned no logits for batch row {row}")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def logits(self, i: int = -1) -> np.ndarray:
        """Logits (n_vocab float32) after token ``i`` of the last decode call; -1 = the last
        requested. A view into llama.cpp's buffer, valid until the next decode."""
        if i == -1:
            if self._last_rows:
                i = max(self._last_rows)
            elif self._saved:
                i = max(self._saved)
        if i in self._last_rows:
            return self._row(self._last_rows[i])
        if i in self._saved:
            return self._saved[i]
        raise RequestError(f"no logits were requested for token {i} in the last decode")




# Per-token work of a grammar, bounded (llguidance's limits; its figures: ~14k lexer fuel and ~20k
# Earley items a millisecond). A step that would pass them puts the matcher in its error state
# instead of running on: the answer stops with an error, and the runtime's checks between
# tokens (cancel, deadline) keep running. Ambiguous grammars cost an Earley parser a bounded
# number of items per token, where llama.cpp's stack-based sampler doubled its stacks per "[".
GRAMMAR_LIMITS = dict(max_items_in_row=2000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
                      step_max_items=50_000, max_lexer_states=50_000, max_grammar_size=200_000)


class GrammarError(RequestError):
    """A grammar llguidance refuses, or a grammar step that passed its work bound."""


class GrammarSampler(_NativeHandle):
    """A GBNF grammar as a filter over candidate tokens, one per generation: ``allowed(ids)``
    says which tokens the grammar accepts next, ``accept(token)`` advances it. Only ever accept
    a token ``allowed`` returned.

    The engine is llguidance (what llama.cpp and vLLM can use), not llama.cpp's GBNF sampler:
    llama.cpp keeps one stack per way of parsing the text so far, so an ambiguous recursive
    schema doubled its work with every token (2.7 s a token at depth 12 in bench/grammar_engines.py,
    all inside C where no cancel is seen); llguidance's Earley parser does bounded work per token
    (GRAMMAR_LIMITS) and computes the whole-vocabulary mask in about 0.2 ms."""

    def __init__(self, model: LlamaModel, gbnf: str) -> None:
        """``gbnf``: llama.cpp's grammar syntax, start rule ``root``."""
        import llguidance
        from llguidance.gbnf_to_lark import gbnf_to_lark

        self.model = model
        self._mask: np.ndarray | None = None
        self._matcher = None
        try:
            lark = gbnf_to_lark(gbnf)
        except Exception as exc:  # its parser raises plain exceptions naming the grammar's text
            logger.warning("the grammar does not parse: %s", exc)
            raise GrammarError("the grammar does not parse (details in the log)",
                               fix="check the GBNF (llama.cpp grammars/README.md)") from None
        matcher = llguidance.LLMatcher(model.guidance_tokenizer(), llguidance.LLMatcher.grammar_from_lark(lark),
                                       limits=llguidance.LLParserLimits(**GRAMMAR_LIMITS), log_level=0)
        if matcher.is_error():
            logger.warning("llguidance refused a grammar: %s", matcher.get_error())
            raise GrammarError("the grammar does not parse or passes the size bound (details in the log)",
                               fix="simplify the schema, or check the GBNF (llama.cpp grammars/README.md)")
        self._matcher = matcher
        model._register(self)

    def _current_mask(self) -> np.ndarray:
        if self._matcher is None:
            raise InternalError("the grammar sampler was already freed")
        if self._mask is None:
            bias = self._matcher.compute_logit_bias()  # one byte a token: 0 or 200 (allowed)
            if self._matcher.is_error():
                logger.warning("grammar step failed: %s", self._matcher.get_error())
                raise GrammarError("the structured output's grammar passed its work bound for one token",
                                   fix="simplify the schema (fewer ambiguous alternatives)")
            self._mask = np.frombuffer(bias, dtype=np.uint8)[:self.model.n_vocab] != 0
        return self._mask

    def allowed(self, ids: np.ndarray) -> np.ndarray:
        """A boolean mask over ``ids``: which tokens may come next. End-of-generation tokens
        are allowed only once the grammar is complete."""
        if not len(ids):
            return np.zeros(0, dtype=bool)
        return self._current_mask()[np.asarray(ids)]

    def accept(self, token: int) -> None:
        if self._matcher is None:
            raise InternalError("the grammar sampler was already freed")
        self._mask = None
        if not self._matcher.consume_token(int(token)):
            logger.warning("grammar refused token %d: %s", token, self._matcher.get_error())
            raise InternalError(f"the grammar refused token {token} after allowing it")

    def close(self) -> None:
        self._matcher = None
        self._mask = None


class BatchedContext(_ContextHandle):
    """One context holding ``n_seq`` sequences (slots) in a unified KV cache, so one
    ``llama_decode`` call evaluates tokens of several sequences at once (llama-server's slots).
    Each sequence may reach ``n_ctx_seq`` positions; the cache holds ``n_ctx_seq * n_seq`` cells,
    so every slot can be full at once. It remembers the tokens each sequence holds (the prompt
    cache, per sequence). Adapters apply to the whole context: a caller decoding sequences under
    different adapter sets decodes each set's tokens in its own call (``set_adapters`` between),
    and never mixes KV computed under one set into a sequence of another."""

    def __init__(self, model: LlamaModel, n_ctx_seq: int, n_seq: int, n_batch: int = 512,
                 n_threads: int | None = None) -> None:
        if n_ctx_seq < 8:
            raise RequestError(f"context size {n_ctx_seq} is too small", fix="use --ctx 512 or more")
        if not 1 <= n_seq <= 256:
            raise RequestError(f"{n_seq} sequences is out of range (1-256)")
        self.model = model
        self.n_ctx = n_ctx_seq
        self.n_seq = n_seq
        self.n_batch = max(1, min(n_batch, n_ctx_seq * n_seq))
        params = llama.llama_context_default_params()
        params.n_ctx = n_ctx_seq * n_seq
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = n_seq
        params.kv_unified = True
        self.n_threads = n_threads or constants.N_THREADS
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads
        params.no_perf = True
        # Off: the single-token kernel splits the KV cache by thread count (see LlamaContext).
        params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.swa_full = True  # every position kept, so any sequence can be cut anywhere
        _clear_log()
        self._ptr = llama.llama_init_from_model(model.ptr, params)
        if not self._ptr:
            detail = _last_log_lines()
            raise InternalError(f"llama.cpp could not create a context of {n_seq} x {n_ctx_seq} tokens"
                                + (f": {detail}" if detail else ""))
        self._batch = llama.llama_batch_init(self.n_batch, 0, 1)
        self._adapters: tuple[tuple[LoraAdapter, float], ...] = ()
        self._tokens: list[list[int]] = [[] for _ in range(n_seq)]
        model._register(self)

    # --- per-sequence KV cache ---
    def n_past(self, seq: int) -> int:
        return len(self._tokens[seq])

    def cached_tokens(self, seq: int) -> tuple[int, ...]:
        return tuple(self._tokens[seq])

    def clear_seq(self, seq: int) -> None:
        llama.llama_memory_seq_rm(llama.llama_get_memory(self.ptr), seq, -1, -1)
        self._tokens[seq] = []

    def reusable_prefix(self, seq: int, tokens: Sequence[int]) -> int:
        """Leading ``tokens`` sequence ``seq`` already holds, less at least one (the last prompt
        token is always decoded, for its logits). Every position is kept (swa_full), so a
        sequence can be cut anywhere."""
        cached = self._tokens[seq]
        limit = min(len(cached), len(tokens) - 1)
        n = 0
        while n < limit and cached[n] == tokens[n]:
            n += 1
        return n

    def keep_prefix(self, seq: int, n: int) -> int:
        """Keep the first ``n`` positions of sequence ``seq``, drop the rest; returns ``n`` kept."""
        if n <= 0:
            self.clear_seq(seq)
            return 0
        if n < len(self._tokens[seq]):
            if not llama.llama_memory_seq_rm(llama.llama_get_memory(self.ptr), seq, n, -1):
                self.clear_seq(seq)
                return 0
            del self._tokens[seq][n:]
        return min(n, len(self._tokens[seq]))

    # --- adapters ---
    def set_adapters(self, adapters: Iterable[tuple[LoraAdapter, float]]) -> bool:
        """Make exactly these adapters active for the next decodes. The KV cache is kept: each
        sequence's cells were computed under the set its caller decoded it with."""
        return self._switch_adapters(adapters)

    # --- decoding ---
    def decode(self, parts: Sequence[tuple[int, Sequence[int]]]) -> list[int]:
        """One llama_decode over several sequences: ``parts`` is [(seq, tokens)], each appended at
        the sequence's next positions, all tokens together at most n_batch. Returns, per part, the
        batch row whose logits follow its last token (``logits(row)``). On failure every part's
        sequence is cleared (a failed batch may leave some of it in the cache)."""
        total = sum(len(t) for _, t in parts)
        if total == 0 or total > self.n_batch:
            raise InternalError(f"a batch of {total} tokens (1..{self.n_batch} allowed)")
        batch = self._batch
        rows: list[int] = []
        k = 0
        for seq, tokens in parts:
            if not 0 <= seq < self.n_seq or not tokens:
                raise InternalError(f"bad batch part for sequence {seq}")
            pos0 = len(self._tokens[seq])
            if pos0 + len(tokens) > self.n_ctx:
                raise RequestError(f"{pos0 + len(tokens)} tokens do not fit the context of {self.n_ctx} tokens",
                                   fix="shorten the prompt or raise --ctx")
            for i, token in enumerate(tokens):
                self.model._check_token(int(token))
                batch.token[k] = int(token)
                batch.pos[k] = pos0 + i
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = seq
                batch.logits[k] = 1 if i == len(tokens) - 1 else 0
                k += 1
            rows.append(k - 1)
        batch.n_tokens = k
        rc = llama.llama_decode(self.ptr, batch)
        if rc != 0:
            for seq, _ in parts:
                self.clear_seq(seq)
            if rc == 1:
                raise RequestError("the KV cache is full", fix="shorten the prompt or raise --ctx")
            raise InternalError(f"llama_decode failed with code {rc}")
        for seq, tokens in parts:
            self._tokens[seq].extend(int(t) for t in tokens)
        return rows

    def logits(self, row: int) -> np.ndarray:
        """Logits after the token at batch ``row`` of the last decode: a view, valid until the next."""
        ptr = llama.llama_get_logits_ith(self.ptr, row)
        if not ptr:
            raise InternalError(f"llama.cpp returned no logits for batch row {row}")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))
