"""Merged F16 GGUFs and GGUF LoRA adapters hot-applied by llama.cpp both reproduce PEFT's
merged model (numpy reference forward pass on reference.apply_peft weights), for every
architecture and for rsLoRA, rank/alpha patterns, DoRA and modules_to_save."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_lora.converters.adapter_gguf import convert_adapter_to_gguf, written_alpha
from edge_lora.converters.checkpoint import HFCheckpoint
from edge_lora.converters.hf_to_gguf import convert_checkpoint
from edge_lora.converters.merge import PeftMerger, merge_lora_into
from edge_lora.converters.peft import LoraDelta, PeftAdapter
from edge_lora.core.errors import AdapterError
from edge_lora.core.gguf_check import validate_gguf
from tests.support.model_fixtures import make_checkpoint, make_peft_adapter
from tests.support.reference import apply_peft, reference_logits

N_CTX = 64
# Strong enough that a wrong scale, a missing permutation or a dropped module moves logits by
# far more than the 1% tolerance (asserted per case below).
STRENGTH = 0.05


def _weights(ckpt_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    with HFCheckpoint.open(ckpt_dir) as ckpt:
        return ckpt.config, {n: np.array(ckpt.read(n), dtype=np.float32) for n in ckpt.tensor_names()}


def _tokens(config: dict, n: int = 20) -> list[int]:
    rng = np.random.default_rng(7)
    bos = config.get("bos_token_id") or 1
    return [int(bos)] + [int(t) for t in rng.integers(3, config["vocab_size"], n - 1)]


def _llama_logits(model_path: Path, tokens: list[int], adapter: Path | None = None) -> np.ndarray:
    from edge_lora.serving.llama_backend import LlamaContext, LlamaModel, LoraAdapter

    with LlamaModel(model_path) as model, LlamaContext(model, n_ctx=N_CTX, n_batch=N_CTX, n_threads=2) as ctx:
        lora = LoraAdapter(model, adapter) if adapter is not None else None
        if lora is not None:
            ctx.set_adapters([(lora, 1.0)])
        ctx.decode(tokens, 0, "all")
        out = np.array([ctx.logits(i) for i in range(len(tokens))], dtype=np.float64)
        if lora is not None:
            lora.free()
        return out


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / ref.std())


def _assert_matches(got: np.ndarray, ref: np.ndarray, base_ref: np.ndarray) -> None:
    assert got.shape == ref.shape
    assert _rel(got, ref) < 0.01, f"max|diff|/std = {_rel(got, ref):.4f}"
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
    # The adapter's effect is far above the tolerance, so the check above can fail.
    assert _rel(base_ref, ref) > 0.05, f"adapter effect too small to test ({_rel(base_ref, ref):.4f})"


class Base:
    def __init__(self, ckpt: Path, f16: Path) -> None:
        self.ckpt, self.f16 = ckpt, f16
        self.config, self.weights = _weights(ckpt)
        self.tokens = _tokens(self.config)
        self.ref = reference_logits(self.config, self.weights, self.tokens)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Base]:
    root = tmp_path_factory.mktemp("merge-bases")
    cache: dict[str, Base] = {}

    class Lazy(dict):  # build each architecture's base (checkpoint + F16) on first use
        def __missing__(self, arch: str) -> Base:
            ckpt = make_checkpoint(arch, root / arch)
            base = Base(ckpt, convert_checkpoint(ckpt, root / f"{arch}-F16.gguf"))
            self[arch] = base
            return base

    return Lazy(cache)


CASES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "gemma3": ("gemma3", {}),
    "llama-rslora": ("llama", {"use_rslora": True, "r": 16, "alpha": 8}),
    "llama-patterns": ("llama", {"r": 8, "alpha": 16, "rank_pattern": {"q_proj": 4, r"layers\.1\.mlp\.up_proj": 12},
                                 "alpha_pattern": {"k_proj": 64, "down_proj": 2}}),
    "gemma3-rslora-patterns": ("gemma3", {"use_rslora": True, "rank_pattern": {"v_proj": 2},
                                          "alpha_pattern": {"o_proj": 40}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_merged_and_hot_applied_match_peft(case: str, bases: dict[str, Base], tmp_path: Path) -> None:
    arch, options = CASES[case]
    base = bases[arch]
    adapter_dir = make_peft_adapter(base.ckpt, tmp_path / "peft", strength=STRENGTH, **options)
    ref = reference_logits(base.config, apply_peft(base.weights, adapter_dir, base.config), base.tokens)

    merged = convert_checkpoint(base.ckpt, tmp_path / "merged-F16.gguf",
                                adapter=PeftMerger(PeftAdapter.open(adapter_dir)))
    _assert_matches(_llama_logits(merged, base.tokens), ref, base.ref)

    lora = convert_adapter_to_gguf(adapter_dir, base.ckpt, tmp_path / "adapter.gguf")
    info = validate_gguf(lora, expect_type="adapter")
    assert info.architecture == validate_gguf(base.f16).architecture
    _assert_matches(_llama_logits(base.f16, base.tokens, lora), ref, base.ref)


def test_plain_lora_b_is_written_unscaled_and_alpha_kept(bases: dict[str, Base], tmp_path: Path) -> None:
    """For plain LoRA the fold factor is exactly 1: files stay comparable with llama.cpp's own."""
    import gguf

    base = bases["qwen2"]
    adapter_dir = make_peft_adapter(base.ckpt, tmp_path / "peft", r=8, alpha=16)
    lora = convert_adapter_to_gguf(adapter_dir, base.ckpt, tmp_path / "adapter.gguf")
    reader = gguf.GGUFReader(lora)
    assert float(reader.fields["adapter.lora.alpha"].contents()) == 16.0
    peft = PeftAdapter.open(adapter_dir)
    b = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight.lora_b")
    np.testing.assert_array_equal(np.asarray(b.data), peft.deltas["model.layers.0.self_attn.v_proj.weight"].lora_b)


