"""The adapter registry: short names for GGUF LoRA adapter files, kept in
``EDGE_LORA_HOME/adapters.json`` (written atomically). Entries point at files the user owns;
a file that disappeared is reported by ``list`` (not a crash) and refused by ``resolve``."""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_lora.core import constants
from edge_lora.core.atomic import atomic_write_text, ensure_writable_dir, file_lock
from edge_lora.core.bounded_json import JsonKind, read_json_object
from edge_lora.core.errors import InputNotFoundError, RegistryError
from edge_lora.core.gguf_check import validate_gguf
from edge_lora.core.output_dir import adapter_name

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
REGISTRY_FILE = "adapters.json"
REGISTRY_VERSION = 1


@dataclass(frozen=True)
class RegisteredAdapter:
    name: str
    path: Path
    scale: float = 1.0
    architecture: str | None = None

    @property
    def exists(self) -> bool:
        return self.path.is_file()


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise RegistryError(f"invalid adapter name {name!r}",
                            fix="use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def check_scale(scale: float) -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise RegistryError(f"adapter scale {scale!r} is not a number") from None
    if not math.isfinite(value) or not -100.0 <= value <= 100.0:
        raise RegistryError(f"adapter scale {value} is out of range", fix="use a scale between -100 and 100")
    return value


class AdapterRegistry:
    _lock = threading.Lock()  # one process, several server threads

    def __init__(self, home: Path | None = None) -> None:
        self.home = Path(home) if home is not None else constants.EDGE_LORA_HOME
        self.file = self.home / REGISTRY_FILE

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Around a read-modify-write: other threads (the lock) and other processes (a file
        lock beside the registry) wait, so concurrent adds and removes all land."""
        with self._lock:
            ensure_writable_dir(self.home)
            with file_lock(self.file):
                yield

    def _load(self) -> dict[str, RegisteredAdapter]:
        try:
            data = read_json_object(self.file, JsonKind.REGISTRY, missing_ok=True)
        except RegistryError as exc:
            raise RegistryError(f"the adapter registry is unreadable: {exc.message}", fix=exc.fix) from exc
        if data is None:
            return {}
        try:
            entries = data["adapters"]
            if not isinstance(entries, dict):
                raise TypeError("adapters is not an object")
            out = {}
            for name, entry in entries.items():
                out[name] = RegisteredAdapter(name=name, path=Path(entry["path"]),
                                              scale=float(entry.get("scale", 1.0)),
                                              architecture=entry.get("architecture"))
            return out
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RegistryError(f"the adapter registry {self.file} is unreadable ({exc})",
                                fix=f"fix or delete {self.file} and register the adapters again") from exc

    def _save(self, entries: dict[str, RegisteredAdapter]) -> None:
        ensure_writable_dir(self.home)
        payload = {"version": REGISTRY_VERSION, "adapters": {
            name: {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(e).items() if k != "name"}
            for name, e in sorted(entries.items())}}
        atomic_write_text(self.file, json.dumps(payload, indent=2) + "\n")

    def add(self, name: str, path: Path | str, scale: float = 1.0, *, replace: bool = False) -> RegisteredAdapter:
        check_name(name)
        scale = check_scale(scale)
        path = Path(path).expanduser().resolve()
        info = validate_gguf(path, expect_type="adapter")  # missing file, directory, not an adapter
        entry = RegisteredAdapter(name, path, scale, info.architecture)
        with self._locked():
            entries = self._load()
            if name in entries and not replace and entries[name].path != path:
                raise RegistryError(f"an adapter named {name!r} is already registered ({entries[name].path})",
                                    fix=f"remove it first (edge-lora adapters remove {name}) or pick another name")
            entries[name] = entry
            self._save(entries)
        return entry

    def list(self) -> list[RegisteredAdapter]:
        with self._lock:
            return sorted(self._load().values(), key=lambda e: e.name)

    def get(self, name: str) -> RegisteredAdapter | None:
        with self._lock:
            return self._load().get(name)

    def remove(self, name: str) -> RegisteredAdapter:
        with self._locked():
            entries = self._load()
            entry = entries.pop(name, None)
            if entry is None:
                raise RegistryError(f"no adapter named {name!r} is registered",
                                    fix="see `edge-lora adapters list`")
            self._save(entries)
        return entry

    def resolve(self, name_or_path: str | Path) -> RegisteredAdapter:
        """A registered name, or a path to a GGUF adapter file (named after its stem)."""
        text = str(name_or_path)
        if NAME_PATTERN.fullmatch(text):
            entry = self.get(text)
            if entry is not None:
                if not entry.exists:
                    raise InputNotFoundError(f"adapter {text!r} points at {entry.path}, which no longer exists",
                                             fix=f"register it again or remove it (edge-lora adapters remove {text})")
                return entry
        path = Path(text).expanduser()
        if path.is_file():
            info = validate_gguf(path, expect_type="adapter")
            stem = adapter_name(path) or path.name.removesuffix(".gguf")
            name = stem if NAME_PATTERN.fullmatch(stem) else "adapter"
            return RegisteredAdapter(name, path.resolve(), 1.0, info.architecture)
        raise InputNotFoundError(f"{text!r} is neither a registered adapter nor an adapter file",
                                 fix="register it with `edge-lora adapters add NAME FILE.gguf` or give a path")
