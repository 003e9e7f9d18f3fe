"""The real legal adapter on the real Gemma 3 270M base, through `convert_model`: the merged
F16, the base F16 with the GGUF LoRA hot-applied, and the merged Q4_K_M reproduce the
README's perplexities on held-out text (llama-perplexity's method, 512-token windows)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.paths import LEGAL_ADAPTER_DIR
from edge_lora.core.manifest import Manifest
from edge_lora.workflows.convert_model import convert_model

# edge_lora/data/legal-adapter/README.md, HF transformers + PEFT float32
BASE_PPL = 9.460
ADAPTED_PPL = 8.918


@pytest.fixture(scope="module")
def legal_outputs(gemma_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("legal-pipeline")
    manifest = convert_model(gemma_hf_dir, out, adapter=LEGAL_ADAPTER_DIR, quants=["Q4_K_M"])
    return out, manifest


def _ppl(model: Path, text: str, adapters: tuple = ()) -> float:
    from edge_lora.analysis.perplexity import measure_perplexity

    result = measure_perplexity(model, text, ctx=512, adapters=adapters, use_cache=False)
    assert result.tokens == 2805  # 11 windows x 255 scored tokens, as in the README
    return result.ppl


@pytest.mark.slow
def test_pipeline_layout(legal_outputs: tuple[Path, Manifest]) -> None:
    out, manifest = legal_outputs
    rows = {f.path: f for f in manifest.files}
    name = "gemma-3-270m-hf-legal-adapter"
    assert rows[f"{name}-F16.gguf"].kind == "merged" and rows[f"{name}-Q4_K_M.gguf"].kind == "merged"
    assert rows["adapter-legal-adapter.gguf"].kind == "adapter"
    assert manifest.architecture == "gemma3" and manifest.adapter == str(LEGAL_ADAPTER_DIR)
    assert rows[f"{name}-Q4_K_M.gguf"].bytes < rows[f"{name}-F16.gguf"].bytes
    assert not list(out.glob("*.partial"))


@pytest.mark.slow
def test_legal_adapter_perplexity_drop(legal_outputs: tuple[Path, Manifest], gemma_f16_gguf: Path,
                                       heldout_text: str) -> None:
    out, _ = legal_outputs
    name = "gemma-3-270m-hf-legal-adapter"
    hot = _ppl(gemma_f16_gguf, heldout_text, (out / "adapter-legal-adapter.gguf",))
    merged = _ppl(out / f"{name}-F16.gguf", heldout_text)
    merged_q4 = _ppl(out / f"{name}-Q4_K_M.gguf", heldout_text)
    assert abs(hot / ADAPTED_PPL - 1) < 0.02, hot
    assert abs(merged / ADAPTED_PPL - 1) < 0.02, merged
    assert abs(merged_q4 / merged - 1) < 0.10, (merged_q4, merged)
    # the drop itself: an adapter applied wrongly (or not at all) stays near the base's 9.46
    assert merged < BASE_PPL * 0.97 and hot < BASE_PPL * 0.97
