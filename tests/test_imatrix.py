"""Importance matrices: llama.cpp's imatrix GGUF round-trips through gguf-py, bad files and
matrices that do not fit a model are typed errors naming the tensor, and the sums collected
through ``cb_eval`` equal the squared projection inputs of the independent HF-semantics
reference forward pass (tests/support/reference.py) on a synthetic model."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from edge_lora.converters.adapter_gguf import convert_adapter_to_gguf
from edge_lora.converters.hf_to_gguf import convert_checkpoint
from edge_lora.core.errors import ImatrixError, InputError
from edge_lora.core.gguf_check import validate_gguf
from edge_lora.core.text_sketch import TextSketch
from edge_lora.core.imatrix_file import (Imatrix, ImatrixEntry, check_imatrix_fits, imatrix_weight_names,
                                         read_imatrix, write_imatrix)
from tests.support.model_fixtures import make_checkpoint, make_peft_adapter
from tests.support.paths import LICENSES
from tests.support.reference import apply_peft, load_checkpoint, reference_logits

# HF projection -> GGUF tensor (llama.cpp's names), written out independently of the converter.
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def _gguf_name(hf_name: str) -> str:
    _, _, layer, *module, _ = hf_name.split(".")
    return f"blk.{layer}.{HF_TO_GGUF['.'.join(module)]}.weight"


def _sample_imatrix(rng: np.random.Generator) -> Imatrix:
    return Imatrix(
        entries={"blk.0.attn_q.weight": ImatrixEntry(rng.random((1, 256)) * 100, np.array([1024])),
                 "blk.0.ffn_down_exps.weight": ImatrixEntry(rng.random((4, 512)), np.array([7, 0, 300, 21]))},
        datasets=["calibration.txt"], chunk_count=2, chunk_size=512, text_sha256="ab" * 32, tokens=1024,
        model="tiny-F16.gguf", adapters=["adapter-legal.gguf"],
        text_sketch=TextSketch.of_blocks([(LICENSES / "LGPL-2.1").read_text()]).encode())


def test_imatrix_file_round_trips_through_gguf_py(tmp_path: Path) -> None:
    written = _sample_imatrix(np.random.default_rng(0))
    path = write_imatrix(tmp_path / "imatrix.gguf", written)
    assert not list(tmp_path.glob("*.partial"))

    # gguf-py reads exactly llama-imatrix's layout.
    reader = gguf.GGUFReader(path)
    fields = {name: field for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert "general.architecture" not in fields
    assert fields["general.type"].contents() == "imatrix"
    assert fields["imatrix.datasets"].contents() == ["calibration.txt"]
    assert fields["imatrix.chunk_count"].contents() == 2 and fields["imatrix.chunk_size"].contents() == 512
    tensors = {t.name: t for t in reader.tensors}
    assert list(tensors) == ["blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts",
                             "blk.0.ffn_down_exps.weight.in_sum2", "blk.0.ffn_down_exps.weight.counts"]
    sums, counts = tensors["blk.0.ffn_down_exps.weight.in_sum2"], tensors["blk.0.ffn_down_exps.weight.counts"]
    assert sums.tensor_type == gguf.GGMLQuantizationType.F32 and list(sums.shape) == [512, 4]  # ne order
    assert list(counts.shape) == [1, 4]
    np.testing.assert_array_equal(np.asarray(sums.data), written.entries["blk.0.ffn_down_exps.weight"].sums
                                  .astype(np.float32))
    np.testing.assert_array_equal(np.asarray(counts.data).reshape(-1), [7, 0, 300, 21])

    # And back through our reader, provenance included.
    back = read_imatrix(path)
    assert (back.datasets, back.chunk_count, back.chunk_size, back.tokens, back.text_sha256, back.model,
            back.adapters) == (["calibration.txt"], 2, 512, 1024, "ab" * 32, "tiny-F16.gguf", ["adapter-legal.gguf"])
    assert back.text_sketch == written.text_sketch and fields["edge_lora.imatrix.text_sketch"].contents() == back.text_sketch
    for name, entry in written.entries.items():
        np.testing.assert_array_equal(back.entries[name].sums, entry.sums.astype(np.float32))
        np.testing.assert_array_equal(back.entries[name].counts, entry.counts)


def test_reads_a_file_written_by_gguf_py_alone(tmp_path: Path) -> None:
    """What llama-imatrix writes (no edge-lora keys), built here with gguf-py only."""
    path = tmp_path / "llama.imatrix.gguf"
    writer = gguf.GGUFWriter(path, arch="")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", ["wiki.train.raw"])
    writer.add_uint32("imatrix.chunk_count", 3)
    writer.add_uint32("imatrix.chunk_size", 512)
    values = np.arange(256, dtype=np.float32).reshape(1, 256)
    writer.add_tensor("blk.0.attn_k.weight.in_sum2", values)
    writer.add_tensor("blk.0.attn_k.weight.counts", np.array([[1536]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    imatrix = read_imatrix(path)
    assert imatrix.datasets == ["wiki.train.raw"] and imatrix.chunk_count == 3 and imatrix.text_sha256 is None
    entry = imatrix.entries["blk.0.attn_k.weight"]
    # llama-quantize's mean squares: sums / counts.
    np.testing.assert_array_equal(entry.mean_squares(), values.reshape(-1) / np.float32(1536))


def test_mean_squares_follow_llama_quantize(tmp_path: Path) -> None:
    entry = ImatrixEntry(np.array([[2.0, 4.0], [9.0, 9.0], [1.0, 3.0]]), np.array([2, 0, 4]))
    # An expert no token reached gets ones (llama-quantize), the others sums / count in float32.
    np.testing.assert_array_equal(entry.mean_squares(), np.array([1, 2, 1, 1, 0.25, 0.75], dtype=np.float32))


def _write_raw(path: Path, tensors: dict[str, np.ndarray], general_type: str = "imatrix",
               chunk_size: bool = True) -> Path:
    writer = gguf.GGUFWriter(path, arch="")
    writer.add_type(general_type)
    writer.add_array("imatrix.datasets", ["t.txt"])
    writer.add_uint32("imatrix.chunk_count", 1)
    if chunk_size:
        writer.add_uint32("imatrix.chunk_size", 512)
    for name, values in tensors.items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


GOOD_SUMS = np.ones((1, 256), dtype=np.float32)
GOOD_COUNTS = np.array([[512]], dtype=np.float32)


@pytest.mark.parametrize("case, tensors, kwargs, words", [
    ("not-imatrix", {"w.in_sum2": GOOD_SUMS, "w.counts": GOOD_COUNTS}, {"general_type": "model"}, "not an importance"),
    ("no-metadata", {"w.in_sum2": GOOD_SUMS, "w.counts": GOOD_COUNTS}, {"chunk_size": False}, "imatrix.chunk_size"),
    ("no-counts", {"w.in_sum2": GOOD_SUMS}, {}, "w has sums but no counts"),
    ("nan", {"w.in_sum2": np.full((1, 256), np.nan, np.float32), "w.counts": GOOD_COUNTS}, {}, "NaN"),
    ("negative", {"w.in_sum2": -GOOD_SUMS, "w.counts": GOOD_COUNTS}, {}, "negative"),
    ("f16", {"w.in_sum2": GOOD_SUMS.astype(np.float16), "w.counts": GOOD_COUNTS}, {}, "not F32"),
    ("experts", {"w.in_sum2": np.ones((2, 256), np.float32), "w.counts": GOOD_COUNTS}, {}, "counts for 1"),
    ("stray", {"w.in_sum2": GOOD_SUMS, "w.counts": GOOD_COUNTS, "other": GOOD_SUMS}, {}, "neither"),
])
def test_bad_imatrix_files_are_typed_errors(tmp_path: Path, case: str, tensors: dict, kwargs: dict,
                                            words: str) -> None:
    path = _write_raw(tmp_path / f"{case}.gguf", tensors, **kwargs)
    with pytest.raises(ImatrixError) as caught:
        read_imatrix(path)
    assert words in caught.value.one_line()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-layer synthetic Llama at F32 (weights exact), its adapter, and a calibration text."""
    root = tmp_path_factory.mktemp("imatrix")
    ckpt = make_checkpoint("llama", root / "llama", n_layers=2)
    peft = make_peft_adapter(ckpt, root / "peft", r=8, alpha=16, strength=0.2)
    text = root / "calibration.txt"
    text.write_text((LICENSES / "GPL-3").read_text()[:6000], encoding="utf-8")
    return {"ckpt": ckpt, "peft": peft, "text": text,
            "f32": convert_checkpoint(ckpt, root / "tiny-F32.gguf", outtype="f32"),
            "adapter": convert_adapter_to_gguf(peft, ckpt, root / "adapter-tiny.gguf")}


