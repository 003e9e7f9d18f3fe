"""Regenerate tests/data/adapter_arith/: PEFT's own results for adapter arithmetic and IA3 merging,
so tests compare edge-lora's numpy code with the reference library without torch in CI.

Run once in a venv that is never a project dependency:

    python3 -m venv /work/venv-peft && /work/venv-peft/bin/pip install torch==2.13.0 peft transformers
    /work/venv-peft/bin/python tests/support/make_arith_data.py

Written (all tiny, float32):

- ``lora/{a,b,c}/``: three PEFT LoRA adapters (``save_pretrained``) on a tiny Llama: ``a`` and ``b``
  rank 4 (alphas 8 and 16), ``c`` rank 6 with rsLoRA and an alpha pattern;
- ``lora/combined/<case>/``: ``add_weighted_adapter``'s new adapter (config + tensors, as PEFT
  saves it) for every case in ``CASES`` (method, adapters, weights, options);
- ``ia3/<arch>/``: an IA3 adapter on a tiny model of that architecture (``adapter/``), the base
  weights it touches (``base.safetensors``) and PEFT's ``merge_and_unload`` weights (``merged.safetensors``).

This script imports nothing from the project.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import IA3Config, LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

OUT_DIR = Path(__file__).resolve().parent.parent / "data" / "adapter_arith"
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "vocab_size": 128}
TARGETS = ["q_proj", "v_proj", "down_proj"]
ADAPTERS = {
    "a": {"r": 4, "lora_alpha": 8},
    "b": {"r": 4, "lora_alpha": 16},
    "c": {"r": 6, "lora_alpha": 4, "use_rslora": True, "alpha_pattern": {"down_proj": 12}},
}
TIES = {"density": 0.5}
# case name -> (combination_type, adapters, weights, add_weighted_adapter options)
CASES: dict[str, tuple[str, list[str], list[float], dict]] = {
    "cat": ("cat", ["a", "b", "c"], [0.5, 1.0, -0.3], {}),
    "linear": ("linear", ["a", "b"], [0.7, -0.4], {}),
    "linear-single": ("linear", ["a"], [0.6], {}),
    "svd": ("svd", ["a", "b", "c"], [0.5, 1.0, -0.3], {"svd_rank": 6}),
    "ties": ("ties", ["a", "b"], [0.7, -0.4], TIES),
    "ties-frequency": ("ties", ["a", "b"], [0.7, 0.4], {**TIES, "majority_sign_method": "frequency"}),
    "ties_svd": ("ties_svd", ["a", "b", "c"], [0.7, -0.4, 0.5], {**TIES, "svd_rank": 5}),
    "magnitude_prune": ("magnitude_prune", ["a", "b"], [0.7, -0.4], {"density": 0.3}),
    "magnitude_prune_svd": ("magnitude_prune_svd", ["a", "c"], [0.7, 0.5], {"density": 0.3}),
    # DARE is random (torch.bernoulli); at density 1 it is its non-random counterpart.
    "dare_linear-d1": ("dare_linear", ["a", "b"], [0.7, -0.4], {"density": 1.0}),
    "dare_ties-d1": ("dare_ties", ["a", "b"], [0.7, -0.4], {"density": 1.0}),
    "dare_linear_svd-d1": ("dare_linear_svd", ["a", "c"], [0.7, 0.5], {"density": 1.0}),
    "dare_ties_svd-d1": ("dare_ties_svd", ["a", "b"], [0.7, -0.4], {"density": 1.0}),
}


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=False)).eval()


def _randomize_lora(model: torch.nn.Module, name: str) -> None:
    """Both factors nonzero (PEFT zero-inits lora_B), as after training."""
    with torch.no_grad():
        for module_name, param in model.named_parameters():
            if f".lora_A.{name}." in module_name + "." or f".lora_B.{name}." in module_name + ".":
                param.copy_(torch.randn_like(param) * 0.3)


def _save_adapter(model, name: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    save_file(tensors, out / "adapter_model.safetensors")
    config = model.peft_config[name].to_dict()
    for key, value in config.items():
        if isinstance(value, set):
            config[key] = sorted(value)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")


def make_lora_cases() -> None:
    model = None
    torch.manual_seed(1)
    for name, options in ADAPTERS.items():
        config = LoraConfig(target_modules=TARGETS, init_lora_weights=False, **options)
        if model is None:
            model = get_peft_model(_tiny_llama(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        _randomize_lora(model, name)
        _save_adapter(model, name, OUT_DIR / "lora" / name)
    for case, (method, adapters, weights, options) in CASES.items():
        torch.manual_seed(2)
        new = f"combined_{case}"
        model.add_weighted_adapter(adapters, weights, new, combination_type=method, **options)
        _save_adapter(model, new, OUT_DIR / "lora" / "combined" / case)
        meta = {"method": method, "adapters": adapters, "weights": weights, "options": options}
        (OUT_DIR / "lora" / "combined" / case / "case.json").write_text(json.dumps(meta, indent=2) + "\n")


IA3_ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),  # q/k/v biases: IA3 scales them too
}


def make_ia3_cases() -> None:
    for arch, (config_cls, model_cls) in IA3_ARCHS.items():
        torch.manual_seed(3)
        base = model_cls(config_cls(**TINY, tie_word_embeddings=False)).eval()
        if arch == "qwen2":
            with torch.no_grad():
                for layer in base.model.layers:
                    for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.copy_(torch.randn_like(proj.bias))
        config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                           init_ia3_weights=False)
        model = get_peft_model(base, config)
        targeted = [n for n, _ in model.named_parameters() if "ia3_l" in n]
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "ia3_l" in name:
                    param.copy_(1.0 + 0.5 * torch.randn_like(param))
        out = OUT_DIR / "ia3" / arch
        adapter = out / "adapter"
        adapter.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(adapter)
        modules = sorted({n.split(".base_layer")[0].split(".ia3_l")[0].removeprefix("base_model.model.")
                          for n in targeted})
        state = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v.detach().clone()
                 for k, v in model.named_parameters()}
        kept = {n: state[n] for m in modules for n in (m + ".weight", m + ".bias") if n in state}
        save_file({k: v.contiguous() for k, v in kept.items()}, out / "base.safetensors")
        merged = model.merge_and_unload()
        merged_state = dict(merged.named_parameters())
        save_file({k: merged_state[k].detach().contiguous() for k in kept}, out / "merged.safetensors")


def main() -> None:
    if OUT_DIR.exists():
        shutil.rmtree(OUT_DIR)
    make_lora_cases()
    make_ia3_cases()
    total = sum(p.stat().st_size for p in OUT_DIR.rglob("*") if p.is_file())
    print(f"wrote {OUT_DIR} ({total / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
