"""Write files so that a final path only ever holds a complete file.

Write ``<name>.partial`` in the destination directory, fsync, optionally validate, then
``os.replace``. An interrupted run leaves at most a ``.partial`` file, never a half-written
final file. Free space is checked before large writes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from edge_lora.core.errors import OutputError

PARTIAL_SUFFIX = ".partial"


def partial_path(final: Path) -> Path:
    return final.with_name(final.name + PARTIAL_SUFFIX)


def ensure_writable_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output directory {directory}: {exc.strerror}",
                          fix="choose a writable --out directory") from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {directory} is not writable",
                          fix="choose a writable --out directory")


def check_not_an_input(final: Path, inputs: Iterable[Path | str | None]) -> None:
    """Refuse an output path that is a file this command reads (``inputs``: files, or directories
    whose files are read): publishing there would replace the input, e.g. `modelfile --model
    m.gguf --out m.gguf` turned a 250 MB model into a 600-byte Modelfile."""
    final = Path(final)
    if not final.is_file():
        return
    for source in inputs:
        if source is None:
            continue
        source = Path(source)
        files = [p for p in source.iterdir() if p.is_file()] if source.is_dir() else [source]
        if any(_same_file(final, path) for path in files):
            raise OutputError(f"{final} is an input of this command; writing there would destroy it",
                              fix="choose another output path")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_free_space(directory: Path, needed_bytes: int) -> None:
    """Refuse to start a write that cannot finish: need 1.1 x the expected size."""
    free = shutil.disk_usage(directory).free
    if free < int(needed_bytes * 1.1):
        raise OutputError(
            f"not enough disk space in {directory}: need about {needed_bytes * 1.1 / 1e6:.0f} MB, "
            f"{free / 1e6:.0f} MB free", fix="free some space or choose another --out directory")


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def os_error_to_output_error(exc: OSError, target: Path) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return OutputError(f"disk full while writing {target}", fix="free some space and run again")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write {target}: permission denied", fix="choose a writable --out directory")
    if exc.errno == errno.EISDIR:
        return OutputError(f"cannot write {target}: a directory has that name",
                           fix="give a file path, or move the directory away")
    return OutputError(f"cannot write {target}: {exc.strerror or exc}")


def publish(tmp: Path, final: Path, validate: Callable[[Path], None] | None = None) -> None:
    """fsync ``tmp``, validate it, and move it to ``final`` atomically (removing it on failure)."""
    try:
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if validate is not None:
            validate(tmp)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_path(final: Path, validate: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success publish it, on any failure
    (including KeyboardInterrupt) delete it."""
    final = Path(final)
    tmp = partial_path(final)
    try:
        yield tmp
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise os_error_to_output_error(exc, final) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        publish(tmp, final, validate)
    except OSError as exc:
        raise os_error_to_output_error(exc, final) from exc


@contextlib.contextmanager
def atomic_open(final: Path, mode: str = "wb") -> Iterator[BinaryIO]:
    with atomic_path(final) as tmp, open(tmp, mode) as fh:
        yield fh  # type: ignore[misc]


def atomic_write_text(final: Path, text: str) -> None:
    with atomic_path(Path(final)) as tmp:
        tmp.write_text(text, encoding="utf-8")
