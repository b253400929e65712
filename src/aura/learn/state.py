"""The state directory: saved generations of the learned state, one commit point, one owner.

    STATE/
        ledger.sqlite        which texts were learned or skipped (see ledger.py)
        CURRENT              {"generation": "gen-00000012"}: the commit point, replaced atomically
        gen-00000012/        state.json (counters, ledger seq, sha256 of every file) + whatever
                             the learner saves (token statistics, plastic weights, model, memories)
        learn.log            one line per event: files skipped, warmup validation, saves
        lock                 held by the running service (aura.lock), naming it

A generation is written under its own name, every file and directory in it fsynced, and only
then does CURRENT name it. A crash before that leaves CURRENT on the previous generation and the
new one is deleted at the next start, so the saved state is always one complete generation.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aura.atomic import atomic_write_text, fsync_dir
from aura.data.shards import file_sha256
from aura.errors import DataError
from aura.lock import DirectoryLock

FORMAT = 1
CURRENT, STATE_JSON, LOCK = "CURRENT", "state.json", "lock"
LEDGER, LOG = "ledger.sqlite", "learn.log"


class StateDir:
    """The service's directory, locked so two services never interleave their commits."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise DataError(f"state directory {self.root} is a file")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"cannot use state directory {self.root}: {exc.strerror}") from None
        self._lock = DirectoryLock(self.root / LOCK, "aura learn",
                                   f"another `aura learn` is using {self.root}")

    def close(self) -> None:
        self._lock.release()

    def current(self) -> tuple[Path, dict[str, Any]] | None:
        """The committed generation and its state.json, verified; None before the first save."""
        pointer = self.root / CURRENT
        if not pointer.exists():
            return None
        try:
            name = json.loads(pointer.read_text(encoding="utf-8"))["generation"]
            gen = self.root / name
            meta = json.loads((gen / STATE_JSON).read_text(encoding="utf-8"))
            files = dict(meta["files"])
        except (OSError, ValueError, KeyError, TypeError):
            raise DataError(f"state {self.root}: {CURRENT} or its {STATE_JSON} is missing or "
                            "corrupt (delete the state directory to start over)") from None
        if meta.get("format") != FORMAT:
            raise DataError(f"state {gen}: unknown format {meta.get('format')!r}")
        for rel, digest in files.items():
            f = gen / rel
            if not f.is_file() or file_sha256(f) != digest:
                raise DataError(f"state {gen}: {rel} is missing, truncated or corrupt")
        return gen, meta

    def commit(self, meta: dict[str, Any], write: Callable[[Path], None]) -> Path:
        """Write generation ``meta['saves']`` with ``write(dir)``, fsync it, then point at it."""
        name = f"gen-{meta['saves']:08d}"
        gen = self.root / name
        if gen.exists():  # left by a crash before its commit
            shutil.rmtree(gen)
        gen.mkdir()
        write(gen)
        files = sorted(p for p in gen.rglob("*") if p.is_file())
        meta = {**meta, "format": FORMAT,
                "files": {p.relative_to(gen).as_posix(): file_sha256(p) for p in files}}
        (gen / STATE_JSON).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        _fsync_tree(gen)
        fsync_dir(self.root)
        atomic_write_text(self.root / CURRENT, json.dumps({"generation": name}) + "\n")
        self.collect_garbage(keep=name)
        return gen

    def collect_garbage(self, keep: str | None) -> None:
        """Delete generations other than ``keep`` and temporary files left by a crash."""
        for p in self.root.iterdir():
            stale = (p.name.startswith("gen-") and p.name != keep) or p.name.endswith(".tmp")
            if stale:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        p.unlink()


def _fsync_tree(root: Path) -> None:
    """Every file and directory under ``root`` (and root itself) durably on disk."""
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            fd = os.open(os.path.join(dirpath, n), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))
