from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge_lora.cli import main
from edge_lora.core.errors import InputError, InputNotFoundError, InvalidGGUFError
from edge_lora.analysis.fit import (FIT_SHARE, estimate_memory, fit_report, format_of,
                           measure_peak_rss, verdict_for)
from edge_lora.core.gguf_check import validate_gguf
from tests.support.gguf_parses import count_parses
from tests.support.quant_fixtures import gemma_formats

MB = 1_000_000


@pytest.fixture(scope="session")
def formats(persistent_cache: Path, gemma_q4_gguf: Path) -> dict[str, Path]:
    return gemma_formats(persistent_cache, gemma_q4_gguf)


@pytest.fixture()
def format_dir(tmp_path: Path, formats: dict[str, Path]) -> Path:
    """A converted-looking directory of symlinks (no copies of 1 GB of files)."""
    out = tmp_path / "out"
    out.mkdir()
    for name, path in formats.items():
        (out / f"gemma-{name}.gguf").symlink_to(path)
    return out


def test_kv_cache_from_gemma_metadata(gemma_q4_gguf: Path) -> None:
    # 18 layers x 1 KV head x (256 + 256) x cells x 2 bytes; SWA layers get a full cache by default.
    for ctx, cells in ((512, 512), (1000, 1024), (8192, 8192)):
        est = estimate_memory(gemma_q4_gguf, ctx)
        assert est.kv_bytes == 18 * 1 * 512 * cells * 2
    small, big = estimate_memory(gemma_q4_gguf, 512), estimate_memory(gemma_q4_gguf, 8192)
    assert big.compute_bytes > small.compute_bytes
    assert small.total_bytes == (small.weights_bytes + small.kv_bytes + small.compute_bytes
                                 + small.overhead_bytes + small.adapters_bytes)


def test_repacked_tensors_count_twice(gemma_q4_gguf: Path) -> None:
    info = validate_gguf(gemma_q4_gguf)
    q4k = sum(t.n_bytes for t in info.tensors if t.type_name == "Q4_K")
    assert q4k > 0
    with_repack = estimate_memory(gemma_q4_gguf, 512, repack=True)
    without = estimate_memory(gemma_q4_gguf, 512, repack=False)
    assert with_repack.weights_bytes - without.weights_bytes == q4k
    assert without.weights_bytes == info.tensor_data_bytes


def test_logit_rows_cost_a_vocabulary_each(gemma_q4_gguf: Path) -> None:
    one = estimate_memory(gemma_q4_gguf, 512)
    many = estimate_memory(gemma_q4_gguf, 512, logits_rows=256)
    assert many.compute_bytes - one.compute_bytes == 255 * 262144 * 4


def test_adapter_bytes_added(gemma_q4_gguf: Path, random_gemma_loras: tuple[Path, Path]) -> None:
    base = estimate_memory(gemma_q4_gguf, 512)
    with_adapter = estimate_memory(gemma_q4_gguf, 512, adapters=[random_gemma_loras[0]])
    assert with_adapter.adapters_bytes == validate_gguf(random_gemma_loras[0]).tensor_data_bytes > 0
    assert with_adapter.total_bytes == base.total_bytes + with_adapter.adapters_bytes


def test_verdicts() -> None:
    assert verdict_for(int(1000 * FIT_SHARE), 1000) == "fits"
    assert verdict_for(int(1000 * FIT_SHARE) + 1, 1000) == "tight"
    assert verdict_for(1000, 1000) == "tight"
    assert verdict_for(1001, 1000) == "no"


def test_report_recommends_best_quality_that_fits(format_dir: Path) -> None:
    report = fit_report([format_dir], ctx=2048, available_bytes=10**11)
    assert [m.format for m in report.models] == ["F16", "Q8_0", "Q4_K_M", "Q2_K"]
    assert [m.recommended for m in report.models] == [True, False, False, False]
    sizes = {m.format: m.total_bytes for m in report.models}
    # Room for Q8_0 with margin but not F16: Q8_0 recommended, F16 tight or no.
    available = int(sizes["Q8_0"] / FIT_SHARE) + 1
    report = fit_report([format_dir], ctx=2048, available_bytes=available)
    verdicts = {m.format: m.verdict for m in report.models}
    assert verdicts["Q8_0"] == "fits" and verdicts["F16"] == "no"
    assert report.recommended is not None and report.recommended.format == "Q8_0"
    assert sum(m.recommended for m in report.models) == 1


def test_report_tight_and_none(format_dir: Path) -> None:
    report = fit_report([format_dir], ctx=512, available_bytes=10**8)
    assert all(m.verdict == "no" for m in report.models) and report.recommended is None
    smallest = min(m.total_bytes for m in report.models)
    report = fit_report([format_dir], ctx=512, available_bytes=smallest)
    assert report.recommended is not None and report.recommended.verdict == "tight"


