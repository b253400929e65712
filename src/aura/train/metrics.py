"""Run metrics: one JSON object per line in RUN/metrics.jsonl, mirrored to TensorBoard, and
what the train and val rows hold (`TrainLog`).

JSONL is the record (`aura plot` reads it); TensorBoard is a view, skipped with a note when the
package is missing.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from aura.atomic import atomic_write_text
from aura.config import ModelConfig
from aura.eval.energy import count_energy
from aura.models import build_model
from aura.train.schedule import Every

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True,
                 log: Callable[[str], None] = print):
        self.path = run_dir / METRICS_FILE
        self._tb_dir = run_dir / "tb" if tensorboard else None
        self._log: Callable[[str], None] | None = log  # None once the TensorBoard note is out
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
                if self._log is not None:
                    self._log("note: TensorBoard is not installed (pip install "
                              "'aura[tensorboard]'): metrics go to metrics.jsonl only")
                    self._log = None

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
