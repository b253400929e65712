"""Injected file-system faults: the OSErrors a denied permission, a read-only file system or a
full disk raise, under one directory, from the moment a test asks.

The tests run as root, for whom chmod denies nothing, so the faults are injected where Python
touches the file system (``open``, ``os.open``, ``os.mkdir``, renames and deletions), which is
where a real refusal would surface too. Writes made by native code (safetensors' Rust) are not
seen; every such write starts inside a directory Python created, which is.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class FsFaults:
    """``deny(root, err)``: from now on, writes under ``root`` fail with ``err`` (and reads too
    with ``reads=True``), as the OS would report them: the errno's own subclass and message,
    with the path."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self._rules: list[tuple[str, int, bool]] = []
        original_open = builtins.open

        def guarded_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if isinstance(file, str | bytes | os.PathLike):
                self._check(file, writing=any(c in mode for c in "wax+"))
            return original_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", guarded_open)
        monkeypatch.setattr(io, "open", guarded_open)
        monkeypatch.setattr(os, "open", self._wrap(
            os.open, lambda path, flags, *_a, **_k: [(path, bool(flags & _WRITE_FLAGS))]))
        for name in ("mkdir", "unlink", "remove", "rmdir"):
            monkeypatch.setattr(os, name, self._wrap(
                getattr(os, name), lambda path, *_a, **_k: [(path, True)]))
        for name in ("replace", "rename"):
            monkeypatch.setattr(os, name, self._wrap(
                getattr(os, name), lambda src, dst, *_a, **_k: [(src, True), (dst, True)]))

    def deny(self, root: Path, err: int = errno.EACCES, reads: bool = False) -> None:
        self._rules.append((os.path.abspath(root), err, reads))

    def _wrap(self, fn: Callable[..., Any],
              paths: Callable[..., list[tuple[Any, bool]]]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("dir_fd") is None:  # relative to a descriptor: not a path we can see
                for path, writing in paths(*args, **kwargs):
                    self._check(path, writing)
            return fn(*args, **kwargs)

        return wrapped

    def _check(self, path: Any, writing: bool) -> None:
        full = os.path.abspath(os.fsdecode(path))
        for root, err, reads in self._rules:
            if (writing or reads) and (full == root or full.startswith(root + os.sep)):
                raise OSError(err, os.strerror(err), os.fsdecode(path))
