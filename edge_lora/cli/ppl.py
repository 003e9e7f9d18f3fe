"""``edge-lora ppl FILE.gguf [--adapter NAME] [--text FILE] [--ctx N] [--kld-base F16.gguf] [--json]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_lora.core.errors import InputError, InputNotFoundError


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("ppl", help="measure perplexity (and KL divergence against a baseline)",
                                   description="Perplexity in llama-perplexity's method; with --kld-base also "
                                               "KL divergence and top-1 agreement against that model.")
    parser.add_argument("file", type=Path, metavar="FILE.gguf")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME",
                        help="registered adapter name or adapter .gguf to hot-apply (repeatable)")
    parser.add_argument("--text", type=Path, default=None,
                        help="UTF-8 text file (default: the shipped Apache-2.0 + MPL-2.0 text)")
    parser.add_argument("--ctx", type=int, default=512, help="window size in tokens (default 512)")
    parser.add_argument("--kld-base", type=Path, default=None, metavar="F16.gguf",
                        help="baseline model for KL divergence")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(handler=ppl_command)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputNotFoundError(f"text file {path} does not exist", fix="give an existing --text file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path} as UTF-8 text: {exc}", fix="give a UTF-8 --text file") from exc


def _record_in_manifest(model: Path, ppl: float, kld: float | None) -> bool:
    """Store the figures in manifest.json when the file lives in a converted output directory."""
    from edge_lora.core.manifest import record_quality_beside

    try:
        return record_quality_beside(model.parent, model, ppl=ppl, kld=kld)
    except InputError as exc:  # the measurement stands; only the bookkeeping is skipped
        print(f"edge-lora: note: not recorded in manifest.json: {exc.one_line()}", file=sys.stderr)
        return False


def _warn_if_calibrated_on(model: Path, text: str) -> float | None:
    """Warn when the text is (partly) the calibration text of the file's importance matrix: the
    calibrated format would look better than it is. Returns the estimated overlap (None: unknown)."""
    from edge_lora.analysis.imatrix import calibration_overlap

    found = calibration_overlap(model, text)
    if found is None or not found.overlap.total:
        return None
    if found.overstated:
        print(f"edge-lora: warning: {100 * found.overlap.fraction:.0f}% of this text's sampled 13-word runs are in "
              f"{found.dataset}, the text {model.name}'s importance matrix was computed on: its PPL/KLD will look "
              f"better than on unseen text; evaluate on other text", file=sys.stderr)
    return found.overlap.fraction


def ppl_command(args: argparse.Namespace) -> int:
    from edge_lora.analysis.perplexity import default_eval_text, measure_perplexity
    from edge_lora.core.progress import cli_progress

    text = _read_text(args.text) if args.text is not None else default_eval_text()
    calibration_overlap = _warn_if_calibrated_on(args.file, text)
    adapters = []
    if args.adapter:
        from edge_lora.serving.registry import AdapterRegistry

        registry = AdapterRegistry()
        adapters = [(e.path, e.scale) for e in (registry.resolve(name) for name in args.adapter)]
    with cli_progress(quiet=args.json) as progress:
        result = measure_perplexity(args.file, text, ctx=args.ctx, adapters=adapters, kld_base=args.kld_base,
                                    progress=progress)
    if not adapters:  # the manifest describes the file itself, not file + adapter
        _record_in_manifest(args.file.absolute(), result.ppl, result.kld)
    if args.json:
        print(json.dumps({**result.to_json(), "calibration_overlap": calibration_overlap}))
        return 0
    print(f"{args.file.name}: PPL {result.ppl:.4f} ± {result.ppl_stderr:.4f} over {result.tokens} tokens "
          f"({result.windows} windows of {result.ctx}, {result.tokens_per_second:.0f} tokens/s)")
    if result.kld is not None:
        exact = "" if result.kld_exact else " (from cached baseline top-k: a lower bound)"
        print(f"KLD vs {Path(result.kld_base or '').name}: mean {result.kld:.6f} ± {result.kld_stderr:.6f}, "
              f"median {result.kld_median:.6f}, p99 {result.kld_p99:.6f}, max {result.kld_max:.6f}; "
              f"same top token {100 * (result.top1_agreement or 0):.2f}%{exact}")
    sys.stdout.flush()
    return 0
