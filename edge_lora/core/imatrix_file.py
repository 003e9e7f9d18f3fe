"""llama.cpp's importance-matrix file: the GGUF ``llama-imatrix`` writes and ``llama-quantize
--imatrix`` reads (REFERENCE.md "Importance matrix").

Layout: ``general.type = "imatrix"``, ``imatrix.datasets`` (string array), ``imatrix.chunk_count``
and ``imatrix.chunk_size`` (u32); per model weight two F32 tensors, ``<weight>.in_sum2``
(ne = [n_per_row, n_mat]: the sum of squared activations per input column, per matrix — one
matrix for a dense weight, one per expert for a stacked MoE weight) and ``<weight>.counts``
(ne = [1, n_mat]: how many activation rows were summed). No ``general.architecture``, as
llama.cpp writes it. edge-lora adds keys of its own under ``edge_lora.imatrix.`` (the hash of
the calibration text, tokens, the model and adapters it was computed on), which llama.cpp ignores.

The quantizer uses mean squares: ``in_sum2 / counts``, and 1 for a matrix never reached (an
expert no calibration token was routed to), exactly as ``llama-quantize`` loads the file.

This module only reads and writes files it is handed (layer 1): computing a matrix needs
llama.cpp and lives in ``edge_lora.analysis.imatrix``; quantizing with one lives in the converters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from edge_lora.core.atomic import atomic_path, ensure_writable_dir
from edge_lora.core.errors import ImatrixError, InvalidGGUFError
from edge_lora.core.gguf_check import ArraySummary, GGUFInfo, validate_gguf

IMATRIX_TYPE = gguf.GGUFType.IMATRIX  # "imatrix"
KEY_DATASETS = gguf.Keys.IMatrix.DATASETS
KEY_CHUNK_COUNT = gguf.Keys.IMatrix.CHUNK_COUNT
KEY_CHUNK_SIZE = gguf.Keys.IMatrix.CHUNK_SIZE
# File names: edge-lora writes ``<stem>.imatrix.gguf``; llama-imatrix's default is ``imatrix.gguf``.
IMATRIX_SUFFIX = ".imatrix.gguf"
LLAMA_IMATRIX_DEFAULT_NAME = "imatrix.gguf"
SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"
# Keys llama-quantize (and edge-lora's quantizer) write into a file quantized with a matrix.
QUANTIZE_IMATRIX_FILE = "quantize.imatrix.file"
QUANTIZE_IMATRIX_DATASET = "quantize.imatrix.dataset"
QUANTIZE_IMATRIX_ENTRIES = "quantize.imatrix.entries_count"
QUANTIZE_IMATRIX_CHUNKS = "quantize.imatrix.chunks_count"
# edge-lora's provenance keys: what the manifest records for a file quantized with this matrix.
KEY_TEXT_SHA256 = "edge_lora.imatrix.text_sha256"
KEY_TEXT_SKETCH = "edge_lora.imatrix.text_sketch"  # core/text_sketch: spots evaluation text it overlaps
KEY_TOKENS = "edge_lora.imatrix.tokens"
KEY_MODEL = "edge_lora.imatrix.model"
KEY_ADAPTERS = "edge_lora.imatrix.adapters"


def is_imatrix_file_name(path: Path | str) -> bool:
    """An importance matrix by its name (``x.imatrix.gguf``, ``imatrix.gguf``): not a model file."""
    name = Path(path).name.lower()
    return name == LLAMA_IMATRIX_DEFAULT_NAME or name.endswith(IMATRIX_SUFFIX)


@dataclass
class ImatrixEntry:
    """One weight's statistics: ``sums`` (n_mat, n_per_row) and ``counts`` (n_mat,)."""

    sums: np.ndarray
    counts: np.ndarray

    @property
    def n_per_row(self) -> int:
        return int(self.sums.shape[1])

    @property
    def n_mat(self) -> int:
        return int(self.sums.shape[0])

    def mean_squares(self) -> np.ndarray:
        """What llama-quantize hands the quantizer: float32 ``sums / counts`` per matrix, laid out
        matrix after matrix; a matrix with count 0 gets all ones (llama-quantize's rule)."""
        sums = self.sums.astype(np.float32)
        counts = self.counts.astype(np.float32)
        out = np.ones_like(sums)
        reached = counts > 0
        out[reached] = sums[reached] / counts[reached][:, None]
        return out.reshape(-1)


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry]
    datasets: list[str]
    chunk_count: int
    chunk_size: int
    text_sha256: str | None = None  # of the calibration text, when edge-lora computed it
    text_sketch: str | None = None  # TextSketch.encode() of the calibration text's n-grams
    tokens: int | None = None  # calibration tokens evaluated (chunk_count x chunk_size)
    model: str | None = None  # file name of the model it was computed on
    adapters: list[str] = field(default_factory=list)  # adapter file names hot-applied meanwhile


