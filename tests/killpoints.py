"""Deterministic kill -9 points for the fault-injection tests (tests/test_faults.py).

A child runs ``aura ARGV`` with the operations that make its writes durable counted: renames,
fsyncs, directory creation and removal, file deletion, safetensors saves, metrics rows and
ledger rows. Only those of the main thread on paths under one root directory count, so the same
command on the same starting state counts the same operations in the same order. With
``kill_at`` = N the child SIGKILLs itself just before the N-th; with ``torn`` the file that
operation writes is first left half written (an fsync: the file is cut to half its size; a
safetensors save: the same, after it; a metrics row: half a line), as a kill during a write
leaves it. Every operation reached is appended to a trace file as ``N KIND PATH``, which is how
a test learns the points there are (from a run without a kill) and checks that a kill landed
where it was aimed.

Importing torch costs seconds and a tiny command milliseconds, so the children are forked from
a server (``serve``, started with ``python -c``) that imported torch and every module of Aura
once: production code carries no test hook, and a kill point costs about what its command does.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

SERVE = "import killpoints; killpoints.serve()"
TORN_KINDS = ("fsync", "save_file", "save_model", "metrics-row")  # what ``torn`` can cut


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _cut_half(path: str) -> None:
    if os.path.isfile(path):
        os.truncate(path, os.path.getsize(path) // 2)


class _Counter:
    """Counts the operations under ``root`` in the main thread; kills at the ``kill_at``-th."""

    def __init__(self, root: str, kill_at: int | None, torn: bool, trace_fd: int):
        self.root, self.kill_at, self.torn, self.trace_fd = root, kill_at, torn, trace_fd
        self.count = 0
        self.main = threading.main_thread()

    def reached(self, kind: str, path: Any, dir_fd: int | None = None,
                tear: Callable[[], None] | None = None) -> None:
        """Operation ``kind`` on ``path`` is about to run; ``tear`` leaves its write torn."""
        if threading.current_thread() is not self.main:
            return
        path = os.fsdecode(path)
        if dir_fd is not None:
            path = os.path.join(_fd_path(dir_fd), path)
        full = os.path.realpath(path)
        if full != self.root and not full.startswith(self.root + os.sep):
            return
        self.count += 1
        os.write(self.trace_fd,
                 f"{self.count} {kind} {os.path.relpath(full, self.root)}\n".encode())
        if self.count == self.kill_at:
            if self.torn and tear is not None:
                tear()
            os.kill(os.getpid(), signal.SIGKILL)


def _install(counter: _Counter) -> None:
    """Route the counted operations through ``counter``: os functions, and the safetensors
    savers, metrics rows and ledger rows of Aura's modules (all imported by ``serve``)."""
    reached = counter.reached

    def one_path(name: str) -> None:
        real = getattr(os, name)

        def hooked(path: Any, *args: Any, dir_fd: int | None = None, **kwargs: Any) -> Any:
            reached(name, path, dir_fd)
            return real(path, *args, dir_fd=dir_fd, **kwargs)

        setattr(os, name, hooked)

    def two_paths(name: str) -> None:
        real = getattr(os, name)

        def hooked(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
            reached(name, dst, kwargs.get("dst_dir_fd"))
            return real(src, dst, *args, **kwargs)

        setattr(os, name, hooked)

    for name in ("mkdir", "unlink", "remove", "rmdir"):
        one_path(name)
    for name in ("replace", "rename"):
        two_paths(name)
    real_fsync = os.fsync

    def fsync(fd: Any) -> None:
        fd = fd if isinstance(fd, int) else fd.fileno()
        path = _fd_path(fd)
        reached("fsync", path, tear=lambda: _cut_half(path))
        real_fsync(fd)

    os.fsync = fsync

    import safetensors.torch

    for name in ("save_file", "save_model"):
        real = getattr(safetensors.torch, name)

        def save(obj: Any, filename: Any, *args: Any, _real: Any = real, _name: str = name,
                 **kwargs: Any) -> Any:
            def tear() -> None:
                _real(obj, filename, *args, **kwargs)
                _cut_half(os.fsdecode(filename))

            reached(_name, filename, tear=tear)
            return _real(obj, filename, *args, **kwargs)

        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("aura.") and \
                    vars(module).get(name) is real:
                setattr(module, name, save)

    from aura.learn.ledger import Ledger
    from aura.train.metrics import MetricsLog

    write_row = MetricsLog.write

    def metrics_row(self: MetricsLog, row: dict[str, Any]) -> None:
        def tear() -> None:
            line = json.dumps(row)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line[: len(line) // 2])

        reached("metrics-row", self.path, tear=tear)
        write_row(self, row)

    record_text = Ledger.record_text

    def ledger_row(self: Ledger, *args: Any, **kwargs: Any) -> int:
        reached("ledger-row", self.path)
        return record_text(self, *args, **kwargs)

    MetricsLog.write = metrics_row  # type: ignore[method-assign]
    Ledger.record_text = ledger_row  # type: ignore[method-assign]


def _child(request: dict[str, Any]) -> None:
    """Run one request in this forked process and exit with its code; never returns."""
    code = 1
    try:
        for fd, key in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(request[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        trace = os.open(request["trace"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        _install(_Counter(os.path.realpath(request["root"]), request.get("kill_at"),
                          request.get("torn", False), trace))
        from aura.cli import main

        code = main(request["argv"])
    except SystemExit as exc:  # argparse: usage errors and --help
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # what Python would print for an uncaught exception
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    """Import torch and all of Aura, then for each JSON request on stdin (``argv``, ``root``,
    ``stdout``, ``stderr``, ``trace`` paths, optional ``kill_at`` and ``torn``) fork a child
    that runs it, and answer one JSON line: its exit code, or minus the signal that ended it."""
    import torch
    import torch._dynamo  # what the first optimizer would import, in every child

    import aura

    for info in pkgutil.walk_packages(aura.__path__, "aura."):
        if info.name != "aura.__main__":  # that one runs the CLI
            importlib.import_module(info.name)
    torch.set_num_threads(1)  # tiny models; before any parallel region, so forking is safe
    from aura.plasticity import TokenSTDP

    # numba's start-up (~0.5 s) once here, not in every forked `aura learn`
    TokenSTDP(2).update(torch.tensor([1]), torch.tensor([True]))
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # nothing a module prints may reach the replies
    for line in sys.stdin:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            replies.close()
            _child(json.loads(line))
        status = os.waitpid(pid, 0)[1]
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        replies.write(json.dumps({"code": code}) + "\n")
        replies.flush()
