"""The transformer's dense feed-forward: ``proj(GELU(fc(x)))`` with a 4x hidden width (GPT-2)."""

from __future__ import annotations

import torch
from torch import nn

from aura.nn.dropout import Dropout


class MLP(nn.Module):
    """Its output layer is named ``proj`` so the GPT-2 init scales it with the other residual
    projections."""

    def __init__(self, n_embd: int, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))
