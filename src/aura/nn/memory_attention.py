"""Gated cross-attention from every token to the top-k entries of an episodic memory bank.

The bank is an ``aura.memory.EpisodicStore`` of chunk encodings, stored as both key and value:
by default the mean of this layer's normalised hidden states over ``chunk`` consecutive tokens,
detached; or any other ``dim_entry``-wide encoding its owner writes (e.g. MiniLM sentence
embeddings of the chunk's text). Each token projects its hidden state to a retrieval query
(initialised to the identity when entries are this layer's own states, so retrieval starts as
"chunks whose hidden states resemble mine"), reads the ``top_k`` most
cosine-similar entries, attends over them with ordinary multi-head attention whose logits also
get the learned-weighted retrieval score, and adds the result through a per-token sigmoid gate
that starts nearly closed (sigmoid(-3) ~ 0.05), so a fresh layer barely perturbs its block.

Gradients: the stored entries are constants. ``Retrieval.scores`` are differentiable w.r.t. the
queries, so the retrieval projection learns through the score term of the attention logits; the
q/kv/out projections and the gate learn as in any attention layer.

Energy: every product here, the store's exact search included (a (B*T, capacity) matmul run
while this module is the innermost one), is an ordinary torch op, so ``aura.eval.energy`` counts
it without an ``energy_ops`` report (a FAISS search runs outside torch and is not counted; its
candidates' re-scoring is).

Causality is the caller's contract, kept by when entries are written (see ``remember``/``flush``
and the model that owns the layer): a forward never reads entries it wrote itself; and, given
each token's position in the corpus (``max_source_pos``), never an entry from later text.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from aura.memory.store import EpisodicStore


class MemoryCrossAttention(nn.Module):
    """``gate(h) * proj(attention(q(h), kv(top-k entries of retrieve(h))))`` for h (B, T, C).

    ``forward`` returns the residual update; ``remember`` queues h's chunk encodings and ``flush``
    writes them, so a training step's own chunks become readable only from the next forward on.
    """

    def __init__(self, n_embd: int, n_head: int, store: EpisodicStore, top_k: int, chunk: int,
                 dropout: float = 0.0, bias: bool = False, gate_init: float = -3.0):
        super().__init__()
        dim = store.dim_key
        if store.dim_value != dim:
            raise ValueError(f"the store must hold entries as both key and value, got "
                             f"{store.dim_key}-d keys and {store.dim_value}-d values")
        if top_k < 1 or chunk < 1:
            raise ValueError(f"top_k and chunk must be >= 1, got {top_k}, {chunk}")
        self.n_head, self.head_dim = n_head, n_embd // n_head
        self.store, self.top_k, self.chunk, self.gate_init = store, top_k, chunk, gate_init
        self.retrieve = nn.Linear(n_embd, dim, bias=False)
        self.q = nn.Linear(n_embd, n_embd, bias=bias)
        self.kv = nn.Linear(dim, 2 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.gate = nn.Linear(n_embd, 1)  # one gate per token, broadcast over channels
        self.score_weight = nn.Parameter(torch.tensor(1.0))
        self.drop = nn.Dropout(dropout)
        self._pending: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._metrics: dict[str, torch.Tensor] = {}
        self.reset_memory_parameters()

    def reset_memory_parameters(self) -> None:
        """Identity retrieval query (for entries this layer's own width; else N(0, 1/n_embd)) and
        a nearly closed gate; the owning model calls this again after its global init, which
        would otherwise overwrite them."""
        w = self.retrieve.weight
        if w.shape[0] == w.shape[1]:
            nn.init.eye_(w)
        else:
            nn.init.normal_(w, 0.0, w.shape[1] ** -0.5)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, self.gate_init)
        with torch.no_grad():
            self.score_weight.fill_(1.0)

    def _apply(self, fn: Any, recurse: bool = True) -> MemoryCrossAttention:
        """``.to(device)`` moves the bank with the weights (the store is not a module)."""
        super()._apply(fn, recurse)
        self.store.to(self.q.weight.device)
        return self

    # --- writing ------------------------------------------------------------------------------

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """Chunk encodings (B, T // chunk, C): the mean of h over each complete chunk."""
        B, T, C = h.shape
        n = T // self.chunk
        return h[:, :n * self.chunk].reshape(B, n, self.chunk, C).mean(2)

    @torch.no_grad()
    def remember(self, h: torch.Tensor, source_pos: torch.Tensor | None = None) -> None:
        """Queue h's chunk encodings for the next ``flush``, replacing any queued ones, so a
        gradient-checkpointing recompute re-queues the same entries instead of adding them twice.

        ``source_pos`` (B, T // chunk) is where each chunk came from (default: the store step).
        """
        self.queue(self.encode(h.detach().float()), source_pos)

    def queue(self, entries: torch.Tensor, source_pos: torch.Tensor | None = None) -> None:
        """Queue ready-made entries (..., dim_entry) for the next ``flush``, replacing any queued
        ones; ``source_pos`` has the entries' leading shape."""
        self._pending = (entries, source_pos)

    @torch.no_grad()
    def flush(self) -> int:
        """Write the queued entries as one store step (after one decay step); returns how many.

        Non-finite encodings (from a step the trainer will skip as non-finite) are dropped, so
        one bad batch cannot poison the bank. Only the newest ``capacity`` entries are kept.
        """
        if self._pending is None:
            return 0
        encodings, source_pos = self._pending
        self._pending = None
        entries = encodings.reshape(-1, encodings.size(-1))
        finite = torch.isfinite(entries).all(-1)
        entries = entries[finite][-self.store.capacity:]
        if entries.numel() == 0:
            return 0
        pos = None
        if source_pos is not None:
            pos = source_pos.reshape(-1).to(finite.device)[finite][-self.store.capacity:]
        step = self.store.step + 1
        self.store.decay_step()
        self.store.write(entries, entries, step=step, source_pos=pos)
        return entries.size(0)

    # --- reading ------------------------------------------------------------------------------

    def forward(self, h: torch.Tensor, max_source_pos: torch.Tensor | None = None
                ) -> torch.Tensor:
        """The gated memory read-out (B, T, C) to add to the residual stream; with
        ``max_source_pos`` (B, T) token (b, t) reads only entries whose ``source_pos`` is at most
        that (its own position in the corpus: no text after it)."""
        B, T, C = h.shape
        nh, hd, k = self.n_head, self.head_dim, self.top_k
        limit = None if max_source_pos is None else max_source_pos.reshape(B * T)
        # Only training reads count as use (recency, read boost): evaluation and generation
        # leave the bank exactly as they found it, so they cannot change what training evicts.
        got = self.store.read(self.retrieve(h).reshape(B * T, -1), k, max_source_pos=limit,
                              touch=self.training)
        hit = got.mask.view(B, T, 1, k)
        scores = got.scores.masked_fill(~got.mask, 0.0).view(B, T, 1, k).to(h.dtype)
        keys, values = self.kv(got.values.to(h.dtype)).view(B, T, k, 2, nh, hd).unbind(3)
        q = self.q(h).view(B, T, nh, hd)
        logits = torch.einsum("bthd,btkhd->bthk", q, keys) * hd**-0.5 + self.score_weight * scores
        logits = logits.masked_fill(~hit, float("-inf"))
        any_hit = hit.any(-1, keepdim=True)  # a token with no entry would softmax -inf only
        att = torch.softmax(logits.masked_fill(~any_hit, 0.0), dim=-1) * hit
        out = torch.einsum("bthk,btkhd->bthd", att, values).reshape(B, T, C)
        gate = torch.sigmoid(self.gate(h))  # (B, T, 1)
        with torch.no_grad():
            found = got.mask[:, 0]
            top = got.scores[:, 0].masked_fill(~found, 0.0).float()
            self._metrics = {
                "gate": gate.float().mean(),
                "top_score": top.sum() / found.sum().clamp(min=1),
                "hit_rate": got.mask.float().mean(),
            }
        return gate * self.drop(self.proj(out))

    def metrics(self) -> dict[str, torch.Tensor]:
        """The last read's detached mean ``gate``, mean best cosine ``top_score`` (over tokens
        that found an entry) and ``hit_rate`` (the fraction of top-k slots filled)."""
        if not self._metrics:
            raise RuntimeError("metrics are recorded by forward; call the module first")
        return dict(self._metrics)
