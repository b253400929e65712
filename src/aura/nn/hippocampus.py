"""The hippocampal formation: episodic memories of hidden states, recalled into the residual stream.

Each training step the most *novel* token states (least similar to anything stored: the
hippocampus's novelty signal) become memories, keyed by a learned projection and valued by the
state itself, in an ``aura.memory.EpisodicStore`` (capacity, decay 0.03 a step, eviction by
importance and recency). Every token then queries the store; its top-k memories (plus, with a
cognitive map, the map's neighbours of its best match: spreading activation) are mixed by a
softmax of their cosine scores, projected, and added to the residual through a learned gate,
(B, T, 1) so one gate per token broadcasts over the features (a (B, T, C) gate would be C
gates learning one decision).

Causality: writes go through the model's ``MemoryWriter`` (aura.memory.writer), applied when the
model's next forward starts. So no token ever reads a memory formed from its own sequence, a
gradient-checkpoint recompute sees the same store as the forward it repeats, and evaluation and
generation (which never write) read a fixed store: cached and uncached decoding agree. Given the
tokens' corpus positions, a memory also records where in the corpus it was formed, and token t
reads (directly or through the cognitive map) only memories formed at or before its own
position: an earlier batch's overlapping window cannot hand it later text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aura.memory.store import SNIPPET_TOKENS, EpisodicStore
from aura.memory.writer import MemoryAccess, MemoryWriter, snippets

_GATE_BIAS = -2.0  # sigmoid(-2) = 0.12: recall starts as a small correction


def store_problems(capacity: int, decay: float, graph_k: int) -> list[str]:
    """What is wrong with a store's settings, one line each (every model config that builds a
    ``HippocampalMemory`` checks them the same way)."""
    out = []
    if not 0 <= decay < 1:
        out.append(f"model.memory_decay must be in [0, 1), got {decay}")
    if not 0 <= graph_k < capacity:
        out.append(f"model.memory_graph_k must be in [0, memory_capacity), got {graph_k}")
    return out


def recall_activation_bytes(tokens: int, n_embd: int, top_k: int, graph_k: int, dim_key: int,
                            capacity: int) -> int:
    """What a training read keeps for the backward: per token its query, gate and read-out
    (five rows of the width, three of the key), per candidate its slot, weight and unit key (the
    winners are rescored, the search itself keeps nothing), and once the store's value table
    the weighted sum reads by slot."""
    candidates = top_k + graph_k
    per_token = 4 * (5 * n_embd + 3 * dim_key) + candidates * (12 + 4 * dim_key)
    return tokens * per_token + 4 * capacity * n_embd


class HippocampalMemory(nn.Module):
    """Recall from, and novel states into, the store of ``writer`` (keys ``dim_key``-wide, values
    ``n_embd``-wide, a cognitive map of ``graph_k`` neighbours when spreading activation)."""

    def __init__(self, n_embd: int, writer: MemoryWriter, top_k: int = 8,
                 writes_per_step: int = 64, tied_key: bool = False):
        super().__init__()
        store = writer.store
        if store.dim_value != n_embd:
            raise ValueError(f"the store's values must be {n_embd}-d states, got "
                             f"{store.dim_value}-d")
        if writes_per_step > store.capacity:
            raise ValueError(f"writes_per_step {writes_per_step} exceeds capacity "
                             f"{store.capacity}")
        dim_key = store.dim_key
        self.writer, self.top_k, self.writes_per_step = writer, top_k, writes_per_step
        self.graph_k = store.graph_k
        self.query = nn.Linear(n_embd, dim_key, bias=False)
        # Memories are written without gradient, so a separate ``key`` keeps its initial random
        # projection for good; ``tied_key`` writes with the read's own (trained) ``query``
        # instead, so a state finds the memories of states like it.
        self.key = None if tied_key else nn.Linear(n_embd, dim_key, bias=False)
        self.out = nn.Linear(n_embd, n_embd, bias=False)
        self.gate = nn.Linear(n_embd, 1)
        self.log_temperature = nn.Parameter(torch.tensor(2.3))  # softmax over cosines x ~10
        for lin in (self.query, self.key, self.out, self.gate):
            if lin is not None:
                nn.init.normal_(lin.weight, 0.0, 0.02)
        nn.init.constant_(self.gate.bias, _GATE_BIAS)
        self._metrics: dict[str, torch.Tensor] = {}

    @property
    def store(self) -> EpisodicStore:
        return self.writer.store

    def forward(self, h: torch.Tensor, access: MemoryAccess) -> torch.Tensor:
        """``h`` plus the gated recall; with ``access.write``, this batch's most novel states
        are queued as memories at their corpus positions."""
        if not access.read:
            return h
        B, T, C = h.shape
        queries = self.query(h).reshape(B * T, -1)
        where = None if access.positions is None else access.positions.reshape(-1)
        floor = None if access.floor is None else access.floor.reshape(-1)
        best = torch.zeros(B * T, device=h.device)
        recall = torch.zeros_like(h)
        if len(self.store):
            read, best = self._recall(queries, where, floor)
            gate = torch.sigmoid(self.gate(h))  # (B, T, 1)
            recall = gate * self.out(read.reshape(B, T, C).to(h.dtype))
            self._metrics = {"memory_gate": gate.detach().float().mean(),
                             "memory_match": best.detach().mean(), "memory_size":
                             torch.tensor(float(len(self.store)))}
        if access.write:
            self._remember(h.detach(), best.detach(), where, access.tokens, access.salience)
        return h + recall.to(h.dtype)

    def _recall(self, queries: torch.Tensor, where: torch.Tensor | None,
                floor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax-weighted values of each query's memories (Q, C), and its best cosine (Q,);
        ``where`` (Q,) limits each query to memories formed at or before it, ``floor`` (Q,)
        to those formed at or after its document's start."""
        with torch.autocast(queries.device.type, enabled=False):  # cosines in fp32
            # evaluation leaves recency and importance alone: it must not steer what training
            # forgets, and a read that bookkeeps nothing is cheaper
            r = self.store.read(queries.float(), self.top_k, max_source_pos=where,
                                touch=self.training, min_source_pos=floor)
        scores, slots, mask = r.scores, r.slots, r.mask
        if self.graph_k:
            scores, slots, mask = self._spread(queries, r.ids, scores, slots, mask, where, floor)
        # Missing entries score -inf: zero them before scaling, or the temperature's gradient
        # would be -inf * 0 = nan.
        logits = torch.where(mask, scores, 0.0) * self.log_temperature.exp()
        weights = torch.softmax(logits.masked_fill(~mask, -1e9), dim=-1) * mask
        best = scores[:, 0].masked_fill(~mask[:, 0], 0.0)
        # a weighted sum of stored rows, never a (Q, k, C) gather of them
        read = F.embedding_bag(slots, self.store.values, per_sample_weights=weights, mode="sum")
        return read, best

    def _spread(self, queries: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor,
                slots: torch.Tensor, mask: torch.Tensor, where: torch.Tensor | None,
                floor: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add the cognitive map's neighbours of each query's best memory to its candidates,
        scored by their own cosine to the query; ones already among the top-k, or formed after
        the query's position (or before its ``floor``), are masked."""
        nbr = self.store.neighbours(ids[:, 0].contiguous(), self.graph_k)  # (Q, g); -1: none
        limit = None if where is None else where[:, None].expand_as(nbr)
        low = None if floor is None else floor[:, None].expand_as(nbr)
        nbr_slots, found = self.store.locate(nbr, max_source_pos=limit, min_source_pos=low)
        keys = self.store.index.get(nbr_slots)
        nbr_scores = torch.einsum("qd,qgd->qg", F.normalize(queries.float(), dim=-1), keys)
        fresh = found & ~(nbr[:, :, None] == ids[:, None, :]).any(-1)
        return (torch.cat([scores, nbr_scores.masked_fill(~fresh, float("-inf"))], 1),
                torch.cat([slots, nbr_slots], 1), torch.cat([mask, fresh], 1))

    @torch.no_grad()
    def _remember(self, h: torch.Tensor, best: torch.Tensor, where: torch.Tensor | None,
                  tokens: torch.Tensor | None = None,
                  salience: torch.Tensor | None = None) -> None:
        """Queue this batch's most novel states (or, given ``salience``, its salient ones),
        keyed by their projection, with where they were formed and (given the ``tokens``) the
        text ending at each."""
        flat = h.reshape(-1, h.size(-1)).float()
        if salience is not None:
            sal = salience.reshape(-1).to(flat.device, torch.float32)
            rows = (sal > 0).nonzero().squeeze(1)[-self.store.capacity:]
            importance = sal[rows]
        else:
            novelty = 1.0 - best.clamp(min=0.0)
            n = min(self.writes_per_step, flat.size(0))
            importance, rows = novelty.topk(n)
        project = self.query if self.key is None else self.key
        keys = project(flat[rows].to(project.weight.dtype)).float()
        source = None
        if tokens is not None:
            source = snippets(tokens, SNIPPET_TOKENS).reshape(-1, SNIPPET_TOKENS)[rows]
        self.writer.queue(keys, flat[rows], importance.float(),
                          None if where is None else where[rows], source)

    def metrics(self) -> dict[str, torch.Tensor]:
        """The last read's mean gate, mean best cosine and the number of memories held."""
        return dict(self._metrics)
