"""Benchmark: tokenizer export and the exported tokenizers' speed in llama.cpp.

For each fixture tokenizer family: time to read + convert (read_tokenizer), then tokenization
throughput of llama.cpp on our GGUF vs the HF `tokenizers` library (the baseline) on the same
license text, measured in the same run, and whether their token ids agree.
Usage: python bench/tokenizer_export.py   (run from the repo root; uses tests/model_fixtures.py)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

KINDS = [("llama", "spm"), ("gemma3", "spm"), ("llama", "bpe"), ("qwen2", "bpe")]


def main() -> None:
    import llama_cpp
    from tokenizers import Tokenizer

    from edge_lora.converters.hf_to_gguf import convert_checkpoint
    from edge_lora.converters.tokenizer_export import read_tokenizer
    from tests.support.model_fixtures import make_checkpoint

    licenses = Path("/usr/share/common-licenses")
    text = "\n".join((licenses / name).read_text() for name in ("Apache-2.0", "MPL-2.0", "GPL-3"))
    print(f"text: {len(text.encode()) / 1e3:.0f} kB")
    print(f"{'tokenizer':14}{'read ms':>9}{'llama.cpp MB/s':>16}{'HF MB/s':>10}{'ratio':>8}{'same ids':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for arch, kind in KINDS:
            ckpt = make_checkpoint(arch, Path(tmp) / f"{arch}-{kind}", tokenizer=kind, n_layers=1)
            config = json.loads((ckpt / "config.json").read_text())
            t = time.perf_counter()
            read_tokenizer(ckpt, config)
            read_ms = (time.perf_counter() - t) * 1e3
            gguf_path = convert_checkpoint(ckpt, Path(tmp) / f"{arch}-{kind}.gguf")
            llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
            hf = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
            data = text.encode()
            t = time.perf_counter()
            ours = llm.tokenize(data, add_bos=True, special=False)
            llama_s = time.perf_counter() - t
            t = time.perf_counter()
            theirs = hf.encode(text, add_special_tokens=True).ids
            hf_s = time.perf_counter() - t
            mb = len(data) / 1e6
            print(f"{arch + '-' + kind:14}{read_ms:9.1f}{mb / llama_s:16.2f}{mb / hf_s:10.2f}"
                  f"{hf_s / llama_s:8.2f}{str(ours == theirs):>10}")


if __name__ == "__main__":
    main()
