"""``edge-lora convert`` orchestration: F16 (merged when an adapter is given), the GGUF LoRA
adapter, the quantization ladder and manifest.json.

Layout (DESIGN.md "Output directory"), with an adapter:

- ``<base>-<adapter>-F16.gguf`` and its quants: the merged model (kind ``merged``);
- ``adapter-<adapter>.gguf``: the same adapter as a GGUF LoRA (kind ``adapter``), for hot-apply
  on quants of the plain base — convert the base without ``--adapter`` (same or another
  directory) to get those; it is not written here, so one directory holds one model per format.

Without an adapter: ``<base>-F16.gguf`` and its quants (kind ``model``). Everything is validated
(adapter against the base, quant names, outtype) before the first byte is written.

Converting into a directory that holds another model (e.g. the plain base where a merged model
was) makes manifest.json describe the new conversion only: the other model's rows are dropped
(its files stay on disk), except GGUF adapters for the same base, which hot-apply on it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from edge_lora.converters.adapter_gguf import check_expressible, write_adapter_gguf
from edge_lora.converters.architectures import arch_spec_for
from edge_lora.converters.checkpoint import HFCheckpoint
from edge_lora.converters.hf_to_gguf import check_outtype, model_name_for, output_file_name, write_checkpoint_gguf
from edge_lora.converters.combine import CombineOptions
from edge_lora.converters.peft import PeftAdapter
from edge_lora.converters.quantize import QuantResult, check_imatrix_given, record_in_manifest
from edge_lora.core.atomic import ensure_writable_dir
from edge_lora.core.errors import EdgeLoraError, InputError, QuantizeError
from edge_lora.core.formats import format_named, parse_quant_list
from edge_lora.core.imatrix_file import read_imatrix
from edge_lora.core.manifest import FileKind, Manifest, ManifestFile
from edge_lora.core.output_dir import OutputDir, adapter_file_name
from edge_lora.core.progress import NullProgress, ProgressSink
from edge_lora.hub import resolve_local_or_hub
from edge_lora.analysis.imatrix import check_calibration_text
from edge_lora.analysis.modelfile import write_modelfile_for_output
from edge_lora.state import remember_output_dir
from edge_lora.workflows.combine_adapters import plan_merge
from edge_lora.workflows.calibrate import quantize_calibrated


logger = logging.getLogger(__name__)


class PartialConversionError(QuantizeError):
    """Some quant formats failed; the others (and the manifest) were written."""

    def __init__(self, message: str, *, fix: str | None = None, manifest: Manifest, failed: list[QuantResult]) -> None:
        super().__init__(message, fix=fix)
        self.manifest = manifest
        self.failed = failed


def convert_model(base: str | Path, out_dir: str | Path, *,
                  adapter: str | Path | Sequence[str | Path] | None = None,
                  quants: str | Iterable[str] = "all", outtype: str = "f16",
                  calibrate: str | Path | None = None, imatrix: str | Path | None = None,
                  combine: CombineOptions | None = None,
                  progress: ProgressSink = NullProgress()) -> Manifest:
    """``adapter``: one adapter reference (``A`` or ``A:W``) or several; one without a weight
    merges as given (LoRA or IA3), otherwise their combination (``combine``, default ``cat``) is
    merged. ``calibrate``: a text file to compute an importance matrix on (on the written full-precision
    file: the merged model when an adapter is given) before quantizing with it; or ``imatrix``, an
    importance matrix file made for this model (read now; checked against the full-precision
    file once written, before any quantization)."""
    full_format = check_outtype(outtype)
    names = parse_quant_list(quants)
    if calibrate is not None and imatrix is not None:
        raise InputError("both a calibration text and an importance matrix were given",
                         fix="pass --calibrate TEXT or --imatrix FILE, not both")
    check_imatrix_given(names, calibrate if calibrate is not None else imatrix)
    if (calibrate is not None or imatrix is not None) and not names:
        raise InputError(f"--{'calibrate' if calibrate is not None else 'imatrix'} with --quant none: "
                         "there is nothing to quantize with it",
                         fix="give --quant all (or a list of formats), or leave it out")
    if calibrate is not None:
        check_calibration_text(calibrate)
    if imatrix is not None:
        read_imatrix(imatrix)  # a malformed file is refused before any work
    out_dir = Path(out_dir)
    base_ref = str(base)
    ckpt_dir = resolve_local_or_hub(base_ref, "model")
    name = model_name_for(base_ref, ckpt_dir)
    # The base and the adapter are opened (their headers parsed) once, for every file written.
    with HFCheckpoint.open(ckpt_dir) as ckpt:
        spec = arch_spec_for(ckpt.config)
        refs = [] if adapter is None else [str(adapter)] if isinstance(adapter, (str, Path)) else \
            [str(a) for a in adapter]
        if combine is not None and not refs:
            raise InputError(f"--method {combine.method} needs adapters to combine", fix="give --adapter A:W ...")
        plan = plan_merge(refs, ckpt, combine) if refs else None  # checked before the output directory exists
        peft: PeftAdapter | None = plan.lora if plan is not None else None
        adapter_name: str | None = plan.name if plan is not None else None
        if adapter_name is not None:
            name = f"{name}-{adapter_name}"
        ensure_writable_dir(out_dir)

        full_path = write_checkpoint_gguf(ckpt, out_dir / output_file_name(name, outtype), outtype=outtype,
                                          adapter=plan.merger if plan is not None else None, name=name,
                                          progress=progress)
    kind: FileKind = "merged" if plan is not None else "model"
    manifest = _manifest_for_conversion(out_dir, name=name, architecture=spec.gguf_arch_name, base=base_ref,
                                        adapter=plan.description if plan is not None else None, kind=kind)
    manifest.add_file(full_path.name, format=full_format.name, kind=kind)
    if peft is not None and adapter_name is not None:
        try:
            check_expressible(peft)
        except EdgeLoraError as exc:
            # DoRA / modules_to_save: only the merged model can carry it.
            logger.warning("no GGUF adapter written (the merged model has it): %s", exc.one_line())
        else:
            adapter_path = write_adapter_gguf(peft, spec, out_dir / adapter_file_name(adapter_name),
                                              progress=progress)
            manifest.add_file(adapter_path.name, format="F32", kind="adapter")
    manifest.save()

    failed: list[QuantResult] = []
    if names:
        results, used = quantize_calibrated(full_path, out_dir, names, imatrix=imatrix, calibrate_text=calibrate,
                                            progress=progress)
        record_in_manifest(out_dir, full_path, results, imatrix=used)
        manifest = Manifest.load(out_dir)
        failed = [r for r in results if not r.ok]
    _hand_off(out_dir)
    if names:
        if failed:
            raise PartialConversionError(
                f"{len(failed)} of {len(results)} formats failed: {failed[0].error}",
                fix="the other files were written; re-run with --quant for the failed ones",
                manifest=manifest, failed=failed)
    return manifest


def _manifest_for_conversion(out_dir: Path, *, name: str, architecture: str, base: str, adapter: str | None,
                             kind: FileKind) -> Manifest:
    """The manifest a conversion writes: its own description, and of the rows already there only
    those a re-run keeps — other formats of this same model (a BF16 beside the F16, quants), and
    after a plain base conversion the GGUF adapters made for this same base (the hot-apply layout
    the module docstring describes). Rows of another model, e.g. an earlier merge into the same
    directory, are dropped: the Modelfile, `run` and `fit` would pick them as this model."""
    manifest = Manifest.load(out_dir)
    same_base = manifest.base == base and manifest.architecture == architecture
    same_model = same_base and manifest.adapter == adapter

    def kept(row: ManifestFile) -> bool:
        if row.kind == "adapter":
            return same_base and adapter is None
        row_format = format_named(row.format)
        return same_model and row.kind == kind and row_format is not None and row.path == row_format.file_name(name)

    dropped = [row.path for row in manifest.files if not kept(row)]
    if dropped:
        logger.warning("manifest.json no longer lists %d file(s) of an earlier conversion into %s (e.g. %s); "
                       "they stay on disk", len(dropped), out_dir, dropped[0])
    manifest.files = [row for row in manifest.files if kept(row)]
    manifest.name, manifest.architecture, manifest.base, manifest.adapter = name, architecture, base, adapter
    return manifest


def _hand_off(out_dir: Path) -> None:
    """Make the output set usable right away: an Ollama Modelfile beside it, and `run`/`fit`
    without arguments pointing at it. A model whose chat template no Ollama family matches still
    converts: the Modelfile is skipped with a warning, not the conversion failed."""
    remember_output_dir(out_dir)
    try:
        write_modelfile_for_output(OutputDir.read(out_dir))
    except EdgeLoraError as exc:
        logger.warning("no Modelfile written: %s", exc.one_line())
