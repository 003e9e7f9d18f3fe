"""Write files so that a final path only ever holds a complete file.

A writer creates its own partial file beside the final path — ``<name>.<pid>-<random>.partial``,
with ``O_CREAT | O_EXCL | O_NOFOLLOW``, so two writers never share one and a symlink planted
under that name is never followed — writes it through the descriptor it created, fsyncs,
optionally validates, then ``os.replace``s it (a rename replaces a symlink at the final path
instead of writing through it). An interrupted run leaves at most its partial file, never a
half-written final file; a killed run's partial carries its dead pid, and the next writer into
the same directory removes it, whatever final file it was for (only regular files of ours whose
writer is gone: `quantize --quant Q4_K_M` after a killed `--quant Q4_K_M,Q8_0` also removes the
dead run's Q8_0 partial). Free space is checked before large writes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from edge_lora.core.errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; updates there are not serialized
    fcntl = None  # type: ignore[assignment]

PARTIAL_SUFFIX = ".partial"
_CREATE_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0))


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a zombie counts until its parent reaps it)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def partial_path(final: Path) -> Path:
    """A fresh partial name for ``final``, carrying this process's pid (not yet created)."""
    final = Path(final)
    return final.with_name(f"{final.name}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


# <final name>.<writer's pid>-<8 hex>.partial, for any final name
_PARTIAL_NAME = re.compile(rf".+\.(\d+)-[0-9a-f]{{8}}{re.escape(PARTIAL_SUFFIX)}", re.DOTALL)


def remove_stale_partials(directory: Path) -> list[Path]:
    """Delete the partial files in ``directory`` whose writer is no longer running (a killed
    run's), for whatever final file they were: only names of our scheme, only regular files
    this user owns, never this process's own or a live writer's."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _PARTIAL_NAME.fullmatch(entry.name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or pid_alive(pid):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid():
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except FileNotFoundError:
            continue  # another writer cleaned it up first
    return removed


def create_partial(final: Path) -> tuple[Path, int]:
    """Remove the stale partials in ``final``'s directory, then create a new empty partial
    exclusively (``O_CREAT | O_EXCL | O_NOFOLLOW``): (its path, a descriptor open for writing)."""
    final = Path(final)
    remove_stale_partials(final.parent)
    while True:
        tmp = partial_path(final)
        try:
            return tmp, os.open(tmp, _CREATE_FLAGS, 0o666)
        except FileExistsError:
            continue  # a name taken (or planted) already: draw another


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
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if validate is not None:
            validate(tmp)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _published_partial(final: Path, validate: Callable[[Path], None] | None) -> Iterator[tuple[Path, int]]:
    """A new partial beside ``final`` and its descriptor: published at ``final`` when the block
    ends normally, deleted on any failure (including KeyboardInterrupt)."""
    try:
        tmp, fd = create_partial(final)
    except OSError as exc:
        raise os_error_to_output_error(exc, final) from exc
    try:
        yield tmp, fd
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
def atomic_file(final: Path, validate: Callable[[Path], None] | None = None, mode: str = "wb"
                ) -> Iterator[IO[Any]]:
    """A file object on a new partial beside ``final`` (the descriptor that created it: no
    reopening by name); on success published at ``final``, on any failure deleted."""
    with _published_partial(Path(final), validate) as (_tmp, fd), \
            os.fdopen(fd, mode, encoding="utf-8" if "b" not in mode else None) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(final: Path, validate: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """For writers that only take a path: a new, empty partial beside ``final``, created
    exclusively; published on success, deleted on any failure. Prefer ``atomic_file``."""
    with _published_partial(Path(final), validate) as (tmp, fd):
        os.close(fd)
        yield tmp


LOCK_SUFFIX = ".lock"


@contextlib.contextmanager
def file_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``.<target>.lock`` (created beside ``target``, kept for the
    next user: deleting a lock file races with its next locker) around a read-modify-write of
    ``target``, so two processes — or two threads — updating it at once lose nothing. Readers
    need no lock: ``target`` is only ever replaced whole."""
    target = Path(target)
    lock = target.with_name(f".{target.name}{LOCK_SUFFIX}")  # hidden: not an output users look for
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        raise os_error_to_output_error(exc, lock) from exc
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def atomic_open(final: Path, mode: str = "wb") -> contextlib.AbstractContextManager[IO[Any]]:
    return atomic_file(final, mode=mode)


def atomic_write_text(final: Path, text: str) -> None:
    with atomic_file(Path(final), mode="w") as fh:
        fh.write(text)
