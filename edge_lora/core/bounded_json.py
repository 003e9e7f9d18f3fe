"""The one reader for every JSON file edge-lora reads: model files are untrusted, and so is
anything on disk another program may have written.

Each kind of file has a size cap (read at most cap + 1 bytes; a FIFO or device is refused
before it is opened for reading, so it cannot block or stream forever), and the failures
json leaves as tracebacks are typed errors naming the file, with the kind's error class and
fix: nesting deeper than ``MAX_DEPTH`` (json itself raises RecursionError near 1000 levels),
integers longer than ``MAX_INT_DIGITS`` digits (Python 3.11 raises ValueError past 4300 digits;
3.10 would spend quadratic time converting them), invalid UTF-8 and invalid JSON.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from edge_lora.core.errors import (AdapterError, EdgeLoraError, InputError, InvalidCheckpointError,
                                   RegistryError)

MiB = 1024 * 1024
# Real files nest 5-6 levels (tokenizer.json's normalizer sequences); code that walks them
# recursively must not meet a thousand.
MAX_DEPTH = 64
# transformers writes model_max_length as int(1e30) (31 digits); anything far longer is hostile.
MAX_INT_DIGITS = 100


class JsonKind(Enum):
    """What a JSON file is: decides its size cap, error class and fix."""

    CONFIG = "config.json"
    SHARD_INDEX = "safetensors shard index"
    SAFETENSORS_HEADER = "safetensors header"
    GENERATION_CONFIG = "generation_config.json"
    TOKENIZER = "tokenizer.json"
    TOKENIZER_CONFIG = "tokenizer configuration"  # tokenizer_config, special_tokens_map, added_tokens
    ADAPTER_CONFIG = "adapter_config.json"
    MANIFEST = "manifest.json"
    REGISTRY = "adapter registry"
    STATE = "edge-lora state"  # settings and the last-output-directory pointer
    CACHE_RECORD = "cache record"  # derived data edge-lora can rebuild (hub blob hashes)


@dataclass(frozen=True)
class JsonLimits:
    max_bytes: int
    error: type[EdgeLoraError]
    fix: str


_CHECKPOINT_FIX = "re-download the checkpoint"
LIMITS: dict[JsonKind, JsonLimits] = {
    # A few KB in practice; multimodal configs with nested text/vision configs stay under 100 KB.
    JsonKind.CONFIG: JsonLimits(16 * MiB, InvalidCheckpointError, _CHECKPOINT_FIX),
    # One line per tensor: DeepSeek-V3's 90k tensors make a 9 MB index.
    JsonKind.SHARD_INDEX: JsonLimits(64 * MiB, InvalidCheckpointError, _CHECKPOINT_FIX),
    # The safetensors format's own cap (the official parser refuses larger headers).
    JsonKind.SAFETENSORS_HEADER: JsonLimits(100 * 1000 * 1000, InvalidCheckpointError,
                                            "re-download or re-export the checkpoint"),
    JsonKind.GENERATION_CONFIG: JsonLimits(4 * MiB, InvalidCheckpointError, _CHECKPOINT_FIX),
    # Gemma 3's 262k-token tokenizer.json is 33 MB; vocabularies of a million tokens exist.
    JsonKind.TOKENIZER: JsonLimits(256 * MiB, InvalidCheckpointError,
                                   "re-download the checkpoint's tokenizer files"),
    # added_tokens_decoder can list every added token (Gemma 3: 1.2 MB).
    JsonKind.TOKENIZER_CONFIG: JsonLimits(64 * MiB, InvalidCheckpointError,
                                          "re-download the checkpoint's tokenizer files"),
    # target_modules / rank_pattern / alpha_pattern can name every layer's modules.
    JsonKind.ADAPTER_CONFIG: JsonLimits(16 * MiB, AdapterError, "re-download or re-export the adapter"),
    JsonKind.MANIFEST: JsonLimits(16 * MiB, InputError, "delete it and re-run `edge-lora convert`"),
    JsonKind.REGISTRY: JsonLimits(16 * MiB, RegistryError, "fix or delete it and register the adapters again"),
    JsonKind.STATE: JsonLimits(1 * MiB, InputError, "delete it (it only remembers the last output directory)"),
    JsonKind.CACHE_RECORD: JsonLimits(64 * MiB, InputError, "delete it; it is rebuilt"),
}


class _TooDeep(Exception):
    pass


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _IntTooLong(len(text))
    return int(text)


class _IntTooLong(Exception):
    def __init__(self, digits: int) -> None:
        super().__init__(digits)
        self.digits = digits


def _check_depth(value: Any) -> None:
    """Iteratively (a deep value must not recurse here either): raise _TooDeep past MAX_DEPTH."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, (dict, list)):
                if depth >= MAX_DEPTH:
                    raise _TooDeep
                stack.append((child, depth + 1))


def _error(kind: JsonKind, message: str) -> EdgeLoraError:
    limits = LIMITS[kind]
    return limits.error(message, fix=limits.fix)


def loads_json(data: bytes | str, kind: JsonKind, source: str | Path) -> Any:
    """Parse ``data`` (already read, e.g. a safetensors header) under ``kind``'s limits;
    ``source`` names it in errors."""
    limits = LIMITS[kind]
    if len(data) > limits.max_bytes:
        raise _error(kind, f"{source} is larger than {limits.max_bytes // MiB} MiB (the limit for {kind.value} files)")
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise _error(kind, f"{source} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        value = json.loads(data, parse_int=_bounded_int)
        if isinstance(value, (dict, list)):
            _check_depth(value)
    except _IntTooLong as exc:
        raise _error(kind, f"{source} holds an integer of {exc.digits} digits "
                           f"(more than {MAX_INT_DIGITS})") from None
    except (RecursionError, _TooDeep):
        raise _error(kind, f"{source} is nested more than {MAX_DEPTH} levels deep") from None
    except json.JSONDecodeError as exc:
        raise _error(kind, f"{source} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    except ValueError as exc:  # e.g. a float literal Python cannot convert
        raise _error(kind, f"{source} is not valid JSON ({exc})") from exc
    return value


def read_json(path: Path | str, kind: JsonKind, *, missing_ok: bool = False) -> Any:
    """The parsed content of the file at ``path`` (symlinks followed: the Hugging Face cache is
    made of them); None when it does not exist and ``missing_ok``."""
    value = _read(Path(path), kind, missing_ok)
    return None if value is _MISSING else value


def read_json_object(path: Path | str, kind: JsonKind, *, missing_ok: bool = False) -> dict[str, Any] | None:
    """``read_json``, refusing anything but a JSON object at the top (None only for a missing
    file, never for a file holding ``null``)."""
    value = _read(Path(path), kind, missing_ok)
    if value is _MISSING:
        return None
    if not isinstance(value, dict):
        raise _error(kind, f"{path} is not a JSON object")
    return value


_MISSING = object()


def _read(path: Path, kind: JsonKind, missing_ok: bool) -> Any:
    limits = LIMITS[kind]
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        if missing_ok:
            return _MISSING
        raise _error(kind, f"{path.parent} has no {path.name}") from exc
    except OSError as exc:
        raise _error(kind, f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            what = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise _error(kind, f"{path} is {what}")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(limits.max_bytes + 1)
    except OSError as exc:
        raise _error(kind, f"cannot read {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    return loads_json(data, kind, path)