def test_imatrix_fit_errors_name_the_tensor(tiny: dict[str, Path]) -> None:
    info = validate_gguf(tiny["f32"])
    names = imatrix_weight_names(info)
    assert len(names) == 2 * 7 and "token_embd.weight" not in names and "output.weight" not in names
    full = {n: ImatrixEntry(np.ones((1, info.tensor(n).shape[0])), np.array([64])) for n in names}
    check_imatrix_fits(Imatrix(full, [], 2, 32), info)

    missing = dict(full)
    del missing["blk.1.ffn_down.weight"]
    with pytest.raises(ImatrixError) as caught:
        check_imatrix_fits(Imatrix(missing, [], 2, 32), info)
    assert caught.value.tensor == "blk.1.ffn_down.weight" and "blk.1.ffn_down.weight" in caught.value.one_line()

    wrong = dict(full, **{"blk.0.ffn_down.weight": ImatrixEntry(np.ones((1, 256)), np.array([64]))})
    with pytest.raises(ImatrixError) as caught:
        check_imatrix_fits(Imatrix(wrong, [], 2, 32), info)
    assert caught.value.tensor == "blk.0.ffn_down.weight" and "1 x 512" in caught.value.one_line()

    extra = dict(full, **{"blk.7.attn_q.weight": ImatrixEntry(np.ones((1, 256)), np.array([64]))})
    with pytest.raises(ImatrixError) as caught:
        check_imatrix_fits(Imatrix(extra, [], 2, 32), info)
    assert caught.value.tensor == "blk.7.attn_q.weight" and "another model" in caught.value.one_line()


