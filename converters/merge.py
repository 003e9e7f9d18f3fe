"""Merging LoRA deltas into base weights, one row block at a time (float32).

W' = W + s·B@A; DoRA: W' = m ⊙ (W + s·B@A) / ‖W + s·B@A‖ with the norm per output row, which
needs only whole rows, so row blocks work for both. ``PeftMerger`` is the ``TensorMerger``
that ``edge_lora.converters.hf_to_gguf.convert_checkpoint`` calls while streaming the base.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge_lora.converters.checkpoint import HFCheckpoint
from edge_lora.converters.peft import LoraDelta, PeftAdapter
from edge_lora.core.errors import InputError


def merge_lora_into(weight_rows: np.ndarray, delta: LoraDelta, rows: slice) -> np.ndarray:
    """Rows ``rows`` of the merged weight, given the same rows of the base weight (HF layout)."""
    base = np.asarray(weight_rows, dtype=np.float32)
    merged = base + delta.delta_rows(rows)
    if delta.magnitude is not None:
        norms = np.linalg.norm(merged, axis=1)
        if not np.all(norms > 0):
            raise InputError(f"DoRA merge of {delta.module}: a row of W + ΔW is all zeros",
                             fix="check the adapter and base weights")
        merged *= (delta.magnitude[rows] / norms).astype(np.float32)[:, None]
    return merged


class PeftMerger:
    """TensorMerger over a validated PEFT adapter."""

    def __init__(self, adapter: PeftAdapter) -> None:
        self.adapter = adapter

    def check_fits(self, ckpt: HFCheckpoint) -> None:
        self.adapter.check_fits(ckpt)

    def merge_rows(self, hf_name: str, rows: np.ndarray, row_slice: slice) -> np.ndarray:
        delta = self.adapter.delta_for(hf_name)
        if delta is None:
            return rows
        return merge_lora_into(rows, delta, row_slice)

    def extra_tensors(self) -> Mapping[str, np.ndarray]:
        return self.adapter.replacements
