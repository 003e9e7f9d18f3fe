"""Compute an importance matrix with llama.cpp, as ``llama-imatrix`` does (tools/imatrix).

Method (llama.cpp's, REFERENCE.md "Importance matrix"):

* the calibration text is tokenized with BOS (control tokens are not parsed; one trailing newline
  is dropped, as ``-f FILE`` does) and cut into chunks of ``ctx`` tokens; the last partial chunk
  is dropped, at least two chunks are required. Each chunk is evaluated from an empty KV cache
  with BOS replacing its first token, asking for outputs at every position (so the last layer's
  feed-forward sees every token, as in llama-imatrix);
* a ``cb_eval`` callback observes every ``MUL_MAT`` whose first source is a weight of a repeating
  block (``blk.*``; never ``output.weight``, never a LoRA A/B matrix or a KV view) and whose
  activation input is F32 with at least 16 rows, and every ``MUL_MAT_ID`` on such a weight: it
  adds the squares of the activation input per input column into that weight's sums (per expert
  for ``_ID``, following the routing ids) and counts the rows (per expert);
* the result is llama.cpp's imatrix GGUF (``edge_lora.core.imatrix_file``).

With adapters, they are hot-applied while collecting: the base's weights see the activations the
adapted model produces, which is what a base meant to run with those adapters should be
quantized for.

Speed. The scheduler calls the callback from the thread running ``llama_decode`` once per node
("ask") and once more, after computing, for each node we asked for; the ask path reads two
fields by fixed offsets and the collect path is one numpy reduction over the activation buffer
in place. The output layer is not needed (llama-imatrix skips ``output.weight``), yet asking for
every position's outputs makes llama.cpp compute it: for Gemma 3 270M the 262,144 x 640 head is
most of the work. So once the first micro-batch has shown that no block weight is multiplied
after the ``result_norm`` node, the callback asks for ``result_norm`` and returns false after it,
which the scheduler documents as cancelling the rest of the graph. Measured on Gemma 3 270M
(bench/quantize.py): see the README's imatrix section. Memory: outputs for every position cost
n_batch x n_vocab floats, so the micro-batch is sized to keep that buffer near
``OUTPUT_BUFFER_BYTES``; the text is read and tokenized in blocks, so memory is flat in its
length.
"""

from __future__ import annotations

import codecs
import ctypes
import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_lora.core.context_size import check_ctx
from edge_lora.core.errors import InputError, InputNotFoundError, InternalError, InvalidGGUFError
from edge_lora.core.imatrix_file import Imatrix, ImatrixEntry
from edge_lora.core.progress import NullProgress, ProgressSink
from edge_lora.core.text_sketch import NGRAM, Overlap, TextSketch, ngrams, stream_ngrams, words

MIN_ROWS = 16  # llama-imatrix ignores matrix products over fewer activation rows
MIN_CHUNKS = 2  # llama-imatrix refuses texts shorter than two chunks
MAX_BATCH = 512
OUTPUT_BUFFER_BYTES = 128 * 1024 * 1024  # logits kept per micro-batch (n_batch x n_vocab x 4)
TEXT_BLOCK_CHARS = 1 << 20  # text read and tokenized per block (cut after a blank line)
OVERLAP_LIMIT = 0.01  # share of the evaluation text's 13-grams the calibration text may contain
# ``ppl`` warns from a sample (core/text_sketch) instead: at a share five times higher, seen in at
# least two sampled n-grams, so licence boilerplate shared by unrelated texts does not trip it.
OVERLAP_WARN, OVERLAP_WARN_HITS = 0.05, 2
RESULT_NORM = b"result_norm"  # llama.cpp's name for the final norm, the output layer's input

AdapterSpec = Path | str | tuple[Path | str, float]


# --- ggml's tensor struct (ggml/include/ggml.h, llama-cpp-python 0.3.36); checked at run time ---

class GgmlTensor(ctypes.Structure):
    pass


GgmlTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * 4),
    ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * 16),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * 10),
    ("view_src", ctypes.c_void_p),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * 64),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]
_OP_OFFSET = GgmlTensor.op.offset
_NAME_OFFSET = GgmlTensor.name.offset
GGML_TYPE_F32 = 0
GGML_TYPE_I32 = 26


@dataclass(frozen=True)
class _GgmlOps:
    mul_mat: int
    mul_mat_id: int
    norm_outputs: frozenset[int]  # ops a norm's last step can be (x * w, + b): result_norm's