def _reference_sums(ckpt: Path, chunks: list[list[int]], peft: Path | None = None) -> dict[str, np.ndarray]:
    config, weights = load_checkpoint(ckpt)
    if peft is not None:
        weights = apply_peft(weights, peft, config)
    inputs: dict[str, list[np.ndarray]] = {}
    for chunk in chunks:
        reference_logits(config, weights, chunk, linear_inputs=inputs)
    return {_gguf_name(name): sum((rows * rows).sum(axis=0) for rows in seen) for name, seen in inputs.items()}


def _chunks(model_path: Path, text: Path, ctx: int, n: int) -> list[list[int]]:
    """llama-imatrix's chunking, done plainly: whole text with BOS, ctx-token chunks, BOS first."""
    from edge_lora.serving.llama_backend import LlamaModel

    with LlamaModel(model_path) as model:
        tokens = model.tokenize(text.read_text(encoding="utf-8").removesuffix("\n"), add_bos=True, special=False)
        return [[model.bos] + tokens[i * ctx + 1:(i + 1) * ctx] for i in range(n)]


@pytest.mark.parametrize("with_adapter", [False, True], ids=["merged", "hot-applied"])
def test_collected_sums_equal_the_reference_projection_inputs(tiny: dict[str, Path], with_adapter: bool) -> None:
    from edge_lora.analysis.imatrix import compute_imatrix

    ctx = 64
    run = compute_imatrix(tiny["f32"], tiny["text"], ctx=ctx, n_threads=1, max_chunks=3,
                          adapters=[tiny["adapter"]] if with_adapter else [])
    imatrix = run.imatrix
    assert (imatrix.chunk_count, imatrix.chunk_size, imatrix.tokens) == (3, ctx, 3 * ctx)
    assert imatrix.adapters == (["adapter-tiny.gguf"] if with_adapter else [])
    expected = _reference_sums(tiny["ckpt"], _chunks(tiny["f32"], tiny["text"], ctx, 3),
                               tiny["peft"] if with_adapter else None)
    # Exactly the 14 block matrices: no LoRA A/B, no output layer, no KV views.
    assert sorted(imatrix.entries) == sorted(expected)
    for name, sums in expected.items():
        entry = imatrix.entries[name]
        assert entry.counts.tolist() == [3 * ctx], name
        relative = np.abs(entry.sums[0] - sums) / sums
        if name.startswith("blk.0.attn_") and name != "blk.0.attn_output.weight":  # normed embeddings
            assert relative.max() < 1e-5, (name, relative.max())
        else:  # downstream of attention, which reads llama.cpp's F16 KV cache (~1e-3 rounding)
            assert relative.max() < 3e-3 and np.median(relative) < 5e-4, (name, relative.max())
    # The output layer was skipped after the first micro-batch (and the last layer's inputs,
    # compared above, were still collected in full).
    assert run.early_stop


