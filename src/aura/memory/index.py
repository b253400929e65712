"""Cosine-similarity vector indexes over integer ids in ``[0, capacity)``.

``VectorIndex`` is the surface the episodic store searches through. ``ExactIndex`` is brute force
(one matmul and a top-k), exact and fast up to tens of thousands of keys; ``FaissIndex``
(faiss_index.py) implements the same protocol for large banks, where an approximate search is
worth its recall.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class VectorIndex(Protocol):
    """Keys addressed by integer ids; ``search`` answers -1 / -inf where fewer than k match."""

    capacity: int

    def __len__(self) -> int: ...

    def add(self, ids: torch.Tensor, keys: torch.Tensor) -> None:
        """Store ``keys`` (N, d) under ``ids`` (N,), replacing whatever those ids held."""

    def remove(self, ids: torch.Tensor) -> None: ...

    def search(self, queries: torch.Tensor, k: int, allowed: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (Q, k) and ids (Q, k) of the k most cosine-similar keys per query, best first.

        ``allowed``, a bool mask over ids broadcastable to (Q, capacity), hides keys per query.
        """


class ExactIndex:
    """Unit-normalised keys in a preallocated (capacity, d) buffer plus a validity mask.

    A key's id is its row, so add/remove are scatters and a search is one (Q, capacity) matmul:
    no Python loop over items. ``rows_scored`` counts query rows scored against the whole buffer,
    which is what a search costs; callers use it to check they never score all pairs.
    """

    def __init__(self, capacity: int, dim: int, device: torch.device | str = "cpu"):
        if capacity < 1 or dim < 1:
            raise ValueError(f"capacity and dim must be positive, got {capacity}, {dim}")
        self.capacity, self.dim = capacity, dim
        self.keys = torch.zeros(capacity, dim, device=device)
        self.valid = torch.zeros(capacity, dtype=torch.bool, device=device)
        self.rows_scored = 0

    def __len__(self) -> int:
        return int(self.valid.sum())

    def add(self, ids: torch.Tensor, keys: torch.Tensor) -> None:
        self.keys[ids] = F.normalize(keys.detach().to(self.keys), dim=-1)
        self.valid[ids] = True

    def remove(self, ids: torch.Tensor) -> None:
        self.valid[ids] = False

    def get(self, ids: torch.Tensor) -> torch.Tensor:
        """The stored (unit) keys of ``ids``."""
        return self.keys[ids]

    def similarity(self, queries: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (Q, capacity) of every query to every slot, -inf at empty slots.

        Differentiable w.r.t. ``queries``; the stored keys are constants.
        """
        self.rows_scored += queries.shape[0]
        sims = F.normalize(queries.to(self.keys.dtype), dim=-1) @ self.keys.T
        return sims.masked_fill(~self.valid, float("-inf"))

    def search(self, queries: torch.Tensor, k: int, allowed: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        sims = self.similarity(queries)
        if allowed is not None:
            sims = sims.masked_fill(~allowed, float("-inf"))
        kk = min(k, self.capacity)
        scores, ids = sims.topk(kk, dim=-1)
        ids = ids.masked_fill(scores == float("-inf"), -1)  # cosine is finite: -inf means none
        if kk < k:
            scores = F.pad(scores, (0, k - kk), value=float("-inf"))
            ids = F.pad(ids, (0, k - kk), value=-1)
        return scores, ids
