"""Adapter arithmetic and IA3 against the reference: PEFT's own add_weighted_adapter and
merge_and_unload outputs (tests/data/adapter_arith, made by tests/support/make_arith_data.py), the
numpy reference forward pass, and llama.cpp running merged and hot-applied files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_lora.cli import main
from edge_lora.converters.adapter_gguf import convert_adapter_to_gguf
from edge_lora.converters.combine import (METHODS, CombineOptions, Merge, Method, Space, combine_adapters,
                                          merge_task_tensors, write_peft_adapter)
from edge_lora.converters.gguf_to_peft import peft_tensors_from_gguf_adapter
from edge_lora.converters.hf_to_gguf import convert_checkpoint
from edge_lora.converters.ia3 import Ia3Adapter, Ia3Merger
from edge_lora.converters.merge import PeftMerger
from edge_lora.converters.peft import PeftAdapter
from edge_lora.core.errors import AdapterError, AdapterMismatchError, InputError
from edge_lora.workflows.combine_adapters import combine_to_dir, parse_weighted
from tests.support.model_fixtures import make_checkpoint, make_peft_adapter
from tests.support.reference import apply_ia3, apply_peft, load_safetensors, make_ia3_adapter, reference_logits
from tests.test_merge_and_adapter import _llama_logits, _rel, _tokens, _weights

DATA = Path(__file__).resolve().parent / "data" / "adapter_arith"
CASES = sorted(p.name for p in (DATA / "lora" / "combined").iterdir())


def _fixture_adapters() -> dict[str, PeftAdapter]:
    return {name: PeftAdapter.open(DATA / "lora" / name) for name in "abc"}


def _options(meta: dict, **changes: object) -> CombineOptions:
    o = meta["options"]
    values = dict(method=meta["method"], density=o.get("density"),
                  majority_sign_method=o.get("majority_sign_method", "total"), svd_rank=o.get("svd_rank"))
    values.update(changes)
    return CombineOptions(**values)  # type: ignore[arg-type]


def _product(adapter: PeftAdapter, weight_name: str) -> np.ndarray:
    d = adapter.deltas[weight_name]
    return d.scale * (d.lora_b.astype(np.float64) @ d.lora_a.astype(np.float64))


# ----------------------------------------------------------------------------- tensors vs PEFT

def test_fixture_covers_every_method() -> None:
    methods = {json.loads((DATA / "lora" / "combined" / c / "case.json").read_text())["method"] for c in CASES}
    assert methods == set(METHODS)


@pytest.mark.parametrize("case", CASES)
def test_combined_tensors_equal_peft(case: str, tmp_path: Path) -> None:
    """Every method's A and B equal PEFT's (SVD factors up to the sign of each singular pair, which
    LAPACK leaves free), the product B·A too, and the written directory reads back the same."""
    meta = json.loads((DATA / "lora" / "combined" / case / "case.json").read_text())
    adapters = _fixture_adapters()
    got = combine_adapters([(adapters[n], w) for n, w in zip(meta["adapters"], meta["weights"])], _options(meta))
    ref = PeftAdapter.open(DATA / "lora" / "combined" / case)
    assert got.config.r == ref.config.r and got.config.lora_alpha == ref.config.lora_alpha
    assert sorted(got.deltas) == sorted(ref.deltas)
    svd = METHODS[meta["method"]].space is Space.SVD and len(meta["adapters"]) > 1
    for name, d in ref.deltas.items():
        g = got.deltas[name]
        assert g.lora_a.shape == d.lora_a.shape and g.lora_b.shape == d.lora_b.shape
        assert g.scale == pytest.approx(d.scale)
        ref_prod = _product(ref, name)
        np.testing.assert_allclose(_product(got, name), ref_prod, atol=2e-5 * np.abs(ref_prod).max())
        if svd:
            signs = np.sign(np.sum(g.lora_a * d.lora_a, axis=1))
            assert np.all(signs != 0)
            g_a, g_b = g.lora_a * signs[:, None], g.lora_b * signs[None, :]
        else:
            g_a, g_b = g.lora_a, g.lora_b
        np.testing.assert_allclose(g_a, d.lora_a, rtol=1e-4, atol=1e-4 * np.abs(d.lora_a).max())
        np.testing.assert_allclose(g_b, d.lora_b, rtol=1e-4, atol=1e-4 * np.abs(d.lora_b).max())
    back = PeftAdapter.open(write_peft_adapter(got, tmp_path / "out"))
    for name in ref.deltas:
        np.testing.assert_allclose(_product(back, name), _product(got, name), rtol=1e-6, atol=1e-9)


def test_linear_is_not_the_sum_of_deltas_but_cat_is() -> None:
    """PEFT's linear combines the factors (cross terms), the README and --help say so; cat is exact."""
    adapters = _fixture_adapters()
    inputs = [(adapters["a"], 0.7), (adapters["b"], -0.4)]
    name = next(iter(adapters["a"].deltas))
    exact = 0.7 * _product(adapters["a"], name) - 0.4 * _product(adapters["b"], name)
    cat = combine_adapters(inputs, CombineOptions("cat"))
    linear = combine_adapters(inputs, CombineOptions("linear"))
    np.testing.assert_allclose(_product(cat, name), exact, atol=1e-5 * np.abs(exact).max())
    assert np.abs(_product(linear, name) - exact).max() > 0.1 * np.abs(exact).max()


