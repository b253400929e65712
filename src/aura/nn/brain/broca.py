"""Broca's area: production, the projection from the stream to ``broca_dim`` units the token
head reads (seed 003: 8192, the NeuroGen decoder's input). A GELU follows the projection: two
linear maps in a row would only factor the head through a rank-n_embd bottleneck."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Broca(nn.Module):
    def __init__(self, n_embd: int, broca_dim: int, bias: bool = False):
        super().__init__()
        self.proj = nn.Linear(n_embd, broca_dim, bias=bias)
        # unit-scale units at init (std 1/sqrt(n_embd) on a LayerNormed stream): with GPT-2's
        # 0.02 they start ~10x smaller and the head behind them learned visibly slower
        # (val loss above uniform for the first 20 steps on brain-cpu)
        nn.init.normal_(self.proj.weight, 0.0, n_embd ** -0.5)
        self._metrics: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.proj(x))
        with torch.no_grad():
            self._metrics = {"broca_active": (y > 0).float().mean()}
        return y

    def metrics(self) -> dict[str, torch.Tensor]:
        """The fraction of Broca units with a positive output."""
        return dict(self._metrics)