def write_imatrix(path: Path | str, imatrix: Imatrix) -> Path:
    """Write ``imatrix`` to ``path`` atomically (``.partial``, fsync, read back, rename)."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    _check_entries(imatrix.entries, str(path))
    with atomic_path(path, validate=read_imatrix) as tmp:
        writer = gguf.GGUFWriter(tmp, arch="")  # an empty arch writes no general.architecture, as llama.cpp
        writer.add_type(IMATRIX_TYPE)
        writer.add_array(KEY_DATASETS, list(imatrix.datasets))
        writer.add_uint32(KEY_CHUNK_COUNT, int(imatrix.chunk_count))
        writer.add_uint32(KEY_CHUNK_SIZE, int(imatrix.chunk_size))
        if imatrix.text_sha256 is not None:
            writer.add_string(KEY_TEXT_SHA256, imatrix.text_sha256)
        if imatrix.text_sketch is not None:
            writer.add_string(KEY_TEXT_SKETCH, imatrix.text_sketch)
        if imatrix.tokens is not None:
            writer.add_uint64(KEY_TOKENS, int(imatrix.tokens))
        if imatrix.model is not None:
            writer.add_string(KEY_MODEL, imatrix.model)
        if imatrix.adapters:
            writer.add_array(KEY_ADAPTERS, list(imatrix.adapters))
        for name in sorted(imatrix.entries):  # llama-imatrix's deterministic order
            entry = imatrix.entries[name]
            writer.add_tensor(name + SUMS_SUFFIX, np.ascontiguousarray(entry.sums, dtype=np.float32))
            writer.add_tensor(name + COUNTS_SUFFIX,
                              np.ascontiguousarray(entry.counts, dtype=np.float32).reshape(entry.n_mat, 1))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _check_entries(entries: dict[str, ImatrixEntry], source: str) -> None:
    if not entries:
        raise ImatrixError(f"{source} holds no importance data", fix="compute it with `edge-lora imatrix`")
    for name, entry in entries.items():
        if entry.sums.ndim != 2 or entry.counts.shape != (entry.sums.shape[0],):
            raise ImatrixError(f"{source}: entry {name} has sums of shape {entry.sums.shape} and counts of "
                               f"shape {entry.counts.shape}", tensor=name,
                               fix="recompute the importance matrix")
        if not (np.isfinite(entry.sums).all() and np.isfinite(entry.counts).all()):
            raise ImatrixError(f"{source}: entry {name} holds NaN or infinite values", tensor=name,
                               fix="recompute the importance matrix; the model produced non-finite activations")
        if (entry.sums < 0).any() or (entry.counts < 0).any():
            raise ImatrixError(f"{source}: entry {name} holds negative sums of squares or counts", tensor=name,
                               fix="recompute the importance matrix")


def _uint(info: GGUFInfo, key: str) -> int:
    value = info.metadata.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ImatrixError(f"{info.path} has no valid {key} (found {value!r})",
                           fix="recompute the importance matrix with `edge-lora imatrix` or llama-imatrix")
    return value


def _strings(info: GGUFInfo, key: str) -> list[str]:
    value = info.metadata.get(key, [])
    if isinstance(value, ArraySummary):
        return []  # a list too long to keep: provenance only, not needed to quantize
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImatrixError(f"{info.path}: {key} is not a list of strings",
                           fix="recompute the importance matrix")
    return list(value)


def read_imatrix(path: Path | str) -> Imatrix:
    """Read and validate an imatrix GGUF: type, metadata, paired F32 tensors of consistent shapes,
    finite non-negative values. Raises ImatrixError (or InvalidGGUFError for a malformed GGUF)."""
    path = Path(path)
    info = validate_gguf(path)
    if info.general_type != IMATRIX_TYPE:
        raise ImatrixError(f"{path} is not an importance matrix (general.type={info.general_type!r})",
                           fix="give a file written by `edge-lora imatrix` or llama-imatrix")
    datasets = _strings(info, KEY_DATASETS)
    chunk_count, chunk_size = _uint(info, KEY_CHUNK_COUNT), _uint(info, KEY_CHUNK_SIZE)
    sums_of: dict[str, tuple[int, int, int]] = {}  # weight -> (offset, n_per_row, n_mat)
    counts_of: dict[str, tuple[int, int]] = {}  # weight -> (offset, n_mat)
    for t in info.tensors:
        if t.type_name != "F32":
            raise ImatrixError(f"{path}: tensor {t.name} is {t.type_name}, not F32", fix="recompute the importance matrix")
        if t.name.endswith(SUMS_SUFFIX) and len(t.shape) == 2:
            sums_of[t.name[:-len(SUMS_SUFFIX)]] = (t.offset, t.shape[0], t.shape[1])
        elif t.name.endswith(COUNTS_SUFFIX) and len(t.shape) == 2 and t.shape[0] == 1:
            counts_of[t.name[:-len(COUNTS_SUFFIX)]] = (t.offset, t.shape[1])
        else:
            raise ImatrixError(f"{path}: tensor {t.name} of shape {list(t.shape)} is neither "
                               f"<weight>{SUMS_SUFFIX} [n_per_row, n_mat] nor <weight>{COUNTS_SUFFIX} [1, n_mat]",
                               fix="recompute the importance matrix")
    for name in sorted(set(sums_of) ^ set(counts_of)):
        raise ImatrixError(f"{path}: weight {name} has {'sums' if name in sums_of else 'counts'} but no "
                           f"{'counts' if name in sums_of else 'sums'}", tensor=name,
                           fix="recompute the importance matrix")
    entries: dict[str, ImatrixEntry] = {}
    try:
        with open(path, "rb") as fh:
            for name, (offset, n_per_row, n_mat) in sums_of.items():
                counts_offset, counts_mat = counts_of[name]
                if counts_mat != n_mat:
                    raise ImatrixError(f"{path}: weight {name} has sums for {n_mat} matrices but counts for "
                                       f"{counts_mat}", tensor=name, fix="recompute the importance matrix")
                sums = _read_f32(fh, offset, n_mat * n_per_row).reshape(n_mat, n_per_row)
                counts = _read_f32(fh, counts_offset, n_mat)
                entries[name] = ImatrixEntry(sums, counts)
    except OSError as exc:
        raise InvalidGGUFError(f"cannot read {path}: {exc.strerror or exc}", fix="check the file") from exc
    _check_entries(entries, str(path))
    for name, entry in entries.items():
        if (entry.counts != np.round(entry.counts)).any():
            raise ImatrixError(f"{path}: weight {name} has fractional counts", tensor=name,
                               fix="recompute the importance matrix")
    text_sha = info.metadata.get(KEY_TEXT_SHA256)
    sketch = info.metadata.get(KEY_TEXT_SKETCH)
    tokens = info.metadata.get(KEY_TOKENS)
    model = info.metadata.get(KEY_MODEL)
    return Imatrix(entries=entries, datasets=datasets, chunk_count=chunk_count, chunk_size=chunk_size,
                   text_sha256=text_sha if isinstance(text_sha, str) else None,
                   text_sketch=sketch if isinstance(sketch, str) else None,
                   tokens=tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None,
                   model=model if isinstance(model, str) else None,
                   adapters=_strings(info, KEY_ADAPTERS) if KEY_ADAPTERS in info.metadata else [])


def _read_f32(fh, offset: int, count: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    fh.seek(offset)
    data = np.fromfile(fh, dtype="<f4", count=count)
    if data.size != count:
        raise ImatrixError(f"{fh.name} ends inside a tensor", fix="recompute the importance matrix")
    return data.astype(np.float32)


def imatrix_weight_names(info: GGUFInfo) -> list[str]:
    """The model weights an importance matrix must cover: every matrix of a repeating block
    (``blk.N.*.weight`` with two or more dimensions), which llama.cpp multiplies activations by.
    ``token_embd`` is a row lookup, and ``output.weight`` is left out as llama-imatrix leaves it
    out by default; the quantizer uses no importance data for them."""
    return [t.name for t in info.tensors
            if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) >= 2]


def check_imatrix_fits(imatrix: Imatrix, model: GGUFInfo, *, source: str = "the importance matrix") -> None:
    """Raise ImatrixError naming the tensor when ``imatrix`` does not fit ``model``: a weight it
    must cover has no entry, an entry's size differs from what llama.cpp's quantizer expects
    (row length x experts), or an entry names a tensor the model does not have (computed on
    another model). llama.cpp itself would quantize the first silently without importance data,
    abort on the second, and ignore the third."""
    fix = f"compute the importance matrix on this model: edge-lora imatrix {model.path.name} --text TEXT"
    for name, entry in imatrix.entries.items():
        tensor = model.tensor(name)
        if tensor is None:
            raise ImatrixError(f"{source} has an entry for {name}, which {model.path.name} does not have "
                               f"(it was computed on another model)", tensor=name, fix=fix)
        # llama.cpp's quantizer takes row length x matrices (experts) values, matrix after matrix.
        n_mat = tensor.shape[2] if len(tensor.shape) > 2 else 1
        if entry.sums.size != tensor.shape[0] * n_mat or entry.n_mat not in (1, n_mat):
            raise ImatrixError(f"{source} entry {name} covers {entry.n_mat} x {entry.n_per_row} columns; "
                               f"{model.path.name}'s tensor needs {n_mat} x {tensor.shape[0]}",
                               tensor=name, fix=fix)
    for name in imatrix_weight_names(model):
        if name not in imatrix.entries:
            raise ImatrixError(f"{source} has no entry for {name} of {model.path.name}", tensor=name, fix=fix)


def mean_squares_table(imatrix: Imatrix, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """name -> float32 mean squares, the data ``llama_model_quantize`` takes (``names``: a subset)."""
    wanted = imatrix.entries if names is None else {n: imatrix.entries[n] for n in names}
    return {name: entry.mean_squares() for name, entry in wanted.items()}


def calibration_of(model: GGUFInfo) -> str | None:
    """For a model file quantized with an importance matrix: ``"<imatrix file> (<dataset>)"``
    from the ``quantize.imatrix.*`` keys it carries; None for an uncalibrated file."""
    name = model.metadata.get(QUANTIZE_IMATRIX_FILE)
    if not isinstance(name, str):
        return None
    dataset = model.metadata.get(QUANTIZE_IMATRIX_DATASET)
    return f"{name} ({dataset})" if isinstance(dataset, str) and dataset else name
