"""Crash-safe file writes: temp file in the same directory, fsync, rename, fsync the directory.

A reader sees either the old file or the complete new one, never a torn write, whatever moment
the process dies at. A directory that replaces another is swapped with it in one step where the
system can (Linux), and the old one deleted only after.

Temporary files and directories are created with the modes a plain ``open`` or ``mkdir`` would
give (0666 / 0777 less the process umask), not ``tempfile``'s private 0600 / 0700: they are
renamed into place and become the dataset or the run, which others on the machine may need to
read just like the shards written beside them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

T = TypeVar("T")
_TEMP_TRIES = 100


def fsync_dir(path: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_temp(path: Path, create: Callable[[Path], T]) -> tuple[Path, T]:
    """A fresh ``.NAME.RANDOM.tmp`` sibling of ``path`` and what ``create`` returned making it
    (``create`` must fail with FileExistsError when the name is taken)."""
    for _ in range(_TEMP_TRIES):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return tmp, create(tmp)
        except FileExistsError:
            continue
        except OSError as exc:  # the reader knows the file it asked for, not its temporary twin
            raise OSError(exc.errno, exc.strerror, os.fspath(path)) from exc
    raise FileExistsError(f"no free temporary name next to {path}")


def _create_file(path: Path) -> int:
    """A new file's descriptor; the mode is what ``open(path, "w")`` would give it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)  # 0 off Windows
    return os.open(path, flags, 0o666)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a binary stream that replaces ``path`` only when the block exits without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _new_temp(path, _create_file)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so there is
    no moment with neither; False, nothing moved, where the C library or file system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def _replace_dir(tmp: Path, path: Path) -> None:
    """Put directory ``tmp`` at ``path`` and delete the directory that was there. Deleting it
    first would leave neither for as long as that takes (a crash then loses both), so the two
    are swapped in one step; where the system cannot swap, the old is renamed aside first and
    only the instant between the two renames has no ``path``."""
    if not path.exists():
        os.replace(tmp, path)
        return
    if _exchange(tmp, path):
        old = tmp
    else:
        old = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
    shutil.rmtree(old)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``path`` whole when the block exits.

    Every file written into it is fsynced before the rename, so a crash leaves either the old
    directory or the complete new one (plus, at worst, a stale ``.NAME.*.tmp`` to clean up).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, _ = _new_temp(path, lambda p: os.mkdir(p, 0o777))
    try:
        yield tmp
        for f in sorted(tmp.rglob("*"), reverse=True):  # files before their directories
            if f.is_dir():
                fsync_dir(f)
                continue
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def check_writable_dir(path: str | os.PathLike[str]) -> None:
    """Raise the OSError that writing into directory ``path`` would meet, before any long work
    starts: create it (and missing parents) and a file in it, then remove everything this
    created, so a check that passes or fails leaves the file system as it found it."""
    path = Path(path)
    missing = []
    parent = path
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
        try:
            probe, fd = _new_temp(path / "probe", _create_file)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, os.fspath(path)) from exc
        os.close(fd)
        os.unlink(probe)
    finally:
        for d in missing:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()
