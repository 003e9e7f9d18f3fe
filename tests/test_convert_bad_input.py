"""Bad input to `edge-lora convert`: each case is one stderr line, exit code 2 (130 for
Ctrl-C), no traceback, and nothing at the final path (not even a .partial)."""

from __future__ import annotations

import errno
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from edge_lora.converters import gguf_output
from edge_lora.converters.safetensors_io import SafetensorsFile, write_safetensors
from edge_lora.cli import main
from tests.support.model_fixtures import make_checkpoint


@pytest.fixture(scope="session")
def pristine_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("llama", tmp_path_factory.mktemp("pristine") / "tiny-llama")


@pytest.fixture
def ckpt(tmp_path: Path, pristine_llama: Path) -> Path:
    """A fresh, valid copy each test can break."""
    return Path(shutil.copytree(pristine_llama, tmp_path / "tiny-llama"))


def _weights(ckpt: Path) -> dict[str, np.ndarray]:
    with SafetensorsFile(ckpt / "model.safetensors") as f:
        return {n: np.array(f.read(n)) for n in f.names()}


def _run(capsys: pytest.CaptureFixture[str], ckpt: Path, out: Path, *extra: str) -> tuple[int, str]:
    rc = main(["convert", str(ckpt), "--out", str(out), "--quant", "none", *extra])
    err = capsys.readouterr().err
    return rc, err


def _assert_refused(rc: int, err: str, out: Path, *needles: str, code: int = 2) -> None:
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("edge-lora:") and "Traceback" not in err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]
    if out.is_dir():
        leftovers = [p.name for p in out.iterdir() if p.suffix in (".gguf", ".partial")]
        assert leftovers == [], leftovers


def test_valid_checkpoint_converts(capsys: pytest.CaptureFixture[str], ckpt: Path, tmp_path: Path) -> None:
    """The control: the fixture itself converts, so every refusal below is due to the defect."""
    out = tmp_path / "out"
    rc, err = _run(capsys, ckpt, out)
    assert rc == 0, err
    assert (out / "tiny-llama-F16.gguf").is_file() and (out / "manifest.json").is_file()


def test_missing_config(capsys: pytest.CaptureFixture[str], ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "config.json").unlink()
    _assert_refused(*_run(capsys, ckpt, tmp_path / "out"), tmp_path / "out", "config.json")


def test_invalid_config(capsys: pytest.CaptureFixture[str], ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "config.json").write_text("{not json")
    _assert_refused(*_run(capsys, ckpt, tmp_path / "out"), tmp_path / "out", "config.json", "JSON")


def test_config_with_bad_dimension(capsys: pytest.CaptureFixture[str], ckpt: Path, tmp_path: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config["num_attention_heads"] = "eight"
    (ckpt / "config.json").write_text(json.dumps(config))
    _assert_refused(*_run(capsys, ckpt, tmp_path / "out"), tmp_path / "out", "num_attention_heads")


@pytest.mark.parametrize("field,value", [
    ("num_hidden_layers", 10**9),  # used to build a 10^9-layer tensor table: hung, then out of memory
    ("max_position_embeddings", 10**30),  # used to fail in struct.pack mid-write (a traceback)
    ("tie_word_embeddings", "false"),  # bool("false") is True: lm_head would be dropped silently
])
def test_config_value_out_of_range(capsys: pytest.CaptureFixture[str], ckpt: Path, tmp_path: Path,
                                   field: str, value: object) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config[field] = value
    (ckpt / "config.json").write_text(json.dumps(config))
    _assert_refused(*_run(capsys, ckpt, tmp_path / "out"), tmp_path / "out")


def test_unsupported_architecture_lists_supported(capsys: pytest.CaptureFixture[str], ckpt: Path,
                                                  tmp_path: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(config))
    _assert_refused(*_run(capsys, ckpt, tmp_path / "out"), tmp_path / "out", "GPT2LMHeadModel",
                    "LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM")


def test_truncated_safetensors(capsys: pytest.CaptureFixture[str], ckpt: Path, tmp_path: Path) -> None:
    model = ckpt / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-1000])
    _assert_refused(*_run(capsys, ckpt, tmp_path / "out"), tmp_path / "out", "model.safetensors", "truncated")