# ----------------------------------------------------------------------------- DARE

@pytest.mark.parametrize("dare, plain", [("dare_linear", "linear"), ("dare_ties", "ties"),
                                         ("dare_linear_svd", "svd"), ("dare_ties_svd", "ties_svd")])
def test_dare_at_density_1_is_its_counterpart(dare: str, plain: str) -> None:
    adapters = _fixture_adapters()
    inputs = [(adapters["a"], 0.7), (adapters["b"], -0.4)]
    got = combine_adapters(inputs, CombineOptions(dare, density=1.0, seed=3))
    ref = combine_adapters(inputs, CombineOptions(plain, density=1.0 if plain.startswith("ties") else None))
    for name in ref.deltas:
        if plain == "svd":  # svd works from the factors, dare_linear_svd from the full delta: rounding differs
            np.testing.assert_allclose(_product(got, name), _product(ref, name),
                                       atol=1e-5 * np.abs(_product(ref, name)).max())
        else:
            np.testing.assert_array_equal(_product(got, name), _product(ref, name))


def test_dare_keeps_density_rescales_and_repeats_with_its_seed() -> None:
    """PEFT's rule: each value kept with probability density (Bernoulli), kept values / density."""
    rng = np.random.default_rng(0)
    task = rng.standard_normal((200, 300)).astype(np.float32) + 0.01  # no exact zeros
    method = Method(Space.FACTORS, Merge.DARE_LINEAR)
    density = 0.3

    def prune(seed: int) -> np.ndarray:
        return merge_task_tensors([task], [1.0], method, CombineOptions("dare_linear", density=density, seed=seed),
                                  np.random.default_rng(seed))

    got = prune(11)
    kept = got != 0
    n = task.size
    assert abs(kept.mean() - density) < 5 * np.sqrt(density * (1 - density) / n)  # 5 sigma of Binomial(n, d)
    np.testing.assert_allclose(got[kept], task[kept] / np.float32(density), rtol=1e-6)
    np.testing.assert_array_equal(prune(11), got)
    assert not np.array_equal(prune(12) != 0, kept)


def test_dare_combination_repeats_for_a_seed_and_differs_for_another() -> None:
    adapters = _fixture_adapters()
    inputs = [(adapters["a"], 0.7), (adapters["b"], 0.4)]
    name = next(iter(adapters["a"].deltas))
    one = combine_adapters(inputs, CombineOptions("dare_ties", density=0.5, seed=7))
    again = combine_adapters(inputs, CombineOptions("dare_ties", density=0.5, seed=7))
    other = combine_adapters(inputs, CombineOptions("dare_ties", density=0.5, seed=8))
    np.testing.assert_array_equal(one.deltas[name].lora_a, again.deltas[name].lora_a)
    assert not np.array_equal(one.deltas[name].lora_a, other.deltas[name].lora_a)