def test_the_adapter_changes_what_the_base_weights_see(tiny: dict[str, Path]) -> None:
    from edge_lora.analysis.imatrix import compute_imatrix

    plain = compute_imatrix(tiny["f32"], tiny["text"], ctx=64, n_threads=1, max_chunks=2).imatrix
    adapted = compute_imatrix(tiny["f32"], tiny["text"], ctx=64, n_threads=1, max_chunks=2,
                              adapters=[tiny["adapter"]]).imatrix
    # Layer 0's q/k/v read the embedding (the adapter cannot change it); later inputs differ.
    np.testing.assert_allclose(plain.entries["blk.0.attn_q.weight"].sums, adapted.entries["blk.0.attn_q.weight"].sums,
                               rtol=1e-5)
    a, b = plain.entries["blk.1.ffn_down.weight"].sums, adapted.entries["blk.1.ffn_down.weight"].sums
    assert np.abs(a - b).max() / a.max() > 1e-3


def test_mul_mat_id_sums_follow_the_routing() -> None:
    """MUL_MAT_ID (mixture-of-experts) accumulation against a plain loop over llama-imatrix's
    definition: each (token, slot) adds its activation row's squares to the routed expert."""
    from edge_lora.analysis.imatrix import ImatrixCollector

    rng = np.random.default_rng(3)
    n_tokens, n_used, n_as, ne0 = 40, 2, 5, 32
    x = rng.standard_normal((1, n_tokens, n_used, ne0)).astype(np.float32)
    ids = np.stack([rng.choice(n_as - 1, n_used, replace=False) for _ in range(n_tokens)]).astype(np.int32)
    collector = ImatrixCollector(frozenset())
    collector._add_indirect("blk.0.ffn_up_exps.weight", x, ids, n_as)
    collector._add_indirect("blk.0.ffn_up_exps.weight", x, ids, n_as)
    sums = np.zeros((n_as, ne0))
    counts = np.zeros(n_as, dtype=np.int64)
    for _ in range(2):
        for token in range(n_tokens):
            for slot in range(n_used):
                sums[ids[token, slot]] += x[0, token, slot].astype(np.float64) ** 2
                counts[ids[token, slot]] += 1
    np.testing.assert_allclose(collector.sums["blk.0.ffn_up_exps.weight"], sums, rtol=1e-6)
    assert collector.counts["blk.0.ffn_up_exps.weight"].tolist() == counts.tolist() and counts[-1] == 0
    # A shared activation row (src1 ne1 == 1) is used for every slot.
    shared = ImatrixCollector(frozenset())
    shared._add_indirect("w", x[:, :, :1], ids, n_as)
    expected = np.zeros((n_as, ne0))
    for token in range(n_tokens):
        for slot in range(n_used):
            expected[ids[token, slot]] += x[0, token, 0].astype(np.float64) ** 2
    np.testing.assert_allclose(shared.sums["w"], expected, rtol=1e-6)


def test_short_text_and_small_context_are_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    from edge_lora.analysis.imatrix import compute_imatrix

    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.", encoding="utf-8")
    with pytest.raises(InputError, match="needs at least"):
        compute_imatrix(tiny["f32"], short, ctx=64)
    with pytest.raises(InputError, match="out of range"):
        compute_imatrix(tiny["f32"], tiny["text"], ctx=32)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe" * 100)
    with pytest.raises(InputError, match="not UTF-8"):
        compute_imatrix(tiny["f32"], binary, ctx=64)


