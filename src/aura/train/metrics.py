"""Run metrics: one JSON object per line in RUN/metrics.jsonl, mirrored to TensorBoard.

JSONL is the record (`aura plot` reads it); TensorBoard is a view, skipped with a note when the
package is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aura.atomic import atomic_write_text

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = run_dir / METRICS_FILE
        self._tb_dir = run_dir / "tb" if tensorboard else None
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        self._open(resume_step)

    def _open(self, resume_step: int | None) -> None:
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._tb: Any = None
        if self._tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(str(self._tb_dir), purge_step=purge)
            except ImportError:
                self._tb = None

    def rewind(self, step: int) -> None:
        """Forget the rows after ``step``: a rollback runs those steps again."""
        self.close()
        self._truncate_after(step)
        self._open(step)

    def _truncate_after(self, step: int) -> None:
        """Drop rows after ``step`` that a resumed run writes again, so each step appears once."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the crash we are resuming from
            if row.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self._tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