_ops: _GgmlOps | None = None


def _ggml_ops() -> _GgmlOps:
    """MUL_MAT / MUL_MAT_ID enum values, confirmed by name with the loaded libggml (an enum that
    moved in another build would otherwise silently collect nothing)."""
    global _ops
    if _ops is None:
        from llama_cpp._ggml import libggml

        op_name = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_int)(("ggml_op_name", libggml))
        expected = {2: b"ADD", 7: b"MUL", 29: b"MUL_MAT", 30: b"MUL_MAT_ID"}  # enum ggml_op in ggml.h
        if any(op_name(op) != name for op, name in expected.items()):
            raise InternalError("this llama.cpp build numbers ggml operations differently from ggml.h "
                                "of llama-cpp-python 0.3.36", fix="install llama-cpp-python==0.3.36")
        _ops = _GgmlOps(29, 30, frozenset({2, 7}))
    return _ops


def _check_struct_layout(address: int) -> None:
    """Compare our view of one live tensor with libggml's own accessors."""
    from llama_cpp._ggml import libggml

    get_name = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p)(("ggml_get_name", libggml))
    nbytes = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p)(("ggml_nbytes", libggml))
    t = GgmlTensor.from_address(address)
    expected = t.nb[0] * t.ne[0] + sum((t.ne[i] - 1) * t.nb[i] for i in range(1, 4)) if t.type == GGML_TYPE_F32 else None
    if get_name(address) != t.name or (expected is not None and nbytes(address) != expected):
        raise InternalError("ggml_tensor's layout differs from ggml.h of llama-cpp-python 0.3.36",
                            fix="install llama-cpp-python==0.3.36")


class _ArrayView:
    """numpy's array interface over memory llama.cpp owns (no copy)."""

    __slots__ = ("__array_interface__",)

    def __init__(self, address: int, shape: tuple[int, ...], strides: tuple[int, ...], typestr: str) -> None:
        self.__array_interface__ = {"data": (address, True), "shape": shape, "strides": strides,
                                    "typestr": typestr, "version": 3}


def _tensor_array(t: GgmlTensor, typestr: str = "<f4") -> np.ndarray:
    """[ne3, ne2, ne1, ne0] view of a host tensor with its byte strides."""
    shape = (t.ne[3], t.ne[2], t.ne[1], t.ne[0])
    strides = (t.nb[3], t.nb[2], t.nb[1], t.nb[0])
    return np.asarray(_ArrayView(t.data, shape, strides, typestr))


def _weight_name(raw: bytes) -> bytes:
    """llama-imatrix's filter_tensor_name: ``CUDA0#blk.0.attn_k.weight#0`` -> ``blk.0.attn_k.weight``."""
    if b"#" not in raw:
        return raw
    return raw.split(b"#")[1]