# ----------------------------------------------------------------------------- refusals

def test_refusals_name_the_first_difference(tmp_path: Path) -> None:
    a, b, c = (DATA / "lora" / n for n in "abc")
    with pytest.raises(InputError, match="needs --density"):
        combine_to_dir([f"{a}:1", f"{b}:1"], tmp_path / "o", CombineOptions("ties"))
    with pytest.raises(AdapterMismatchError, match="one rank.*a r=4, c r=6"):
        combine_to_dir([f"{a}:1", f"{c}:1"], tmp_path / "o", CombineOptions("linear"))
    with pytest.raises(InputError, match="does not apply"):
        combine_to_dir([f"{a}:1", f"{b}:1"], tmp_path / "o", CombineOptions("cat", density=0.5))
    with pytest.raises(InputError, match="out of range"):
        combine_to_dir([f"{a}:1", f"{b}:1"], tmp_path / "o", CombineOptions("dare_linear", density=0.0))
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_model.safetensors").write_bytes((a / "adapter_model.safetensors").read_bytes())
    config = json.loads((a / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj", "v_proj",
                                                                                          "down_proj", "k_proj"]}))
    # same weights, other targets declared: still the same modules, so combinable
    combine_to_dir([f"{a}:1", f"{other}:1"], tmp_path / "ok")
    pruned = load_safetensors(a / "adapter_model.safetensors")
    pruned = {k: v for k, v in pruned.items() if "layers.1.mlp" not in k}
    from safetensors.numpy import save_file
    save_file(pruned, str(other / "adapter_model.safetensors"))
    with pytest.raises(AdapterMismatchError, match="does not adapt model.layers.1.mlp.down_proj"):
        combine_to_dir([f"{a}:1", f"{other}:1"], tmp_path / "o")
    assert not (tmp_path / "o" / "adapter_config.json").exists()


def test_parse_weighted(tmp_path: Path) -> None:
    (tmp_path / "run:2").mkdir()
    assert parse_weighted(str(tmp_path / "run:2")).weight is None  # an existing path is taken as written
    assert parse_weighted("legal:0.5") == parse_weighted("legal:.5")
    assert parse_weighted("legal:-1").weight == -1.0
    assert parse_weighted("org/name").weight is None
    assert parse_weighted(r"C:\adapters\x").ref == r"C:\adapters\x"
    with pytest.raises(InputError):
        parse_weighted("legal:nan")


