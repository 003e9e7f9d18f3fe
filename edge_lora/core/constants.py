"""Environment read once, at import. Modules read these as ``constants.NAME`` (not
``from constants import NAME``) so tests can monkeypatch them."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def _path_from_env(var: str, default: Path) -> Path:
    value = os.environ.get(var)
    return Path(value).expanduser() if value else default


def _flag_from_env(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}


# Adapter registry, settings and the last-converted-model pointer live here.
EDGE_LORA_HOME: Path = _path_from_env("EDGE_LORA_HOME", Path(platformdirs.user_data_dir("edge-lora")))
# Derived artifacts that can be rebuilt (HF-layout demo base, KLD baselines, demo outputs).
EDGE_LORA_CACHE: Path = _path_from_env("EDGE_LORA_CACHE", Path(platformdirs.user_cache_dir("edge-lora")))
EDGE_LORA_API_KEY: str | None = os.environ.get("EDGE_LORA_API_KEY") or None
HF_HUB_OFFLINE: bool = _flag_from_env("HF_HUB_OFFLINE")
# Load models without ggml's extra buffer types (AMX, CPU repacking) whatever the probe said:
# for CPUs that advertise instructions they trap on (REFERENCE.md "CPUs that advertise more").
NO_EXTRA_BUFFERS_ENV = "EDGE_LORA_NO_EXTRA_BUFFERS"
NO_EXTRA_BUFFERS: bool = _flag_from_env(NO_EXTRA_BUFFERS_ENV)
# Under EDGE_LORA_CACHE: verdicts about this machine's llama.cpp (the extra-buffer probe, files
# proven to load), keyed so that another CPU, kernel or llama-cpp-python build never reuses them.
NATIVE_CACHE_DIR = "native"

# Tools that default to a model's full 128K context mislead users about memory.
DEFAULT_CTX_CAP: int = 4096
DEFAULT_HOST: str = "127.0.0.1"
DEFAULT_PORT: int = 8000
N_THREADS: int = max(1, os.cpu_count() or 1)

# Sampling limits shared by the library, the CLI and the API (OpenAI's temperature range).
MAX_TEMPERATURE: float = 2.0
MAX_STOP_STRINGS: int = 16
