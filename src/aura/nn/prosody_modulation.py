"""Prosody-modulated attention: the text's rhythm and affect set each head's focus per token.

A token's prosody (aura.data.prosody: boundaries, punctuation, capitals, valence, arousal) gives
every head a query gain, which acts as that token's attention temperature (sharper after a
sentence end, broader mid-word, ...), and a key gain, which makes the token more or less salient
to everyone attending to it. Both multiply q and k before ``scaled_dot_product_attention``, so the
fused kernel is kept; a bias mask would have forced the slower masked path.
"""

from __future__ import annotations

import torch
from torch import nn


class ProsodyModulation(nn.Module):
    """(B, T, n_features) prosody -> (query, key) gains, each (B, n_head, T, 1).

    Gains are ``exp(max_log_gain * tanh(W p + b))``: bounded in [e^-m, e^m] so no token can
    blow a softmax up, and exactly 1 at initialisation (W = b = 0): the model starts as plain
    attention and learns how much prosody should matter.
    """

    def __init__(self, n_features: int, n_head: int, max_log_gain: float = 1.0):
        super().__init__()
        self.n_head, self.max_log_gain = n_head, max_log_gain
        self.proj = nn.Linear(n_features, 2 * n_head)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, prosody: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_gain = self.max_log_gain * torch.tanh(self.proj(prosody.to(self.proj.weight.dtype)))
        gains = log_gain.exp().transpose(1, 2).unsqueeze(-1)  # (B, 2H, T, 1)
        return gains[:, : self.n_head], gains[:, self.n_head :]
