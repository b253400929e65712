"""A replay buffer of past training windows: reservoir-sampled (Vitter's algorithm R, so the
buffer is a uniform sample of every window ever offered, across domains), replayed uniformly or
by priority (Schaul et al. 2016, prioritised experience replay: P(i) ~ p_i^alpha, importance
weights (N P(i))^-beta / max, priorities set to the loss each time a window is replayed).

Every random draw comes from a generator keyed by the caller (seed, step, micro-batch), so a
run's buffer is a pure function of its history and a resumed run draws exactly what it would
have; the buffer itself is saved as safetensors + JSON.
"""

from __future__ import annotations

from typing import Any

import torch

PRIORITY_EPS = 1e-3


def keyed_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from integers (seed, step, micro-batch, purpose)."""
    value = 0
    for k in key:
        value = (value * 1_000_003 + int(k) + 0x9E3779B1) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


class ReplayBuffer:
    """Up to ``capacity_tokens // length`` windows of ``length`` tokens each (block + 1)."""

    def __init__(self, capacity_tokens: int, length: int, priority: str = "uniform",
                 alpha: float = 0.6, beta: float = 0.4):
        self.length = length
        self.slots = max(capacity_tokens // length, 0)
        self.priority_kind, self.alpha, self.beta = priority, alpha, beta
        self.windows = torch.zeros((self.slots, length), dtype=torch.int64)
        self.priority = torch.zeros(self.slots, dtype=torch.float64)
        self.filled = 0
        self.seen = 0
        self.max_priority = 1.0

    def __len__(self) -> int:
        return self.filled

    def offer(self, windows: torch.Tensor, generator: torch.Generator,
              priority: torch.Tensor | None = None) -> None:
        """Reservoir step for each row of ``windows`` (N, >= length): kept with probability
        slots / seen, replacing a uniformly chosen slot. A kept window's priority is
        ``priority`` (e.g. salience) or the largest so far, so it is replayed soon."""
        if self.slots == 0:
            return
        windows = windows[:, : self.length].to("cpu", torch.int64)
        if windows.size(1) < self.length:
            return
        u = torch.rand(windows.size(0), generator=generator, dtype=torch.float64)
        for row in range(windows.size(0)):
            self.seen += 1
            if self.filled < self.slots:
                slot = self.filled
                self.filled += 1
            else:
                slot = int(u[row] * self.seen)
                if slot >= self.slots:
                    continue
            self.windows[slot] = windows[row]
            self.priority[slot] = (self.max_priority if priority is None
                                   else float(priority[row]) + PRIORITY_EPS)
            if priority is not None:
                self.max_priority = max(self.max_priority, float(self.priority[slot]))

    def probabilities(self) -> torch.Tensor:
        """P(i) over the filled slots."""
        if self.priority_kind == "uniform":
            return torch.full((self.filled,), 1.0 / self.filled, dtype=torch.float64)
        p = self.priority[: self.filled] ** self.alpha
        return p / p.sum()

    def sample(self, k: int, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices (k,), windows (k, length), importance weights (k,), all 1 when uniform)."""
        probs = self.probabilities()
        idx = torch.multinomial(probs, k, replacement=True, generator=generator)
        if self.priority_kind == "uniform":
            weights = torch.ones(k, dtype=torch.float32)
        else:
            w = (self.filled * probs[idx]) ** -self.beta
            weights = (w / w.max()).float()
        return idx, self.windows[idx], weights

    def update(self, idx: torch.Tensor, losses: torch.Tensor) -> None:
        """Priorities of replayed windows become their loss now."""
        values = losses.detach().to("cpu", torch.float64) + PRIORITY_EPS
        self.priority[idx] = values
        self.max_priority = max(self.max_priority, float(values.max()))

    # --- persistence: safetensors + JSON --------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"replay.windows": self.windows[: self.filled].contiguous(),
                "replay.priority": self.priority[: self.filled].contiguous()}

    def state(self) -> dict[str, Any]:
        return {"length": self.length, "slots": self.slots, "filled": self.filled,
                "seen": self.seen, "max_priority": self.max_priority}

    def load(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Restore a saved buffer; one of another window length or size is cropped to fit (an
        --init-from run with a different block size or buffer size)."""
        windows, priority = tensors["replay.windows"], tensors["replay.priority"]
        if windows.size(1) < self.length:  # shorter windows than this run's: keep theirs
            self.length = windows.size(1)
            self.windows = torch.zeros((self.slots, self.length), dtype=torch.int64)
        n = min(windows.size(0), self.slots)
        self.windows[:n] = windows[:n, : self.length]
        self.priority[:n] = priority[:n]
        self.filled = n
        self.seen = max(int(state.get("seen", n)), n)
        self.max_priority = float(state.get("max_priority", 1.0))
