"""The default TUI services: thin translations from the real edge_lora / converters APIs to
``edge_lora.tui.view_model`` data. Heavy modules are imported inside each function."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edge_lora.core.errors import InputError, InputNotFoundError
from edge_lora.core.progress import ProgressSink
from edge_lora.tui.services import ChatRuntime, TuiServices
from edge_lora.tui.view_model import AdapterEntry, FitPrediction, FormatEntry, HardwareView, ModelDirView, QualityResult, Verdict

if TYPE_CHECKING:  # gguf_check pulls in numpy and gguf: the TUI starts without them
    from edge_lora.core.gguf_check import GGUFInfo


def detect_hardware_view() -> HardwareView:
    from edge_lora.hardware import detect_hardware

    hw = detect_hardware()
    return HardwareView(total_ram_bytes=hw.total_ram_bytes, available_ram_bytes=hw.available_ram_bytes,
                        cores=hw.physical_cores, cpu_features=tuple(hw.cpu_features), llama_build=hw.llama_build)


def fit_predictions(paths: Sequence[Path], ctx: int, available_bytes: int) -> list[FitPrediction]:
    from edge_lora.analysis.fit import fit_report

    report = fit_report(_parsed_headers(paths), ctx, available_bytes=available_bytes)
    # Each row names the path its header was parsed from: one of ours, unresolved.
    return [FitPrediction(path=Path(m.path), total_bytes=m.total_bytes, verdict=Verdict(m.verdict),
                          recommended=m.recommended) for m in report.models]


# The screen re-fits on every context or free-RAM change; headers are parsed once per directory
# (~30 ms each for a 262k vocabulary) and re-parsed only when a file changes (a re-convert).
_HeaderKey = tuple[tuple[Path, int, int, int], ...]
_header_cache: dict[_HeaderKey, list[GGUFInfo]] = {}


def _parsed_headers(paths: Sequence[Path]) -> list[GGUFInfo]:
    from edge_lora.analysis.fit import model_infos

    key = tuple((p, *_signature(p)) for p in paths)
    cached = _header_cache.get(key)
    if cached is None:
        cached = model_infos(paths)
        _header_cache.clear()  # one directory is on screen at a time
        _header_cache[key] = cached
    return cached


def _signature(path: Path) -> tuple[int, int, int]:
    try:
        stat = path.stat()
    except OSError:
        return (-1, -1, -1)  # model_infos reports the missing file
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)  # outputs are replaced atomically: a new inode


def measure_quality(model: Path, text: str, ctx: int, kld_base: Path | None,
                    progress: ProgressSink) -> QualityResult:
    from edge_lora.analysis.perplexity import measure_perplexity

    result = measure_perplexity(model, text, ctx=ctx, kld_base=kld_base, progress=progress)
    return QualityResult(ppl=result.ppl, kld=result.kld)


def record_quality(directory: Path, model: Path, result: QualityResult) -> None:
    from edge_lora.core.manifest import record_quality_beside

    # A lone GGUF (the demo model) has no manifest to remember figures in: nothing is recorded.
    record_quality_beside(directory, model, ppl=result.ppl, kld=result.kld)


def open_runtime(model: Path, n_ctx: int) -> ChatRuntime:
    from edge_lora.serving.runtime import Runtime

    return Runtime(model, n_ctx=n_ctx)


def list_registered_adapters() -> list[AdapterEntry]:
    from edge_lora.serving.registry import AdapterRegistry

    return [AdapterEntry(name=a.name, path=a.path, scale=a.scale) for a in AdapterRegistry().list()]


def register_adapter(name: str, path: Path, scale: float) -> AdapterEntry:
    from edge_lora.serving.registry import AdapterRegistry

    added = AdapterRegistry().add(name, path, scale)
    return AdapterEntry(name=added.name, path=added.path, scale=added.scale)


def combine_adapters(name: str, inputs: Sequence[tuple[str, float]], method: str,
                     density: float | None) -> AdapterEntry:
    from edge_lora.converters.combine import CombineOptions
    from edge_lora.workflows.combine_adapters import combine_registered

    added = combine_registered(name, inputs, CombineOptions(method=method, density=density))
    return AdapterEntry(name=added.name, path=added.path, scale=added.scale)


def convert(base: str, out_dir: Path, adapter: str | None, quants: Sequence[str], progress: ProgressSink) -> Path:
    from edge_lora.workflows.convert_model import convert_model

    manifest = convert_model(base, out_dir, adapter=adapter, quants=list(quants), progress=progress)
    return Path(manifest.directory)


def write_modelfile(model: Path, num_ctx: int, out_dir: Path) -> Path:
    from edge_lora.analysis.modelfile import write_modelfile as write

    result = write(out_dir, model, num_ctx=num_ctx)
    return result.path if result.path is not None else out_dir


def demo_model_path() -> Path:
    from edge_lora.workflows.demo import demo_base_gguf

    return demo_base_gguf()


def default_eval_text() -> str:
    from edge_lora.analysis.perplexity import default_eval_text as shipped_text

    return shipped_text()


def load_model_dir(path: Path) -> ModelDirView:
    """A converted output dir (manifest.json + GGUF files) or a single GGUF file."""
    from edge_lora.core.output_dir import OutputDir

    path = Path(path)
    if path.is_file():
        return _single_gguf_view(path)
    if not path.is_dir():
        raise InputNotFoundError(f"{path} does not exist", fix="give a directory written by `edge-lora convert`")
    output = OutputDir.read(path)
    if not output.has_manifest:
        raise InputNotFoundError(f"{path} has no manifest.json", fix="give a directory written by `edge-lora convert`")
    if output.missing:
        raise InputNotFoundError(f"{path / 'manifest.json'} lists missing file(s): {', '.join(output.missing)}",
                                 fix="re-run `edge-lora convert` for this directory")
    formats = tuple(FormatEntry(path=m.path, format=m.format_name or "unknown", kind=m.kind, file_bytes=int(m.row.bytes),
                                bpw=_opt_float(m.row.bpw), ppl=_opt_float(m.row.ppl), kld=_opt_float(m.row.kld),
                                calibrated=m.row.imatrix is not None)
                    for m in output.models if m.row is not None)
    if not formats:
        raise InputError(f"{path / 'manifest.json'} lists no model files", fix="re-run `edge-lora convert`")
    reference = output.reference
    return ModelDirView(directory=path, name=output.name, formats=formats,
                        adapters=tuple(AdapterEntry(name=a.name, path=a.path) for a in output.adapters),
                        reference=reference.path if reference is not None else None)


def _single_gguf_view(path: Path) -> ModelDirView:
    from edge_lora.core.errors import InvalidGGUFError
    from edge_lora.core.formats import format_named
    from edge_lora.core.gguf_check import validate_gguf
    from edge_lora.core.imatrix_file import calibration_of
    from edge_lora.core.manifest import info_bits_per_weight
    from edge_lora.analysis.fit import format_of

    info = validate_gguf(path, expect_type="model")
    try:
        bpw: float | None = info_bits_per_weight(info)[1]
    except InvalidGGUFError:  # no tensors: nothing to divide by; the table shows a blank
        bpw = None
    entry = FormatEntry(path=path, format=format_of(info), file_bytes=info.file_bytes, bpw=bpw,
                        calibrated=calibration_of(info) is not None)
    fmt = format_named(entry.format)
    return ModelDirView(directory=path.parent, name=path.stem, formats=(entry,),
                        reference=path if fmt is not None and fmt.full_precision else None)


def _opt_float(value: object) -> float | None:
    """A manifest figure (untrusted JSON) as a float."""
    if value is None:
        return None
    if isinstance(value, (int, float, str)):
        try:
            return float(value)
        except ValueError:
            pass
    raise InputError(f"manifest value {value!r} is not a number", fix="re-run `edge-lora convert`")


def default_services() -> TuiServices:
    return TuiServices(
        hardware_provider=detect_hardware_view,
        fit_fn=fit_predictions,
        ppl_fn=measure_quality,
        record_quality=record_quality,
        runtime_factory=open_runtime,
        list_adapters=list_registered_adapters,
        register_adapter=register_adapter,
        combine_adapters=combine_adapters,
        convert_fn=convert,
        write_modelfile=write_modelfile,
        load_model_dir=load_model_dir,
        demo_model=demo_model_path,
        eval_text=default_eval_text,
    )
