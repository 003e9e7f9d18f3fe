"""kill -9 at random points (the short variant of bench/kill.py): after each kill nothing at a
final path fails validation, the next complete run leaves no stale partial, and no quantize
child outlives its killed parent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO_ROOT

SEED = 20260412


@pytest.mark.slow
def test_kill_9_leaves_no_invalid_final_file_and_no_stale_partial(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "kill.py"), "--conversions", "3",
                           "--quantizations", "3", "--seed", str(SEED), "--no-baseline", "--json",
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["seed"] == SEED
    for key in ("convert", "quantize"):
        phase = report["phases"][key]
        assert phase["runs"] == 3
        assert phase["killed"] >= 1, phase  # at least one kill landed mid-run
        assert phase["invalid_final_files"] == 0, phase["invalid_examples"]
        assert phase["stale_partials_after_next_run"] == 0, phase
        assert phase["next_run_failures"] == 0, phase
        assert phase["orphan_children"] == 0, phase
