"""Output errors name the cause and the fix: disk full, permissions, a directory in the way."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from edge_lora.core.atomic import atomic_write_text, os_error_to_output_error
from edge_lora.core.errors import OutputError


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "disk full"), (errno.EACCES, "permission denied"),
                                         (errno.EISDIR, "a directory has that name")])
def test_os_errors_become_output_errors_with_a_fix(tmp_path: Path, code: int, words: str) -> None:
    error = os_error_to_output_error(OSError(code, "x"), tmp_path / "out.gguf")
    assert words in error.message and error.fix


def test_writing_over_a_directory_keeps_it_and_says_what_to_do(tmp_path: Path) -> None:
    taken = tmp_path / "out.gguf"
    (taken / "inside").mkdir(parents=True)
    with pytest.raises(OutputError) as info:
        atomic_write_text(taken, "text")
    assert "directory" in info.value.one_line() and info.value.fix
    assert (taken / "inside").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]


# --- partial files: unique per writer, exclusive, no symlink followed, stale ones removed ----

def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # exited and reaped: its pid names no process (until the kernel reuses it)
    return child.pid


def test_each_writer_gets_its_own_partial(tmp_path: Path) -> None:
    from edge_lora.core.atomic import PARTIAL_SUFFIX, atomic_file, create_partial

    final = tmp_path / "model.gguf"
    first, fd1 = create_partial(final)
    second, fd2 = create_partial(final)
    os.close(fd1)
    os.close(fd2)
    assert first != second and first.parent == second.parent == tmp_path
    assert first.name.startswith(f"model.gguf.{os.getpid()}-") and first.name.endswith(PARTIAL_SUFFIX)
    # Two writers of one final name interleaved: each publishes its own complete content.
    with atomic_file(final) as a:
        a.write(b"first writer")
        with atomic_file(final) as b:
            b.write(b"second writer")
        assert final.read_bytes() == b"second writer"
    assert final.read_bytes() == b"first writer"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.gguf", first.name, second.name])


def test_a_planted_symlink_is_never_followed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone who can predict (here: forces) the partial name plants a symlink there, and another
    at the final name: the victim files are untouched, the output lands at the final path."""
    from edge_lora.core import atomic

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    tokens = iter(["deadbeef", "0badf00d"])
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: next(tokens))
    final = tmp_path / "manifest.json"
    (tmp_path / f"manifest.json.{os.getpid()}-deadbeef.partial").symlink_to(victim)
    other_victim = tmp_path / "other.txt"
    other_victim.write_text("also precious")
    final.symlink_to(other_victim)
    atomic.atomic_write_text(final, "new manifest")
    assert victim.read_text() == "precious" and other_victim.read_text() == "also precious"
    assert not final.is_symlink() and final.read_text() == "new manifest"


def test_stale_partials_of_dead_writers_are_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    from edge_lora.core.atomic import atomic_write_text

    final = tmp_path / "model.gguf"
    dead = _dead_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f"model.gguf.{dead}-0123abcd.partial"
        live = tmp_path / f"model.gguf.{sleeper.pid}-0123abcd.partial"
        mine = tmp_path / f"model.gguf.{os.getpid()}-0123abcd.partial"
        other_name = tmp_path / f"other.gguf.{dead}-0123abcd.partial"
        not_ours = tmp_path / f"model.gguf.{dead}-notours.partial"   # not our naming scheme
        legacy = tmp_path / "model.gguf.partial"                     # no pid: cannot tell whose
        dead_link_target = tmp_path / "target"
        dead_link_target.write_text("kept")
        link = tmp_path / f"model.gguf.{dead}-fedcba98.partial"      # a symlink, not our file
        link.symlink_to(dead_link_target)
        for path in (stale, live, mine, other_name, not_ours, legacy):
            path.write_bytes(b"half a file")
        atomic_write_text(final, "done")
        left = {p.name for p in tmp_path.iterdir()}
        assert stale.name not in left and other_name.name not in left  # a dead writer's, whatever its final file
        assert {live.name, mine.name, not_ours.name, legacy.name, link.name} <= left
        assert final.read_text() == "done" and dead_link_target.read_text() == "kept"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    from edge_lora.core.atomic import atomic_file

    final = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_file(final) as fh:
        fh.write(b"half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
