"""Logits from transformers itself, for checking tests/support/reference.py against the library
it reimplements. Run with a Python that has torch and transformers (a side venv, never a project
dependency):

    PYTHON -m tests.support.hf_logits CHECKPOINT_DIR TOKENS_JSON OUT.npy

Writes float64 logits [n_tokens, vocab] of the float32 model (eager attention, so Gemma 2's
soft-capping applies) and prints the transformers version. Imports nothing from the project.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    import numpy as np
    import torch
    import transformers

    ckpt, tokens_file, out = Path(argv[0]), Path(argv[1]), Path(argv[2])
    tokens = json.loads(tokens_file.read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double().numpy()
    np.save(out, logits)
    print(transformers.__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
