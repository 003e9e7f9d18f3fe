"""The context size every command takes (``--ctx`` of run, serve, tui, fit, modelfile): one
range and one default."""

from __future__ import annotations

from edge_lora.core import constants
from edge_lora.core.errors import InputError

# Below 64 tokens a chat template alone fills the context; above 2^20 no GGUF we read was trained.
MIN_CTX = 64
MAX_CTX = 1 << 20


def check_ctx(ctx: int | None) -> None:
    """Refuse a ``--ctx`` outside the range (None = the default, always fine). A context larger
    than the model's training context is refused where the model is read."""
    if ctx is not None and not MIN_CTX <= ctx <= MAX_CTX:
        raise InputError(f"--ctx {ctx} is out of range", fix=f"use a context between {MIN_CTX} and {MAX_CTX}")


def default_ctx(trained: int | None) -> int:
    """The context used when none is given: the model's training context, capped (tools that
    default to a model's full 128K context mislead users about memory); the cap when unknown."""
    return min(trained, constants.DEFAULT_CTX_CAP) if trained else constants.DEFAULT_CTX_CAP
