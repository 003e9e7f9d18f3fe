"""Quantization through llama.cpp: the whole ladder on a synthetic model whose rows are
multiples of 256 (so every K-quant applies), manifest rows, bad input, and a failing format
not stopping the others."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_lora.cli import main
from edge_lora.converters.hf_to_gguf import convert_checkpoint
from edge_lora.converters.quantize import quantize_ladder
from edge_lora.core.formats import LADDER
from edge_lora.core.gguf_check import validate_gguf
from edge_lora.core.manifest import Manifest, sha256_file
from tests.support.model_fixtures import make_checkpoint


@pytest.fixture(scope="module")
def f16_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("quant")
    ckpt = make_checkpoint("llama", root / "llama", n_layers=4)
    return convert_checkpoint(ckpt, root / "tiny-F16.gguf")


@pytest.fixture(scope="module")
def ladder(f16_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """`edge-lora quantize FILE --quant all --out DIR --json`, run once for the module."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("ladder")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["quantize", str(f16_model), "--quant", "all", "--out", str(out), "--json"]) == 0
    return out, json.loads(stdout.getvalue())


# --quant all: name -> llama_ftype, in llama.cpp's order
QUANT_TYPES = {f.name: f.file_type for f in LADDER}


@pytest.mark.slow
def test_whole_ladder_loads_and_sizes_follow_llama_cpp_order(ladder: tuple[Path, dict], f16_model: Path) -> None:
    from edge_lora.serving.llama_backend import LlamaModel

    out, report = ladder
    rows = {r["format"]: r for r in report["results"]}
    assert list(rows) == list(QUANT_TYPES) and all(r["ok"] for r in rows.values())
    sizes = []
    for name, ftype in QUANT_TYPES.items():
        path = out / f"tiny-{name}.gguf"
        assert rows[name]["path"] == str(path)
        info = validate_gguf(path, expect_type="model")
        assert info.file_type == ftype
        with LlamaModel(path) as model:
            assert model.n_vocab > 0
        sizes.append(info.tensor_data_bytes)
    # llama.cpp's format order is also its size order (K-quants apply to every 2-D tensor here)
    assert sizes == sorted(sizes) and len(set(sizes)) >= 8, dict(zip(QUANT_TYPES, sizes))
    assert sizes[-1] < validate_gguf(f16_model).tensor_data_bytes
    # no partial files left behind
    assert not list(out.glob("*.partial"))


@pytest.mark.slow
def test_ladder_manifest_rows(ladder: tuple[Path, dict]) -> None:
    out, report = ladder
    manifest = Manifest.load(out)
    assert manifest.name == "tiny" and manifest.architecture == "llama"
    for row in report["results"]:
        entry = manifest.file(Path(row["path"]).name)
        assert entry is not None and entry.kind == "model" and entry.format == row["format"]
        assert entry.bytes == Path(row["path"]).stat().st_size == row["bytes"]
        assert entry.sha256 == sha256_file(Path(row["path"]))
    bpw = {f.format: f.bpw for f in manifest.files}
    assert 2.5 < bpw["Q2_K"] < bpw["Q4_K_M"] < bpw["Q6_K"] < bpw["Q8_0"] < 9.0


@pytest.mark.slow
def test_q8_0_logits_stay_close_to_f16(ladder: tuple[Path, dict], f16_model: Path) -> None:
    from edge_lora.serving.llama_backend import LlamaContext, LlamaModel

    tokens = [1] + list(range(10, 40))

    def logits(path: Path) -> np.ndarray:
        with LlamaModel(path) as model, LlamaContext(model, n_ctx=64, n_batch=64, n_threads=2) as ctx:
            ctx.decode(tokens, 0, "all")
            return np.array([ctx.logits(i) for i in range(len(tokens))], dtype=np.float64)

    ref, q8, q2 = logits(f16_model), logits(ladder[0] / "tiny-Q8_0.gguf"), logits(ladder[0] / "tiny-Q2_K.gguf")
    err_q8 = np.abs(q8 - ref).max() / ref.std()
    err_q2 = np.abs(q2 - ref).max() / ref.std()
    # random weights are harsher than trained ones; Q8_0 must still be far closer than Q2_K
    assert err_q8 < 0.25 and err_q8 < err_q2 / 5, (err_q8, err_q2)