def test_header_length_past_eof(capsys: pytest.CaptureFixture[str], ckpt: Path, tmp_path: Path) -> None:
    model = ckpt / "model.safetensors"
    data = model.read_bytes()
    model.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    _assert_refused(*_run(capsys, ckpt, tmp_path / "out"), tmp_path / "out", "header length")


def _rewrite_header(model: Path, edit: callable) -> None:  # type: ignore[valid-type]
    data = model.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    model.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_overlapping_offsets(capsys: pytest.CaptureFixture[str], ckpt: Path, tmp_path: Path) -> None:
    def overlap(header: dict) -> None:
        names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        a, b = header[names[0]], header[names[1]]
        # b starts inside a; b's span keeps its size, so only the overlap is wrong.
        size = b["data_offsets"][1] - b["data_offsets"][0]
        b["data_offsets"] = [a["data_offsets"][0] + 4, a["data_offsets"][0] + 4 + size]
    _rewrite_header(ckpt / "model.safetensors", overlap)
    _assert_refused(*_run(capsys, ckpt, tmp_path / "out"), tmp_path / "out", "overlap")


def test_out_of_range_offsets(capsys: pytest.CaptureFixture[str], ckpt: Path, tmp_path: Path) -> None:
    def out_of_range(header: dict) -> None:
        name = next(k for k in header if k != "__metadata__")
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin + 10**9, end + 10**9]
    _rewrite_header(ckpt / "model.safetensors", out_of_range)
    _assert_refused(*_run(capsys, ckpt, tmp_path / "out"), tmp_path / "out", "outside")


def test_unknown_dtype(capsys: pytest.CaptureFixture[str], ckpt: Path, tmp_path: Path) -> None:
    def int_dtype(header: dict) -> None:
        name = next(k for k in header if k != "__metadata__" and header[k]["dtype"] in ("F32", "I32"))
        header[name]["dtype"] = "I32"
    weights = _weights(ckpt)
    write_safetensors(ckpt / "model.safetensors", {k: v.astype(np.float32) for k, v in weights.items()})
    _rewrite_header(ckpt / "model.safetensors", int_dtype)
    _assert_refused(*_run(capsys, ckpt, tmp_path / "out"), tmp_path / "out", "I32", "bfloat16")


