"""Counting GGUF header parses, to prove work is not done twice."""

from __future__ import annotations

from pathlib import Path

import pytest


def count_parses(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every GGUF header parse, wherever edge_lora imported validate_gguf."""
    import edge_lora.analysis.fit
    import edge_lora.core.gguf_check
    import edge_lora.analysis.modelfile

    parsed: list[Path] = []
    real = edge_lora.core.gguf_check.validate_gguf

    def counting(path, **kwargs):  # type: ignore[no-untyped-def]
        parsed.append(Path(path))
        return real(path, **kwargs)

    for module in (edge_lora.core.gguf_check, edge_lora.analysis.fit, edge_lora.analysis.modelfile):
        monkeypatch.setattr(module, "validate_gguf", counting)
    return parsed