def test_text_is_read_in_paragraph_blocks(tmp_path: Path) -> None:
    from edge_lora.analysis.imatrix import text_blocks

    text = "".join(f"Paragraph {i} " + "word " * (i % 7 + 3) + "\n\n\n" for i in range(200))
    path = tmp_path / "t.txt"
    path.write_text(text + "\n", encoding="utf-8")
    blocks = list(text_blocks(path, block_chars=300))
    assert "".join(blocks) == text  # nothing lost; only the file's one trailing newline dropped (as -f does)
    assert len(blocks) > 20 and all(len(b) <= 300 for b in blocks)
    assert all(b.startswith("Paragraph") and b.endswith("\n\n\n") for b in blocks[:-1])


def test_memory_is_flat_in_text_length(tiny: dict[str, Path], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp only ever tokenizes one block of text: a long text is never held whole."""
    import edge_lora.analysis.imatrix as imatrix_module
    from edge_lora.serving.llama_backend import LlamaModel

    long_text = tmp_path / "long.txt"
    long_text.write_text("\n\n".join([tiny["text"].read_text()] * 3), encoding="utf-8")
    whole = imatrix_module.compute_imatrix(tiny["f32"], long_text, ctx=64, n_threads=1).imatrix
    seen: list[int] = []
    real_tokenize = LlamaModel.tokenize

    def tokenize(self: LlamaModel, text: str, *args: object, **kwargs: object) -> list[int]:
        seen.append(len(text))
        return real_tokenize(self, text, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(LlamaModel, "tokenize", tokenize)
    monkeypatch.setattr(imatrix_module, "TEXT_BLOCK_CHARS", 2000)
    blocks = imatrix_module.compute_imatrix(tiny["f32"], long_text, ctx=64, n_threads=1).imatrix
    assert seen and max(seen) <= 2000 and sum(seen) >= 2 * long_text.stat().st_size  # counted, then evaluated
    # Cutting after blank lines changes at most a token per block boundary (and so where later
    # chunks start): the same statistics up to that shift.
    assert abs(blocks.chunk_count - whole.chunk_count) <= 1
    for name, entry in whole.entries.items():
        mean_whole = entry.sums[0] / entry.counts[0]
        mean_blocks = blocks.entries[name].sums[0] / blocks.entries[name].counts[0]
        difference = np.linalg.norm(mean_blocks - mean_whole) / np.linalg.norm(mean_whole)
        # The first layer's inputs depend on the tokens alone; deeper ones on where chunks start
        # too, which a random synthetic model's attention amplifies.
        limit = 0.01 if name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight") else 0.15
        assert difference < limit, (name, difference)


def test_cli_hot_applies_a_registered_adapter_and_shows_progress(tiny: dict[str, Path], tmp_path: Path) -> None:
    """``edge-lora imatrix BASE --adapter NAME``: the base's statistics with the registered adapter
    hot-applied (the same as the library run with that adapter), one progress step per chunk."""
    import contextlib
    import io
    import json

    from edge_lora.cli import main
    from edge_lora.analysis.imatrix import compute_imatrix
    from edge_lora.serving.registry import AdapterRegistry

    AdapterRegistry().add("tiny", tiny["adapter"], 1.0)
    out = tmp_path / "base+tiny.imatrix.gguf"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["imatrix", str(tiny["f32"]), "--text", str(tiny["text"]), "--ctx", "64", "--adapter", "tiny",
                     "--out", str(out), "--json"]) == 0
    report = json.loads(stdout.getvalue())
    assert report["adapters"] == [str(tiny["adapter"].resolve())] and report["tokens"] == 64 * report["chunks"]
    written = read_imatrix(out)
    assert written.adapters == ["adapter-tiny.gguf"] and written.model == "tiny-F32.gguf"

    events: list[tuple[str, float | None]] = []

    class Recording:
        def start(self, task: str, total: float | None) -> None:
            events.append(("start", total))

        def advance(self, amount: float = 1.0, *, description: str | None = None) -> None:
            events.append(("advance", amount))

        def finish(self) -> None:
            events.append(("finish", None))

    library = compute_imatrix(tiny["f32"], tiny["text"], ctx=64, adapters=[tiny["adapter"]], progress=Recording())
    assert events == [("start", library.chunks)] + [("advance", 1)] * library.chunks + [("finish", None)]
    assert library.chunks == report["chunks"] >= 2
    for name, entry in library.imatrix.entries.items():
        np.testing.assert_allclose(written.entries[name].sums, entry.sums, rtol=1e-5)