def test_shard_index_names_missing_file(capsys: pytest.CaptureFixture[str], ckpt: Path, tmp_path: Path) -> None:
    weights = _weights(ckpt)
    names = list(weights)
    (ckpt / "model.safetensors").unlink()
    write_safetensors(ckpt / "model-00001-of-00002.safetensors", {n: weights[n] for n in names[:3]})
    index = {"metadata": {}, "weight_map": {n: ("model-00001-of-00002.safetensors" if i < 3
                                               else "model-00002-of-00002.safetensors")
                                           for i, n in enumerate(names)}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    _assert_refused(*_run(capsys, ckpt, tmp_path / "out"), tmp_path / "out", "model-00002-of-00002.safetensors",
                    "missing")


def test_sharded_checkpoint_converts_like_single(capsys: pytest.CaptureFixture[str], ckpt: Path,
                                                 tmp_path: Path) -> None:
    rc, err = _run(capsys, ckpt, tmp_path / "single")
    assert rc == 0, err
    weights = _weights(ckpt)
    names = list(weights)
    (ckpt / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, members in shards.items():
        write_safetensors(ckpt / shard, {n: weights[n] for n in members})
    index = {"weight_map": {n: s for s, members in shards.items() for n in members}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    rc, err = _run(capsys, ckpt, tmp_path / "sharded")
    assert rc == 0, err
    single = (tmp_path / "single" / "tiny-llama-F16.gguf").read_bytes()
    assert (tmp_path / "sharded" / "tiny-llama-F16.gguf").read_bytes() == single


def test_tensor_missing_for_a_layer(capsys: pytest.CaptureFixture[str], ckpt: Path, tmp_path: Path) -> None:
    weights = _weights(ckpt)
    del weights["model.layers.1.mlp.up_proj.weight"]
    write_safetensors(ckpt / "model.safetensors", weights)
    _assert_refused(*_run(capsys, ckpt, tmp_path / "out"), tmp_path / "out", "model.layers.1.mlp.up_proj.weight")


def test_tensor_shape_disagrees_with_config(capsys: pytest.CaptureFixture[str], ckpt: Path,
                                            tmp_path: Path) -> None:
    weights = _weights(ckpt)
    weights["model.layers.0.mlp.down_proj.weight"] = weights["model.layers.0.mlp.down_proj.weight"][:, :-1].copy()
    write_safetensors(ckpt / "model.safetensors", weights)
    _assert_refused(*_run(capsys, ckpt, tmp_path / "out"), tmp_path / "out", "down_proj", "shape")


def test_pickle_only_checkpoint_is_refused(capsys: pytest.CaptureFixture[str], ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    _assert_refused(*_run(capsys, ckpt, tmp_path / "out"), tmp_path / "out", "pickle")


def test_tokenizer_missing(capsys: pytest.CaptureFixture[str], ckpt: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (ckpt / name).unlink(missing_ok=True)
    _assert_refused(*_run(capsys, ckpt, tmp_path / "out"), tmp_path / "out", "tokenizer")


def test_output_dir_not_writable(capsys: pytest.CaptureFixture[str], ckpt: Path, tmp_path: Path) -> None:
    # Root ignores permission bits, so use a path below a regular file: no one can create it.
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _assert_refused(*_run(capsys, ckpt, blocker / "sub"), blocker / "sub", "output directory")


def test_missing_base_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _assert_refused(*_run(capsys, tmp_path / "no" / "such" / "dir", tmp_path / "out"), tmp_path / "out",
                    "does not exist")


def _fail_after_first_block(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> list[int]:
    calls: list[int] = []
    real = gguf_output.write_block

    def failing(fh, block):  # type: ignore[no-untyped-def]
        calls.append(block.nbytes)
        if len(calls) > 1:
            raise exc
        real(fh, block)

    monkeypatch.setattr(gguf_output, "write_block", failing)
    return calls


def test_disk_full_mid_write(capsys: pytest.CaptureFixture[str], ckpt: Path, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fail_after_first_block(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    out = tmp_path / "out"
    _assert_refused(*_run(capsys, ckpt, out), out, "disk full")
    assert len(calls) == 2  # it really failed mid-write, after data had been written
    assert not (out / "manifest.json").exists()


def test_ctrl_c_mid_write(capsys: pytest.CaptureFixture[str], ckpt: Path, tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fail_after_first_block(monkeypatch, KeyboardInterrupt())
    out = tmp_path / "out"
    _assert_refused(*_run(capsys, ckpt, out), out, "interrupted", code=130)
    assert len(calls) == 2
    assert not (out / "manifest.json").exists()


def test_existing_output_is_replaced_only_when_complete(capsys: pytest.CaptureFixture[str], ckpt: Path,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    rc, err = _run(capsys, ckpt, out)
    assert rc == 0, err
    before = (out / "tiny-llama-F16.gguf").read_bytes()
    _fail_after_first_block(monkeypatch, KeyboardInterrupt())
    rc, err = _run(capsys, ckpt, out)
    assert rc == 130
    assert (out / "tiny-llama-F16.gguf").read_bytes() == before  # the old complete file survives
    assert not list(out.glob("*.partial"))