def test_report_prefers_measured_kld(format_dir: Path) -> None:
    files = [{"path": p.name, "format": format_of(validate_gguf(p)), "kind": "model", "bytes": 1, "bpw": 8.0,
              "sha256": "", "kld": k}
             for p, k in zip(sorted(format_dir.glob("*.gguf")), (0.5, 0.01, 0.002, 0.2))]
    (format_dir / "manifest.json").write_text(json.dumps({"files": files}))
    best = min(files, key=lambda f: f["kld"])
    report = fit_report([format_dir], ctx=512, available_bytes=10**11)
    assert Path(report.recommended.path).name == best["path"]
    assert {Path(m.path).name: m.kld for m in report.models} == {f["path"]: f["kld"] for f in files}


def test_manifest_rows_outside_the_directory_are_ignored(format_dir: Path, tmp_path: Path) -> None:
    # An untrusted manifest naming ../x must not lend x a KLD when x is estimated too.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside = elsewhere / "gemma-Q2_K.gguf"
    outside.symlink_to((format_dir / "gemma-Q2_K.gguf").resolve())
    row = {"path": "../elsewhere/gemma-Q2_K.gguf", "format": "Q2_K", "kind": "model", "bytes": 1, "bpw": 8.0,
           "sha256": "", "kld": 0.0}
    (format_dir / "manifest.json").write_text(json.dumps({"files": [row]}))
    report = fit_report([format_dir, outside], ctx=512, available_bytes=10**11)
    assert all(m.kld is None for m in report.models)


def test_fit_report_parses_each_file_once(format_dir: Path, random_gemma_loras: tuple[Path, Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = count_parses(monkeypatch)
    fit_report([format_dir], adapters=[random_gemma_loras[0]], available_bytes=10**11)
    assert sorted(p.name for p in parsed) == sorted([p.name for p in format_dir.glob("*.gguf")]
                                                    + [random_gemma_loras[0].name])


def test_estimates_from_parsed_headers_read_no_file(format_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_lora.analysis.fit import model_infos

    infos = model_infos([format_dir])
    by_path = fit_report([format_dir], ctx=2048, available_bytes=10**11)
    parsed = count_parses(monkeypatch)
    by_info = fit_report(infos, ctx=2048, available_bytes=10**11)
    assert parsed == [] and by_info == by_path
    assert estimate_memory(infos[0], 512) == estimate_memory(infos[0].path, 512)


def test_default_ctx_is_capped(gemma_q4_gguf: Path) -> None:
    from edge_lora.core import constants

    assert fit_report([gemma_q4_gguf]).ctx == min(32768, constants.DEFAULT_CTX_CAP)


def test_bad_inputs(tmp_path: Path, gemma_q4_gguf: Path) -> None:
    with pytest.raises(InputNotFoundError):
        fit_report([tmp_path / "missing.gguf"])
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(InvalidGGUFError):
        fit_report([junk])
    with pytest.raises(InputNotFoundError):  # a directory holding only junk has no models
        fit_report([tmp_path])
    with pytest.raises(InputError, match="training context"):
        estimate_memory(gemma_q4_gguf, 65536)


def test_cli_fit_json_schema(capsys, gemma_q4_gguf: Path) -> None:
    assert main(["fit", str(gemma_q4_gguf), "--ctx", "1024", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"ram", "ctx", "models"} and data["ctx"] == 1024
    assert set(data["ram"]) == {"total_bytes", "available_bytes"}
    row = data["models"][0]
    for key in ("path", "format", "file_bytes", "kv_bytes", "overhead_bytes", "total_bytes", "fits", "recommended"):
        assert key in row
    assert row["format"] == "Q4_K_M" and row["recommended"] is True


def test_cli_fit_errors_and_last_dir(capsys, tmp_path: Path, gemma_q4_gguf: Path) -> None:
    assert main(["fit"]) == 2
    assert "no converted output directory" in capsys.readouterr().err
    assert main(["fit", str(gemma_q4_gguf), "--ctx", "999999"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training context" in err
    from edge_lora.state import remember_output_dir

    out = tmp_path / "converted"
    out.mkdir()
    shutil.copy(gemma_q4_gguf, out / "gemma-Q4_K_M.gguf")
    remember_output_dir(out)
    assert main(["fit", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["models"][0]["path"].endswith("gemma-Q4_K_M.gguf")
    assert str(out.resolve()) in captured.err


@pytest.mark.slow
def test_prediction_matches_measured_peak_rss(formats: dict[str, Path]) -> None:
    worst = 0.0
    for name, path in formats.items():
        for ctx in (512, 2048, 8192):
            predicted = estimate_memory(path, ctx).total_bytes
            measured = measure_peak_rss(path, ctx)
            error = abs(predicted - measured) / measured
            worst = max(worst, error)
            assert error < 0.10, f"{name} ctx {ctx}: predicted {predicted / MB:.0f} MB, measured {measured / MB:.0f} MB"
    assert worst < 0.10
