"""Typed error hierarchy.

Errors are raised deep (where the problem is understood) with a message saying what is wrong
and a ``fix`` saying what to do; the CLI edge turns them into one stderr line and an exit code.
Each class also subclasses the builtin a Python caller would expect to catch.
"""

from __future__ import annotations


class EdgeLoraError(Exception):
    """Base of every error edge-lora raises on purpose."""

    exit_code: int = 2  # bad input; InternalError overrides

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def one_line(self) -> str:
        text = self.message if not self.fix else f"{self.message} — {self.fix}"
        return " ".join(text.split())


class InputError(EdgeLoraError, ValueError):
    """The user's input (arguments, files) is invalid."""


class InputNotFoundError(EdgeLoraError, FileNotFoundError):
    """A file, directory or registered name the user named does not exist."""


class InvalidCheckpointError(InputError):
    """An HF checkpoint (config.json, safetensors, shard index, tokenizer) is malformed."""


class UnsupportedArchitectureError(InputError):
    """The checkpoint's architecture has no entry in the architecture table."""


class InvalidGGUFError(InputError):
    """A GGUF file is malformed, truncated or hostile."""


class AdapterError(InputError):
    """A PEFT or GGUF LoRA adapter is invalid or unsupported."""


class AdapterMismatchError(AdapterError):
    """An adapter does not fit the base model (architecture or tensor shapes)."""


class ImatrixError(InputError):
    """An importance matrix file is malformed, or does not fit the model it is used with.
    ``tensor`` names the model weight concerned, when there is one."""

    def __init__(self, message: str, *, fix: str | None = None, tensor: str | None = None) -> None:
        super().__init__(message, fix=fix)
        self.tensor = tensor


class UnsafeFormatError(InputError):
    """A file format that can execute code on load (pickle) was refused."""


class RegistryError(InputError):
    """The adapter registry was asked something invalid (bad name, unknown name)."""


class RequestError(InputError):
    """A runtime request is invalid (prompt too long, bad parameters)."""


class ContextLengthError(RequestError):
    """The prompt does not fit the context."""


class TemplateLimitError(RequestError):
    """A chat template (untrusted: it comes from the model file) ran past its time, output or
    memory budget and was stopped."""


class OutputError(EdgeLoraError, OSError):
    """An output could not be written (not writable, disk full)."""


class QuantizeError(EdgeLoraError):
    """llama.cpp's quantizer failed for a format."""

    exit_code = 1


class InternalError(EdgeLoraError):
    """Something that should not happen; a bug, not bad input."""

    exit_code = 1
