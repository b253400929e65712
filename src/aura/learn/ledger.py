"""The ledger: which texts the service has seen, in SQLite (WAL, one transaction per file).

Two tables. ``texts`` is keyed by the sha256 of a file's bytes and says what became of that
content: ``applied`` (learned, with the learner's statistics of it as JSON) or ``skipped``
(with the reason). Every row carries ``seq``, a counter the saved learner state refers to: a
state saved at ``seq = S`` contains exactly the applied rows with ``seq <= S``. ``paths`` maps
each watched path to the content it last had and the ``stat`` signature it had then, so an
unchanged file is recognised without reading it.

The ledger is durable before the state that refers to it (``synchronous=FULL``), and rows newer
than the saved state are rolled back at start (``rollback_to``), which is what makes a crash at
any moment lose no file and count none twice.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from aura.errors import DataError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS texts (
    sha256 TEXT PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,
    status TEXT NOT NULL CHECK (status IN ('applied', 'skipped')),
    reason TEXT,
    path TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    stats TEXT,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS paths (
    path TEXT PRIMARY KEY,
    signature TEXT NOT NULL,
    sha256 TEXT,
    reason TEXT,
    seen_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class PathRow:
    """What a path looked like when last read: its stat signature and content (or why none)."""

    signature: str
    sha256: str | None
    reason: str | None
    seen_ns: int


@dataclass(frozen=True)
class TextRow:
    seq: int
    status: str
    reason: str | None
    path: str


class Ledger:
    """One SQLite file; every method that writes is one transaction."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            version = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if version is None:
                self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif version[0] != str(SCHEMA_VERSION):
                raise DataError(f"ledger {self.path}: unknown schema version {version[0]}")
        except sqlite3.DatabaseError as exc:
            raise DataError(f"ledger {self.path}: not a readable SQLite database ({exc})") from None

    def close(self) -> None:
        self.db.close()

    def last_seq(self) -> int:
        return self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM texts").fetchone()[0]

    def rollback_to(self, seq: int) -> list[str]:
        """Forget the texts applied after the saved state (``seq > S``): they are learned again.

        Returns their paths. Skipped rows stay: skipping changes no state.
        """
        with self._transaction():
            rows = self.db.execute("SELECT path FROM texts WHERE status='applied' AND seq > ? "
                                   "ORDER BY seq", (seq,)).fetchall()
            self.db.execute("DELETE FROM texts WHERE status='applied' AND seq > ?", (seq,))
        return [r[0] for r in rows]

    def text(self, sha256: str) -> TextRow | None:
        row = self.db.execute("SELECT seq, status, reason, path FROM texts WHERE sha256=?",
                              (sha256,)).fetchone()
        return TextRow(*row) if row else None

    def path_row(self, path: str) -> PathRow | None:
        row = self.db.execute("SELECT signature, sha256, reason, seen_ns FROM paths WHERE path=?",
                              (path,)).fetchone()
        return PathRow(*row) if row else None

    def record_text(self, sha256: str, status: str, reason: str | None, path: str,
                    signature: str, n_bytes: int, stats: dict[str, float] | None = None) -> int:
        """The outcome of one file's content (with what learning it measured) and where it
        was seen, in one transaction."""
        tokens = int(stats["tokens"]) if stats else 0
        with self._transaction():
            seq = self.last_seq() + 1
            self.db.execute("INSERT INTO texts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (sha256, seq, status, reason, path, n_bytes, tokens,
                             json.dumps(stats) if stats else None, time.time()))
            self._upsert_path(path, signature, sha256, None)
        return seq

    def record_path(self, path: str, signature: str, sha256: str | None,
                    reason: str | None) -> None:
        """A path whose content needs no learning (known content, or unreadable / too large)."""
        with self._transaction():
            self._upsert_path(path, signature, sha256, reason)

    def _upsert_path(self, path: str, signature: str, sha256: str | None,
                     reason: str | None) -> None:
        self.db.execute("INSERT OR REPLACE INTO paths VALUES (?, ?, ?, ?, ?)",
                        (path, signature, sha256, reason, time.time_ns()))

    def skipped(self) -> dict[str, int]:
        """Texts and paths skipped over the ledger's whole history, by reason."""
        out: dict[str, int] = {}
        for (reason, n) in self.db.execute(
                "SELECT reason, COUNT(*) FROM texts WHERE status='skipped' GROUP BY reason "
                "UNION ALL SELECT reason, COUNT(*) FROM paths WHERE reason IS NOT NULL "
                "GROUP BY reason"):
            out[reason] = out.get(reason, 0) + n
        return out

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
