"""Quantization through llama.cpp's own quantizer (``llama_model_quantize``).

Each format runs in a child process: an abort inside llama.cpp (GGML_ABORT on something we
failed to foresee) then costs that one format, not the whole ladder or the CLI. The child
writes ``<name>.partial``; the parent validates the header and the file type, then
``os.replace``s it. Formats run one after another by default, each with every core. Measured
(bench/quantize.py, Gemma 3 270M, whole ladder, 2 cores): in-process llama.cpp 27.8 s; ours
sequential 31.2 s (1.12x: interpreter start + validation per format); two at once 22.2 s
(0.80x) but two quantizers' memory at the same time, so ``workers=2`` is opt-in.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from edge_lora.core import constants
from edge_lora.core.atomic import check_free_space, ensure_writable_dir, partial_path, publish
from edge_lora.core.errors import EdgeLoraError, InputError, OutputError, QuantizeError
from edge_lora.core.gguf_check import validate_gguf
from edge_lora.core.imatrix_file import (QUANTIZE_IMATRIX_CHUNKS, QUANTIZE_IMATRIX_DATASET, QUANTIZE_IMATRIX_ENTRIES,
                                         QUANTIZE_IMATRIX_FILE, check_imatrix_fits, read_imatrix)
from edge_lora.core.progress import NullProgress, ProgressSink

# llama_ftype (llama.h), in llama.cpp's size order: smallest file first.
QUANT_TYPES: dict[str, int] = {
    "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15,
    "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7,
}
# The IQ ladder (``--quant iq``), smallest file first. llama.cpp's quantizer refuses the
# IQ2 / IQ3_XXS file types without an importance matrix (tensor_requires_imatrix). Rows whose
# length is not a multiple of 256 (Gemma 3 270M's 640) fall back to IQ4_NL (block 32).
IQ_TYPES: dict[str, int] = {
    "IQ2_XXS": 19, "IQ2_XS": 20, "IQ2_S": 28, "IQ3_XXS": 23, "IQ3_S": 26, "IQ4_XS": 30, "IQ4_NL": 25,
}
NEEDS_IMATRIX = frozenset({"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"})
ALL_TYPES: dict[str, int] = {**QUANT_TYPES, **IQ_TYPES}
# Bits per weight llama.cpp's quantize README reports (Llama-3.1-8B): for the free-space check.
EXPECTED_BPW: dict[str, float] = {
    "Q2_K": 3.16, "Q3_K_S": 3.64, "Q3_K_M": 4.00, "Q3_K_L": 4.30, "Q4_K_S": 4.67, "Q4_K_M": 4.89,
    "Q5_K_S": 5.57, "Q5_K_M": 5.70, "Q6_K": 6.56, "Q8_0": 8.50,
    "IQ2_XXS": 2.38, "IQ2_XS": 2.59, "IQ2_S": 2.74, "IQ3_XXS": 3.25, "IQ3_S": 3.66, "IQ4_XS": 4.46, "IQ4_NL": 4.68,
}
# --quant words for whole ladders: `all` (K-quants + Q8_0), `iq`; `all,iq` asks for both.
LADDERS: dict[str, tuple[str, ...]] = {"all": tuple(QUANT_TYPES), "iq": tuple(IQ_TYPES)}
# Source file types we quantize from (llama_ftype): ALL_F32, MOSTLY_F16, MOSTLY_BF16.
UNQUANTIZED_FILE_TYPES: dict[int, str] = {0: "F32", 1: "F16", 32: "BF16"}
CHILD_FAILED = 3  # the child's exit code when llama_model_quantize returned an error
FULL_PRECISION_SUFFIXES = ("-F16", "-BF16", "-F32")


def parse_quant_list(spec: str | Iterable[str]) -> list[str]:
    """``all`` | ``iq`` | ``none`` | ``Q4_K_M,IQ4_XS`` | ``all,iq`` (case-insensitive) -> ordered,
    de-duplicated names."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    items = [s for s in items if s]
    if not items or [s.lower() for s in items] == ["none"]:
        return []
    names: list[str] = []
    for item in items:
        expanded = LADDERS.get(item.lower(), (item.upper(),))
        for name in expanded:
            if name not in ALL_TYPES:
                raise InputError(f"unknown quantization type {item!r}",
                                 fix=f"use all (K-quants), iq (IQ formats), none, or a comma list of "
                                     f"{', '.join(ALL_TYPES)}")
            if name not in names:
                names.append(name)
    return names


def check_imatrix_given(names: Sequence[str], imatrix: object | None) -> None:
    """llama.cpp refuses the very-low-bit IQ file types without an importance matrix: say so
    before any work, with the fix."""
    needing = [n for n in names if n in NEEDS_IMATRIX]
    if needing and imatrix is None:
        raise InputError(f"{', '.join(needing)} need{'s' if len(needing) == 1 else ''} an importance matrix "
                         f"(llama.cpp refuses to make {'it' if len(needing) == 1 else 'them'} without one)",
                         fix="add --calibrate TEXT (e.g. the shipped edge_lora/data/calibration text) or "
                             "--imatrix FILE from `edge-lora imatrix`")