class ImatrixCollector:
    """The ``cb_eval`` callback and the sums it accumulates. ``weights``: names of the model's
    block weights (anything else multiplied — adapters, KV views — is not collected)."""

    def __init__(self, weights: frozenset[bytes]) -> None:
        ops = _ggml_ops()
        self._mul_mat, self._mul_mat_id, self._norm_outputs = ops.mul_mat, ops.mul_mat_id, ops.norm_outputs
        self.weights = weights
        self.sums: dict[str, np.ndarray] = {}  # (n_mat, n_per_row) float64
        self.counts: dict[str, np.ndarray] = {}  # (n_mat,) int64
        self.error: BaseException | None = None
        self.seconds = 0.0  # CPU time spent collecting (the callback's non-ask calls)
        self.calls = 0  # ask and collect calls
        # Early stop after result_norm: unknown until a micro-batch has shown the graph's order.
        self.stop_at_result_norm = False
        self._probing = True
        self._seen_result_norm = False
        self._collected_after_norm = False
        self._layout_checked = False
        from edge_lora.serving.llama_backend import EvalCallback

        self.callback = EvalCallback(self._on_node)

    # --- the callback ---
    def _on_node(self, address: int, ask: bool, _user_data: int) -> bool:
        self.calls += 1
        try:
            if ask:
                return self._wants(address)
            # CPU time of the decoding thread (meaningful on a busy machine); the ask path, about
            # a microsecond a node, is not timed: timing would double it.
            started = time.thread_time()
            try:
                return self._collect(address)
            finally:
                self.seconds += time.thread_time() - started
        except BaseException as exc:  # never let an exception unwind into C; stop the graph
            if self.error is None:
                self.error = exc
            return False

    def _wants(self, address: int) -> bool:
        op = ctypes.c_int.from_address(address + _OP_OFFSET).value
        if op != self._mul_mat and op != self._mul_mat_id:
            return (op in self._norm_outputs and (self._probing or self.stop_at_result_norm)
                    and ctypes.string_at(address + _NAME_OFFSET) == RESULT_NORM)
        t = GgmlTensor.from_address(address)
        if _weight_name(t.src[0].contents.name) not in self.weights:
            return False
        if op == self._mul_mat_id:
            return True  # llama-imatrix collects every indirect product
        src1 = t.src[1].contents
        return src1.ne[1] >= MIN_ROWS and src1.type == GGML_TYPE_F32

    def _collect(self, address: int) -> bool:
        if not self._layout_checked:
            _check_struct_layout(address)
            self._layout_checked = True
        t = GgmlTensor.from_address(address)
        if t.op != self._mul_mat and t.op != self._mul_mat_id:  # result_norm
            self._seen_result_norm = True
            return not self.stop_at_result_norm  # False cancels the rest: the output layer
        if self._seen_result_norm:
            self._collected_after_norm = True
        src0, src1 = t.src[0].contents, t.src[1].contents
        name = _weight_name(src0.name).decode("utf-8", errors="replace")
        if src1.nb[0] != 4 or src1.type != GGML_TYPE_F32:
            raise InternalError(f"activation input of {name} is not contiguous F32 rows")
        x = _tensor_array(src1)
        if t.op == self._mul_mat_id:
            ids = t.src[2].contents
            self._add_indirect(name, x, _tensor_array(ids, "<i4")[0, 0], int(src0.ne[2]))
        else:
            self._add_dense(name, x, int(src0.ne[2]), int(src0.ne[3]))
        return True

    def end_micro_batch(self) -> None:
        """After the first micro-batch: stop early from now on when nothing followed result_norm."""
        if self._probing:
            self._probing = False
            self.stop_at_result_norm = self._seen_result_norm and not self._collected_after_norm
        self._seen_result_norm = False

    # --- accumulation (numpy, also used directly by tests) ---
    def _accumulator(self, name: str, n_mat: int, n_per_row: int, n_counts: int) -> tuple[np.ndarray, np.ndarray]:
        sums = self.sums.get(name)
        if sums is None:
            sums = self.sums[name] = np.zeros((n_mat, n_per_row))
            self.counts[name] = np.zeros(n_counts, dtype=np.int64)
        elif sums.shape != (n_mat, n_per_row):
            raise InternalError(f"inconsistent activation size for {name}: {sums.shape} then {(n_mat, n_per_row)}")
        return sums, self.counts[name]

    def _add_dense(self, name: str, x: np.ndarray, src0_ne2: int = 1, src0_ne3: int = 1) -> None:
        """MUL_MAT: ``x`` [ne3, ne2, ne1, ne0]; a weight with several matrices (ne2 x ne3) gets
        one row of sums per matrix, broadcast as ggml broadcasts, and a single count."""
        n_mat = src0_ne2 * src0_ne3
        ne3, ne2, ne1, ne0 = x.shape
        sums, counts = self._accumulator(name, 1, ne0 * n_mat, 1)
        if n_mat == 1 and ne2 == 1 and ne3 == 1:
            rows = x[0, 0]
            sums[0] += np.einsum("ij,ij->j", rows, rows)
        else:
            flat = sums.reshape(n_mat, ne0)
            for i3 in range(ne3):
                for i2 in range(ne2):
                    rows = x[i3, i2]
                    flat[(i3 % src0_ne3) * src0_ne2 + (i2 % src0_ne2)] += np.einsum("ij,ij->j", rows, rows)
        counts[0] += ne1 * ne2 * ne3 // n_mat
        if not np.isfinite(sums).all():
            raise InvalidGGUFError(f"the activations multiplying {name} are NaN or infinite on this text",
                                   fix="re-convert the model and adapters, or lower the adapter scale")

    def _add_indirect(self, name: str, x: np.ndarray, ids: np.ndarray, n_as: int) -> None:
        """MUL_MAT_ID: ``x`` [1, n_tokens, n_used or 1, ne0], ``ids`` [n_tokens, n_used] expert ids."""
        _, n_tokens, ne1, ne0 = x.shape
        sums, counts = self._accumulator(name, n_as, ne0, n_as)
        if ids.shape[0] != n_tokens:
            raise InternalError(f"routing ids of {name} cover {ids.shape[0]} tokens, activations {n_tokens}")
        if ids.size and (ids.min() < 0 or ids.max() >= n_as):
            raise InternalError(f"routing ids of {name} outside 0..{n_as - 1}")
        for slot in range(ids.shape[1]):
            rows = x[0, :, slot % ne1, :]
            experts = ids[:, slot]
            np.add.at(sums, experts, (rows * rows).astype(np.float64))
            counts += np.bincount(experts, minlength=n_as)
        touched = np.unique(ids)
        if not np.isfinite(sums[touched]).all():
            raise InvalidGGUFError(f"the activations multiplying {name} are NaN or infinite on this text",
                                   fix="re-convert the model and adapters, or lower the adapter scale")

    def imatrix_entries(self) -> dict[str, ImatrixEntry]:
        return {name: ImatrixEntry(self.sums[name], self.counts[name]) for name in sorted(self.sums)}


