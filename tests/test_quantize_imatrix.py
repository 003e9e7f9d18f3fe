"""Quantization with an importance matrix: the tensors equal those of llama.cpp's own
``llama_model_quantize`` handed the same data directly (read from the file with gguf-py, as
llama-quantize loads it); matrices that do not fit are typed errors naming the tensor before any
work; the manifest and the CLI say which files are calibrated."""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from edge_lora.cli import main
from edge_lora.converters.hf_to_gguf import convert_checkpoint
from edge_lora.converters.quantize import quantize_ladder, record_in_manifest
from edge_lora.core.errors import ImatrixError
from edge_lora.core.formats import BY_NAME, LADDERS, Ladder
from edge_lora.core.imatrix_file import ImatrixEntry, read_imatrix, write_imatrix
from edge_lora.core.manifest import Manifest, sha256_file
from tests.support.model_fixtures import make_checkpoint
from tests.support.paths import LICENSES


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-layer synthetic Llama at F16, a calibration text and its importance matrix."""
    from edge_lora.workflows.calibrate import calibrate

    root = tmp_path_factory.mktemp("qimatrix")
    ckpt = make_checkpoint("llama", root / "llama", n_layers=2)
    f16 = convert_checkpoint(ckpt, root / "tiny-F16.gguf")
    text = root / "calibration.txt"
    text.write_text((LICENSES / "LGPL-2.1").read_text()[:8000], encoding="utf-8")
    imatrix = root / "tiny.imatrix.gguf"
    calibrate(f16, text, imatrix, ctx=64)
    return {"root": root, "f16": f16, "text": text, "imatrix": imatrix}


def _direct_quantize(src: Path, dst: Path, ftype: int, imatrix: Path | None) -> None:
    """llama.cpp's quantizer called the way llama-quantize calls it (tools/quantize: the mean
    squares per weight, and its four ``quantize.imatrix.*`` keys), the imatrix read with gguf-py."""
    import llama_cpp.llama_cpp as llama

    llama.llama_backend_init()
    params = llama.llama_model_quantize_default_params()
    params.nthread = 2
    params.ftype = ftype
    keep = []
    if imatrix is not None:
        tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in gguf.GGUFReader(imatrix).tensors}
        names = sorted(n[:-len(".in_sum2")] for n in tensors if n.endswith(".in_sum2"))
        data = (llama.llama_model_imatrix_data * (len(names) + 1))()
        for slot, name in zip(data, names):
            sums = tensors[name + ".in_sum2"].reshape(-1)
            counts = tensors[name + ".counts"].reshape(-1)
            per = sums.size // counts.size
            values = np.concatenate([sums[j * per:(j + 1) * per] / np.float32(counts[j]) if counts[j] > 0
                                     else np.ones(per, np.float32) for j in range(counts.size)]).astype(np.float32)
            keep.append(values)
            slot.name, slot.size = name.encode(), values.size
            slot.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = ctypes.cast(data, ctypes.POINTER(llama.llama_model_imatrix_data))
        fields = gguf.GGUFReader(imatrix).fields
        overrides = (llama.llama_model_kv_override * 5)()
        for slot, (key, value) in zip(overrides, [
                ("quantize.imatrix.file", imatrix.name), ("quantize.imatrix.dataset", fields["imatrix.datasets"].contents()[0]),
                ("quantize.imatrix.entries_count", len(names)),
                ("quantize.imatrix.chunks_count", fields["imatrix.chunk_count"].contents())]):
            slot.key = key.encode()
            if isinstance(value, str):
                slot.tag, slot.value.val_str = llama.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()
            else:
                slot.tag, slot.value.val_i64 = llama.LLAMA_KV_OVERRIDE_TYPE_INT, value
        params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama.llama_model_kv_override))
    assert llama.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


def _tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, bytes(np.asarray(t.data).tobytes())) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("fmt", ["Q2_K", "Q4_K_M"])
def test_calibrated_quantization_equals_llama_cpps_own(calibrated: dict[str, Path], fmt: str,
                                                       tmp_path: Path) -> None:
    [result] = quantize_ladder(calibrated["f16"], tmp_path / "ours", [fmt], imatrix=calibrated["imatrix"])
    assert result.ok, result.error
    direct = tmp_path / f"direct-{fmt}.gguf"
    _direct_quantize(calibrated["f16"], direct, BY_NAME[fmt].file_type, calibrated["imatrix"])
    plain = tmp_path / f"plain-{fmt}.gguf"
    _direct_quantize(calibrated["f16"], plain, BY_NAME[fmt].file_type, None)
    assert result.path.read_bytes() == direct.read_bytes()  # the whole file, metadata included
    ours, theirs, without = _tensors(result.path), _tensors(direct), _tensors(plain)
    assert list(ours) == list(theirs)
    for name in ours:
        assert ours[name] == theirs[name], name
    # The matrix was really used: every quantized block matrix differs from the uncalibrated one.
    block = [n for n in ours if n.startswith("blk.") and ours[n][0] not in ("F32", "F16")]
    assert block and all(ours[n][1] != without[n][1] for n in block)
    # llama-quantize's provenance keys, for any tool reading the file.
    fields = gguf.GGUFReader(result.path).fields
    assert fields["quantize.imatrix.file"].contents() == "tiny.imatrix.gguf"
    assert fields["quantize.imatrix.dataset"].contents() == "calibration.txt"
    assert fields["quantize.imatrix.entries_count"].contents() == 14
    assert fields["quantize.imatrix.chunks_count"].contents() == read_imatrix(calibrated["imatrix"]).chunk_count


def _altered(calibrated: dict[str, Path], tmp_path: Path, change) -> Path:  # type: ignore[no-untyped-def]
    imatrix = read_imatrix(calibrated["imatrix"])
    change(imatrix.entries)
    return write_imatrix(tmp_path / "altered.imatrix.gguf", imatrix)


def test_missing_or_wrong_shape_entries_are_refused_before_any_work(calibrated: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    missing = _altered(calibrated, tmp_path, lambda e: e.pop("blk.1.attn_v.weight"))
    with pytest.raises(ImatrixError) as caught:
        quantize_ladder(calibrated["f16"], tmp_path / "out", ["Q4_K_M"], imatrix=missing)
    assert caught.value.tensor == "blk.1.attn_v.weight" and "blk.1.attn_v.weight" in caught.value.one_line()
    assert not (tmp_path / "out").exists()

    def shrink(entries: dict[str, ImatrixEntry]) -> None:
        entries["blk.0.ffn_down.weight"] = ImatrixEntry(np.ones((1, 256)), np.array([64]))

    wrong = _altered(calibrated, tmp_path, shrink)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["quantize", str(calibrated["f16"]), "--quant", "Q4_K_M", "--out", str(tmp_path / "cli"),
                     "--imatrix", str(wrong)])
    assert code == 2
    line = stderr.getvalue().strip()
    assert len(line.splitlines()) == 1 and "blk.0.ffn_down.weight" in line and "Traceback" not in line
    assert not list((tmp_path / "cli").glob("*.gguf")) if (tmp_path / "cli").exists() else True


def test_quantize_cli_calibrates_and_the_manifest_records_it(calibrated: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["quantize", str(calibrated["f16"]), "--quant", "Q4_K_M,Q8_0", "--out", str(out),
                     "--calibrate", str(calibrated["text"]), "--json"]) == 0
    report = json.loads(stdout.getvalue())
    imatrix = out / "tiny.imatrix.gguf"
    assert report["imatrix"] == str(imatrix) and imatrix.is_file()
    written = read_imatrix(imatrix)
    expected = {"sha256": sha256_file(imatrix), "text_sha256": sha256_file(calibrated["text"]),
                "tokens": written.chunk_count * 512, "dataset": "calibration.txt", "path": "tiny.imatrix.gguf",
                "text_sketch": written.text_sketch}
    manifest = Manifest.load(out)
    for fmt in ("Q4_K_M", "Q8_0"):
        row = manifest.file(f"tiny-{fmt}.gguf")
        assert row is not None and row.imatrix == expected
    assert all(r["imatrix"] == expected for r in report["results"])
    on_disk = json.loads((out / "manifest.json").read_text())
    assert all(f["imatrix"] == expected for f in on_disk["files"])

    # Re-quantizing without a matrix replaces the rows: no stale "calibrated" claim.
    [plain] = quantize_ladder(calibrated["f16"], out, ["Q8_0"])
    record_in_manifest(out, calibrated["f16"], [plain])
    manifest = Manifest.load(out)
    assert manifest.file("tiny-Q8_0.gguf").imatrix is None
    assert "imatrix" not in json.loads((out / "manifest.json").read_text())["files"][-1]
    assert manifest.file("tiny-Q4_K_M.gguf").imatrix == expected


def test_imatrix_cli_writes_a_file_llama_quantize_reads(calibrated: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.imatrix.gguf"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["imatrix", str(calibrated["f16"]), "--text", str(calibrated["text"]), "--ctx", "64",
                     "--out", str(out), "--json"]) == 0
    report = json.loads(stdout.getvalue())
    assert report["path"] == str(out) and report["entries"] == 14 and report["tokens"] == 64 * report["chunks"]
    assert report["text_sha256"] == sha256_file(calibrated["text"])
    # Same text, same model, same chunking: the same sums as the module fixture's run.
    again, before = read_imatrix(out), read_imatrix(calibrated["imatrix"])
    for name, entry in before.entries.items():
        np.testing.assert_allclose(again.entries[name].sums, entry.sums, rtol=1e-6)


def test_imatrix_refuses_text_overlapping_the_evaluation_text(calibrated: dict[str, Path], tmp_path: Path) -> None:
    from edge_lora.analysis.perplexity import default_eval_text

    mixed = tmp_path / "mixed.txt"
    mixed.write_text(calibrated["text"].read_text() + "\n" + default_eval_text()[:3000], encoding="utf-8")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["imatrix", str(calibrated["f16"]), "--text", str(mixed), "--ctx", "64",
                     "--out", str(tmp_path / "x.imatrix.gguf")])
    assert code == 2 and "held-out evaluation text" in stderr.getvalue()
    assert not (tmp_path / "x.imatrix.gguf").exists()


def test_fit_and_modelfile_say_which_files_are_calibrated(calibrated: dict[str, Path], tmp_path: Path) -> None:
    from edge_lora.analysis.fit import fit_report
    from edge_lora.analysis.modelfile import render_modelfile
    from tests.support.modelfile_grammar import parse_modelfile

    out = tmp_path / "out"
    quantize_ladder(calibrated["f16"], out, ["Q4_K_M"], imatrix=calibrated["imatrix"])
    quantize_ladder(calibrated["f16"], out, ["Q8_0"])
    report = fit_report([out, calibrated["f16"]], ctx=256)
    by_format = {m.format: m for m in report.models}
    assert by_format["Q4_K_M"].calibrated == "tiny.imatrix.gguf (calibration.txt)"
    assert by_format["Q8_0"].calibrated is None and by_format["F16"].calibrated is None
    assert {m["format"]: m["calibrated"] for m in report.to_json()["models"]}["Q4_K_M"] == by_format["Q4_K_M"].calibrated

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["fit", str(out), "--ctx", "256"]) == 0
    lines = {line.split()[0]: line for line in stdout.getvalue().splitlines() if line.startswith("Q")}
    assert "[imatrix tiny.imatrix.gguf (calibration.txt)]" in lines["Q4_K_M"] and "imatrix" not in lines["Q8_0"]

    text = render_modelfile(out / "tiny-Q4_K_M.gguf")
    assert "# quantized with the importance matrix tiny.imatrix.gguf (calibration.txt)" in text.splitlines()
    parse_modelfile(text)  # still a valid Modelfile
    assert "importance matrix" not in render_modelfile(out / "tiny-Q8_0.gguf")


def test_iq_formats_needing_an_imatrix_are_refused_without_one(calibrated: dict[str, Path], tmp_path: Path) -> None:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["quantize", str(calibrated["f16"]), "--quant", "IQ4_XS,IQ2_XXS,IQ3_XXS",
                     "--out", str(tmp_path / "out")])
    line = stderr.getvalue().strip()
    assert code == 2 and len(line.splitlines()) == 1
    assert "IQ2_XXS, IQ3_XXS need an importance matrix" in line and "--calibrate" in line
    assert not (tmp_path / "out").exists()
    # IQ4_XS / IQ4_NL / IQ3_S do not need one.
    results = quantize_ladder(calibrated["f16"], tmp_path / "plain", ["IQ4_NL"])
    assert results[0].ok, results[0].error


@pytest.mark.slow
def test_iq_ladder_with_an_imatrix_loads_and_runs(calibrated: dict[str, Path], tmp_path: Path) -> None:
    from edge_lora.core.gguf_check import validate_gguf
    from edge_lora.serving.llama_backend import LlamaContext, LlamaModel

    iq_ladder = {f.name: f.file_type for f in LADDERS[Ladder.IQ]}
    results = quantize_ladder(calibrated["f16"], tmp_path, list(iq_ladder), imatrix=calibrated["imatrix"])
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    for result in results:
        info = validate_gguf(result.path, expect_type="model")
        assert info.file_type == iq_ladder[result.name]
        # Rows of 256 take the file type's default tensor type (IQ2_S's is IQ2_XS; llama.cpp's mix
        # gives some tensors, e.g. attn_v and attn_output, more bits).
        assert info.tensor("blk.1.ffn_up.weight").type_name == {"IQ2_S": "IQ2_XS"}.get(result.name, result.name)
        with LlamaModel(result.path) as model, LlamaContext(model, n_ctx=64) as context:
            context.decode(model.tokenize("The licensee may copy and distribute"), logits="last")
            assert np.isfinite(context.logits()).all(), result.name


def test_convert_calibrates_or_takes_an_imatrix(calibrated: dict[str, Path], tmp_path: Path) -> None:
    """``convert --calibrate TEXT`` computes the matrix on the written F16 and quantizes with it;
    ``convert --imatrix FILE`` quantizes with a given one (the same bytes for the same matrix);
    without either, the formats that need one are refused before anything is written."""
    ckpt = calibrated["root"] / "llama"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["convert", str(ckpt), "--out", str(tmp_path / "a"), "--quant", "Q4_K_M,IQ2_XXS",
                     "--calibrate", str(calibrated["text"]), "--json"]) == 0
    rows = {f["format"]: f for f in json.loads(stdout.getvalue())["files"]}
    imatrix = tmp_path / "a" / "llama.imatrix.gguf"
    assert rows["F16"].get("imatrix") is None
    for fmt in ("Q4_K_M", "IQ2_XXS"):
        assert rows[fmt]["imatrix"]["sha256"] == sha256_file(imatrix)
        assert rows[fmt]["imatrix"]["text_sha256"] == sha256_file(calibrated["text"])

    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["convert", str(ckpt), "--out", str(tmp_path / "b"), "--quant", "Q4_K_M",
                     "--imatrix", str(imatrix)]) == 0
    assert (tmp_path / "b" / "llama-Q4_K_M.gguf").read_bytes() == (tmp_path / "a" / "llama-Q4_K_M.gguf").read_bytes()
    assert Manifest.load(tmp_path / "b").file("llama-Q4_K_M.gguf").imatrix["sha256"] == sha256_file(imatrix)

    broken = tmp_path / "broken.imatrix.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 20)
    for extra in ([], ["--imatrix", str(broken)]):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            code = main(["convert", str(ckpt), "--out", str(tmp_path / "c"), "--quant", "IQ2_XXS", *extra])
        assert code == 2 and len(stderr.getvalue().strip().splitlines()) == 1, stderr.getvalue()
        assert not (tmp_path / "c").exists()


def test_ppl_warns_when_the_text_is_the_calibration_text(calibrated: dict[str, Path], tmp_path: Path) -> None:
    """The matrix carries a sketch of its calibration text into the manifest row of every file
    quantized with it; ``ppl`` on that text (gone or not) warns, on other text it does not."""
    from edge_lora.analysis.imatrix import sketch_of_file

    sketch = read_imatrix(calibrated["imatrix"]).text_sketch
    assert sketch == sketch_of_file(calibrated["text"]).encode()
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["quantize", str(calibrated["f16"]), "--quant", "Q4_K_M", "--out", str(out),
                     "--imatrix", str(calibrated["imatrix"])]) == 0
        assert main(["quantize", str(calibrated["f16"]), "--quant", "Q8_0", "--out", str(out)]) == 0
    calibrated_row = Manifest.load(out).file("tiny-Q4_K_M.gguf")
    assert calibrated_row is not None and calibrated_row.imatrix is not None
    assert calibrated_row.imatrix["text_sketch"] == sketch
    moved = tmp_path / "gone.txt"  # the calibration text need not exist any more
    moved.write_text(calibrated["text"].read_text(), encoding="utf-8")
    other = tmp_path / "other.txt"
    other.write_text((LICENSES / "MPL-2.0").read_text()[:8000], encoding="utf-8")

    def ppl(text: Path) -> tuple[dict, str]:  # type: ignore[type-arg]
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            assert main(["ppl", str(out / "tiny-Q4_K_M.gguf"), "--text", str(text), "--ctx", "64", "--json"]) == 0
        return json.loads(stdout.getvalue()), stderr.getvalue()

    same, warning = ppl(moved)
    assert same["calibration_overlap"] == 1.0
    assert "warning" in warning and "calibration.txt" in warning and "evaluate on other text" in warning
    assert len(warning.strip().splitlines()) == 1
    unrelated, quiet = ppl(other)
    assert unrelated["calibration_overlap"] is not None and unrelated["calibration_overlap"] < 0.05
    assert "warning" not in quiet
    stdout = io.StringIO()  # the uncalibrated file: nothing to say
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        assert main(["ppl", str(out / "tiny-Q8_0.gguf"), "--text", str(moved), "--ctx", "64", "--json"]) == 0
    assert json.loads(stdout.getvalue())["calibration_overlap"] is None
