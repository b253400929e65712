"""Theta-gamma positional encoding: nested oscillations plus a geometric bank of sinusoids.

Theta advances one cycle every ``theta_period`` tokens; ``gammas_per_theta`` gamma cycles nest
inside each theta cycle and their amplitude follows theta phase (phase-amplitude coupling, as in
hippocampal recordings). A bank of sinusoids with geometrically spread periods keeps positions
distinguishable far beyond one theta cycle.

Every period is a whole number of ``TICKS`` (1/1024 of a token), so a phase is reduced exactly in
int64 before anything becomes a float: position 10**9 gets the same precision as position 10,
which a float32 ``pos / period`` cannot give once ``pos`` outgrows the mantissa.
"""

from __future__ import annotations

import math

import torch
from torch import nn

TICKS = 1024  # sub-token resolution of every period
SCALE = 0.02 * math.sqrt(2)  # a sinusoid over uniform phase has std 1/sqrt(2): features std 0.02
_BANK_BASE = 10_000.0  # the bank's periods span 2π .. 2π·base tokens, as in sinusoidal encodings


class ThetaGammaEncoding(nn.Module):
    """Position features of size ``n_embd`` (even, >= 6), added to the token embeddings.

    Feature pairs are (cos, sin) of: theta, gamma times the theta envelope (1 + cos θ) / 2 (1 at
    theta peak, 0 at the trough), then the bank. With ``learnable_mix`` a square mix matrix starts
    at ``SCALE`` times the identity, so both modes begin with the same encoding; it is a bare
    Parameter, not an ``nn.Linear``, so a model's blanket Linear init cannot blow it up to
    N(0, 0.02) per entry (output std 0.02·sqrt(n_embd / 2)).
    """

    def __init__(self, n_embd: int, theta_period: float = 64.0, gammas_per_theta: int = 8,
                 learnable_mix: bool = True):
        super().__init__()
        if n_embd < 6 or n_embd % 2:
            raise ValueError(f"n_embd must be even and at least 6, got {n_embd}")
        if gammas_per_theta < 1:
            raise ValueError(f"gammas_per_theta must be at least 1, got {gammas_per_theta}")
        gamma_ticks = round(theta_period * TICKS / gammas_per_theta)
        if gamma_ticks < 2 * TICKS:  # below two tokens a gamma cycle aliases
            raise ValueError(f"gamma period theta_period / gammas_per_theta = "
                             f"{theta_period / gammas_per_theta:g} tokens is shorter than 2")
        n_bank = n_embd // 2 - 2
        bank = [round(2 * math.pi * _BANK_BASE ** (i / n_bank) * TICKS) for i in range(n_bank)]
        # theta is exactly gammas_per_theta gamma cycles, so the nesting never drifts
        ticks = torch.tensor([gamma_ticks * gammas_per_theta, gamma_ticks, *bank])
        self.register_buffer("period_ticks", ticks, persistent=False)  # int64: .to(dtype) skips it
        self.mix = nn.Parameter(SCALE * torch.eye(n_embd)) if learnable_mix else None

    @property
    def periods(self) -> torch.Tensor:
        """Period in tokens of each (cos, sin) pair, in feature order: theta, gamma, bank."""
        return self.period_ticks.double() / TICKS

    def features(self, positions: torch.Tensor) -> torch.Tensor:
        """Unscaled features in [-1, 1], float32, shape ``(*positions.shape, n_embd)``."""
        if positions.is_floating_point() or positions.is_complex():
            raise TypeError(f"positions must be integers, got {positions.dtype}")
        n = self.period_ticks
        # (pos mod n) * TICKS < n * TICKS: exact in int64 for any int64 position
        ticks = positions.long().unsqueeze(-1) % n * TICKS % n
        phase = ticks.float() / n.float() * (2 * math.pi)  # in [0, 2π) at any position
        pairs = torch.stack((phase.cos(), phase.sin()), dim=-1)  # (..., n_pairs, 2)
        theta, gamma, bank = pairs[..., :1, :], pairs[..., 1:2, :], pairs[..., 2:, :]
        envelope = (1 + theta[..., :1]) / 2
        return torch.cat((theta, envelope * gamma, bank), dim=-2).flatten(-2)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Encoding of integer ``positions`` (any shape), in ``dtype`` if given, else in the mix's
        dtype (under autocast: autocast's), else float32."""
        f = self.features(positions)
        out = f * SCALE if self.mix is None else f.to(self.mix.dtype) @ self.mix
        return out if dtype is None else out.to(dtype)
