"""aura.lock: one writer per directory, and whoever is refused learns who holds it."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import aura
from aura.errors import AuraError
from aura.lock import DirectoryLock


def test_a_second_holder_is_refused_naming_the_first_and_changing_nothing(
        tmp_path: Path) -> None:
    path = tmp_path / "lock"
    first = DirectoryLock(path, "aura train --resume", "the run is busy")
    info = json.loads(path.read_text())
    assert (info["pid"], info["host"]) == (os.getpid(), socket.gethostname())
    assert datetime.datetime.fromisoformat(info["since"]).tzinfo is not None
    before = path.read_bytes()
    with pytest.raises(AuraError) as refused:
        DirectoryLock(path, "aura memory build", "the run is busy")
    assert str(refused.value) == (f"the run is busy (held by pid {os.getpid()} on "
                                  f"{socket.gethostname()} since {info['since']}: "
                                  "aura train --resume)")
    assert path.read_bytes() == before
    first.release()
    first.release()  # a second release is harmless
    assert path.read_bytes() == b""  # released: the file names no holder
    with DirectoryLock(path, "aura memory build", "the run is busy"):
        assert json.loads(path.read_text())["command"] == "aura memory build"
    assert path.read_bytes() == b""


def test_a_holder_that_wrote_nothing_yet_is_still_refused(tmp_path: Path) -> None:
    """Between a holder's flock and its write the file is empty: still one clear line."""
    path = tmp_path / "lock"
    with DirectoryLock(path, "aura learn", "busy"):
        path.write_text("")
        with pytest.raises(AuraError, match=r"^busy \(held by another process\)$"):
            DirectoryLock(path, "aura learn", "busy")


HOLD_AND_FORK = """
import os, sys, time
from pathlib import Path
from aura.lock import DirectoryLock

lock = DirectoryLock(Path(sys.argv[1]), "aura train", "busy")
if os.fork() == 0:  # the child reports once its at-fork handler has closed its copy
    print(os.getpid(), flush=True)
    time.sleep(60)
    os._exit(0)
time.sleep(60)
"""


def test_a_forked_worker_does_not_keep_a_killed_holders_lock(tmp_path: Path) -> None:
    """A DataLoader worker outliving its SIGKILLed trainer must not keep the run locked."""
    path = tmp_path / "lock"
    env = {**os.environ, "PYTHONPATH": str(Path(aura.__file__).parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_FORK, str(path)],
                              stdout=subprocess.PIPE, text=True, env=env)
    worker = None
    try:
        assert holder.stdout is not None
        worker = int(holder.stdout.readline())
        with pytest.raises(AuraError, match=f"held by pid {holder.pid} "):
            DirectoryLock(path, "aura train", "busy")
        holder.kill()
        holder.wait(timeout=30)
        os.kill(worker, 0)  # the worker is still alive...
        with DirectoryLock(path, "aura train", "busy"):  # ...and the lock is free
            pass
    finally:
        holder.kill()
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