# --- text: streamed, hashed, checked against the evaluation text ---

def _open_text(path: Path):  # type: ignore[no-untyped-def]
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a text file", fix="give a UTF-8 text file")
    if not path.is_file():
        raise InputNotFoundError(f"text file {path} does not exist", fix="give an existing text file")
    try:
        return open(path, "rb")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}", fix="check the file's permissions") from exc


def text_blocks(path: Path, block_chars: int | None = None) -> Iterator[str]:
    """The file's text in blocks of about ``block_chars`` characters, each cut after a run of
    blank lines (so a block starts a paragraph), with one trailing newline of the file dropped
    (as llama.cpp's ``-f FILE`` does). Line endings are kept as they are."""
    block_chars = block_chars or TEXT_BLOCK_CHARS
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending = ""
    with _open_text(path) as fh:
        while True:
            raw = fh.read(block_chars)
            try:
                pending += decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as exc:
                raise InputError(f"{path} is not UTF-8 text ({exc.reason})", fix="give a UTF-8 text file") from None
            if not raw:
                break
            while len(pending) >= block_chars:
                cut = _paragraph_cut(pending, block_chars)
                yield pending[:cut]
                pending = pending[cut:]
    if pending.endswith("\n"):
        pending = pending[:-1]
    if pending:
        yield pending


def _paragraph_cut(text: str, limit: int) -> int:
    """An index <= limit just after a blank-line run (else after a newline, else ``limit``)."""
    cut = text.rfind("\n\n", 0, limit)
    if cut <= 0:
        cut = text.rfind("\n", 0, limit)
        return cut + 1 if cut > 0 else limit
    while cut < limit and text[cut] == "\n":
        cut += 1
    return cut


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with _open_text(path) as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def text_overlap(calibration: Path, evaluation: str, n: int = NGRAM) -> Overlap:
    """How much of ``evaluation`` (its distinct lower-cased word n-grams) occurs in the
    calibration file, streamed; exact (``TextSketch`` estimates it once the file is gone)."""
    wanted = set(ngrams(words(evaluation), n))
    found = {g for g in stream_ngrams(text_blocks(calibration), n) if g in wanted}
    return Overlap(len(found), len(wanted))


def sketch_of_file(path: Path) -> TextSketch:
    """The n-gram sketch of a text file, streamed (kept with the matrix, see core/text_sketch)."""
    return TextSketch.of_blocks(text_blocks(path))


def check_no_overlap(calibration: Path, evaluation: str, evaluation_name: str) -> Overlap:
    """Refuse a calibration text holding passages of the evaluation text: an importance matrix
    tuned on the very text PPL/KLD are measured on makes the calibrated formats look better
    than they are."""
    overlap = text_overlap(calibration, evaluation)
    if overlap.fraction >= OVERLAP_LIMIT:
        raise InputError(
            f"{calibration} contains {100 * overlap.fraction:.1f}% of the {evaluation_name} "
            f"({overlap.shared} of its {overlap.total} {NGRAM}-word runs): calibrating on the text "
            f"quality is measured on would overstate the result",
            fix="calibrate on other text (the shipped default: edge_lora/data/calibration)")
    return overlap


