"""The prefrontal cortex: a gated recurrent working memory carried across windows.

A linear gated recurrence per head: ``s_t = a_t * s_{t-1} + (1 - a_t) * u_t`` with a per-token,
per-head retention ``a_t = sigmoid(W_a x_t + b)`` (biases spread so the heads start remembering
over ~4 to ~64 tokens) and a candidate ``u_t = W_u x_t``; the region's output is
``W_o(s_t * sigmoid(W_g x_t))``. Because the recurrence is linear in ``s`` a whole window is one
parallel computation: with ``L_t`` the cumulative log-retention,
``s_t = sum_{j<=t} exp(L_t - L_j) (1 - a_j) u_j + exp(L_t) s_0``, where every factor is <= 1
(numerically safe) and the sum runs over j <= t only (causal by construction). The state after
the window is returned, so a caller that keeps it (the generation cache) continues the memory
across windows: cached token-by-token and one-shot forwards give the same outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PrefrontalCortex(nn.Module):
    fp32_weights = True
    """The recurrence runs in fp32 outside autocast, so train.weights=bf16 leaves these fp32."""

    def __init__(self, n_embd: int, dim: int, n_head: int):
        super().__init__()
        if dim % n_head:
            raise ValueError(f"pfc_dim {dim} must be a multiple of pfc_heads {n_head}")
        self.dim, self.n_head = dim, n_head
        self.retain = nn.Linear(n_embd, n_head)
        self.candidate = nn.Linear(n_embd, dim, bias=False)
        self.gate = nn.Linear(n_embd, dim)
        self.out = nn.Linear(dim, n_embd, bias=False)
        for lin in (self.retain, self.candidate, self.gate, self.out):
            nn.init.normal_(lin.weight, 0.0, 0.02)
        nn.init.zeros_(self.gate.bias)
        with torch.no_grad():  # time constants tau from 4 to 64 tokens: a = 1 - 1/tau
            tau = torch.logspace(math.log10(4), math.log10(64), n_head)
            a = 1 - 1 / tau
            self.retain.bias.copy_(torch.log(a / (1 - a)))
        self._metrics: dict[str, torch.Tensor] = {}

    def initial_state(self, batch: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(batch, self.n_head, self.dim // self.n_head, device=device)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(output (B, T, n_embd), the state after the last token (B, heads, dim / heads))."""
        B, T, _ = x.shape
        H, D = self.n_head, self.dim // self.n_head
        with torch.autocast(x.device.type, enabled=False):
            xf = x.float()
            log_a = F.logsigmoid(self.retain(xf))  # (B, T, H)
            u = self.candidate(xf).view(B, T, H, D)
            b = (1 - log_a.exp())[..., None] * u
            L = log_a.cumsum(1).transpose(1, 2)  # (B, H, T)
            diff = L[:, :, :, None] - L[:, :, None, :]  # L_t - L_j
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            decay = diff.masked_fill(~causal, float("-inf")).exp()  # (B, H, T, T)
            s = torch.einsum("bhtj,bjhd->bthd", decay, b)
            if state is not None:
                s = s + L.exp().transpose(1, 2)[..., None] * state[:, None].float()
            gated = s.reshape(B, T, H * D) * torch.sigmoid(self.gate(xf))
            with torch.no_grad():
                self._metrics = {"pfc_retention": log_a.exp().mean(),
                                 "pfc_state_rms": s.pow(2).mean().sqrt()}
        return self.out(gated.to(x.dtype)), s[:, -1].detach()

    def metrics(self) -> dict[str, torch.Tensor]:
        """Mean retention (how much of its memory the PFC keeps per token) and the state's
        RMS."""
        return dict(self._metrics)