@pytest.mark.parametrize("case", ["llama-patterns", "gemma3-rslora-patterns"])
def test_q8_0_adapter_pads_rank_and_still_matches_peft(case: str, bases: dict[str, Base], tmp_path: Path) -> None:
    """outtype q8_0: every tensor Q8_0, every rank (2..12 here) zero-padded to 32, alpha kept,
    and llama.cpp's hot-applied logits keep the adapter's effect up to 8-bit rounding (these
    test adapters move logits by ~3 std, so the rounding shows; F32 stays under 0.01)."""
    import gguf

    arch, options = CASES[case]
    base = bases[arch]
    adapter_dir = make_peft_adapter(base.ckpt, tmp_path / "peft", strength=STRENGTH, **options)
    ref = reference_logits(base.config, apply_peft(base.weights, adapter_dir, base.config), base.tokens)
    lora = convert_adapter_to_gguf(adapter_dir, base.ckpt, tmp_path / "adapter-q8.gguf", outtype="q8_0")
    reader = gguf.GGUFReader(lora)
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.Q8_0}
    assert {int(t.shape[1]) for t in reader.tensors if t.name.endswith(".lora_a")} == {32}
    assert {int(t.shape[0]) for t in reader.tensors if t.name.endswith(".lora_b")} == {32}
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    assert alpha == written_alpha(PeftAdapter.open(adapter_dir))
    got = _llama_logits(base.f16, base.tokens, lora)
    effect = _rel(base.ref, ref)
    assert _rel(got, ref) < 0.03 * effect, (_rel(got, ref), effect)
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.9


