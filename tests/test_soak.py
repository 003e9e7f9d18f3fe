"""The short variant of bench/soak.py: `edge-lora serve` on loopback under 12 concurrent clients
with mixed adapters, malformed requests, disconnects, slow connections and adapter loads and
unloads interleaved, for 20 s. No answer may differ from the same request made alone, no
well-formed request may get a 5xx, and the server must be alive with a clean log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_short_soak(gemma_q4_gguf: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "soak.py"), "--minutes", str(20 / 60),
                             "--clients", "12", "--distinct", "8", "--max-requests", "2000",
                             "--model", str(gemma_q4_gguf), "--json"],
                            capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    assert result.stdout.strip(), result.stderr
    figures = json.loads(result.stdout)
    assert figures["answers_compared"] >= 3, figures
    assert figures["answers_differing"] == 0 and figures["answers_differing_after_soak_alone"] == 0, figures
    assert figures["well_formed_5xx"] == 0 and figures["malformed_wrong_status"] == 0, figures
    assert figures["server_alive"] and figures["server_log_tracebacks"] == 0, figures
    assert figures["slow_connections"] == figures["slow_connections_closed_by_server"], figures
    assert figures["distinct_answers"] >= 6  # the adapters and prompts really differ
    assert result.returncode == 0, result.stderr
