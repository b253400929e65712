"""Learning-rate schedules as plain functions of the step, plus plateau/early-stop bookkeeping
and the cadence of periodic work (logging, evaluation, checkpoints).

Keeping the LR a function of (step, a few saved numbers) makes resumed runs exact without
pickling scheduler objects.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from aura.config import TrainConfig


def cosine_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to ``min_ratio`` at ``max_steps``: the usual LM recipe,
    large steps once the early gradients have calmed, small ones to settle at the end."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Every:
    """Work done every ``interval`` steps and after the run's ``last`` step, so a run always
    ends logged, evaluated and saved whatever its length. Steps count updates done."""

    interval: int
    last: int

    def due(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.last


@dataclass
class Plateau:
    """ReduceLROnPlateau with early stopping: halve on ``patience`` flat evals, for runs whose
    length is not known in advance (no cosine horizon to aim at)."""

    patience: int
    early_stop_patience: int
    factor: float = 0.5
    min_scale: float = 1e-3
    best: float = math.inf
    bad_evals: int = 0
    evals_since_best: int = 0
    scale: float = 1.0

    def observe(self, val_loss: float) -> bool:
        """Record an evaluation; True when early stopping says the run should end."""
        if val_loss < self.best - 1e-6:
            self.best, self.bad_evals, self.evals_since_best = val_loss, 0, 0
            return False
        self.bad_evals += 1
        self.evals_since_best += 1
        if self.bad_evals >= self.patience:
            self.scale = max(self.min_scale, self.scale * self.factor)
            self.bad_evals = 0
        return 0 < self.early_stop_patience <= self.evals_since_best

    def state(self) -> dict[str, float]:
        return asdict(self)


def lr_factor(cfg: TrainConfig, step: int, plateau: Plateau) -> float:
    """Multiplier on ``train.lr`` at ``step``; "plateau" adds its reductions after warmup."""
    if cfg.schedule == "cosine":
        base = cosine_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    elif step < cfg.warmup_steps:
        base = (step + 1) / cfg.warmup_steps
    else:
        base = 1.0
    return base * (plateau.scale if cfg.schedule == "plateau" else 1.0)
