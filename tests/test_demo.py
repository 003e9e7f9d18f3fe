"""`edge-lora demo --json` end to end on the real Gemma 3 270M and the bundled legal adapter."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.support.modelfile_grammar import parse_modelfile, resolve_modelfile_path

from edge_lora.core.gguf_check import validate_gguf
from edge_lora.core.imatrix_file import read_imatrix
from edge_lora.analysis.perplexity import default_eval_text, measure_perplexity

EXPECTED_FORMATS = {"F16", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
                    "Q8_0"}
# The adapter README's measurements (F16, llama-perplexity's method): 9.460 -> 8.918.
README_BASE_PPL, README_ADAPTER_PPL = 9.460, 8.918


@pytest.mark.parametrize("bad_out", ["file", "under-a-file"])
def test_unusable_out_is_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str], bad_out: str) -> None:
    # It used to rebuild the base (30+ s), then fail with a NotADirectoryError traceback.
    from edge_lora.workflows import demo
    from edge_lora.cli import main

    def too_late() -> Path:
        raise AssertionError("--out must be checked before the base model is prepared")

    monkeypatch.setattr(demo, "demo_base_gguf", too_late)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    out = a_file if bad_out == "file" else a_file / "demo"
    assert main(["demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("edge-lora: error: ") and str(a_file) in err, err


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path, persistent_cache: Path) -> None:
    out = tmp_path / "demo-out"
    # The HF-layout base is shared with the conftest fixtures through the persistent cache.
    env = {**os.environ, "EDGE_LORA_CACHE": str(persistent_cache), "EDGE_LORA_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-m", "edge_lora", "demo", "--out", str(out), "--json"],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)  # exactly one JSON document on stdout

    files = summary["files"]
    models = [f for f in files if f["kind"] == "merged"]
    assert {f["format"] for f in models} == EXPECTED_FORMATS
    for f in files:
        info = validate_gguf(f["path"])
        assert Path(f["path"]).stat().st_size == f["bytes"]
        assert info.general_type == ("adapter" if f["kind"] == "adapter" else "model")
    sizes = {f["format"]: f["bytes"] for f in models}
    assert sizes["Q2_K"] < sizes["Q4_K_M"] < sizes["Q8_0"] < sizes["F16"]
    assert [f["kind"] for f in files].count("adapter") == 1
    # Every quant was made with the importance matrix computed on the shipped calibration text.
    assert all(f["calibrated"] == (f["format"] != "F16") for f in models)
    [imatrix] = out.glob("*.imatrix.gguf")
    assert read_imatrix(imatrix).datasets == ["gpl-3.0-lgpl-2.1.txt"]
    assert sum(f["recommended"] for f in files) == 1
    assert not list(out.glob("*.partial"))

    ppl = summary["perplexity"]
    assert ppl["adapter"] < ppl["base"]
    assert ppl["base"] == pytest.approx(README_BASE_PPL, rel=0.03)
    assert ppl["adapter"] == pytest.approx(README_ADAPTER_PPL, rel=0.03)
    # the drop itself, not only the endpoints: ~5.7% in the README
    assert ppl["adapter"] / ppl["base"] == pytest.approx(README_ADAPTER_PPL / README_BASE_PPL, abs=0.01)
    # merging and hot-applying the same adapter agree
    assert ppl["merged"] == pytest.approx(ppl["adapter"], rel=0.03)

    modelfile = Path(summary["modelfile"])
    parsed = parse_modelfile(modelfile.read_text())
    assert resolve_modelfile_path(modelfile, parsed.from_).samefile(summary["recommended"])
    assert parsed.parameter("stop") == ["<end_of_turn>"]

    assert summary["sample_adapter"].strip()
    assert summary["sample_adapter"] != summary["sample_base"]  # the adapter is really applied
    # The Modelfile is convert's hand-off (edge_lora.workflows.convert_model), not a stage of its own.
    assert set(summary["stage_seconds"]) == {"base", "convert", "fit", "quality", "sample"}

    check_every_format_runs_in_llama_cpp({f["format"]: Path(f["path"]) for f in models})


def check_every_format_runs_in_llama_cpp(paths: dict[str, Path]) -> None:
    """Each merged format loads in llama.cpp and scores the held-out text; KL divergence from the
    merged F16 grows as bits shrink (llama.cpp's own quantizer, so this checks our F16 input and
    the per-format type choices, not the kernels)."""
    text = default_eval_text()
    results = {name: measure_perplexity(path, text, ctx=256, max_windows=2, kld_base=paths["F16"])
               for name, path in sorted(paths.items()) if name != "F16"}
    f16 = measure_perplexity(paths["F16"], text, ctx=256, max_windows=2)
    for name, result in results.items():
        assert math.isfinite(result.ppl) and result.ppl < 5 * f16.ppl, (name, result.ppl, f16.ppl)
        assert result.kld is not None and result.top1_agreement is not None
    for name in ("Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0"):
        assert results[name].ppl == pytest.approx(f16.ppl, rel=0.1), name
    kld = {name: r.kld for name, r in results.items()}
    # Along the _M ladder quality falls with size. (Q3_K_S scores below Q2_K on this model:
    # llama.cpp's Q2_K mix stores attn_v in more bits, Q5_0 here, than Q3_K_S does, Q4_0.)
    assert kld["Q8_0"] < kld["Q6_K"] < kld["Q5_K_M"] < kld["Q4_K_M"] < kld["Q3_K_M"], kld
    assert kld["Q4_K_M"] < kld["Q2_K"], kld
    assert kld["Q8_0"] < 0.01 and results["Q8_0"].top1_agreement > 0.95, results["Q8_0"]
    assert results["Q8_0"].ppl == pytest.approx(f16.ppl, rel=0.01)
