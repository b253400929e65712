"""The hippocampal formation: episodic memories of hidden states, recalled into the residual stream.

Each training step the most *novel* token states (least similar to anything stored: the
hippocampus's novelty signal) become memories, keyed by a learned projection and valued by the
state itself, in an ``aura.memory.EpisodicStore`` (capacity, decay 0.03 a step, eviction by
importance and recency). Every token then queries the store; its top-k memories (plus, with a
cognitive map, the map's neighbours of its best match: spreading activation) are mixed by a
softmax of their cosine scores, projected, and added to the residual through a learned gate,
(B, T, 1) so it broadcasts over the features (seed 002's broadcasting fix).

Causality: a batch's memories are written only at the start of the *next* training forward. So
no token ever reads a memory formed from its own sequence, a gradient-checkpoint recompute sees
the same store as the forward it repeats, and evaluation and generation (which never write) read
a fixed store: cached and uncached decoding agree. Given each window's corpus offset
(``corpus_pos``, from the trainer), a memory also records where in the corpus it was formed, and
token t reads (directly or through the cognitive map) only memories formed at or before its own
position: an earlier batch's overlapping window cannot hand it later text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aura.memory import EpisodicStore

_GATE_BIAS = -2.0  # sigmoid(-2) = 0.12: recall starts as a small correction


class HippocampalMemory(nn.Module):
    def __init__(self, n_embd: int, dim_key: int = 64, capacity: int = 4096, top_k: int = 8,
                 decay: float = 0.03, graph_k: int = 0, writes_per_step: int = 64):
        super().__init__()
        if writes_per_step > capacity:
            raise ValueError(f"writes_per_step {writes_per_step} exceeds capacity {capacity}")
        self.top_k, self.graph_k, self.writes_per_step = top_k, graph_k, writes_per_step
        self.query = nn.Linear(n_embd, dim_key, bias=False)
        self.key = nn.Linear(n_embd, dim_key, bias=False)
        self.out = nn.Linear(n_embd, n_embd, bias=False)
        self.gate = nn.Linear(n_embd, 1)
        self.log_temperature = nn.Parameter(torch.tensor(2.3))  # softmax over cosines x ~10
        for lin in (self.query, self.key, self.out, self.gate):
            nn.init.normal_(lin.weight, 0.0, 0.02)
        nn.init.constant_(self.gate.bias, _GATE_BIAS)
        self.store = EpisodicStore(dim_key, n_embd, capacity, decay, graph_k=graph_k)
        self._pending: tuple[torch.Tensor, ...] | None = None
        self._metrics: dict[str, torch.Tensor] = {}

    def forward(self, h: torch.Tensor, use_memory: bool = True,
                corpus_pos: torch.Tensor | None = None) -> torch.Tensor:
        """``corpus_pos`` (B,): each row's offset in the corpus (see the module docstring)."""
        if not use_memory:
            return h
        if self.training:
            self.flush()
        self.store.to(h.device)
        B, T, C = h.shape
        queries = self.query(h).reshape(B * T, -1)
        where = None if corpus_pos is None else (
            corpus_pos.to(h.device).view(B, 1) + torch.arange(T, device=h.device)).reshape(-1)
        best = torch.zeros(B * T, device=h.device)
        recall = torch.zeros_like(h)
        if len(self.store):
            read, best = self._recall(queries, where)
            gate = torch.sigmoid(self.gate(h))  # (B, T, 1)
            recall = gate * self.out(read.reshape(B, T, C).to(h.dtype))
            self._metrics = {"memory_gate": gate.detach().float().mean(),
                             "memory_match": best.detach().mean(), "memory_size":
                             torch.tensor(float(len(self.store)))}
        if self.training:
            self._remember(h.detach(), best.detach(), where)
        return h + recall.to(h.dtype)

    def _recall(self, queries: torch.Tensor, where: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax-weighted values of each query's memories (Q, C), and its best cosine (Q,);
        ``where`` (Q,) limits each query to memories formed at or before it."""
        with torch.autocast(queries.device.type, enabled=False):  # cosines in fp32
            # evaluation leaves recency and importance alone: it must not steer what training
            # forgets, and a read that bookkeeps nothing is cheaper
            r = self.store.read(queries.float(), self.top_k, max_source_pos=where,
                                touch=self.training)
        scores, values, mask = r.scores, r.values, r.mask
        if self.graph_k:
            scores, values, mask = self._spread(queries, r.ids, scores, values, mask, where)
        # Missing entries score -inf: zero them before scaling, or the temperature's gradient
        # would be -inf * 0 = nan.
        logits = torch.where(mask, scores, 0.0) * self.log_temperature.exp()
        weights = torch.softmax(logits.masked_fill(~mask, -1e9), dim=-1) * mask
        best = scores[:, 0].masked_fill(~mask[:, 0], 0.0)
        return torch.einsum("qk,qkc->qc", weights, values), best

    def _spread(self, queries: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor,
                values: torch.Tensor, mask: torch.Tensor, where: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add the cognitive map's neighbours of each query's best memory to its candidates,
        scored by their own cosine to the query; ones already among the top-k, or formed after
        the query's position, are masked."""
        nbr = self.store.neighbours(ids[:, 0].contiguous(), self.graph_k)  # (Q, g); -1: none
        limit = None if where is None else where[:, None].expand_as(nbr)
        keys, nbr_values, found = self.store.lookup(nbr, max_source_pos=limit)
        nbr_scores = (F.normalize(queries.float(), dim=-1)[:, None] * keys).sum(-1)
        fresh = found & ~(nbr[:, :, None] == ids[:, None, :]).any(-1)
        return (torch.cat([scores, nbr_scores.masked_fill(~fresh, float("-inf"))], 1),
                torch.cat([values, nbr_values], 1), torch.cat([mask, fresh], 1))

    @torch.no_grad()
    def _remember(self, h: torch.Tensor, best: torch.Tensor, where: torch.Tensor | None) -> None:
        """Queue this batch's most novel states (and where they were formed); ``flush`` stores
        them next step."""
        flat = h.reshape(-1, h.size(-1)).float()
        novelty = 1.0 - best.clamp(min=0.0)
        n = min(self.writes_per_step, flat.size(0))
        importance, rows = novelty.topk(n)
        self._pending = (self.key(flat[rows].to(self.key.weight.dtype)).float(), flat[rows],
                         importance.float(), None if where is None else where[rows])

    def flush(self) -> None:
        """Write the queued memories now (the next training forward would): before a save, so a
        checkpoint holds every memory formed so far and a resumed run continues exactly."""
        if self._pending is None:
            return
        keys, values, importance, where = self._pending
        self._pending = None
        self.store.decay_step()
        with torch.autocast(keys.device.type, enabled=False):  # the index and map stay fp32
            # the store's clock counts writing steps, and is saved with it
            self.store.write(keys, values, importance, step=self.store.step + 1,
                             source_pos=where)

    def metrics(self) -> dict[str, torch.Tensor]:
        """The last read's mean gate, mean best cosine and the number of memories held."""
        return dict(self._metrics)
