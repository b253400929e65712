"""The thalamus: per-token relay of the stream to the cortical regions.

For each token a linear router scores the regions; ``soft`` relays to every region with a
softmax weight, ``topk`` only to the ``k`` best (their softmax renormalised), ``bypass`` (the
seed's debug mode) relays everything to every region and builds no router. Weights are scaled
so that the mean weight is 1 (uniform soft routing at init leaves each region's input as it
is). Each token's routing depends on that token's state only, so it is as causal as its input.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Mode = Literal["soft", "topk", "bypass"]


class Thalamus(nn.Module):
    def __init__(self, n_embd: int, regions: tuple[str, ...], mode: Mode = "soft", top_k: int = 1):
        super().__init__()
        if mode == "topk" and not 1 <= top_k <= len(regions):
            raise ValueError(f"thalamus top_k must be in [1, {len(regions)}], got {top_k}")
        self.regions, self.mode, self.top_k = regions, mode, top_k
        self.router = nn.Linear(n_embd, len(regions), bias=False) if mode != "bypass" else None
        if self.router is not None:
            nn.init.zeros_(self.router.weight)  # uniform relay at init
        self._metrics: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each region's relay weight per token, (B, T, 1)."""
        R = len(self.regions)
        if self.router is None:
            ones = x.new_ones(*x.shape[:-1], 1)
            return dict.fromkeys(self.regions, ones)
        probs = torch.softmax(self.router(x).float(), dim=-1)
        if self.mode == "topk":
            top, idx = probs.topk(self.top_k, dim=-1)
            weights = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
            weights = weights * self.top_k
        else:
            weights = probs * R
        with torch.no_grad():
            entropy = -(probs * probs.clamp(min=1e-9).log()).sum(-1).mean()
            self._metrics = {"thalamus_entropy": entropy,
                             **{f"thalamus_to_{r}": weights[..., i].mean()
                                for i, r in enumerate(self.regions)}}
        weights = weights.to(x.dtype)
        return {r: weights[..., i:i + 1] for i, r in enumerate(self.regions)}

    def metrics(self) -> dict[str, torch.Tensor]:
        """Routing entropy (nats; ln R is uniform) and each region's mean relay weight."""
        return dict(self._metrics)