def model_stem(src: Path) -> str:
    """``gemma-F16.gguf`` -> ``gemma``: quant files are named ``<stem>-<TYPE>.gguf``."""
    stem = src.name.removesuffix(".gguf")
    for suffix in FULL_PRECISION_SUFFIXES:
        if stem.upper().endswith(suffix):
            return stem[:-len(suffix)]
    return stem


def check_quantizable(src: Path) -> int:
    """Validate the source header; refuse adapters and already-quantized files. Returns its
    tensor data size in bytes."""
    info = validate_gguf(src, expect_type="model")
    if info.file_type not in UNQUANTIZED_FILE_TYPES:
        label = f"file type {info.file_type}" if info.file_type is not None else "no general.file_type"
        raise InputError(
            f"{src} is already quantized ({label}); re-quantizing loses quality twice",
            fix="quantize from the F16/BF16/F32 file written by `edge-lora convert`")
    return info.tensor_data_bytes


def _imatrix_params(path: str) -> tuple[object, object, list[object]]:
    """``params.imatrix`` and ``params.kv_overrides`` for the importance matrix at ``path``, as
    llama-quantize builds them: {name, mean squares, size} entries ended by a NULL name, and
    ``quantize.imatrix.*`` keys recorded in the output file. The third item keeps the buffers alive."""
    import numpy as np

    import llama_cpp.llama_cpp as llama

    imatrix = read_imatrix(path)
    keep: list[object] = []
    entries = (llama.llama_model_imatrix_data * (len(imatrix.entries) + 1))()  # zeroed: last name NULL
    for slot, (name, entry) in zip(entries, imatrix.entries.items()):
        values = np.ascontiguousarray(entry.mean_squares(), dtype=np.float32)
        keep.append(values)
        slot.name = name.encode()
        slot.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        slot.size = values.size
    overrides = (llama.llama_model_kv_override * 5)()  # zeroed: the last key is empty
    keys: list[tuple[str, str | int]] = [
        (QUANTIZE_IMATRIX_FILE, Path(path).name),
        (QUANTIZE_IMATRIX_DATASET, imatrix.datasets[0] if imatrix.datasets else ""),
        (QUANTIZE_IMATRIX_ENTRIES, len(imatrix.entries)), (QUANTIZE_IMATRIX_CHUNKS, imatrix.chunk_count)]
    for slot, (key, value) in zip(overrides, keys):
        slot.key = key.encode()
        if isinstance(value, str):
            slot.tag, slot.value.val_str = llama.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()[:127]
        else:
            slot.tag, slot.value.val_i64 = llama.LLAMA_KV_OVERRIDE_TYPE_INT, value
    return entries, overrides, keep


def _child_quantize(src: str, dst: str, ftype: int, nthread: int, imatrix: str | None = None) -> int:
    """Runs in the child process (``python -m edge_lora.converters.quantize``)."""
    import sys

    import llama_cpp.llama_cpp as llama

    @llama.llama_log_callback
    def errors_only(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level >= 3:  # ggml WARN / ERROR: the parent quotes the last lines on failure
            sys.stderr.write(text.decode("utf-8", errors="replace"))

    llama.llama_log_set(errors_only, ctypes.c_void_p(0))
    llama.llama_backend_init()
    params = llama.llama_model_quantize_default_params()
    params.nthread = nthread
    params.ftype = ftype
    if imatrix is not None:
        entries, overrides, _buffers = _imatrix_params(imatrix)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama.llama_model_imatrix_data))
        params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama.llama_model_kv_override))
    return int(llama.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)))


def _validator(ftype: int) -> Callable[[Path], None]:
    def validate(path: Path) -> None:
        info = validate_gguf(path, expect_type="model")
        if info.file_type != ftype:
            raise QuantizeError(f"llama.cpp wrote file type {info.file_type}, expected {ftype}")
    return validate


@dataclass
class QuantJob:
    """One format in flight: its child process and where it writes."""

    name: str
    dst: Path
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    started: float


@dataclass
class QuantResult:
    name: str
    path: Path | None
    ok: bool
    seconds: float
    error: str | None = None


def _start(src: Path, dst: Path, name: str, nthread: int, imatrix: Path | None) -> QuantJob:
    # A fresh interpreter (not fork, not multiprocessing's spawn, which re-runs the caller's
    # __main__): an abort inside llama.cpp kills only this child.
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_lora.converters.quantize", str(src), str(partial_path(dst)),
         str(ALL_TYPES[name]), str(nthread), *([str(imatrix)] if imatrix is not None else [])],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    return QuantJob(name, dst, process, log, time.perf_counter())


def _log_tail(log: IO[bytes], lines: int = 2) -> str:
    log.seek(0)
    text = log.read().decode("utf-8", errors="replace").strip().splitlines()
    log.close()
    return "; ".join(line.strip() for line in text[-lines:] if line.strip())


