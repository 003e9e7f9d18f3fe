"""Small persistent state: the last converted output directory (so `edge-lora run` with no
--model picks up what `edge-lora convert` just wrote). Lives in EDGE_LORA_HOME/state.json."""

from __future__ import annotations

import json
from pathlib import Path

from edge_lora.core import constants
from edge_lora.core.atomic import atomic_write_text, ensure_writable_dir, file_lock
from edge_lora.core.bounded_json import JsonKind, read_json_object
from edge_lora.core.errors import EdgeLoraError

STATE_FILE = "state.json"


def _state_path() -> Path:
    return constants.EDGE_LORA_HOME / STATE_FILE


def _read() -> dict:
    try:
        return read_json_object(_state_path(), JsonKind.STATE, missing_ok=True) or {}
    except EdgeLoraError:
        return {}  # damaged state only means "nothing remembered"


def remember_output_dir(path: Path | str) -> None:
    ensure_writable_dir(constants.EDGE_LORA_HOME)
    with file_lock(_state_path()):  # other keys another process writes meanwhile are kept
        state = _read()
        state["last_output_dir"] = str(Path(path).expanduser().resolve())
        atomic_write_text(_state_path(), json.dumps(state, indent=2) + "\n")


def last_output_dir() -> Path | None:
    value = _read().get("last_output_dir")
    if not isinstance(value, str):
        return None
    path = Path(value)
    return path if path.is_dir() else None
