"""Faults injected where a CPU cannot be relied on to produce them.

NaN weights do not reliably give NaN logits: on AVX2 they do, on AVX-512 llama.cpp's SIMD clamps
swallow the NaN and the model writes finite nonsense (which is why adapters are checked for NaN
at load). The runtime's own guard against non-finite logits is tested by making the logits NaN.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest

from edge_lora.serving.llama_backend import BatchedContext, LlamaContext


@contextlib.contextmanager
def nan_logits(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every logits row (LlamaContext's, BatchedContext's) reads NaN inside the block (decoding
    itself is untouched)."""
    real = LlamaContext.logits
    real_batched = BatchedContext.logits

    def poisoned(self: LlamaContext, i: int = -1) -> np.ndarray:
        return np.full_like(real(self, i), np.nan)

    def poisoned_batched(self: BatchedContext, row: int) -> np.ndarray:
        return np.full_like(real_batched(self, row), np.nan)

    monkeypatch.setattr(LlamaContext, "logits", poisoned)
    monkeypatch.setattr(BatchedContext, "logits", poisoned_batched)
    try:
        yield
    finally:
        monkeypatch.setattr(LlamaContext, "logits", real)
        monkeypatch.setattr(BatchedContext, "logits", real_batched)