def _finish(job: QuantJob) -> QuantResult:
    tmp = partial_path(job.dst)
    try:
        rc = job.process.wait()
        detail = _log_tail(job.log)
        if rc != 0:
            what = "failed" if rc == CHILD_FAILED else f"crashed (exit code {rc})"
            raise QuantizeError(f"llama.cpp's quantizer {what} making {job.name}" + (f": {detail}" if detail else ""),
                                fix="check the input file and free disk space")
        if not tmp.is_file():
            raise QuantizeError(f"llama.cpp reported success for {job.name} but wrote no file")
        publish(tmp, job.dst, _validator(ALL_TYPES[job.name]))
        return QuantResult(job.name, job.dst, True, time.perf_counter() - job.started)
    except EdgeLoraError as exc:
        tmp.unlink(missing_ok=True)
        return QuantResult(job.name, None, False, time.perf_counter() - job.started, exc.one_line())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        return QuantResult(job.name, None, False, time.perf_counter() - job.started, f"{job.name}: {exc}")


def quantize_ladder(src: Path | str, out_dir: Path | str, names: Sequence[str], *,
                    progress: ProgressSink = NullProgress(), workers: int = 1,
                    nthread: int | None = None, imatrix: Path | str | None = None) -> list[QuantResult]:
    """Quantize ``src`` into every format in ``names`` (``<stem>-<TYPE>.gguf`` in ``out_dir``),
    with the importance matrix file ``imatrix`` when given (checked against ``src`` first).
    Bad input raises before any work; a failing format is reported in its result while the
    others still finish."""
    src, out_dir = Path(src), Path(out_dir)
    for name in names:
        if name not in ALL_TYPES:
            raise InputError(f"unknown quantization type {name!r}", fix=f"use one of {', '.join(ALL_TYPES)}")
    check_imatrix_given(names, imatrix)
    data_bytes = check_quantizable(src)
    if imatrix is not None:
        imatrix = Path(imatrix).absolute()  # the child resolves nothing
        check_imatrix_fits(read_imatrix(imatrix), validate_gguf(src), source=str(imatrix))
    ensure_writable_dir(out_dir)
    check_free_space(out_dir, sum(int(data_bytes * EXPECTED_BPW[n] / 16) for n in names))
    threads = nthread or max(1, constants.N_THREADS // max(1, workers))
    stem = model_stem(src)
    for name in names:  # an output path taken by a directory is bad input, not a failed format
        if (out_dir / f"{stem}-{name}.gguf").is_dir():
            raise OutputError(f"{out_dir / f'{stem}-{name}.gguf'} is a directory",
                              fix="remove it or choose another --out directory")
    pending = list(names)
    running: list[QuantJob] = []
    results: dict[str, QuantResult] = {}
    progress.start("quantizing", total=len(names))
    try:
        while pending or running:
            while pending and len(running) < max(1, workers):
                name = pending.pop(0)
                running.append(_start(src, out_dir / f"{stem}-{name}.gguf", name, threads, imatrix))
            job = running.pop(0)
            results[job.name] = _finish(job)
            progress.advance(1, description=f"{job.name} {'done' if results[job.name].ok else 'FAILED'}")
    except BaseException:
        for job in running:  # interrupted: stop children, leave no partial files
            job.process.kill()
            job.process.wait()
            partial_path(job.dst).unlink(missing_ok=True)
        raise
    finally:
        progress.finish()
    return [results[n] for n in names]


def record_in_manifest(out_dir: Path, src: Path, results: Sequence[QuantResult],
                       imatrix: Path | str | None = None) -> None:
    """Add each successful quant to ``out_dir``'s manifest with the kind of its source
    (a quant of a merged model is merged) and, when quantized with one, its importance matrix."""
    from edge_lora.core.manifest import Manifest, imatrix_record

    manifest = Manifest.load(out_dir)
    kind = "model"
    try:
        # ``src`` is a path as given (relative to the working directory), not a name in out_dir.
        row = manifest.file(Path(src).absolute())
    except InputError:
        row = None  # the source lives outside out_dir
    if row is not None and row.kind == "merged":
        kind = "merged"
    calibration = imatrix_record(Path(imatrix), out_dir) if imatrix is not None else None
    for result in results:
        if result.ok and result.path is not None:
            manifest.add_file(result.path.name, format=result.name, kind=kind,  # type: ignore[arg-type]
                              imatrix=calibration)
    if not manifest.name:
        manifest.name = model_stem(src)
    if not manifest.architecture:
        manifest.architecture = validate_gguf(src).architecture or ""
    manifest.save()


def _child_main(argv: Sequence[str]) -> int:
    src, dst, ftype, nthread, *imatrix = argv
    return 0 if _child_quantize(src, dst, int(ftype), int(nthread), *imatrix) == 0 else CHILD_FAILED


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
