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
        # in place: the product is fresh and its backward does not read it
        return self._cosines(queries).masked_fill_(~self.valid, float("-inf"))

    def _cosines(self, queries: torch.Tensor, used: int | None = None) -> torch.Tensor:
        """Cosines (Q, used) to the first ``used`` slots (default: all)."""
        self.rows_scored += queries.shape[0]
        return F.normalize(queries.to(self.keys.dtype), dim=-1) @ self.keys[:used].T

    def search(self, queries: torch.Tensor, k: int, allowed: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Picks the winners without autograd, then scores only them differentiably.

        A top-k passes gradient to k of every row's ``capacity`` scores, so building the whole
        (Q, capacity) product into the graph costs a backward of the same size as the search
        (a zero-filled gradient, its masking, a second large matmul) for nothing.
        """
        # Slots fill from 0 up, so a store still filling scores only its occupied prefix.
        filled = self.valid.nonzero()  # one host sync, as a top-k's consumers need anyway
        used = int(filled[-1]) + 1 if len(filled) else 1
        kk = min(k, used)
        with torch.no_grad():
            valid = self.valid[:used]
            visible = valid if allowed is None else allowed[..., :used] & valid
            sims = self._cosines(queries, used).masked_fill_(~visible, float("-inf"))
            scores, ids = sims.topk(kk, dim=-1)
        found = scores != float("-inf")  # cosine is finite: -inf means none
        ids = ids.masked_fill(~found, -1)
        if torch.is_grad_enabled() and queries.requires_grad:
            unit = F.normalize(queries.to(self.keys.dtype), dim=-1)
            winners = torch.einsum("qd,qkd->qk", unit, self.keys[ids.clamp(min=0)])
            scores = torch.where(found, winners, scores)
        if kk < k:
            scores = F.pad(scores, (0, k - kk), value=float("-inf"))
            ids = F.pad(ids, (0, k - kk), value=-1)
        return scores, ids
