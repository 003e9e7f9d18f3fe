"""Native crashes are contained: a GGUF llama.cpp aborts on is refused in Python or first loaded in
a child process; a file swapped between the check and the load is caught; `convert` proves its
output loads before publishing it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from edge_lora.serving import llama_backend
from edge_lora.converters import load_check
from edge_lora.core import constants
from edge_lora.core.errors import InvalidGGUFError
from edge_lora.core.gguf_check import FileIdentity, validate_gguf

from tests.support.tiny_gguf import write_tiny_llama

BYTES_AND_WORDS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]

# Each of these made llama.cpp 0.3.36 abort the whole process (SIGABRT) while loading.
ABORTING = {
    "nextn-layers": ({"llama.nextn_predict_layers": 5}, "n_layer_nextn <= hparams.n_layer_all", "nextn_predict_layers"),
    "rope-scaling": ({"llama.rope.scaling.type": "dynamic"}, "LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED", "rope.scaling.type"),
    "experts-used": ({"llama.expert_count": 4, "llama.expert_used_count": 8}, "n_expert_used_max <= hparams.n_expert",
                     "more used than exist"),
    "experts-none-used": ({"llama.expert_count": 4, "llama.expert_used_count": 0}, "n_expert_used_max > 0",
                          "at least one"),
    "duplicate-tokens": ({"tokenizer.ggml.tokens": BYTES_AND_WORDS + ["\u2581same"] * 41},
                         "id_to_token.size() == token_to_id.size()", None),
}


@pytest.mark.parametrize("case", list(ABORTING))
def test_a_file_the_loader_aborts_on_kills_only_the_child(tmp_path: Path, case: str) -> None:
    overrides, assert_text, python_refusal = ABORTING[case]
    path = write_tiny_llama(tmp_path / f"{case}.gguf", overrides)
    with pytest.raises(InvalidGGUFError, match="died by SIGABRT") as caught:
        load_check.check_loads(path, depth="model", fix="re-convert")
    assert assert_text in caught.value.message and "this process was not affected" in caught.value.message
    if python_refusal is not None:  # and the header check refuses it before any child runs
        with pytest.raises(InvalidGGUFError, match=python_refusal):
            validate_gguf(path, expect_type="model")


def test_llama_model_refuses_an_aborting_file_the_header_check_passes(tmp_path: Path) -> None:
    """Duplicate vocabulary strings pass the header check; the preflight child aborts, the
    caller gets a typed error, and nothing is remembered as proven."""
    path = write_tiny_llama(tmp_path / "dup.gguf", ABORTING["duplicate-tokens"][0])
    with pytest.raises(InvalidGGUFError, match="died by SIGABRT.*GGML_ASSERT"):
        llama_backend.LlamaModel(path)
    identity = FileIdentity.of(path.stat())
    assert not load_check._is_proven(identity, "model")


@pytest.mark.parametrize("overrides,match", [
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "no-such-pre", "tokenizer.ggml.merges": ["a b"]},
     "unknown pre-tokenizer type: 'no-such-pre'"),
    ({"tokenizer.ggml.model": "no-such-tokenizer"}, "unknown tokenizer: 'no-such-tokenizer'"),
    ({"llama.feed_forward_length": [128, 128]}, "wrong array length"),
], ids=["pre-tokenizer", "tokenizer", "per-layer-array"])
def test_a_file_llama_cpp_refuses_is_a_typed_error_quoting_llama_cpp(tmp_path: Path, overrides: dict,
                                                                      match: str) -> None:
    path = write_tiny_llama(tmp_path / "refused.gguf", overrides)
    with pytest.raises(InvalidGGUFError, match=match):
        load_check.check_loads(path, depth="vocab" if "tokenizer" in str(overrides) else "model", fix="x")


def test_a_vocabulary_that_would_abort_the_first_tokenize_is_refused(tmp_path: Path) -> None:
    # A BPE vocabulary too small for llama.cpp's default BOS id, and add_bos on: llama.cpp loads
    # it, then GGML_ASSERT(vocab.token_bos() != LLAMA_TOKEN_NULL) on the first tokenize.
    tokens = ["a", "b", "c", "\u010a", "ab"]
    path = write_tiny_llama(tmp_path / "nobos.gguf", {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.scores": [0.0] * 5, "tokenizer.ggml.token_type": [1] * 5,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": 99, "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.unknown_token_id": 0})
    with pytest.raises(InvalidGGUFError, match="adds a BOS token but the vocabulary has none"):
        load_check.check_loads(path, depth="vocab", fix="x")


def test_a_proven_file_is_not_loaded_again_until_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "EDGE_LORA_CACHE", tmp_path / "own-cache")
    monkeypatch.setattr(load_check, "_proven", set())
    path = write_tiny_llama(tmp_path / "ok.gguf")
    first = load_check.check_loads(path, depth="model", fix="x", identity=FileIdentity.of(path.stat()))
    assert not first.cached and first.n_vocab == 300
    assert list((tmp_path / "own-cache" / constants.NATIVE_CACHE_DIR / "loads").iterdir())
    monkeypatch.setattr(load_check, "_proven", set())  # a new process: the marker file answers
    again = load_check.check_loads(path, depth="vocab", fix="x", identity=FileIdentity.of(path.stat()))
    assert again.cached  # a whole-model proof covers the vocabulary
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = load_check.check_loads(path, depth="model", fix="x", identity=FileIdentity.of(path.stat()))
    assert not changed.cached


def test_a_file_replaced_after_validation_is_refused(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "model.gguf")
    info = validate_gguf(path, expect_type="model")
    other = write_tiny_llama(tmp_path / "other.gguf", seed=1)
    os.replace(other, path)
    with pytest.raises(InvalidGGUFError, match="replaced or modified while it was being loaded"):
        llama_backend.LlamaModel(path, info=info)


def test_a_file_swapped_between_the_preflight_and_the_load_is_refused(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The swap happens in the window between the child's proof and llama.cpp's load: the model
    loaded is the validated file (through its descriptor), and the changed path is still refused."""
    path = write_tiny_llama(tmp_path / "model.gguf")
    hostile = write_tiny_llama(tmp_path / "hostile.gguf", ABORTING["duplicate-tokens"][0])
    real_check = load_check.check_loads
    loaded: list[bytes] = []
    real_load = llama_backend.llama.llama_model_load_from_file

    def check_then_swap(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = real_check(*args, **kwargs)
        os.replace(hostile, path)
        return result

    def recording_load(name: bytes, params):  # type: ignore[no-untyped-def]
        loaded.append(name)
        return real_load(name, params)

    monkeypatch.setattr(llama_backend, "check_loads", check_then_swap)
    monkeypatch.setattr(llama_backend.llama, "llama_model_load_from_file", recording_load)
    with pytest.raises(InvalidGGUFError, match="replaced or modified"):
        llama_backend.LlamaModel(path)
    assert loaded and loaded[0].startswith(b"/proc/self/fd/")  # the descriptor, not the swapped name


def test_a_file_grown_in_place_after_validation_is_refused(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "model.gguf")
    info = validate_gguf(path, expect_type="model")
    with open(path, "ab") as fh:
        fh.write(b"\0" * 32)
    with pytest.raises(InvalidGGUFError, match="replaced or modified"):
        llama_backend.LlamaModel(path, info=info)


def test_an_unchanged_file_loads_and_runs(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "model.gguf")
    with llama_backend.LlamaModel(path) as model:
        ctx = llama_backend.LlamaContext(model, n_ctx=64, n_batch=16)
        ctx.decode(model.tokenize("hello"))
        assert ctx.logits().shape == (300,)


# --- convert proves its output loads ---

def _published(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def _unknown_pre_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_lora.converters import hf_to_gguf, tokenizer_export

    real_read = tokenizer_export.read_tokenizer

    def unknown_pre(*args, **kwargs):  # type: ignore[no-untyped-def]
        spec = real_read(*args, **kwargs)
        spec.pre = "no-such-pre"
        return spec

    monkeypatch.setattr(hf_to_gguf, "read_tokenizer", unknown_pre)


def _missing_hparam(monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_lora.converters.gguf_output import StreamingGGUFWriter

    real_add = StreamingGGUFWriter.add_metadata

    def without_context_length(self, items):  # type: ignore[no-untyped-def]
        real_add(self, [item for item in items if item[0] != "qwen2.context_length"])

    monkeypatch.setattr(StreamingGGUFWriter, "add_metadata", without_context_length)


def _wrong_tensor_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """ffn_down planned (and written) transposed: the same bytes, so the writer's own plan check
    passes; only the architecture's shape table can tell."""
    import dataclasses

    from edge_lora.converters import hf_to_gguf

    real_plan = hf_to_gguf._plan_tensor

    def transposed_ffn_down(*args, **kwargs):  # type: ignore[no-untyped-def]
        planned = real_plan(*args, **kwargs)
        if planned.name == "blk.0.ffn_down.weight":
            assert planned.shape[0] != planned.shape[1]
            return dataclasses.replace(planned, shape=planned.shape[::-1])
        return planned

    monkeypatch.setattr(hf_to_gguf, "_plan_tensor", transposed_ffn_down)


@pytest.mark.parametrize("fault,match", [
    (_unknown_pre_tokenizer, "unknown pre-tokenizer type: 'no-such-pre'"),
    (_missing_hparam, "key not found in model: qwen2.context_length"),
    (_wrong_tensor_shape, "tensor 'blk.0.ffn_down.weight' has wrong shape"),
], ids=["pre-tokenizer", "missing-hparam", "tensor-shape"])
def test_convert_refuses_an_output_llama_cpp_cannot_load_and_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qwen2_checkpoint: Path, fault, match: str) -> None:
    """The converter is made to write a file llama.cpp refuses (the checkpoint itself is fine):
    the file is loaded (metadata, vocabulary, tensor table; no weights) before publishing,
    refused with llama.cpp's reason, and removed."""
    from edge_lora.converters.hf_to_gguf import convert_checkpoint

    fault(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(InvalidGGUFError, match=match) as caught:
        convert_checkpoint(qwen2_checkpoint, out / "m-F16.gguf")
    assert "m-F16.gguf (as converted)" in caught.value.message and "nothing was written" in (caught.value.fix or "")
    assert _published(out) == []


def test_without_proc_fd_the_check_runs_after_the_write_and_still_refuses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qwen2_checkpoint: Path) -> None:
    """Where the child cannot open the file being written through /proc/self/fd, the check
    runs on the complete file before publishing instead of beside the write."""
    from edge_lora.converters.hf_to_gguf import convert_checkpoint

    monkeypatch.setattr(load_check, "proc_fd_path", lambda fd: None)
    _unknown_pre_tokenizer(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(InvalidGGUFError, match="unknown pre-tokenizer type: 'no-such-pre'") as caught:
        convert_checkpoint(qwen2_checkpoint, out / "m-F16.gguf")
    assert "m-F16.gguf (as converted)" in caught.value.message
    assert _published(out) == []


def test_a_converted_file_is_remembered_as_proven(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  qwen2_checkpoint: Path) -> None:
    """The check ran on the file while it was written; the pass is recorded under the published
    file's identity, so its first `run` does not load it again."""
    from edge_lora.converters.hf_to_gguf import convert_checkpoint

    monkeypatch.setattr(constants, "EDGE_LORA_CACHE", tmp_path / "cache")
    out = convert_checkpoint(qwen2_checkpoint, tmp_path / "m-F16.gguf")
    assert load_check._is_proven(FileIdentity.of(out.stat()), "model")


@pytest.fixture(scope="module")
def qwen2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.model_fixtures import make_checkpoint

    return make_checkpoint("qwen2", tmp_path_factory.mktemp("ckpt") / "qwen2")


def _sparse_wide_llama(path: Path, n_ff: int) -> Path:
    """The tiny Llama with a feed-forward ``n_ff`` wide, its tensor data a hole in a sparse file:
    hundreds of MB that cost nothing to write, and that a check reading the weights would bring
    into memory."""
    from tests.support.tiny_gguf import N_EMBD, _value_type, tiny_metadata

    import gguf
    import numpy as np

    metadata = tiny_metadata() | {"llama.feed_forward_length": n_ff}
    n_vocab = len(metadata["tokenizer.ggml.tokens"])
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in metadata.items():
        w.add_key_value(key, value, _value_type(value))
    shapes = {"token_embd.weight": (n_vocab, N_EMBD), "output_norm.weight": (N_EMBD,),
              "output.weight": (n_vocab, N_EMBD), "blk.0.attn_norm.weight": (N_EMBD,),
              "blk.0.ffn_norm.weight": (N_EMBD,), "blk.0.ffn_gate.weight": (n_ff, N_EMBD),
              "blk.0.ffn_up.weight": (n_ff, N_EMBD), "blk.0.ffn_down.weight": (N_EMBD, n_ff)}
    shapes |= {f"blk.0.{n}.weight": (N_EMBD, N_EMBD) for n in ("attn_q", "attn_k", "attn_v", "attn_output")}
    data_bytes = 0
    for name, shape in shapes.items():
        n_bytes = int(np.prod(shape)) * 4
        w.add_tensor_info(name, shape, np.dtype(np.float32), n_bytes)
        data_bytes += -(-n_bytes // w.data_alignment) * w.data_alignment
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with open(path, "r+b") as fh:
        end = fh.seek(0, os.SEEK_END)
        fh.truncate(-(-end // w.data_alignment) * w.data_alignment + data_bytes)
    return path


def test_the_model_check_does_not_read_the_weights(tmp_path: Path) -> None:
    """The check convert runs on every file it writes (and the runtime on a file it has not
    loaded before) is a no_alloc load: a 768 MB model is checked in a child that stays far
    below that size. (The former mmap load prefaulted the whole file.)"""
    import json
    import subprocess
    import sys

    path = _sparse_wide_llama(tmp_path / "wide.gguf", n_ff=1_000_000)
    assert path.stat().st_size > 750_000_000
    measure = ("import json, resource, subprocess, sys\n"
               "proc = subprocess.run([sys.executable, '-m', 'edge_lora.converters.load_check', 'model', sys.argv[1]],"
               " capture_output=True, text=True)\n"
               "print(json.dumps([proc.stdout, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024]))")
    result = subprocess.run([sys.executable, "-c", measure, str(path)], capture_output=True, text=True, timeout=120,
                            check=True)
    stdout, peak_rss = json.loads(result.stdout)
    assert json.loads(stdout.strip().splitlines()[-1]) == {"ok": True, "n_vocab": 300}
    assert peak_rss < 200_000_000, f"the check child peaked at {peak_rss / 1e6:.0f} MB"


def test_convert_cli_refuses_a_tokenizer_llama_cpp_aborts_on(tmp_path: Path) -> None:
    """An added token spelling a vocabulary token that has another id: the exported vocabulary
    has a duplicate string, on which llama.cpp aborts (GGML_ASSERT) — the check child dies,
    `convert` exits 2 with one line and leaves no file."""
    import json
    import subprocess
    import sys

    from tests.support.model_fixtures import make_checkpoint

    ckpt = make_checkpoint("qwen2", tmp_path / "ckpt")
    tj = json.loads((ckpt / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    existing = next(t for t in vocab if len(t) > 2)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    roles = {config.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    added = next(a for a in tj["added_tokens"] if a["content"] not in roles)
    added["content"] = existing
    (ckpt / "tokenizer.json").write_text(json.dumps(tj))
    config["added_tokens_decoder"][str(added["id"])]["content"] = existing
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "edge_lora", "convert", str(ckpt), "--out", str(out),
                             "--quant", "none"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edge-lora: error:"), result.stderr
    assert "GGML_ASSERT" in lines[0] or "duplicate" in lines[0]
    assert not [p for p in _published(out) if p.endswith(".gguf") or p.endswith(".partial")]


def test_an_adapter_swapped_between_its_check_and_its_load_is_refused(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_lora.core.errors import AdapterError
    from tests.support.tiny_gguf import write_tiny_lora

    model_path = write_tiny_llama(tmp_path / "model.gguf")
    adapter = write_tiny_lora(tmp_path / "adapter.gguf")
    other = write_tiny_lora(tmp_path / "other.gguf", seed=1)
    real_fits = llama_backend.check_adapter_fits

    def fits_then_swap(base, info):  # type: ignore[no-untyped-def]
        real_fits(base, info)
        os.replace(other, adapter)

    with llama_backend.LlamaModel(model_path) as model:
        llama_backend.LoraAdapter(model, write_tiny_lora(tmp_path / "fine.gguf", seed=2)).free()  # loads
        monkeypatch.setattr(llama_backend, "check_adapter_fits", fits_then_swap)
        with pytest.raises(AdapterError, match="replaced or modified"):
            llama_backend.LoraAdapter(model, adapter)


def test_a_rewrite_in_place_with_the_mtime_restored_is_not_taken_as_proven(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The review's finding: same inode, same size, mtime put back with utime — only the ctime
    tells the rewrite apart, so FileIdentity includes it and the proof no longer holds."""
    monkeypatch.setattr(constants, "EDGE_LORA_CACHE", tmp_path / "own-cache")
    monkeypatch.setattr(load_check, "_proven", set())
    path = write_tiny_llama(tmp_path / "ok.gguf")
    before = path.stat()
    assert load_check.check_loads(path, depth="model", fix="x", identity=FileIdentity.of(before)).n_vocab == 300
    time.sleep(0.01)
    with open(path, "r+b") as fh:  # same size, same inode
        fh.seek(before.st_size - 1)
        fh.write(b"\x01")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert FileIdentity.of(after) != FileIdentity.of(before)
    assert not load_check._is_proven(FileIdentity.of(after), "model")
