"""Time cells: how long ago the last event boundary was, as a bank of log-spaced tuning curves.

Hippocampal time cells fire in sequence after an event, each at its own delay, and the later a
cell's field the wider it is (Pastalkova et al. 2008; MacDonald et al. 2011): a scale-invariant,
logarithmic timeline. Here the "event" is a boundary the caller marks per token (sentence ends,
prosodic breaks, from the data pipeline), and the code tells the model how far into the current
segment each token is: the order of events, which absolute positions do not carry.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def elapsed_since(boundary: torch.Tensor, start: int | torch.Tensor = 0,
                  previous: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens since the latest boundary at or before each position: (..., T) bool -> long.

    0 on a boundary token, counting up after it. The tokens sit at positions ``start ..
    start + T - 1`` (``start`` an int, or (..., 1) per row); ``previous`` (...,) is the
    position of the latest boundary before them (a generation cache carries it from step to
    step), else the sequence start counts as one.
    A running max of boundary positions (``cummax``) needs no loop over time, and position t
    reads only boundaries at <= t: causal by construction.
    """
    pos = torch.arange(boundary.size(-1), device=boundary.device) + start
    last = torch.where(boundary, pos, 0).cummax(-1).values
    if previous is not None:
        last = torch.maximum(last, previous.unsqueeze(-1))
    return pos - last


class TimeCellEncoder(nn.Module):
    """``h + W_out(rates(elapsed))``: a temporal-interval code added to the residual stream.

    Cell i prefers the interval ``tau_i = max_interval ** (i / (n_cells - 1))``: log-spaced from 1
    to ``max_interval``, a constant ratio apart. Its tuning is a Gaussian in ``log(1 + elapsed)``
    with peak 1 at ``tau_i`` and width ``width`` times the local spacing of the centres there,
    ``sigma_i = width * log(ratio) * tau_i / (1 + tau_i)``; in elapsed tokens that is a field
    ``sigma_i * (1 + tau_i)``, proportional to ``tau_i`` (Weber's law), while ``log(1 + .)`` keeps
    ``elapsed = 0`` finite. A boundary token itself (elapsed 0) lies below every field: with the
    default width its code is silent (< 1e-10).

    The tuning is fixed (a basis); ``out`` learns the readout and starts at N(0, 0.02) so the
    encoder begins as a near-identity. ``rates`` gives the raw code to callers that project it
    themselves.
    """

    def __init__(self, n_embd: int, n_cells: int = 32, max_interval: float = 512.0,
                 width: float = 1.0):
        super().__init__()
        if n_cells < 2 or max_interval <= 1 or width <= 0:
            raise ValueError("need n_cells >= 2, max_interval > 1 and width > 0")
        self.n_cells, self.max_interval, self.width = n_cells, max_interval, width
        self.out = nn.Linear(n_cells, n_embd, bias=False)
        nn.init.normal_(self.out.weight, 0.0, 0.02)

    def tuning(self, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Preferred intervals (tokens) and tuning widths (in log(1 + elapsed)), each (n_cells,).

        Recomputed from Python floats (n_cells numbers) rather than kept in buffers, which
        ``module.to(torch.bfloat16)`` would round.
        """
        i = torch.arange(self.n_cells, device=device, dtype=dtype)
        tau = self.max_interval ** (i / (self.n_cells - 1))
        log_ratio = math.log(self.max_interval) / (self.n_cells - 1)
        return tau, self.width * log_ratio * tau / (1 + tau)

    def rates(self, elapsed: torch.Tensor) -> torch.Tensor:
        """Code of each token's elapsed count (>= 0): (...) -> (..., n_cells) in [0, 1].

        Computed in at least float32, whatever the input or autocast. A cell whose rate would
        be subnormal (``exp`` underflowing, about 13 widths off its field) is exactly silent:
        x86 CPUs multiply subnormals ~100x slower, and a few thousand of them in the code made
        the readout's matmuls 5 ms a step of ``hippocampal-cpu``'s ~90.
        """
        dtype = torch.promote_types(elapsed.dtype, torch.float32)
        tau, sigma = self.tuning(elapsed.device, dtype)
        z = (torch.log1p(elapsed.to(dtype))[..., None] - torch.log1p(tau)) / sigma
        rates = torch.exp(-0.5 * z.square())
        return rates.masked_fill(rates < torch.finfo(dtype).tiny, 0.0)

    def forward(self, h: torch.Tensor, elapsed: torch.Tensor) -> torch.Tensor:
        """(B, T, n_embd), (B, T) -> (B, T, n_embd)."""
        return h + self.out(self.rates(elapsed).to(h.dtype))