def test_rank_padding_is_exact_and_odd_rows_stay_f32(bases: dict[str, Base], tmp_path: Path) -> None:
    from edge_lora.converters.adapter_gguf import gguf_lora_pair, stored_type
    from edge_lora.converters.architectures import arch_spec_for
    from edge_lora.converters.gguf_output import GGMLType

    base = bases["llama"]
    adapter_dir = make_peft_adapter(base.ckpt, tmp_path / "peft", r=8, alpha=16)
    delta = PeftAdapter.open(adapter_dir).deltas["model.layers.0.self_attn.q_proj.weight"]
    spec = arch_spec_for(base.config)
    a, b = gguf_lora_pair(spec, delta, 16.0)
    a_pad, b_pad = gguf_lora_pair(spec, delta, 16.0, rank_multiple=32)
    assert a_pad.shape == (32, a.shape[1]) and b_pad.shape == (b.shape[0], 32)
    # llama.cpp multiplies by alpha / r with r from the shape: 16/8 unpadded, 16/32 padded.
    np.testing.assert_allclose(b_pad @ a_pad * (16 / 32), b @ a * (16 / 8), rtol=1e-6, atol=1e-7)
    assert stored_type(GGMLType.Q8_0, 96) == GGMLType.Q8_0
    assert stored_type(GGMLType.Q8_0, 100) == GGMLType.F32  # not whole 32-wide blocks


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_dora_merge_matches_peft(arch: str, bases: dict[str, Base], tmp_path: Path) -> None:
    base = bases[arch]
    adapter_dir = make_peft_adapter(base.ckpt, tmp_path / "peft", use_dora=True, strength=STRENGTH)
    ref = reference_logits(base.config, apply_peft(base.weights, adapter_dir, base.config), base.tokens)
    merged = convert_checkpoint(base.ckpt, tmp_path / "merged-F16.gguf",
                                adapter=PeftMerger(PeftAdapter.open(adapter_dir)))
    _assert_matches(_llama_logits(merged, base.tokens), ref, base.ref)
    with pytest.raises(AdapterError, match="DoRA cannot be expressed"):
        convert_adapter_to_gguf(adapter_dir, base.ckpt, tmp_path / "adapter.gguf")
    assert not (tmp_path / "adapter.gguf").exists()


@pytest.mark.parametrize("arch, modules", [("qwen3", ["lm_head"]), ("llama", ["lm_head", "embed_tokens"])])
def test_modules_to_save_merge(arch: str, modules: list[str], bases: dict[str, Base], tmp_path: Path) -> None:
    """Full replacements (qwen3 is tied: a saved lm_head unties the output)."""
    base = bases[arch]
    adapter_dir = make_peft_adapter(base.ckpt, tmp_path / "peft", modules_to_save=modules, strength=STRENGTH)
    ref = reference_logits(base.config, apply_peft(base.weights, adapter_dir, base.config), base.tokens)
    merged = convert_checkpoint(base.ckpt, tmp_path / "merged-F16.gguf",
                                adapter=PeftMerger(PeftAdapter.open(adapter_dir)))
    _assert_matches(_llama_logits(merged, base.tokens), ref, base.ref)
    with pytest.raises(AdapterError, match="modules_to_save"):
        convert_adapter_to_gguf(adapter_dir, base.ckpt, tmp_path / "adapter.gguf")


def test_merge_row_blocks_equal_whole_merge() -> None:
    """Row-block merging (what the streaming converter does) equals the whole-matrix formula,
    for LoRA and DoRA (the DoRA norm is per output row, so blocks of rows are exact)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 32)).astype(np.float32)
    a = rng.standard_normal((4, 32)).astype(np.float32)
    b = rng.standard_normal((48, 4)).astype(np.float32)
    m = rng.uniform(0.5, 2, 48).astype(np.float32)
    for magnitude in (None, m):
        delta = LoraDelta("x", a, b, 0.75, magnitude)
        whole = w.astype(np.float64) + 0.75 * b.astype(np.float64) @ a
        if magnitude is not None:
            whole = (magnitude / np.linalg.norm(whole, axis=1))[:, None] * whole
        blocks = np.concatenate([merge_lora_into(w[s], delta, s) for s in (slice(0, 20), slice(20, 48))])
        np.testing.assert_allclose(blocks, whole, rtol=1e-5, atol=1e-5)


def test_cli_convert_with_adapter_writes_merged_adapter_and_quant(bases: dict[str, Base], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from edge_lora.core.manifest import Manifest
    from edge_lora.cli import main

    base = bases["qwen3"]
    adapter_dir = make_peft_adapter(base.ckpt, tmp_path / "myadapter", strength=STRENGTH)
    out = tmp_path / "out"
    assert main(["convert", str(base.ckpt), "--adapter", str(adapter_dir), "--out", str(out),
                 "--quant", "Q8_0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    kinds = {f["path"]: f["kind"] for f in report["files"]}
    assert kinds == {"qwen3-myadapter-F16.gguf": "merged", "qwen3-myadapter-Q8_0.gguf": "merged",
                     "adapter-myadapter.gguf": "adapter"}
    assert Manifest.load(out).adapter == str(adapter_dir)
    ref = reference_logits(base.config, apply_peft(base.weights, adapter_dir, base.config), base.tokens)
    _assert_matches(_llama_logits(out / "qwen3-myadapter-F16.gguf", base.tokens), ref, base.ref)
