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

Writes go through the model's ``MemoryWriter`` (aura.memory.writer): ``remember`` queues this
forward's chunk encodings, written when the model's next forward starts, so a forward never reads
entries it wrote itself; and, given each token's corpus position, a token never reads an entry
from later text.
"""

from __future__ import annotations

import torch
from torch import nn

from aura.memory.store import SNIPPET_TOKENS
from aura.memory.writer import MemoryWriter, snippets
from aura.nn.dropout import Dropout


class MemoryCrossAttention(nn.Module):
    """``gate(h) * proj(attention(q(h), kv(top-k entries of retrieve(h))))`` for h (B, T, C).

    ``forward`` returns the residual update; ``remember`` queues h's chunk encodings with the
    model's ``writer``, so a training step's own chunks become readable only from the next forward.
    """

    def __init__(self, n_embd: int, n_head: int, writer: MemoryWriter, top_k: int, chunk: int,
                 dropout: float = 0.0, bias: bool = False, gate_init: float = -3.0):
        super().__init__()
        store = writer.store
        dim = store.dim_key
        if store.dim_value != dim:
            raise ValueError(f"the store must hold entries as both key and value, got "
                             f"{store.dim_key}-d keys and {store.dim_value}-d values")
        if top_k < 1 or chunk < 1:
            raise ValueError(f"top_k and chunk must be >= 1, got {top_k}, {chunk}")
        self.n_head, self.head_dim = n_head, n_embd // n_head
        self.writer, self.top_k, self.chunk, self.gate_init = writer, top_k, chunk, gate_init
        self.retrieve = nn.Linear(n_embd, dim, bias=False)
        self.q = nn.Linear(n_embd, n_embd, bias=bias)
        self.kv = nn.Linear(dim, 2 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.gate = nn.Linear(n_embd, 1)  # one gate per token, broadcast over channels
        self.score_weight = nn.Parameter(torch.tensor(1.0))
        self.drop = Dropout(dropout)
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

    # --- writing ------------------------------------------------------------------------------

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """Chunk encodings (B, T // chunk, C): the mean of h over each complete chunk."""
        B, T, C = h.shape
        n = T // self.chunk
        return h[:, :n * self.chunk].reshape(B, n, self.chunk, C).mean(2)

    @torch.no_grad()
    def remember(self, h: torch.Tensor, positions: torch.Tensor | None = None,
                 tokens: torch.Tensor | None = None, salience: torch.Tensor | None = None
                 ) -> None:
        """Queue h's chunk encodings, each at the corpus position of its last token (from
        ``positions`` (B, T); default: the store's step) and, given the ``tokens`` (B, T), with
        the text ending at that token. Given ``salience`` (B, T) (``aura learn``), only the
        chunks holding a token of positive salience, each with its largest as importance, so
        a full bank evicts the least salient first."""
        B, T, _ = h.shape
        n = T // self.chunk
        keys = self.encode(h.detach().float())
        ends = None if positions is None else positions[:, self.chunk - 1::self.chunk][:, :n]
        source = None
        if tokens is not None:
            source = snippets(tokens, SNIPPET_TOKENS)[:, self.chunk - 1::self.chunk][:, :n]
        importance = None
        if salience is not None:
            peak = salience[:, :n * self.chunk].reshape(B, n, self.chunk).amax(2).float()
            keep = peak > 0
            keys, importance = keys[keep], peak[keep]
            ends = None if ends is None else ends[keep]
            source = None if source is None else source[keep]
        self.writer.queue(keys, importance=importance, source_pos=ends, source_tokens=source)

    # --- reading ------------------------------------------------------------------------------

    def forward(self, h: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The gated memory read-out (B, T, C) to add to the residual stream; given the tokens'
        corpus ``positions`` (B, T), token (b, t) reads only entries whose ``source_pos`` is at
        most its own: no text after it."""
        B, T, C = h.shape
        nh, hd, k = self.n_head, self.head_dim, self.top_k
        limit = None if positions is None else positions.reshape(B * T)
        # Only training reads count as use (recency, read boost): evaluation and generation
        # leave the bank exactly as they found it, so they cannot change what training evicts.
        got = self.writer.store.read(self.retrieve(h).reshape(B * T, -1), k,
                                     max_source_pos=limit, touch=self.training)
        hit = got.mask.view(B, T, 1, k)
        scores = got.scores.masked_fill(~got.mask, 0.0).view(B, T, 1, k).to(h.dtype)
        keys, values = (t.view(B, T, k, nh, hd)  # split: one copy in the backward, as in attention
                        for t in self.kv(got.values.to(h.dtype)).split(C, dim=-1))
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