def test_cli_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, c = DATA / "lora" / "a", DATA / "lora" / "c"
    assert main(["adapter", "combine", f"{a}:1", f"{c}:1", "--method", "ties", "--density", "0.5",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "one rank" in err
    assert main(["adapter", "combine", str(a), "--out", str(tmp_path / "o")]) == 2
    assert "two or more" in capsys.readouterr().err
    ia3 = DATA / "ia3" / "llama" / "adapter"
    assert main(["adapter", "combine", f"{a}:1", str(ia3), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "IA3" in err and "merge it" in err


# ----------------------------------------------------------------------------- IA3 vs PEFT

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_ia3_merge_equals_peft_merge_and_unload(arch: str) -> None:
    root = DATA / "ia3" / arch
    merger = Ia3Merger(Ia3Adapter.open(root / "adapter"))
    base, merged = load_safetensors(root / "base.safetensors"), load_safetensors(root / "merged.safetensors")
    reference = apply_ia3(base, root / "adapter")
    assert any(n.endswith(".bias") for n in base) == (arch == "qwen2")
    for name, values in base.items():
        rows = np.concatenate([merger.merge_rows(name, values[i:i + 16], slice(i, i + 16))
                               for i in range(0, values.shape[0], 16)])
        assert not np.allclose(values, merged[name])
        np.testing.assert_allclose(rows, merged[name], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(reference[name], merged[name], rtol=1e-6, atol=1e-7)


def test_ia3_refused_where_it_cannot_be_hot_applied_other_types_named(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    ia3 = DATA / "ia3" / "llama" / "adapter"
    with pytest.raises(AdapterError, match="IA3.*llama.cpp's LoRA runtime and vLLM cannot apply"):
        PeftAdapter.open(ia3)
    base = make_checkpoint("llama", tmp_path / "base")
    assert main(["adapter", "convert", str(ia3), "--base", str(base), "--out", str(tmp_path / "x.gguf")]) == 2
    assert "IA3" in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()
    loha = tmp_path / "loha"
    loha.mkdir()
    (loha / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": 8}))
    with pytest.raises(AdapterError, match="LOHA"):
        PeftAdapter.open(loha)


# ----------------------------------------------------------------------------- logits (llama.cpp)

STRENGTH = 0.05


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("arith")
    ckpt = make_checkpoint("llama", root / "llama")
    f16 = convert_checkpoint(ckpt, root / "llama-F16.gguf")
    config, weights = _weights(ckpt)
    tokens = _tokens(config)
    one = make_peft_adapter(ckpt, root / "one", r=8, alpha=16, strength=STRENGTH, seed=1)
    two = make_peft_adapter(ckpt, root / "two", r=4, alpha=8, use_rslora=True, strength=STRENGTH, seed=2)
    same_rank = make_peft_adapter(ckpt, root / "three", r=8, alpha=8, strength=STRENGTH, seed=3)
    return {"root": root, "ckpt": ckpt, "f16": f16, "config": config, "weights": weights, "tokens": tokens,
            "one": one, "two": two, "three": same_rank,
            "base_logits": reference_logits(config, weights, tokens)}


def _assert_close(got: np.ndarray, ref: np.ndarray, tol: float = 0.01) -> None:
    assert _rel(got, ref) < tol, f"max|diff|/std = {_rel(got, ref):.4f}"


@pytest.mark.slow
@pytest.mark.parametrize("method, density", [("cat", None), ("ties", 0.6), ("svd", None), ("dare_linear", 0.7)])
def test_combined_adapter_logits_merged_and_hot_applied(llama_base, method: str, density: float | None,
                                                        tmp_path: Path) -> None:
    b = llama_base
    second = b["two"] if method in ("cat", "svd") else b["three"]
    out = combine_to_dir([f"{b['one']}:0.8", f"{second}:-0.5"], tmp_path / "combined",
                         CombineOptions(method, density=density), base=b["ckpt"]).out_dir
    ref = reference_logits(b["config"], apply_peft(b["weights"], out, b["config"]), b["tokens"])
    assert _rel(b["base_logits"], ref) > 0.05  # the combination moves the logits
    merged = convert_checkpoint(b["ckpt"], tmp_path / "merged.gguf", adapter=PeftMerger(PeftAdapter.open(out)))
    _assert_close(_llama_logits(merged, b["tokens"]), ref)
    lora = convert_adapter_to_gguf(out, b["ckpt"], tmp_path / "combined.gguf")
    _assert_close(_llama_logits(b["f16"], b["tokens"], lora), ref)


def _llama_logits_multi(model_path: Path, tokens: list[int], adapters: list[tuple[Path, float]]) -> np.ndarray:
    from edge_lora.serving.llama_backend import LlamaContext, LlamaModel, LoraAdapter

    with LlamaModel(model_path) as model, LlamaContext(model, n_ctx=64, n_batch=64, n_threads=2) as ctx:
        loras = [(LoraAdapter(model, p), s) for p, s in adapters]
        ctx.set_adapters(loras)
        ctx.decode(tokens, 0, "all")
        out = np.array([ctx.logits(i) for i in range(len(tokens))], dtype=np.float64)
        for lora, _ in loras:
            lora.free()
        return out


@pytest.mark.slow
def test_cat_equals_hot_applying_both_and_minus_one_undoes_plus_one(llama_base, tmp_path: Path) -> None:
    b = llama_base
    g1 = convert_adapter_to_gguf(b["one"], b["ckpt"], tmp_path / "one.gguf")
    g2 = convert_adapter_to_gguf(b["two"], b["ckpt"], tmp_path / "two.gguf")
    both = _llama_logits_multi(b["f16"], b["tokens"], [(g1, 0.7), (g2, 0.3)])
    assert _rel(b["base_logits"], both) > 0.05
    cat = combine_to_dir([f"{b['one']}:0.7", f"{b['two']}:0.3"], tmp_path / "cat").out_dir
    cat_gguf = convert_adapter_to_gguf(cat, b["ckpt"], tmp_path / "cat.gguf")
    _assert_close(_llama_logits(b["f16"], b["tokens"], cat_gguf), both, 0.005)
    # convert BASE --adapter one:0.7 --adapter two:0.3 merges the same combination in one pass
    assert main(["convert", str(b["ckpt"]), "--adapter", f"{b['one']}:0.7", "--adapter", f"{b['two']}:0.3",
                 "--quant", "none", "--out", str(tmp_path / "conv")]) == 0
    merged = next((tmp_path / "conv").glob("*-F16.gguf"))
    assert "one_0.7+two_0.3" in merged.name
    _assert_close(_llama_logits(merged, b["tokens"]), both)
    # A:1 + A:-1 = the base; and the GGUF -1 adapter on top of the +1 one gives the base back
    undone = combine_to_dir([f"{b['one']}:1", f"{b['one']}:-1"], tmp_path / "undone").out_dir
    assert all(np.abs(_product(PeftAdapter.open(undone), n)).max() < 1e-6
               for n in PeftAdapter.open(undone).deltas)
    minus = combine_to_dir([f"{b['one']}:-1"], tmp_path / "minus").out_dir
    minus_gguf = convert_adapter_to_gguf(minus, b["ckpt"], tmp_path / "minus.gguf")
    _assert_close(_llama_logits_multi(b["f16"], b["tokens"], [(g1, 1.0), (minus_gguf, 1.0)]), b["base_logits"])


def test_gguf_adapter_back_to_peft_tensors(llama_base, tmp_path: Path) -> None:
    """The GGUF LoRA (q/k rows permuted, rsLoRA scale folded into B) reads back as the same ΔW,
    and combine takes it as an input with --base."""
    from edge_lora.converters.checkpoint import HFCheckpoint

    b = llama_base
    original = PeftAdapter.open(b["two"])
    g = convert_adapter_to_gguf(b["two"], b["ckpt"], tmp_path / "two.gguf", outtype="q8_0")
    with HFCheckpoint.open(b["ckpt"]) as ckpt:
        back = peft_tensors_from_gguf_adapter(g, ckpt)
    assert sorted(back.deltas) == sorted(original.deltas)
    for name in original.deltas:
        ref = _product(original, name)
        assert np.abs(_product(back, name) - ref).max() < 0.02 * np.abs(ref).max()  # Q8_0 rounding
    out = combine_to_dir([f"{g}:1", f"{b['two']}:-1"], tmp_path / "diff", base=b["ckpt"]).out_dir
    diff = PeftAdapter.open(out)
    for name in original.deltas:
        assert np.abs(_product(diff, name)).max() < 0.02 * np.abs(_product(original, name)).max()
    with pytest.raises(InputError, match="needs the base"):
        combine_to_dir([f"{g}:1", f"{b['two']}:1"], tmp_path / "nobase")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_ia3_merged_logits_match_reference(arch: str, tmp_path: Path) -> None:
    ckpt = make_checkpoint(arch, tmp_path / arch)
    config, weights = _weights(ckpt)
    tokens = _tokens(config)
    ia3 = make_ia3_adapter(weights, tmp_path / "ia3", targets=("k_proj", "v_proj", "down_proj"),
                           feedforward=("down_proj",))
    ref = reference_logits(config, apply_ia3(weights, ia3), tokens)
    assert _rel(reference_logits(config, weights, tokens), ref) > 0.05
    assert main(["convert", str(ckpt), "--adapter", str(ia3), "--quant", "none", "--out", str(tmp_path / "out")]) == 0
    merged = next((tmp_path / "out").glob("*-F16.gguf"))
    assert not list((tmp_path / "out").glob("adapter-*.gguf"))  # IA3 has no GGUF adapter form
    _assert_close(_llama_logits(merged, tokens), ref)


@pytest.mark.slow
def test_combine_registered_gguf_adapters_without_base(llama_base, tmp_path: Path) -> None:
    """The TUI's path: registered GGUF adapters combined in GGUF layout (no HF base), written and
    registered; cat hot-applied equals hot-applying both, ties equals the PEFT-space ties."""
    from edge_lora.serving.registry import AdapterRegistry
    from edge_lora.workflows.combine_adapters import combine_registered

    b = llama_base
    registry = AdapterRegistry(home=tmp_path / "home")
    g1 = convert_adapter_to_gguf(b["one"], b["ckpt"], tmp_path / "adapter-one.gguf")
    g3 = convert_adapter_to_gguf(b["three"], b["ckpt"], tmp_path / "adapter-three.gguf")
    registry.add("one", g1)
    registry.add("three", g3)
    entry = combine_registered("mix", [("one", 0.7), ("three", -0.4)], registry=registry)
    assert registry.get("mix") is not None and entry.path.parent == tmp_path / "home" / "adapters"
    both = _llama_logits_multi(b["f16"], b["tokens"], [(g1, 0.7), (g3, -0.4)])
    _assert_close(_llama_logits(b["f16"], b["tokens"], entry.path), both, 0.005)
    ties = combine_registered("mix-ties", [("one", 0.7), (str(g3), -0.4)], CombineOptions("ties", density=0.5),
                              registry=registry)
    peft_ties = combine_to_dir([f"{b['one']}:0.7", f"{b['three']}:-0.4"], tmp_path / "ties",
                               CombineOptions("ties", density=0.5)).out_dir
    ref = reference_logits(b["config"], apply_peft(b["weights"], peft_ties, b["config"]), b["tokens"])
    _assert_close(_llama_logits(b["f16"], b["tokens"], ties.path), ref)
    with pytest.raises(InputError, match="already registered"):
        combine_registered("mix", [("one", 0.5), ("three", 0.5)], registry=registry)


def test_convert_refuses_method_without_a_combination(llama_base, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    b = llama_base
    for extra in (["--adapter", str(b["one"])], []):
        assert main(["convert", str(b["ckpt"]), *extra, "--method", "ties", "--density", "0.5", "--quant", "none",
                     "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--method ties" in err
    assert not (tmp_path / "o").exists()


def test_cli_combine_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = DATA / "lora" / "a", DATA / "lora" / "b"
    assert main(["adapter", "combine", f"{a}:0.7", f"{b}:-0.4", "--method", "dare_ties", "--density", "0.5",
                 "--seed", "3", "--out", str(tmp_path / "o"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["method"] == "dare_ties" and doc["seed"] == 3 and doc["rank"] == 4
    assert [i["weight"] for i in doc["inputs"]] == [0.7, -0.4]
    written = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert written["r"] == written["lora_alpha"] == 4 and written["use_rslora"] is False
    again = combine_adapters([(PeftAdapter.open(a), 0.7), (PeftAdapter.open(b), -0.4)],
                             CombineOptions("dare_ties", density=0.5, seed=3))
    got = PeftAdapter.open(tmp_path / "o")
    for name, delta in again.deltas.items():
        np.testing.assert_array_equal(got.deltas[name].lora_a, delta.lora_a)
