"""Greedy tokens from transformers + PEFT: the reference vLLM's answers are compared with.

Run with the Python of the vLLM venv (it has torch, transformers and peft; the project's own venv
has no torch): ``python tests/support/peft_greedy.py REQUEST.json`` prints
``{"<name>": [[token ids of prompt 0], ...], ...}``. REQUEST: ``{"base": DIR, "max_tokens": K,
"prompts": [[ids]], "models": [{"name", "adapter": DIR | null, "scale": S}]}``; the scale
multiplies every lora_B (the scale edge-lora's registry applies).
"""

from __future__ import annotations

import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int, eos: set[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(input_ids=ids).logits[0, -1]
            token = int(torch.argmax(logits))
            if token in eos:
                break
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def main() -> None:
    request = json.load(open(sys.argv[1]))
    torch.manual_seed(0)
    answers = {}
    for entry in request["models"]:
        model = AutoModelForCausalLM.from_pretrained(request["base"], torch_dtype=torch.float32)
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if entry["adapter"] is not None:
            model = PeftModel.from_pretrained(model, entry["adapter"])
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.mul_(float(entry["scale"]))
        model.eval()
        answers[entry["name"]] = [greedy(model, p, request["max_tokens"], eos_ids) for p in request["prompts"]]
    print(json.dumps(answers))


if __name__ == "__main__":
    main()
