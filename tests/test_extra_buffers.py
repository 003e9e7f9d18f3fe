"""The extra-buffer probe (AMX / CPU repack): the probe model takes the paths it is meant to
exercise, a probe child that dies by a signal makes the parent fall back (and cache "not
usable") instead of dying, the environment forces the fallback, a bad cache file is ignored, and
`doctor` says which path is in use and why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from edge_lora.serving import extra_buffers, llama_backend
from edge_lora.core import constants
from edge_lora.core.gguf_check import validate_gguf
from edge_lora.hardware import cpu_identity

QT = gguf.GGMLQuantizationType
# amx/common.h qtype_has_amx_kernels; repack.cpp's x86 (AVX2) choices.
AMX_TYPES = {"Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"}
X86_REPACK_TYPES = {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"}

SIGILL_CHILD = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]


def _fake_child(report: dict) -> list[str]:
    return [sys.executable, "-c", f"print({json.dumps(json.dumps(report))})"]


@pytest.fixture
def probe_cache(tmp_path: Path) -> Path:
    return tmp_path / "probe-cache"


@pytest.fixture
def fresh_memo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(extra_buffers, "_memo", None)


def test_probe_model_uses_every_type_and_shape_the_extra_paths_take(tmp_path: Path) -> None:
    info = validate_gguf(extra_buffers.write_probe_model(tmp_path / "probe.gguf"), expect_type="model")
    matrices = [t for t in info.tensors if len(t.shape) == 2 and t.name != "token_embd.weight"]
    types = {t.type_name for t in matrices}
    assert AMX_TYPES <= types and X86_REPACK_TYPES <= types
    for t in matrices:
        # AMX: output rows % 32 (TILE_N * 2) and row length % 256 (QK_K); repack: rows % 8.
        assert t.shape[1] % 32 == 0 and t.shape[0] % 256 == 0, t
    assert info.file_bytes < 4 * 1024 * 1024


REAL_MODEL_WITH_EXTRA_BUFFERS = """
import sys
import llama_cpp.llama_cpp as bindings
from llama_cpp import Llama
assert bindings.llama_model_default_params().use_extra_bufts  # llama.cpp's default: on
llm = Llama(sys.argv[1], n_ctx=64, n_batch=32, n_threads=1, verbose=False)
llm.eval(list(range(3, 35)))  # a prompt batch: the path AMX and repacked weights take
print("decoded")
"""


def test_the_probe_verdict_is_what_a_real_model_does_on_this_machine(probe_cache: Path, gemma_q4_gguf: Path) -> None:
    """Whatever this CPU is: the probe passes exactly where the real Gemma Q4_K_M, loaded with
    llama.cpp's defaults (extra buffers on) in a child, decodes a prompt batch; where it passes it
    names the buffer types, where it fails it names the signal; the verdict is cached."""
    verdict = extra_buffers.extra_buffers_verdict(cache_dir=probe_cache)
    assert verdict.source == "probe", verdict
    real = subprocess.run([sys.executable, "-c", REAL_MODEL_WITH_EXTRA_BUFFERS, str(gemma_q4_gguf)],
                          capture_output=True, text=True, timeout=300)
    real_runs = real.returncode == 0 and "decoded" in real.stdout
    assert real_runs or real.returncode < 0, real.stderr[-2000:]  # ran, or died by a signal
    assert verdict.usable == real_runs, (verdict, real.returncode)
    if verdict.usable and "avx2" in cpu_identity().flags:  # repack.cpp: Q4_0/Q4_K/IQ4_NL/MXFP4 on AVX2
        assert "CPU_REPACK" in verdict.buffer_types
    if not verdict.usable:
        assert "the probe child died by SIG" in verdict.reason, verdict.reason
    again = extra_buffers.extra_buffers_verdict(cache_dir=probe_cache, child_command=SIGILL_CHILD)
    assert again.source == "cached" and again.usable == verdict.usable  # no second probe


def test_a_probe_child_killed_by_sigill_means_fallback_and_is_cached(probe_cache: Path) -> None:
    verdict = extra_buffers.extra_buffers_verdict(cache_dir=probe_cache, child_command=SIGILL_CHILD)
    assert not verdict.usable and verdict.source == "probe"
    assert "SIGILL" in verdict.reason
    assert verdict.cache_file is not None and json.loads(verdict.cache_file.read_text())["usable"] is False
    cached = extra_buffers.extra_buffers_verdict(cache_dir=probe_cache, child_command=_fake_child(
        {"ok": True, "buffer_types": ["CPU_REPACK"], "reason": "would pass"}))
    assert not cached.usable and cached.source == "cached" and "SIGILL" in cached.reason
    assert "off: the probe child died by SIGILL" in cached.describe()


def test_a_hanging_or_silent_probe_child_means_fallback(tmp_path: Path) -> None:
    hung, _ = extra_buffers.probe_verdict(child_command=[sys.executable, "-c", "import time; time.sleep(60)"],
                                          timeout=1.0)
    assert not hung.usable and "timed out" in hung.reason
    silent, _ = extra_buffers.probe_verdict(child_command=[sys.executable, "-c", "pass"])
    assert not silent.usable and "no verdict" in silent.reason
    failed, _ = extra_buffers.probe_verdict(child_command=_fake_child(
        {"ok": False, "buffer_types": ["AMX"], "reason": "the extra-buffer path gave NaN/inf logits"}))
    assert not failed.usable and failed.buffer_types == ("AMX",) and "NaN" in failed.reason


@pytest.mark.parametrize("content", [
    b"", b"{not json", b"\xff\xfe\x00", b"[]", b'{"format": 1}', b"x" * 100_000,
    b'{"format": 1, "key": {"cpu_model": "another CPU"}, "usable": false, "reason": "r", "buffer_types": []}',
    b'{"format": 99, "key": null, "usable": true, "reason": "r", "buffer_types": []}',
], ids=["empty", "truncated", "binary", "list", "no-verdict", "huge", "another-machine", "future-format"])
def test_a_corrupt_or_foreign_cache_file_is_ignored_and_rewritten(probe_cache: Path, content: bytes) -> None:
    path = extra_buffers.cache_file_for(extra_buffers.machine_key(), probe_cache)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    verdict = extra_buffers.extra_buffers_verdict(cache_dir=probe_cache, child_command=_fake_child(
        {"ok": True, "buffer_types": ["CPU_REPACK"], "reason": "fake probe ran"}))
    assert verdict.source == "probe" and verdict.usable and verdict.reason == "fake probe ran"
    rewritten = json.loads(path.read_text())
    assert rewritten["usable"] is True and rewritten["key"] == extra_buffers.machine_key()


def test_the_environment_forces_the_fallback_without_a_probe(monkeypatch: pytest.MonkeyPatch, probe_cache: Path,
                                                             fresh_memo: None) -> None:
    monkeypatch.setattr(constants, "NO_EXTRA_BUFFERS", True)
    verdict = extra_buffers.extra_buffers_verdict(cache_dir=probe_cache, child_command=SIGILL_CHILD)
    assert verdict.source == "forced" and not verdict.usable
    assert not probe_cache.exists()  # no probe ran
    assert extra_buffers.use_extra_buffers() is False
    assert llama_backend.model_params().use_extra_bufts is False


def test_after_a_crashing_probe_models_load_without_extra_buffers_and_still_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_memo: None) -> None:
    """The whole chain in this process: the probe child dies by SIGILL, this process survives,
    and the next model load passes use_extra_bufts=False and decodes."""
    cache = constants.EDGE_LORA_CACHE / "probe-elsewhere"
    monkeypatch.setattr(extra_buffers, "cache_file_for", lambda key, cache_dir=None: cache / "verdict.json")
    real = extra_buffers.extra_buffers_verdict
    monkeypatch.setattr(extra_buffers, "extra_buffers_verdict",
                        lambda **kw: real(child_command=SIGILL_CHILD, **kw))
    seen: list[bool] = []
    real_load = llama_backend.llama.llama_model_load_from_file

    def recording_load(path: bytes, params):  # type: ignore[no-untyped-def]
        seen.append(bool(params.use_extra_bufts))
        return real_load(path, params)

    monkeypatch.setattr(llama_backend.llama, "llama_model_load_from_file", recording_load)
    model_path = extra_buffers.write_probe_model(tmp_path / "tiny.gguf")
    with llama_backend.LlamaModel(model_path) as model:
        ctx = llama_backend.LlamaContext(model, n_ctx=64, n_batch=32)
        ctx.decode(list(range(3, 35)), logits="all")
        assert ctx.logits(31).shape == (model.n_vocab,)
    assert seen == [False]
    assert json.loads((cache / "verdict.json").read_text())["usable"] is False


def _doctor(env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_lora", "doctor"], capture_output=True, text=True,
                          env={**os.environ, **env_extra}, timeout=300)


def test_doctor_says_which_path_is_in_use_and_why() -> None:
    forced = _doctor({constants.NO_EXTRA_BUFFERS_ENV: "1"})
    assert forced.returncode == 0, forced.stderr
    assert "Extra buffers off: forced by EDGE_LORA_NO_EXTRA_BUFFERS=1" in forced.stdout
    probed = _doctor({})
    assert probed.returncode == 0, probed.stderr
    verdict = extra_buffers.extra_buffers_verdict()  # this machine's, cached by the doctor child
    assert verdict.source == "cached"
    line = next(line for line in probed.stdout.splitlines() if line.startswith("Extra buffers"))
    expected = "Extra buffers on (" if verdict.usable else "Extra buffers off: the probe child died by SIG"
    assert line.startswith(expected) and "probe" in line and "cached in" in line, line
    as_json = subprocess.run([sys.executable, "-m", "edge_lora", "doctor", "--json"], capture_output=True,
                             text=True, timeout=300)
    document = json.loads(as_json.stdout)
    assert document["extra_buffers"]["usable"] is verdict.usable and document["extra_buffers"]["source"] == "cached"
