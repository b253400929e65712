"""A k-nearest-neighbour graph over an index's keys, kept exact by incremental updates.

Rebuilding the graph from all pairs costs O(n^2) per write. Here a batch of B new keys
costs B similarity rows (B x n) plus a merge of (n, k) edge lists, O(n·k): each new key takes its
k nearest from one search, and every existing node merges its best k among the new keys into its
own list, which is exactly its new k nearest. Removing keys re-searches only the rows that lost an
edge. The graph is therefore always the exact kNN graph of the keys present (ties aside).

The reverse step needs every node's similarity to the new keys, i.e. whole similarity rows, so
the map runs on ``ExactIndex``'s buffer (which ``FaissIndex`` extends), O(n) per new key.
"""

from __future__ import annotations

import torch

from aura.memory.index import ExactIndex

_NEG_INF = float("-inf")


class CognitiveMap:
    """Edges (capacity, k) of index ids, best first, -1 for empty; ``edge_scores`` their cosines.

    Ids are the index's ids (the store's slots). Callers add keys to the index before ``update``
    and remove them from it before ``remove``.
    """

    def __init__(self, index: ExactIndex, k: int = 8):
        if not 1 <= k < index.capacity:
            raise ValueError(f"k must be in [1, {index.capacity}), got {k}")
        self.index, self.k = index, k
        device = index.keys.device
        self.edges = torch.full((index.capacity, k), -1, dtype=torch.long, device=device)
        self.edge_scores = torch.full((index.capacity, k), _NEG_INF, device=device)

    def neighbours(self, ids: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """The ``k`` (default all) nearest neighbours of each id, (N, k), -1 where none."""
        k = self.k if k is None else k
        if not 1 <= k <= self.k:
            raise ValueError(f"k must be in [1, {self.k}], got {k}")
        return self.edges[ids, :k]

    @torch.no_grad()
    def update(self, new_ids: torch.Tensor) -> None:
        """Link keys just added to the index: their own k nearest, and reverse edges to them."""
        if new_ids.numel() == 0:
            return
        sims = self._rows(new_ids)  # (B, capacity): the only similarity computed
        old = self.index.valid.clone()
        old[new_ids] = False
        cand_scores, cand = sims.T.topk(min(self.k, new_ids.numel()), dim=1)  # best new per node
        scores = torch.cat([self.edge_scores, cand_scores], dim=1)
        edges = torch.cat([self.edges, new_ids[cand]], dim=1)
        scores, pos = scores.topk(self.k, dim=1)
        edges = edges.gather(1, pos).masked_fill(scores == _NEG_INF, -1)
        self.edges = torch.where(old[:, None], edges, self.edges)
        self.edge_scores = torch.where(old[:, None], scores, self.edge_scores)
        self._set_rows(new_ids, sims)

    @torch.no_grad()
    def remove(self, ids: torch.Tensor) -> None:
        """Drop ``ids`` and every edge into them; rows that lost an edge are searched again."""
        gone = torch.zeros(self.index.capacity, dtype=torch.bool, device=self.edges.device)
        gone[ids] = True
        self.edges[ids] = -1
        self.edge_scores[ids] = _NEG_INF
        holed = (gone[self.edges.clamp(min=0)] & (self.edges >= 0)).any(dim=1)
        rows = holed.nonzero().squeeze(1)
        if rows.numel():
            self._set_rows(rows, self._rows(rows))

    def clear(self) -> None:
        self.edges.fill_(-1)
        self.edge_scores.fill_(_NEG_INF)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Similarity of ``ids``' keys to every key, with self-similarity hidden."""
        sims = self.index.similarity(self.index.get(ids))
        sims[torch.arange(ids.numel(), device=ids.device), ids] = _NEG_INF
        return sims

    def _set_rows(self, ids: torch.Tensor, sims: torch.Tensor) -> None:
        scores, nbrs = sims.topk(self.k, dim=1)
        self.edges[ids] = nbrs.masked_fill(scores == _NEG_INF, -1)
        self.edge_scores[ids] = scores
