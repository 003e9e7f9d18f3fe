"""Quantization through llama.cpp's own quantizer (``llama_model_quantize``).

Each format runs in a child process: an abort inside llama.cpp (GGML_ABORT on something we
failed to foresee) then costs that one format, not the whole ladder or the CLI. The parent
creates the partial file exclusively (core.atomic) and the child writes into that very file
(``/proc/self/fd/N`` on Linux); the parent validates the header and the file type, then
``os.replace``s it. Children die with the parent (PR_SET_PDEATHSIG; an interrupted or
terminated parent kills them and removes their partials) and start isolated (``python -I``)
with the parent's import path minus the working directory, so an ``edge_lora`` or
``llama_cpp`` package in the directory the user runs from (a cloned model repo) is never
imported. Formats run one after another by default, each with every core. Measured
(bench/quantize.py, Gemma 3 270M, whole ladder, 2 cores): in-process llama.cpp 27.8 s; ours
sequential 31.2 s (1.12x: interpreter start + validation per format); two at once 22.2 s
(0.80x) but two quantizers' memory at the same time, so ``workers=2`` is opt-in.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from edge_lora.converters.load_check import check_loads
from edge_lora.core import constants
from edge_lora.core.atomic import check_free_space, create_partial, ensure_writable_dir, publish
from edge_lora.core.child_process import isolated_python
from edge_lora.core.errors import EdgeLoraError, InputError, OutputError, QuantizeError
from edge_lora.core.formats import format_of_file_type, quant_format, split_file_name
from edge_lora.core.gguf_check import validate_gguf
from edge_lora.core.imatrix_file import (QUANTIZE_IMATRIX_CHUNKS, QUANTIZE_IMATRIX_DATASET, QUANTIZE_IMATRIX_ENTRIES,
                                         QUANTIZE_IMATRIX_FILE, check_imatrix_fits, read_imatrix)
from edge_lora.core.manifest import FileKind, Manifest, imatrix_record
from edge_lora.core.progress import NullProgress, ProgressSink

CHILD_FAILED = 3  # the child's exit code when llama_model_quantize returned an error
CHILD_ORPHANED = 4  # the parent was gone before the child started work


def model_stem(src: Path) -> str:
    """``gemma-F16.gguf`` -> ``gemma``: quant files are named ``<stem>-<TYPE>.gguf``."""
    stem, fmt = split_file_name(src)
    return stem if fmt is not None and fmt.full_precision and stem else src.name.removesuffix(".gguf")


def check_imatrix_given(names: Sequence[str], imatrix: Path | str | None) -> None:
    """llama.cpp refuses the very-low-bit IQ file types without an importance matrix (the
    table's ``needs_imatrix``): say so before any work, with the fix."""
    needing = [name for name in names if quant_format(name).needs_imatrix]
    if needing and imatrix is None:
        raise InputError(f"{', '.join(needing)} need{'s' if len(needing) == 1 else ''} an importance matrix "
                         f"(llama.cpp refuses to make {'it' if len(needing) == 1 else 'them'} without one)",
                         fix="add --calibrate TEXT (e.g. the shipped edge_lora/data/calibration text) or "
                             "--imatrix FILE from `edge-lora imatrix`")


def check_quantizable(src: Path) -> int:
    """Validate the source header; refuse adapters and already-quantized files; prove the source
    loads in llama.cpp (a child process; free when `convert` just proved it): every output copies
    its metadata, so this one check covers the ladder. Returns its tensor data size in bytes."""
    info = validate_gguf(src, expect_type="model")
    source = format_of_file_type(info.file_type)
    if source is None or not source.full_precision:
        label = f"file type {info.file_type}" if info.file_type is not None else "no general.file_type"
        raise InputError(
            f"{src} is already quantized ({label}); re-quantizing loses quality twice",
            fix="quantize from the F16/BF16/F32 file written by `edge-lora convert`")
    check_loads(src, depth="model", identity=info.identity,
                fix="re-convert the source with `edge-lora convert`; llama.cpp cannot quantize a file it cannot load")
    return info.tensor_data_bytes


def _die_with_parent(parent_pid: int) -> None:
    """In the child: be killed when the parent dies, even by SIGKILL (Linux; elsewhere the
    parent's own cleanup is all there is). Applies to the thread that started us, which
    waits for us (quantize_ladder). If the parent died before this took effect, exit now."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(CHILD_ORPHANED)


def _imatrix_params(path: str) -> tuple[ctypes.Array[ctypes.Structure], ctypes.Array[ctypes.Structure], list[object]]:
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
    """Runs in the child process (see _child_command)."""
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
    partial: Path
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


def _child_command(src: Path, dst: str, ftype: int, nthread: int, imatrix: Path | None = None) -> list[str]:
    return isolated_python("from edge_lora.converters.quantize import _child_main; sys.exit(_child_main(sys.argv[1:]))",
                           str(os.getpid()), str(src), dst, str(ftype), str(nthread),
                           *([str(imatrix)] if imatrix is not None else []))


def _start(src: Path, dst: Path, name: str, nthread: int, imatrix: Path | None = None) -> QuantJob:
    # A fresh interpreter (not fork, not multiprocessing's spawn, which re-runs the caller's
    # __main__): an abort inside llama.cpp kills only this child.
    partial, fd = create_partial(dst)
    log = tempfile.TemporaryFile()
    try:
        # The child reopens the descriptor we created, never a name someone could swap.
        target = f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else str(partial)
        process = subprocess.Popen(_child_command(src.absolute(), target, int(quant_format(name).file_type), nthread,
                                                   imatrix),
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                   pass_fds=(fd,))
    except BaseException:
        log.close()
        partial.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return QuantJob(name, dst, partial, process, log, time.perf_counter())


def _stop(job: QuantJob) -> None:
    """Kill a running child and remove its partial file."""
    with contextlib.suppress(ProcessLookupError):
        job.process.kill()
    job.process.wait()
    job.log.close()
    job.partial.unlink(missing_ok=True)


def _log_tail(log: IO[bytes], lines: int = 2) -> str:
    log.seek(0)
    text = log.read().decode("utf-8", errors="replace").strip().splitlines()
    log.close()
    return "; ".join(line.strip() for line in text[-lines:] if line.strip())


def _finish(job: QuantJob) -> QuantResult:
    tmp = job.partial
    try:
        rc = job.process.wait()
        detail = _log_tail(job.log)
        if rc != 0:
            what = "failed" if rc == CHILD_FAILED else f"crashed ({_exit_description(rc)})"
            raise QuantizeError(f"llama.cpp's quantizer {what} making {job.name}" + (f": {detail}" if detail else ""),
                                fix="check the input file and free disk space")
        if not tmp.is_file():
            raise QuantizeError(f"llama.cpp reported success for {job.name} but wrote no file")
        publish(tmp, job.dst, _validator(quant_format(job.name).file_type))
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
    formats = [quant_format(name) for name in names]
    names = [f.name for f in formats]
    check_imatrix_given(names, imatrix)
    data_bytes = check_quantizable(src)
    if imatrix is not None:
        imatrix = Path(imatrix).absolute()  # the child resolves nothing
        check_imatrix_fits(read_imatrix(imatrix), validate_gguf(src), source=str(imatrix))
    ensure_writable_dir(out_dir)
    check_free_space(out_dir, sum(int(data_bytes * f.bits_per_weight / 16) for f in formats))
    threads = nthread or max(1, constants.N_THREADS // max(1, workers))
    stem = model_stem(src)
    destinations = {f.name: out_dir / f.file_name(stem) for f in formats}
    for dst in destinations.values():  # an output path taken by a directory is bad input, not a failed format
        if dst.is_dir():
            raise OutputError(f"{dst} is a directory", fix="remove it or choose another --out directory")
    pending = list(names)
    running: list[QuantJob] = []
    results: dict[str, QuantResult] = {}
    progress.start("quantizing", total=len(names))
    try:
        with _terminate_as_exit():
            while pending or running:
                while pending and len(running) < max(1, workers):
                    name = pending.pop(0)
                    running.append(_start(src, destinations[name], name, threads, imatrix))
                job = running[0]
                results[job.name] = _finish(job)
                running.pop(0)
                progress.advance(1, description=f"{job.name} {'done' if results[job.name].ok else 'FAILED'}")
    finally:
        for job in running:  # interrupted (Ctrl-C, SIGTERM, an error): stop children, leave no partials
            _stop(job)
        progress.finish()
    return [results[n] for n in names]


def _exit_description(rc: int) -> str:
    if rc < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-rc).name}"
        return f"killed by signal {-rc}"
    return f"exit code {rc}"


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """While children run, SIGTERM to this process raises SystemExit (so the ladder kills its
    children and removes their partials) instead of ending the process on the spot — only in
    the main thread and when nobody installed their own SIGTERM handler."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def record_in_manifest(out_dir: Path, src: Path, results: Sequence[QuantResult],
                       imatrix: Path | str | None = None) -> None:
    """Add each successful quant to ``out_dir``'s manifest with the kind of its source
    (a quant of a merged model is merged) and, when quantized with one, its importance matrix."""
    manifest = Manifest.load(out_dir)
    kind: FileKind = "model"
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
            manifest.add_file(result.path.name, format=result.name, kind=kind, imatrix=calibration)
    if not manifest.name:
        manifest.name = model_stem(src)
    if not manifest.architecture:
        manifest.architecture = validate_gguf(src).architecture or ""
    manifest.save()


def _child_main(argv: Sequence[str]) -> int:
    parent_pid, src, dst, ftype, nthread, *imatrix = argv
    _die_with_parent(int(parent_pid))
    return 0 if _child_quantize(src, dst, int(ftype), int(nthread), *imatrix) == 0 else CHILD_FAILED
