"""Crash-safe file writes: temp file in the same directory, fsync, rename, fsync the directory.

A reader sees either the old file or the complete new one, never a torn write, whatever moment
the process dies at.

Temporary files and directories are created with the modes a plain ``open`` or ``mkdir`` would
give (0666 / 0777 less the process umask), not ``tempfile``'s private 0600 / 0700: they are
renamed into place and become the dataset or the run, which others on the machine may need to
read just like the shards written beside them.
"""

from __future__ import annotations

import contextlib
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
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
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
