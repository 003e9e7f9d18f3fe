"""Prove that llama.cpp loads a GGUF — in a child process, where an abort inside llama.cpp
(GGML_ASSERT, a C++ exception thrown through the C API) can only end the child.

Two depths:

- ``vocab``: ``vocab_only`` load plus a tokenize/detokenize round of a sample text (an unknown
  pre-tokenizer or a vocabulary llama.cpp refuses is caught here, not by the user's first
  ``run``). ``model`` runs the same round.
- ``model``: the whole model as llama.cpp's ``no_alloc`` load sees it (hyperparameters,
  vocabulary, every tensor's name, type and shape against the architecture, its data range
  against the file size) and a small context, which builds the compute graphs — where the graph
  builders' asserts fire — without reading or allocating a weight. What ``convert`` proves of
  every file it writes before publishing it, the runtime's preflight for a file it has not
  loaded before, and the quantizer's check of its source.

The child imports only llama-cpp-python's ctypes bindings (not its high-level API, which pulls in
numpy and jinja2), so a check costs little more than an interpreter start.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edge_lora.core import constants
from edge_lora.core.child_run import python_module_command, run_child
from edge_lora.core.errors import InternalError, InvalidGGUFError

if TYPE_CHECKING:  # the child must not import gguf/numpy: it is timed
    from edge_lora.core.gguf_check import FileIdentity

logger = logging.getLogger(__name__)

LoadDepth = Literal["vocab", "model"]
LOAD_CHECK_TIMEOUT_S = 60.0
CHILD_MODULE = "edge_lora.converters.load_check"
# Exercises byte-level BPE regexes, SentencePiece byte fallback, digits, CJK and a newline.
SAMPLE_TEXT = "Hello, world! 123 4567\n\tÀ propos: naïve café — 日本語 😀 <b>x</b>"
PREFLIGHT_N_CTX = 256


@dataclass(frozen=True)
class LoadCheck:
    path: Path
    depth: LoadDepth
    n_vocab: int  # 0 when the verdict came from the cache
    seconds: float  # the child's whole life, interpreter start included; 0 from the cache
    cached: bool = False


# --- files already proven to load, by identity (a replaced or rewritten file is checked again) ---

_proven: set[str] = set()
_proven_lock = threading.Lock()


def _llama_version() -> str:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def _proof_name(identity: FileIdentity, depth: LoadDepth) -> str:
    text = json.dumps([list(identity), depth, _llama_version()])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _proof_file(name: str) -> Path:
    return constants.EDGE_LORA_CACHE / constants.NATIVE_CACHE_DIR / "loads" / name


def _is_proven(identity: FileIdentity, depth: LoadDepth) -> bool:
    names = [_proof_name(identity, d) for d in (("model",) if depth == "model" else ("model", "vocab"))]
    with _proven_lock:
        if any(n in _proven for n in names):
            return True
    if any(_proof_file(n).is_file() for n in names):
        with _proven_lock:
            _proven.update(names)
        return True
    return False


def remember_proven(identity: FileIdentity, depth: LoadDepth) -> None:
    """Record a pass of a check run on a file before its identity was final (convert checks the
    file it is still writing, whose tensor table is already complete)."""
    _remember_proven(identity, depth)


def _remember_proven(identity: FileIdentity, depth: LoadDepth) -> None:
    name = _proof_name(identity, depth)
    with _proven_lock:
        _proven.add(name)
    try:
        marker = _proof_file(name)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError as exc:  # a read-only cache only costs a check per process
        logger.debug("could not record a load check in %s: %s", constants.EDGE_LORA_CACHE, exc)


def remember_renamed(before: FileIdentity, after: FileIdentity) -> None:
    """A proven file that was then only renamed (atomic publishing sets its ctime) stays proven."""
    if before.same_content_as(after) and _is_proven(before, "model"):
        _remember_proven(after, "model")


def proc_fd_path(fd: int) -> str | None:
    """A name that opens exactly the file behind ``fd`` (Linux), or None."""
    return f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else None


def check_loads(path: Path | str, *, depth: LoadDepth, fix: str, timeout: float = LOAD_CHECK_TIMEOUT_S,
                fd: int | None = None, identity: FileIdentity | None = None) -> LoadCheck:
    """Load ``path`` in llama.cpp in a child process; raise InvalidGGUFError (with ``fix``) when
    llama.cpp refuses it, aborts on it or hangs. With ``fd`` (an open descriptor of ``path``) the
    child loads that very file, whatever ``path`` names meanwhile. With ``identity`` (of the file
    checked), a file already proven at this depth is not loaded again, and a pass is remembered
    under EDGE_LORA_CACHE."""
    path = Path(path)
    if identity is not None and _is_proven(identity, depth):
        return LoadCheck(path=path, depth=depth, n_vocab=0, seconds=0.0, cached=True)
    child_path = proc_fd_path(fd) if fd is not None else None
    result = run_child(python_module_command(CHILD_MODULE, [depth, child_path or str(path)]),
                       timeout=timeout, pass_fds=(fd,) if child_path and fd is not None else ())
    if result.returncode == 0:
        try:
            report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise InternalError(f"the llama.cpp load check of {path} printed no verdict",
                                fix="report this as a bug") from None
        if report.get("ok"):
            if identity is not None:
                _remember_proven(identity, depth)
            return LoadCheck(path=path, depth=depth, n_vocab=int(report.get("n_vocab", 0)), seconds=result.seconds)
        raise InvalidGGUFError(f"llama.cpp cannot load {path}: {report.get('error') or 'no reason given'}", fix=fix)
    detail = result.crash_line()
    if result.timed_out or result.signal is not None:
        raise InvalidGGUFError(f"llama.cpp {result.describe_failure()} loading {path}"
                               + (f" ({detail})" if detail else "") + "; this process was not affected", fix=fix)
    raise InternalError(f"the llama.cpp load check of {path} {result.describe_failure()}"
                        + (f": {detail}" if detail else ""), fix="check the llama-cpp-python installation")


# --- the child ---

def import_llama_bindings() -> Any:
    """llama_cpp.llama_cpp (the ctypes bindings) without running llama_cpp/__init__.py, which
    imports the high-level API too (~1 s of numpy/jinja2 imports in a fresh interpreter).
    llama-cpp-python is pinned; if its layout ever changes, the ordinary import is used."""
    import importlib.util
    import types

    if "llama_cpp" not in sys.modules:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is not None and spec.submodule_search_locations:
            package = types.ModuleType("llama_cpp")
            package.__path__ = list(spec.submodule_search_locations)
            package.__spec__ = spec
            sys.modules["llama_cpp"] = package
    try:
        import llama_cpp.llama_cpp as llama
    except ImportError:
        sys.modules.pop("llama_cpp", None)
        import llama_cpp.llama_cpp as llama
    return llama


class LlamaLog:
    """llama.cpp's log, kept (all levels) so a refusal can say why and callers can see which
    buffer types the loader chose."""

    def __init__(self, llama: Any) -> None:
        self.lines: list[tuple[int, str]] = []

        @llama.llama_log_callback
        def callback(level: int, text: bytes, user_data: Any) -> None:
            self.lines.append((level, text.decode("utf-8", errors="replace")))

        self._callback = callback  # keep a reference: ctypes does not
        llama.llama_log_set(callback, None)

    def errors(self) -> str:
        found = [text.strip() for level, text in self.lines if level == 4 and text.strip()]
        return "; ".join(found[-2:])

    def text(self) -> str:
        return "".join(text for _, text in self.lines)


def _tokenize(llama: Any, vocab: Any, text: str) -> list[int]:
    data = text.encode("utf-8")
    capacity = len(data) + 16
    buf = (llama.llama_token * capacity)()
    n = llama.llama_tokenize(vocab, data, len(data), buf, capacity, True, True)
    if n < 0:
        capacity = -n
        buf = (llama.llama_token * capacity)()
        n = llama.llama_tokenize(vocab, data, len(data), buf, capacity, True, True)
    return list(buf[:max(n, 0)])


def _vocab_problem(llama: Any, vocab: Any) -> str | None:
    """States llama.cpp loads without complaint but aborts on at the first tokenize."""
    for name, wants, token in (("BOS", llama.llama_vocab_get_add_bos, llama.llama_vocab_bos),
                               ("EOS", llama.llama_vocab_get_add_eos, llama.llama_vocab_eos),
                               ("SEP", llama.llama_vocab_get_add_sep, llama.llama_vocab_sep)):
        if wants(vocab) and token(vocab) < 0:
            return f"the tokenizer adds a {name} token but the vocabulary has none"
    return None


def _child(depth: str, path: str) -> dict[str, Any]:
    import ctypes

    llama = import_llama_bindings()
    log = LlamaLog(llama)
    llama.llama_backend_init()
    params = llama.llama_model_default_params()
    params.n_gpu_layers = 0
    params.vocab_only = depth == "vocab"
    params.use_extra_bufts = False  # repacking would read every weight
    # no_alloc: llama.cpp reads the hyperparameters, the vocabulary and the tensor table, checks
    # every tensor's shape and type against the architecture and its data range against the
    # file size, then stops short of the weights (it asserts that nothing is mapped: mmap would
    # prefault the whole file with MAP_POPULATE).
    params.no_alloc = True
    params.load_mode = llama.LLAMA_LOAD_MODE_NONE
    model = llama.llama_model_load_from_file(path.encode(), params)
    if not model:
        return {"ok": False, "error": log.errors() or "llama_model_load_from_file returned NULL"}
    vocab = llama.llama_model_get_vocab(model)
    n_vocab = llama.llama_vocab_n_tokens(vocab)
    if n_vocab <= 0:
        return {"ok": False, "error": "the vocabulary is empty"}
    problem = _vocab_problem(llama, vocab)
    if problem:
        return {"ok": False, "error": problem}
    tokens = _tokenize(llama, vocab, SAMPLE_TEXT)
    buf = ctypes.create_string_buffer(256)
    for token in tokens:
        if not 0 <= token < n_vocab:
            return {"ok": False, "error": f"tokenizing a sample gave token {token}, outside the vocabulary"}
        llama.llama_token_to_piece(vocab, token, buf, 256, 0, True)
    if depth == "model":
        ctx_params = llama.llama_context_default_params()
        ctx_params.n_ctx = PREFLIGHT_N_CTX
        ctx_params.n_batch = ctx_params.n_ubatch = 64
        ctx_params.n_seq_max = 1
        ctx_params.n_threads = ctx_params.n_threads_batch = 1
        ctx = llama.llama_init_from_model(model, ctx_params)
        if not ctx:
            return {"ok": False, "error": log.errors() or "llama.cpp could not create a context"}
        llama.llama_free(ctx)
    llama.llama_model_free(model)
    return {"ok": True, "n_vocab": n_vocab}


def main(argv: Sequence[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("vocab", "model"):
        print("usage: python -m edge_lora.converters.load_check vocab|model FILE.gguf", file=sys.stderr)
        return 2
    print(json.dumps(_child(argv[0], argv[1])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
