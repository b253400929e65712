"""Place cells: a sparse population code over the hidden state, added back as a small residual.

Each token drives ``n_place_cells`` cells; only the strongest few (about 3%, like hippocampal
CA1/CA3) fire. Everything is per token, so the block is causal by construction and needs no cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_MAX_GROWTH = 4  # a learned active count may grow to 4x its initial value (bounds the top-k)
_RANK_TEMPERATURE = 1.0  # width, in ranks, of the soft gate the learned count's gradient uses


class PlaceCellEncoder(nn.Module):
    """``h + residual_scale * sparse(relu(W_in h)) @ w_out``, keeping the top ``k`` cells a token.

    ``k = round(active_fraction * n_place_cells)``, at least 1. With ``learnable_sparsity`` the
    count is a learned global ``k_soft = k_max * sigmoid(sparsity_logit)`` (``k_max = 4k``, at most
    every cell), initialised to ``k - 0.5`` so training starts at exactly ``k`` active cells. The
    forward keeps the cells of rank ``r < k_soft`` (a hard, exact top-k); the backward uses the
    soft gate ``sigmoid((k_soft - r) / 1 rank)``, a straight-through estimator, so the task loss
    tells ``k_soft`` whether one more or one fewer cell would help. A global count rather than
    per-cell thresholds keeps the compute bounded and the fraction independent of the hidden
    state's scale.
    """

    def __init__(self, n_embd: int, n_place_cells: int = 2000, active_fraction: float = 0.03,
                 learnable_sparsity: bool = False, residual_scale: float = 0.1):
        super().__init__()
        if n_place_cells < 1:
            raise ValueError(f"n_place_cells must be positive, got {n_place_cells}")
        if not 0.0 < active_fraction <= 1.0:
            raise ValueError(f"active_fraction must be in (0, 1], got {active_fraction}")
        self.n_place_cells, self.residual_scale = n_place_cells, residual_scale
        self.k = max(1, round(active_fraction * n_place_cells))
        self.k_max = min(n_place_cells, _MAX_GROWTH * self.k) if learnable_sparsity else self.k
        self.w_in = nn.Linear(n_embd, n_place_cells, bias=False)
        # one row per cell, the embedding-bag layout: a transposed Linear weight made the bag
        # read strided rows, 25x slower on CPU
        self.w_out = nn.Parameter(torch.empty(n_place_cells, n_embd))
        for w in (self.w_in.weight, self.w_out):
            nn.init.normal_(w, 0.0, 0.02)
        self.sparsity_logit: nn.Parameter | None = None
        if learnable_sparsity:
            p = (self.k - 0.5) / self.k_max
            self.sparsity_logit = nn.Parameter(torch.tensor(p).logit())
        self.last_active_fraction = torch.zeros(())

    def active_count(self) -> torch.Tensor:
        """The (differentiable, fractional) number of cells allowed to fire per token."""
        if self.sparsity_logit is None:
            return torch.tensor(float(self.k))
        return self.k_max * torch.sigmoid(self.sparsity_logit)

    def sparse(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Values and cell indices ``(..., k_max)`` of the firing cells, strongest first.

        Records ``last_active_fraction``. (Recomputing only the winners' drives from gathered
        rows of ``w_in`` saves FLOPs in the backward but moves k_max x n_embd floats per token:
        measured 3-4x slower than this on CPU at both preset shapes.)
        """
        # sorted only where position = rank matters: the learned count gates by rank
        top, idx = self.w_in(h).topk(self.k_max, dim=-1, sorted=self.sparsity_logit is not None)
        values = F.relu(top)
        if self.sparsity_logit is not None:
            k_soft = self.active_count()
            rank = torch.arange(self.k_max, device=h.device, dtype=k_soft.dtype)
            soft = torch.sigmoid((k_soft - rank) / _RANK_TEMPERATURE)
            gate = (rank < k_soft).to(soft.dtype) + soft - soft.detach()
            values = values * gate.to(values.dtype)
        n_tokens = values.numel() // self.k_max
        self.last_active_fraction = ((values != 0).sum() / (n_tokens * self.n_place_cells)
                                     ).detach()
        return values, idx

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """The sparse code as a dense ``(..., n_place_cells)`` tensor (for analysis)."""
        values, idx = self.sparse(h)
        code = torch.zeros(*h.shape[:-1], self.n_place_cells, device=h.device,
                           dtype=values.dtype)
        return code.scatter(-1, idx, values)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The sparse code times ``w_out`` as a weighted sum of k_max of its rows (an embedding
        bag), not a dense matmul over every cell."""
        values, idx = self.sparse(h)
        weights = values.reshape(-1, self.k_max).to(self.w_out.dtype)
        out = F.embedding_bag(idx.reshape(-1, self.k_max), self.w_out, mode="sum",
                              per_sample_weights=weights)
        return h + (self.residual_scale * out.reshape(h.shape)).to(h.dtype)

    def metrics(self) -> dict[str, torch.Tensor]:
        """The last forward's measured active fraction and, if learned, the target fraction."""
        out = {"place_active": self.last_active_fraction}
        if self.sparsity_logit is not None:
            out["place_target"] = (self.active_count() / self.n_place_cells).detach()
        return out
