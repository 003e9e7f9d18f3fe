"""Regenerate tests/data/configs/<arch>-tf4.json and -tf5.json: tiny configs saved by transformers
itself (``Config(...).save_pretrained``), one per architecture, with non-default RoPE bases and
scalings, so the converter is tested on what the two config generations really write
(transformers 4: top-level ``rope_theta`` + ``rope_scaling``; 5: ``rope_parameters``).

Run it once under each major version, in venvs that are never project dependencies:

    python3 -m venv /tmp/tf4 && /tmp/tf4/bin/pip install torch==2.13.0 'transformers<5'
    python3 -m venv /tmp/tf5 && /tmp/tf5/bin/pip install torch==2.13.0 'transformers>=5,<6'
    /tmp/tf4/bin/python tests/support/make_config_data.py
    /tmp/tf5/bin/python tests/support/make_config_data.py

Tests read the JSON files without transformers (``tests.support.model_fixtures.library_config``)
and fill in the tokenizer's vocab_size and special ids. This script imports nothing from the project.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent.parent / "data" / "configs"

# The dims of tests.support.model_fixtures: hidden 256 = 4 heads x 64, 2 KV heads.
TINY: dict[str, Any] = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2,
                        "pad_token_id": 0, "rms_norm_eps": 1e-5}
ROTARY_PAIRS_PHI3 = 24  # head_dim 64 x partial_rotary_factor 0.75 / 2


def _longrope_factors() -> tuple[list[float], list[float]]:
    # Short factors near 1, long ones growing with the wavelength, as Phi-3.5's do.
    short = [round(1.0 + 0.02 * i, 4) for i in range(ROTARY_PAIRS_PHI3)]
    long = [round(1.0 + 0.5 * i, 4) for i in range(ROTARY_PAIRS_PHI3)]
    return short, long


def specs() -> dict[str, tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """arch -> (config class, common kwargs, transformers-4 RoPE kwargs, transformers-5 RoPE kwargs)."""
    short, long = _longrope_factors()
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    yarn = {"factor": 4.0, "original_max_position_embeddings": 64}
    longrope = {"short_factor": short, "long_factor": long}
    return {
        # Llama 3.2 1B/3B: llama3 RoPE scaling and tied embeddings
        "llama": ("LlamaConfig", {"num_hidden_layers": 2, "head_dim": 64, "max_position_embeddings": 256,
                                  "tie_word_embeddings": True},
                  {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **llama3}},
                  {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **llama3}}),
        "mistral": ("MistralConfig", {"num_hidden_layers": 2, "head_dim": 64, "max_position_embeddings": 256,
                                      "sliding_window": None},
                    {"rope_theta": 1_000_000.0, "rope_scaling": {"rope_type": "yarn", **yarn}},
                    {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1_000_000.0, **yarn}}),
        "qwen2": ("Qwen2Config", {"num_hidden_layers": 2, "max_position_embeddings": 256, "tie_word_embeddings": True},
                  {"rope_theta": 1_000_000.0, "rope_scaling": {"rope_type": "yarn", **yarn}},
                  {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1_000_000.0, **yarn}}),
        "qwen3": ("Qwen3Config", {"num_hidden_layers": 2, "head_dim": 64, "max_position_embeddings": 256,
                                  "tie_word_embeddings": True},
                  {"rope_theta": 1_000_000.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
                  {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0}}),
        # 6 layers: five sliding (local base 20000), one global (base 1e6, linear x8)
        "gemma3": ("Gemma3TextConfig", {"num_hidden_layers": 6, "head_dim": 64, "query_pre_attn_scalar": 64,
                                        "sliding_window": 8, "max_position_embeddings": 256},
                   {"rope_theta": 1_000_000.0, "rope_local_base_freq": 20000.0,
                    "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
                   {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0}}}),
        # Gemma 2: soft-capping, a sliding layer then a global one
        "gemma2": ("Gemma2Config", {"num_hidden_layers": 2, "head_dim": 64, "query_pre_attn_scalar": 64,
                                    "sliding_window": 8, "max_position_embeddings": 256,
                                    "attn_logit_softcapping": 4.0, "final_logit_softcapping": 15.0},
                   {"rope_theta": 20000.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
                   {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0}}),
        # Phi-4-mini style: partial rotary 0.75, LongRoPE over a 16-token pretraining context
        "phi3": ("Phi3Config", {"num_hidden_layers": 2, "max_position_embeddings": 64,
                                "original_max_position_embeddings": 16, "tie_word_embeddings": True},
                 {"rope_theta": 20000.0, "partial_rotary_factor": 0.75, "rope_scaling": {"type": "longrope", **longrope}},
                 {"rope_parameters": {"rope_type": "longrope", "rope_theta": 20000.0, "partial_rotary_factor": 0.75,
                                      **longrope}}),
        # Granite 3.x: the four multipliers
        "granite": ("GraniteConfig", {"num_hidden_layers": 2, "max_position_embeddings": 256,
                                      "tie_word_embeddings": True, "embedding_multiplier": 12.0,
                                      "residual_multiplier": 0.22, "attention_multiplier": 0.03125,
                                      "logits_scaling": 4.0},
                    {"rope_theta": 10_000_000.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
                    {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10_000_000.0}}),
        # SmolLM3: every 4th layer without RoPE
        "smollm3": ("SmolLM3Config", {"num_hidden_layers": 4, "max_position_embeddings": 256,
                                      "tie_word_embeddings": True},
                    {"rope_theta": 5_000_000.0, "rope_scaling": {"rope_type": "yarn", **yarn}},
                    {"rope_parameters": {"rope_type": "yarn", "rope_theta": 5_000_000.0, **yarn}}),
    }


def main() -> int:
    import transformers

    generation = f"tf{transformers.__version__.split('.')[0]}"
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for arch, (class_name, common, tf4, tf5) in specs().items():
        config_class = getattr(transformers, class_name)
        config = config_class(**TINY, **common, **(tf4 if generation == "tf4" else tf5))
        with tempfile.TemporaryDirectory() as tmp:
            config.save_pretrained(tmp)
            saved = json.loads((Path(tmp) / "config.json").read_text())
        saved["architectures"] = [class_name.replace("TextConfig", "ForCausalLM").replace("Config", "ForCausalLM")]
        (OUT_DIR / f"{arch}-{generation}.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        print(f"{arch}-{generation}.json ({transformers.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
