"""The basal ganglia: Go/NoGo selection over the regions' proposals, with an explicit no-go.

Each region proposes a change to the stream (its output). Per token, a learned selector scores
every proposal and one more option, "no-go" (change nothing: the comprehension stream goes to
Broca as it is); a softmax over the R + 1 options weights the proposals, so the no-go mass is
what the selector withholds. Selection entropy and the mean no-go probability are logged. The
selector reads the token's own state only, so selection is causal.
"""

from __future__ import annotations

import torch
from torch import nn


class BasalGanglia(nn.Module):
    def __init__(self, n_embd: int, regions: tuple[str, ...]):
        super().__init__()
        self.regions = regions
        self.norm = nn.LayerNorm(n_embd)
        self.select = nn.Linear(n_embd, len(regions) + 1)
        nn.init.zeros_(self.select.weight)
        nn.init.zeros_(self.select.bias)  # uniform over go options and no-go at init
        self._metrics: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, proposals: dict[str, torch.Tensor]) -> torch.Tensor:
        """``x`` plus the selected mix of the proposals (each like x)."""
        probs = torch.softmax(self.select(self.norm(x)).float(), dim=-1)  # (B, T, R + 1)
        out = x
        for i, r in enumerate(self.regions):
            if r in proposals:  # a region bypassed in this training phase proposes nothing
                out = out + probs[..., i:i + 1].to(x.dtype) * proposals[r]
        with torch.no_grad():
            entropy = -(probs * probs.clamp(min=1e-9).log()).sum(-1).mean()
            self._metrics = {"bg_entropy": entropy, "bg_nogo": probs[..., -1].mean(),
                             **{f"bg_go_{r}": probs[..., i].mean()
                                for i, r in enumerate(self.regions)}}
        return out

    def metrics(self) -> dict[str, torch.Tensor]:
        """Selection entropy (nats), mean no-go probability and each region's mean go."""
        return dict(self._metrics)