def check_calibration_text(path: Path | str, evaluation_text: str | None = None,
                           evaluation_name: str = "held-out evaluation text") -> None:
    """Before any long work: the calibration file is readable UTF-8 and does not overlap the
    evaluation text (default: the shipped held-out text ``ppl`` measures on; "" skips)."""
    from edge_lora.analysis.perplexity import default_eval_text

    if evaluation_text is None:
        evaluation_text = default_eval_text()
    if evaluation_text:
        check_no_overlap(Path(path), evaluation_text, evaluation_name)
    else:
        for _ in text_blocks(Path(path)):  # decodes the whole file: bad UTF-8 fails here
            pass


def default_calibration_text() -> Path:
    """The shipped calibration text (GPL-3.0 + LGPL-2.1, see data/calibration/README.md)."""
    from importlib.resources import files

    return Path(str(files("edge_lora.data").joinpath("calibration/gpl-3.0-lgpl-2.1.txt")))


# --- the run ---

@dataclass(frozen=True)
class ImatrixRun:
    imatrix: Imatrix
    seconds: float  # whole run: loading, tokenizing, evaluating
    eval_seconds: float  # evaluating the chunks only
    callback_seconds: float  # CPU time the callback spent collecting (its ask calls untimed)
    callback_calls: int  # ask + collect calls
    chunks: int
    text_tokens: int  # tokens in the whole text (BOS included)
    early_stop: bool  # the output layer was skipped after the first micro-batch

    @property
    def tokens(self) -> int:
        return self.imatrix.chunk_count * self.imatrix.chunk_size


