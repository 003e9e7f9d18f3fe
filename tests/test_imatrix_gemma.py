"""The importance matrix on the real Gemma 3 270M (legal adapter merged, F16): calibrated Q2_K
keeps more of the model than uncalibrated Q2_K on the held-out text, and IQ formats — whose
256-wide blocks do not divide Gemma's 640-wide rows — fall back to IQ4_NL for those tensors,
load and run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_lora.converters.quantize import quantize_ladder
from edge_lora.core.gguf_check import validate_gguf
from edge_lora.core.imatrix_file import write_imatrix
from edge_lora.analysis.perplexity import default_eval_text, measure_perplexity

pytestmark = pytest.mark.slow
CHUNKS = 12  # of the shipped text's 26: 6,144 calibration tokens


@pytest.fixture(scope="module")
def legal_imatrix(gemma_legal_f16_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edge_lora.analysis.imatrix import compute_imatrix, default_calibration_text

    run = compute_imatrix(gemma_legal_f16_gguf, default_calibration_text(), ctx=512, max_chunks=CHUNKS)
    assert run.early_stop and len(run.imatrix.entries) == 18 * 7
    return write_imatrix(tmp_path_factory.mktemp("gemma-imatrix") / "legal.imatrix.gguf", run.imatrix)


def test_calibrated_q2_k_has_lower_kld_than_uncalibrated(gemma_legal_f16_gguf: Path, legal_imatrix: Path,
                                                         tmp_path: Path) -> None:
    [plain] = quantize_ladder(gemma_legal_f16_gguf, tmp_path / "plain", ["Q2_K"])
    [calibrated] = quantize_ladder(gemma_legal_f16_gguf, tmp_path / "calibrated", ["Q2_K"], imatrix=legal_imatrix)
    assert plain.ok and calibrated.ok
    text = default_eval_text()
    # Exact (lockstep) KLD for both: no baseline cache.
    without = measure_perplexity(plain.path, text, ctx=512, max_windows=4, kld_base=gemma_legal_f16_gguf,
                                 use_cache=False)
    with_ = measure_perplexity(calibrated.path, text, ctx=512, max_windows=4, kld_base=gemma_legal_f16_gguf,
                               use_cache=False)
    assert with_.kld < 0.9 * without.kld, (with_.kld, without.kld)
    assert with_.ppl < without.ppl, (with_.ppl, without.ppl)


def test_iq_formats_fall_back_on_640_wide_rows_and_run(gemma_legal_f16_gguf: Path, legal_imatrix: Path,
                                                      tmp_path: Path) -> None:
    names = ["IQ2_XXS", "IQ3_S", "IQ4_XS"]
    results = quantize_ladder(gemma_legal_f16_gguf, tmp_path, names, imatrix=legal_imatrix)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    f16 = measure_perplexity(gemma_legal_f16_gguf, default_eval_text(), ctx=512, max_windows=1)
    for result in results:
        info = validate_gguf(result.path, expect_type="model")
        types = {t.name: t.type_name for t in info.tensors}
        # 640-wide rows (q/k/v, gate/up read the 640-wide hidden state): llama.cpp's fallback
        # to IQ4_NL (32-blocks); 2048-wide ffn_down rows keep an IQ type of the file's family.
        assert types["blk.9.attn_q.weight"] == "IQ4_NL" and types["blk.9.ffn_up.weight"] == "IQ4_NL"
        assert types["blk.9.ffn_down.weight"] == result.name, (result.name, types["blk.9.ffn_down.weight"])
        quality = measure_perplexity(result.path, default_eval_text(), ctx=512, max_windows=1)
        assert np.isfinite(quality.ppl) and quality.ppl < 3 * f16.ppl, (result.name, quality.ppl, f16.ppl)
