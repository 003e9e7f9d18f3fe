"""Calibrated quantization: compute an importance matrix on the full-precision model, write it
beside the quants (``<stem>.imatrix.gguf``), then quantize with it (``quantize --calibrate``,
``convert --calibrate``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edge_lora.converters.quantize import QuantResult, check_quantizable, model_stem, quantize_ladder
from edge_lora.core.atomic import check_not_an_input, ensure_writable_dir
from edge_lora.core.errors import InputError
from edge_lora.core.imatrix_file import IMATRIX_SUFFIX, write_imatrix
from edge_lora.core.progress import NullProgress, ProgressSink
from edge_lora.analysis.imatrix import AdapterSpec, ImatrixRun, compute_imatrix


def imatrix_path_for(model: Path, out_dir: Path) -> Path:
    """``gemma-legal-F16.gguf`` -> ``out_dir/gemma-legal.imatrix.gguf``."""
    return out_dir / f"{model_stem(model)}{IMATRIX_SUFFIX}"


def calibrate(model: Path | str, text: Path | str, out: Path | str, *, ctx: int = 512,
              adapters: Sequence[AdapterSpec] = (), progress: ProgressSink = NullProgress()) -> ImatrixRun:
    """Compute the importance matrix of ``model`` (with ``adapters`` hot-applied) on ``text`` and
    write it to ``out`` atomically."""
    out = Path(out)
    check_not_an_input(out, [model, text, *[a[0] if isinstance(a, tuple) else a for a in adapters]])
    ensure_writable_dir(out.parent)
    run = compute_imatrix(model, text, ctx=ctx, adapters=adapters, progress=progress)
    write_imatrix(out, run.imatrix)
    return run


def quantize_calibrated(src: Path | str, out_dir: Path | str, names: Sequence[str], *,
                        imatrix: Path | str | None = None, calibrate_text: Path | str | None = None,
                        ctx: int = 512, progress: ProgressSink = NullProgress()) -> tuple[list[QuantResult], Path | None]:
    """``quantize_ladder`` with an importance matrix: the file ``imatrix``, or one computed on
    ``src`` from ``calibrate_text`` first (cheap checks of the source come before that run).
    Returns the results and the importance matrix used (None: uncalibrated)."""
    src, out_dir = Path(src), Path(out_dir)
    if imatrix is not None and calibrate_text is not None:
        raise InputError("both an importance matrix and a calibration text were given",
                         fix="pass --imatrix FILE or --calibrate TEXT, not both")
    if calibrate_text is not None:
        check_quantizable(src)
        ensure_writable_dir(out_dir)
        imatrix = imatrix_path_for(src, out_dir)
        calibrate(src, calibrate_text, imatrix, ctx=ctx, progress=progress)
    results = quantize_ladder(src, out_dir, names, progress=progress, imatrix=imatrix)
    return results, Path(imatrix) if imatrix is not None else None