def micro_batch(ctx: int, n_vocab: int) -> int:
    """Tokens per llama_decode: the outputs buffer (n_batch x n_vocab floats) near
    OUTPUT_BUFFER_BYTES, at most MAX_BATCH, split evenly so no micro-batch falls below MIN_ROWS."""
    budget = max(MIN_ROWS * 2, min(MAX_BATCH, OUTPUT_BUFFER_BYTES // (4 * max(1, n_vocab))))
    pieces = -(-ctx // budget)
    return -(-ctx // pieces)


def count_tokens(model, path: Path) -> int:  # type: ignore[no-untyped-def]
    return sum(len(block) for block in _token_blocks(model, path))


def _token_blocks(model, path: Path) -> Iterator[list[int]]:  # type: ignore[no-untyped-def]
    first = True
    for block in text_blocks(path):
        yield model.tokenize(block, add_bos=first, special=False)
        first = False


def calibration_chunks(model, path: Path, ctx: int, n_chunks: int) -> Iterator[list[int]]:  # type: ignore[no-untyped-def]
    """Consecutive ctx-token chunks of the streamed token sequence."""
    buffer: list[int] = []
    done = 0
    for tokens in _token_blocks(model, path):
        buffer = buffer + tokens  # the carried remainder is shorter than one chunk
        pos = 0
        while len(buffer) - pos >= ctx and done < n_chunks:
            yield buffer[pos:pos + ctx]
            pos += ctx
            done += 1
        if done >= n_chunks:
            return
        buffer = buffer[pos:]


def _resolve_adapters(adapters: Sequence[AdapterSpec]) -> list[tuple[Path, float]]:
    out: list[tuple[Path, float]] = []
    for spec in adapters:
        path, scale = spec if isinstance(spec, tuple) else (spec, 1.0)
        path = Path(path)
        if any(path.resolve() == seen.resolve() for seen, _ in out):
            raise InputError(f"adapter {path} given twice", fix="pass each adapter once")
        out.append((path, float(scale)))
    return out


def compute_imatrix(model_path: Path | str, text_path: Path | str, *, ctx: int = 512,
                    adapters: Sequence[AdapterSpec] = (), evaluation_text: str | None = None,
                    evaluation_name: str = "held-out evaluation text", max_chunks: int | None = None,
                    n_threads: int | None = None, progress: ProgressSink = NullProgress()) -> ImatrixRun:
    """The importance matrix of ``model_path`` (with ``adapters`` hot-applied) on the text file
    ``text_path``. ``evaluation_text`` (default: the shipped held-out text ``ppl`` measures on)
    must not overlap the calibration text; pass "" to skip that check. ``max_chunks`` limits the
    work (tests, benches)."""
    from edge_lora.serving.llama_backend import LlamaContext, LlamaModel, LoraAdapter

    started = time.perf_counter()
    model_path, text_path = Path(model_path), Path(text_path)
    check_ctx(ctx)  # the one --ctx range; from 64, every micro-batch keeps >= MIN_ROWS rows
    specs = _resolve_adapters(adapters)
    check_calibration_text(text_path, evaluation_text, evaluation_name)
    text_sha, sketch = sha256_of_file(text_path), sketch_of_file(text_path)
    with LlamaModel(model_path) as model:
        if ctx > model.n_ctx_train:
            raise InputError(f"context {ctx} is larger than the model's training context {model.n_ctx_train}",
                             fix=f"use --ctx {model.n_ctx_train} or less")
        n_text_tokens = count_tokens(model, text_path)
        n_chunks = n_text_tokens // ctx
        if n_chunks < MIN_CHUNKS:
            raise InputError(f"{text_path} has {n_text_tokens} tokens; an importance matrix at context {ctx} "
                             f"needs at least {MIN_CHUNKS * ctx}", fix="give a longer text or a smaller --ctx")
        if max_chunks is not None:
            n_chunks = max(1, min(n_chunks, max_chunks))
        weights = frozenset(t.name.encode() for t in model.info.tensors if t.name.startswith("blk."))
        collector = ImatrixCollector(weights)
        n_batch = micro_batch(ctx, model.n_vocab)
        context = LlamaContext(model, n_ctx=ctx, n_batch=n_batch, n_threads=n_threads,
                               eval_callback=collector.callback)
        loaded = [LoraAdapter(model, path) for path, _ in specs]
        context.set_adapters([(a, scale) for a, (_, scale) in zip(loaded, specs)])
        bos = model.bos if model.add_bos and model.bos >= 0 else None
        eval_started = time.perf_counter()
        progress.start(f"imatrix {model_path.name}", total=n_chunks)
        try:
            for chunk in calibration_chunks(model, text_path, ctx, n_chunks):
                if bos is not None:
                    chunk[0] = bos
                context.clear_kv()
                for start in range(0, ctx, n_batch):
                    context.decode(chunk[start:start + n_batch], pos0=start, logits="all")
                    if collector.error is not None:
                        raise collector.error
                    collector.end_micro_batch()
                progress.advance(1)
        finally:
            progress.finish()
            eval_seconds = time.perf_counter() - eval_started
            context.close()
        entries = collector.imatrix_entries()
    if not entries:
        raise InvalidGGUFError(f"{model_path} multiplied no block weights while evaluating",
                               fix="give a model GGUF of a supported architecture")
    imatrix = Imatrix(entries=entries, datasets=[text_path.name], chunk_count=n_chunks, chunk_size=ctx,
                      text_sha256=text_sha, text_sketch=sketch.encode(), tokens=n_chunks * ctx, model=model_path.name,
                      adapters=[p.name for p, _ in specs])
    return ImatrixRun(imatrix=imatrix, seconds=time.perf_counter() - started, eval_seconds=eval_seconds,
                      callback_seconds=collector.seconds, callback_calls=collector.calls, chunks=n_chunks,
                      text_tokens=n_text_tokens,
                      early_stop=collector.stop_at_result_norm)


# --- after the fact: does an evaluation text overlap the calibration text of a quantized file? ---

@dataclass(frozen=True)
class CalibrationOverlap:
    dataset: str  # the calibration text's name, as recorded
    overlap: Overlap  # sampled n-grams of the evaluation text (see core/text_sketch)

    @property
    def overstated(self) -> bool:
        return self.overlap.shared >= OVERLAP_WARN_HITS and self.overlap.fraction >= OVERLAP_WARN


def calibration_overlap(model: Path, evaluation: str) -> CalibrationOverlap | None:
    """How much of ``evaluation`` the calibration text of ``model``'s importance matrix holds,
    from the sketch its manifest row keeps. None when that is unknown: no manifest beside the
    file, no row, an uncalibrated file, or a matrix computed elsewhere (no sketch)."""
    from edge_lora.core.manifest import MANIFEST_FILE, Manifest

    model = model.absolute()
    if not (model.parent / MANIFEST_FILE).is_file():
        return None
    try:
        row = Manifest.load(model.parent).file(model)
    except InputError:  # an unreadable manifest costs the warning, not the measurement
        return None
    record = row.imatrix if row is not None else None
    sketch = TextSketch.decode(record.get("text_sketch")) if record else None
    if record is None or sketch is None:
        return None
    return CalibrationOverlap(str(record.get("dataset") or "the calibration text"), sketch.overlap_of(evaluation))
