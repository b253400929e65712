"""Run metrics: one JSON object per line in RUN/metrics.jsonl, mirrored to TensorBoard, and
what the train and val rows hold (`TrainLog`).

JSONL is the record (`aura plot` reads it); TensorBoard is a view, skipped with a note when the
package is missing and switched off with a warning when it cannot write.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from aura.atomic import atomic_write_text
from aura.config import ModelConfig
from aura.errors import environment_error
from aura.eval.energy import count_energy
from aura.models import build_model
from aura.train.schedule import Every

METRICS_FILE = "metrics.jsonl"


class _QuietTensorBoardThreads:
    """A ``threading.excepthook`` that drops the second report of a failed TensorBoard write.

    TensorBoard's writer thread keeps a failed write for the main thread, which raises it at the
    next call (``MetricsLog`` turns that into one warning), and then re-raises it in the thread
    as well, where Python would print it as a traceback in the middle of training. Every other
    thread's exception goes to the hook that was there before.
    """

    def __init__(self, previous: Callable[[threading.ExceptHookArgs], object]):
        self.previous = previous

    def __call__(self, args: threading.ExceptHookArgs) -> None:
        if (issubclass(args.exc_type, OSError)
                and type(args.thread).__module__.startswith("tensorboard.")):
            return
        self.previous(args)

    @classmethod
    def install(cls) -> None:
        if not isinstance(threading.excepthook, cls):
            threading.excepthook = cls(threading.excepthook)


class MetricsLog:
    """RUN/metrics.jsonl, flushed after every row, and its TensorBoard mirror.

    A metrics file deleted or replaced during the run is recreated at its path (said once):
    writing on through the old handle would send every later row to a file nobody can open.
    A write the file system refuses is raised: the record must not silently stop.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True,
                 log: Callable[[str], None] = print):
        self.path = run_dir / METRICS_FILE
        self._tb_dir = run_dir / "tb" if tensorboard else None
        self._log = log
        self._said: set[str] = set()
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        self._open(resume_step)

    def _say_once(self, what: str, message: str) -> None:
        if what not in self._said:
            self._said.add(what)
            self._log(message)

    def _open(self, resume_step: int | None) -> None:
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._broken = False
        self._tb: Any = None
        if self._tb_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self._say_once("no tensorboard", "note: TensorBoard is not installed (pip install "
                           "'aura[tensorboard]'): metrics go to metrics.jsonl only")
            return
        _QuietTensorBoardThreads.install()
        purge = None if resume_step is None else resume_step + 1
        try:
            self._tb = SummaryWriter(str(self._tb_dir), purge_step=purge)
        except OSError as exc:
            self._tensorboard_failed(exc)
        except UnicodeEncodeError:  # its file layer encodes paths as strict UTF-8
            self._say_once("tensorboard failed", f"warning: TensorBoard cannot write under "
                           f"{self._tb_dir}, a path that is no UTF-8; metrics go on in "
                           f"{self.path}")

    def _tensorboard_failed(self, exc: OSError) -> None:
        """TensorBoard is only a view: one warning, and the run goes on without it."""
        tb, self._tb = self._tb, None
        if tb is not None:
            with contextlib.suppress(OSError):  # the same failure again
                tb.close()
        self._say_once("tensorboard failed", f"warning: TensorBoard stopped writing "
                       f"({environment_error(exc) or exc}); metrics go on in {self.path}")

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

    def _reopen_if_gone(self, step: Any) -> None:
        """Recreate the file if the path no longer names the one this log holds open."""
        mine = os.fstat(self._file.fileno())
        with contextlib.suppress(FileNotFoundError):
            there = os.stat(self.path)
            if (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                return
        self._file.close()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._say_once("recreated", f"warning: {self.path} was deleted or replaced during the "
                       f"run; rows from step {step} on are written to the file now at that path")

    def write(self, row: dict[str, Any]) -> None:
        line = json.dumps(row) + "\n"
        try:
            self._reopen_if_gone(row.get("step"))
            self._file.write(line)
            self._file.flush()
        except OSError as exc:
            self._broken = True  # the bytes it left in the buffer would fail close() again
            if exc.filename is not None:
                raise
            # a write to an open file names no path: say which file the disk refused
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
        if self._tb is not None:
            try:
                for key, value in row.items():
                    if key != "step" and isinstance(value, int | float):
                        self._tb.add_scalar(key, value, row["step"])
            except OSError as exc:  # raised here for the writer thread's failed write
                self._tensorboard_failed(exc)

    def close(self) -> None:
        if self._broken:  # already raised once; the bytes it left would only fail again
            with contextlib.suppress(OSError):
                self._file.close()
        else:
            self._file.close()
        tb, self._tb = self._tb, None
        if tb is not None:
            try:
                tb.close()
            except OSError as exc:  # a write the thread failed, raised at the final flush
                self._tensorboard_failed(exc)


class TrainLog:
    """The train rows of the metrics log: when one is due (after the first step, every
    ``interval`` steps and after the last) and what it holds. Throughput is measured over the
    wall time since the previous row; with ``flops_per_token`` and the device's ``peak_flops``
    the row also carries the model-FLOPs utilisation."""

    def __init__(self, metrics: MetricsLog, interval: int, last_step: int,
                 flops_per_token: float | None = None, peak_flops: float | None = None):
        self.metrics, self.cadence = metrics, Every(interval, last_step)
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self._window_start, self._window_tokens = time.perf_counter(), 0

    def due(self, step: int) -> bool:
        return step == 1 or self.cadence.due(step)

    def count(self, tokens: int) -> None:
        """Tokens of a step done since the last row."""
        self._window_tokens += tokens

    def write(self, step: int, loss: float, lr: float, grad_norm: float, tokens_seen: int,
              mem_mb: float, aux: dict[str, float]) -> dict[str, Any]:
        now = time.perf_counter()
        tokens_per_s = self._window_tokens / max(now - self._window_start, 1e-9)
        row: dict[str, Any] = {"step": step, "loss": loss, "ppl": math.exp(min(loss, 50.0)),
                               "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}
        if self.flops_per_token is not None and self.peak_flops is not None:
            row["mfu"] = tokens_per_s * self.flops_per_token / self.peak_flops
        row.update({"mem_mb": mem_mb, "tokens": tokens_seen,
                    **{f"aux/{k}": v for k, v in aux.items()}})
        self.metrics.write(row)
        self._window_start, self._window_tokens = now, 0
        return row

    def write_eval(self, step: int, val_loss: float, bytes_per_token: float) -> dict[str, Any]:
        row = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
               "val_bpb": val_loss / math.log(2) / bytes_per_token}
        self.metrics.write(row)
        return row


def progress_fields(row: dict[str, Any]) -> dict[str, str]:
    """A train row as the progress bar shows it."""
    fields = {"loss": f"{row['loss']:.4f}", "ppl": f"{row['ppl']:.2f}", "lr": f"{row['lr']:.2e}",
              "gnorm": f"{row['grad_norm']:.2f}", "tok_s": f"{row['tokens_per_s']:.0f}"}
    if "mfu" in row:
        fields["mfu"] = f"{row['mfu']:.1%}"
    fields["mem"] = f"{row['mem_mb']:.0f}M"
    return fields


def training_flops_per_token(config: ModelConfig, idx: torch.Tensor,
                             features: dict[str, torch.Tensor]) -> float:
    """Model FLOPs to train on one token of ``idx``'s shape (attention grows with its length).

    Six per multiply-add of the forward: two FLOPs each, and backward costs twice the forward
    (gradients for the inputs and for the weights). The multiply-adds are counted by
    ``aura.eval.energy`` on a fresh CPU copy of the model, spike-fed layers as the dense matmuls
    a GPU runs: counting on the trained model itself could leave inference-mode tensors in its
    memory stores, and building the copy must not move the run's random stream. Gradient
    checkpointing's recomputed forward is hardware work, not model FLOPs (PaLM's MFU).
    """
    with torch.random.fork_rng(devices=[]):
        model = build_model(config)
    report = count_energy(model, idx.cpu(), **{k: f.cpu() for k, f in features.items()})
    macs = sum(r.ops if r.dense_macs is None else r.dense_macs for r in report.layers)
    return 6 * macs / report.tokens
