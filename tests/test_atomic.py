"""Output errors name the cause and the fix: disk full, permissions, a directory in the way."""

from __future__ import annotations

import errno
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