def test_failed_format_reported_others_finish(f16_model: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """One format whose child dies is reported; the next one is still written."""
    import edge_lora.converters.quantize as q

    real_start = q._start

    def start(src: Path, dst: Path, name: str, *rest: object) -> q.QuantJob:
        if name == "Q4_K_M":  # a source that makes llama.cpp fail for this format only
            return real_start(tmp_path / "missing.gguf", dst, name, *rest)
        return real_start(src, dst, name, *rest)

    monkeypatch.setattr(q, "_start", start)
    results = quantize_ladder(f16_model, tmp_path / "out", ["Q4_K_M", "Q8_0"])
    assert [r.ok for r in results] == [False, True]
    assert "Q4_K_M" in (results[0].error or "")
    assert not (tmp_path / "out" / "tiny-Q4_K_M.gguf").exists()
    assert not list((tmp_path / "out").glob("*.partial"))
    assert validate_gguf(tmp_path / "out" / "tiny-Q8_0.gguf").file_type == QUANT_TYPES["Q8_0"]


def _cli_error(args: list[str], capsys: pytest.CaptureFixture[str], match: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("edge-lora: error: ") and match in err, err


def test_unknown_quant_type_is_refused(f16_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _cli_error(["quantize", str(f16_model), "--quant", "Q4_K_M,Q4_Z", "--out", str(tmp_path / "o")], capsys,
               "unknown quantization type 'Q4_Z'")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_output_path_taken_by_a_directory_is_refused(f16_model: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # It used to quantize, fail at the final rename and report a failed format (exit code 1).
    (tmp_path / "o" / "tiny-Q8_0.gguf").mkdir(parents=True)
    _cli_error(["quantize", str(f16_model), "--quant", "Q4_K_M,Q8_0", "--out", str(tmp_path / "o")], capsys,
               "tiny-Q8_0.gguf is a directory")
    assert not list((tmp_path / "o").glob("*.gguf*.partial")) and not (tmp_path / "o" / "tiny-Q4_K_M.gguf").exists()


def test_already_quantized_is_refused(f16_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    [result] = quantize_ladder(f16_model, tmp_path, ["Q8_0"])
    assert result.ok
    _cli_error(["quantize", str(tmp_path / "tiny-Q8_0.gguf"), "--quant", "Q4_K_M", "--out", str(tmp_path / "o")],
               capsys, "already quantized")
    assert not list(tmp_path.glob("o/*.gguf*"))


def test_adapter_and_garbage_inputs_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "x-F16.gguf"
    garbage.write_bytes(b"GGUF" + b"\xff" * 60)
    _cli_error(["quantize", str(garbage), "--quant", "Q8_0", "--out", str(tmp_path / "o")], capsys, "x-F16.gguf")
    _cli_error(["quantize", str(tmp_path / "nope.gguf"), "--quant", "Q8_0"], capsys, "does not exist")


# Run as `python -c HELD -m edge_lora quantize ...`: the real CLI, except that once llama.cpp has
# written the Q8_0 partial the run prints its path and stops there, as if still validating it.
HELD = """
import runpy, sys, time
import edge_lora.converters.quantize as q
real_finish = q._finish
def held(job):
    if job.name != "Q8_0":
        return real_finish(job)
    job.process.wait()
    print(job.partial, flush=True)
    time.sleep(600)
q._finish = held
sys.argv = ["edge-lora", *sys.argv[1:]]
runpy.run_module("edge_lora", run_name="__main__")
"""


@pytest.mark.slow
def test_a_killed_runs_partials_are_removed_by_the_next_run_whatever_they_were_for(f16_model: Path,
                                                                                  tmp_path: Path) -> None:
    """`quantize --quant Q4_K_M,Q8_0` killed by SIGKILL while its Q8_0 partial is on disk; then
    `quantize --quant Q4_K_M` into the same directory removes that Q8_0 partial too."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    held = subprocess.Popen([sys.executable, "-c", HELD, "quantize", str(f16_model), "--quant", "Q4_K_M,Q8_0",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert held.stdout is not None
        partial = Path(held.stdout.readline().strip())
        assert partial.name.startswith("tiny-Q8_0.gguf.") and partial.is_file(), held.stderr.read() if held.stderr else ""
        assert partial.stat().st_size > 0  # what llama.cpp wrote: a real, half-published file
    finally:
        os.kill(held.pid, signal.SIGKILL)
        held.wait(timeout=60)
    assert held.returncode == -signal.SIGKILL and partial.is_file()

    again = subprocess.run([sys.executable, "-m", "edge_lora", "quantize", str(f16_model), "--quant", "Q4_K_M",
                            "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert not partial.exists()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".partial")]
    assert validate_gguf(out / "tiny-Q4_K_M.gguf").file_type == QUANT_TYPES["Q4_K_M"]
    assert not (out / "tiny-Q8_0.gguf").exists()
