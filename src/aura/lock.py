"""One writer per directory: an exclusive ``flock`` on a lock file, with its holder written in it.

Every command that writes a run (``aura train``, ``aura memory build``) or a learn state
directory takes the lock first, so two writers never interleave their files; a second one is
refused with one line naming the holder (pid, host, command, since when). The kernel drops a
flock when its process ends, however it ends, so a lock file left behind by a killed process
blocks nothing: only a live holder does. The file is never deleted: a process that had opened it
just before would then hold a lock on a file the next one no longer sees. A forked child (a
DataLoader worker) closes its copy at once, so the lock dies with its holder, not with the last
of its children.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import weakref
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from aura.errors import AuraError, DataError

_HELD: weakref.WeakSet[DirectoryLock] = weakref.WeakSet()


class DirectoryLock:
    """An exclusive lock on the file ``path``, held from construction until ``release()``.

    ``command`` is written into the file as what the holder is doing; ``busy`` begins the error a
    second process gets while this one holds it. The file is created when missing (its directory
    must exist) and is otherwise never changed by a process that does not get the lock."""

    def __init__(self, path: Path, command: str, busy: str):
        self.path = Path(path)
        try:
            self._file = open(self.path, "a+b")  # noqa: SIM115 - held until release()
        except OSError as exc:
            raise DataError(f"cannot lock {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(self._file)
            self._file.close()
            raise AuraError(f"{busy} ({holder})") from None
        except OSError as exc:
            self._file.close()
            raise DataError(f"cannot lock {self.path}: {exc.strerror}") from None
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                "since": since}
        self._rewrite(json.dumps(info) + "\n")
        _HELD.add(self)

    def _rewrite(self, text: str) -> None:
        self._file.truncate(0)  # append mode: the write lands at the start of the empty file
        self._file.write(text.encode("utf-8"))
        self._file.flush()

    def release(self) -> None:
        """Empty the file (nobody holds it) and drop the lock; a second call does nothing."""
        if self._file.closed:
            return
        self._rewrite("")
        self._file.close()

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _holder(file: BinaryIO) -> str:
    """Who holds the lock, as its file says; the holder may be between truncating and writing."""
    file.seek(0)
    try:
        info = json.loads(file.read().decode("utf-8"))
        return (f"held by pid {info['pid']} on {info['host']} since {info['since']}: "
                f"{info['command']}")
    except (ValueError, KeyError, TypeError):
        return "held by another process"


def _close_in_child() -> None:
    """A forked child's copy of a held lock would keep it alive after its holder died; closing
    the copy (no unlock) leaves the holder's lock as it is."""
    for lock in list(_HELD):
        lock._file.close()


os.register_at_fork(after_in_child=_close_in_child)
