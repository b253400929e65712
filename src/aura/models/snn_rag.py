"""`snn_rag`: a spiking transformer that retrieves from a memory bank of its own training text.

Seed 002's SNNRAGTransformer on Aura's engine: gpt's pre-LN decoder (learned positions, tied head,
the same init) whose feed-forwards are ``SNNFeedForward`` (spike rates instead of GELU) and whose
``memory_layers`` also hold a ``MemoryCrossAttention`` between self-attention and the FFN:

    x = x + attn(ln1(x));  x = x + memory(ln_m(x));  x = x + ffn(ln2(x))

Each memory layer owns an ``EpisodicStore`` of chunk encodings: with ``memory_encoder="self"``
(the default) the mean of its own normalised input over ``memory_chunk`` tokens, detached (the
model encodes its corpus itself); with ``"minilm"`` the all-MiniLM-L6-v2 sentence embedding of
the chunk's text (aura.memory.text_encoder, offline), which needs the text: such a bank is built
from the corpus (``build_memory``, run by ``on_train_start`` before a fresh run's first step and
by ``aura memory build``), never written by a forward.

Causality. A forward never reads an entry built from the text it is processing:

- Training: each forward queues its chunk encodings and writes them at the start of the *next*
  forward (``flush_memory``), so the bank a batch reads holds only earlier batches. A gradient-
  checkpointing recompute re-queues the same entries (it replaces, never adds) and reads the same
  bank, since nothing is written between a forward and its backward.
- Evaluation and generation never write, and their reads do not count as use (no recency or
  read boost): the bank is exactly as they found it, so a cached decode reads what the uncached
  re-run reads, evaluating never changes what training evicts, and no prefix of the current
  context is ever in the bank.
  (Within ``block_size`` self-attention already sees the whole context exactly; writing its chunks
  back would add no information, only a way to read positions out of order.)
- Corpus positions: the trainer passes ``corpus_pos``, each training window's offset in the train
  split (``wants_corpus_pos``). Entries carry the offset of their chunk's last token in
  ``source_pos``, and token t of a window reads only entries with ``source_pos <= corpus_pos +
  t``: text at or before it. So a random training window never retrieves an earlier batch's
  encoding of text that lies after it, nor a corpus-built (MiniLM) entry of its own future.
- ``build_memory`` fills the bank from a prepared split window by window in corpus order, with
  the same positions: each window reads only the windows before it.
- Validation and generation pass no positions and read the whole bank, which holds training
  text only (validation documents are never written to it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from aura.data.shards import PreparedData, SplitData
from aura.data.tokenizers import Tokenizer
from aura.errors import AuraError, ConfigError, DataError
from aura.memory.store import EpisodicStore
from aura.memory.text_encoder import MINILM_DIM, MiniLMEncoder
from aura.models.base import AuraModel, ModelConfig, ModelOutput, lm_loss, register_model
from aura.models.gpt import MLP, init_weights
from aura.nn.attention import CausalSelfAttention, KVCache
from aura.nn.memory_attention import MemoryCrossAttention
from aura.nn.snn_ffn import SNNFeedForward, layer_firing_rates


@dataclass
class SNNRAGConfig(ModelConfig):
    name: str = "snn_rag"
    ffn: Literal["mlp", "snn"] = "snn"
    """The blocks' feed-forward: "snn" (spiking neurons' firing rates) or "mlp", the retrieval
    without the spikes (an ablation)."""
    snn_steps: int = 4
    memory_layers: list[int] = field(default_factory=lambda: [-2])
    """Blocks with a memory read, counted from 0, or from the end when negative (-2: the second
    to last)."""
    memory_capacity: int = 4096
    """Entries in each memory layer's bank."""
    memory_top_k: int = 4
    """Entries each token attends over."""
    memory_chunk: int = 16
    """Tokens per entry; a window shorter than this writes none."""
    memory_decay: float = 0.03
    """Strength an entry loses per write step, in [0, 1)."""
    memory_index: Literal["exact", "faiss", "auto"] = "exact"
    """The bank's search: "exact" (torch's exact scan), "faiss" (needs faiss-cpu), or "auto"
    (FAISS for big CPU banks only)."""
    memory_encoder: Literal["self", "minilm"] = "self"
    """What an entry holds: "self" (the layer's own encoding of the chunk) or "minilm"
    (all-MiniLM-L6-v2's embedding of its text, filled from the corpus)."""

    def problems(self) -> list[str]:
        n, out = self.n_layer, []
        bad = [i for i in self.memory_layers if not -n <= i < n]
        if bad:
            out.append(f"model.memory_layers {bad} out of range for model.n_layer={n}")
        for key in ("memory_capacity", "memory_top_k", "memory_chunk"):
            if getattr(self, key) < 1:
                out.append(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.memory_decay < 1:
            out.append(f"model.memory_decay must be in [0, 1), got {self.memory_decay}")
        return out

    def memory_layer_indices(self) -> list[int]:
        """``memory_layers`` as sorted distinct indices in [0, n_layer) (negatives count from
        the top, as in Python)."""
        return sorted({i % self.n_layer for i in self.memory_layers})



class Block(nn.Module):
    def __init__(self, cfg: SNNRAGConfig, layer: int, store: EpisodicStore | None):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg.n_embd, cfg.n_head, cfg.dropout, cfg.bias, layer)
        self.ln_m = nn.LayerNorm(cfg.n_embd, bias=cfg.bias) if store is not None else None
        self.memory = (MemoryCrossAttention(cfg.n_embd, cfg.n_head, store, cfg.memory_top_k,
                                            cfg.memory_chunk, cfg.dropout, cfg.bias)
                       if store is not None else None)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp: MLP | SNNFeedForward
        if cfg.ffn == "snn":
            self.mlp = SNNFeedForward(cfg.n_embd, 4 * cfg.n_embd, cfg.snn_steps, cfg.neuron,
                                      cfg.dropout, cfg.bias)
        else:
            self.mlp = MLP(cfg.n_embd, cfg.dropout, cfg.bias)

    def forward(self, x: torch.Tensor, cache: KVCache | None, use_memory: bool, remember: bool,
                source_pos: torch.Tensor | None, read_limit: torch.Tensor | None
                ) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache)
        if self.memory is not None and self.ln_m is not None:
            h = self.ln_m(x)
            if remember:
                self.memory.remember(h, source_pos)
            if use_memory:
                x = x + self.memory(h, read_limit)
        return x + self.mlp(self.ln2(x))


@register_model("snn_rag", config=SNNRAGConfig)
class SNNRAG(AuraModel):
    wants_corpus_pos = True

    def __init__(self, config: SNNRAGConfig):
        super().__init__()
        assert config.vocab_size is not None
        problems = config.problems()
        if problems:
            raise ConfigError(problems[0])
        self.config = config
        self.memory_layers = config.memory_layer_indices()
        dim = MINILM_DIM if config.memory_encoder == "minilm" else config.n_embd
        stores = {i: EpisodicStore(dim, dim, config.memory_capacity, config.memory_decay,
                                   index=config.memory_index)
                  for i in self.memory_layers}
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i, stores.get(i)) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        init_weights(self, self.blocks, config.n_layer)
        for memory in self._memories():
            memory.reset_memory_parameters()

    def _memories(self) -> list[MemoryCrossAttention]:
        return [b.memory for b in self.blocks if b.memory is not None]

    def memory_stores(self) -> dict[str, EpisodicStore]:
        """The banks by layer; queued writes are applied first, so a checkpoint holds what the
        next forward would read."""
        self.flush_memory()
        return {f"layer{i}": b.memory.store for i, b in enumerate(self.blocks)
                if b.memory is not None}

    def on_train_start(self, data: PreparedData) -> None:
        """A MiniLM bank is built from the train split before the first step (a forward has
        only token ids, not the text MiniLM reads)."""
        if self.config.memory_encoder == "minilm":
            build_memory(self, data.split("train"), tokenizer=data.tokenizer)

    def flush_memory(self) -> None:
        """Write every memory layer's queued chunk encodings (from the previous training
        forward, or from ``build_memory``) into its bank."""
        for memory in self._memories():
            memory.flush()

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.wte.weight
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_head, min(max_len, c.block_size),
                       c.n_embd // c.n_head, p.device, p.dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, label_smoothing: float = 0.0,
                last_only: bool = False, use_memory: bool = True, remember: bool | None = None,
                corpus_pos: torch.Tensor | None = None, **state: Any) -> ModelOutput:
        """``use_memory=False`` skips every read; ``remember`` (default: training without a
        cache, self-encoded banks only) queues this input's chunks for the bank; ``corpus_pos``
        (B,) are the windows' corpus offsets: each token reads only entries from text at or
        before it, and written chunks carry their last token's offset as ``source_pos``."""
        self.flush_memory()
        if remember is None:
            remember = self.training and cache is None
        if remember and self.config.memory_encoder != "self":
            remember = False  # a MiniLM bank needs text: build_memory writes it
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size "
                             f"{self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        source_pos = read_limit = None
        if corpus_pos is not None:
            offsets = corpus_pos.to(idx.device).view(B, 1)
            read_limit = offsets + pos
            L = self.config.memory_chunk
            source_pos = offsets + torch.arange(1, T // L + 1, device=idx.device) * L - 1
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            if self.grad_checkpoint and self.training and cache is None:
                x = checkpoint(block, x, None, use_memory, remember, source_pos, read_limit,
                               use_reentrant=False)
            else:
                x = block(x, cache, use_memory, remember, source_pos, read_limit)
        if cache is not None:
            cache.pos += T
        x = self.ln_f(x)
        aux = self._aux(use_memory)
        if targets is None:
            return ModelOutput(self.lm_head(x[:, -1:] if last_only else x), None, aux)
        logits = self.lm_head(x)
        loss = lm_loss(logits, targets, label_smoothing)
        return ModelOutput(logits, loss, {"ce": loss.detach(), **aux})

    def _aux(self, read: bool) -> dict[str, torch.Tensor]:
        """Spike rate of the FFNs; per-bank fill, and when the banks were read, the mean gate,
        the mean best retrieval score and the fraction of top-k slots filled."""
        aux: dict[str, torch.Tensor] = {}
        if self.config.ffn == "snn":
            aux.update(layer_firing_rates([b.mlp for b in self.blocks]))
        memories = self._memories()
        if not memories:
            return aux
        aux["mem_fill"] = torch.stack([(m.store.ids >= 0).float().mean() for m in memories]).mean()
        if read:
            stats = [m.metrics() for m in memories]
            for key in ("gate", "top_score", "hit_rate"):
                aux[f"mem_{key}"] = torch.stack([s[key] for s in stats]).mean()
        return aux


@torch.no_grad()
def build_memory(model: AuraModel, split: SplitData, max_chunks: int | None = None,
                 batch_size: int = 8, tokenizer: Tokenizer | None = None) -> int:
    """Refill ``model``'s banks from a prepared split, encoded by the model itself (or, for a
    MiniLM bank, by MiniLM from the chunks' text, which ``tokenizer`` decodes).

    Non-overlapping ``block_size`` windows, evenly spread over the split when more than
    ``max_chunks`` (default and at most: the bank's capacity) entries would fit, run in corpus
    order with memory reads on, each batch's chunks written before the next batch runs: the
    bank a window reads holds only windows before it. Every entry's ``source_pos`` is its
    chunk's last token's offset in the split. Returns the entries written per bank.
    """
    if not isinstance(model, SNNRAG):
        raise AuraError(f"model {model.config.name!r} has no chunk memory to build")
    if (max_chunks is not None and max_chunks < 1) or batch_size < 1:
        raise AuraError(f"max_chunks and batch_size must be >= 1, got {max_chunks}, {batch_size}")
    cfg = model.config
    if cfg.memory_encoder == "minilm" and tokenizer is None:
        raise AuraError("a MiniLM memory bank is built from text: pass the corpus's tokenizer")
    encoder = MiniLMEncoder() if cfg.memory_encoder == "minilm" else None
    T, L = cfg.block_size, cfg.memory_chunk
    if T < L:
        raise AuraError(f"model.block_size {T} is shorter than one memory chunk ({L} tokens)")
    per_window = T // L
    budget = min(max_chunks or cfg.memory_capacity, cfg.memory_capacity)
    starts = np.cumsum([0] + [sh.n_tokens for sh in split.shards])
    windows = [(s, off, int(starts[s]) + off) for s, sh in enumerate(split.shards)
               for off in range(0, sh.n_tokens - T + 1, T)]
    if not windows:
        raise DataError(f"{split.name} split: no shard holds block_size = {T} tokens")
    wanted = max(1, budget // per_window)
    if len(windows) > wanted:
        picks = np.unique(np.linspace(0, len(windows) - 1, wanted).round().astype(int))
        windows = [windows[i] for i in picks]
    was_training = model.training
    model.eval()
    for store in model.memory_stores().values():
        store.clear()
    device = model.wte.weight.device
    maps = split.maps
    try:
        for i in range(0, len(windows), batch_size):
            batch = windows[i:i + batch_size]
            ids = np.stack([maps[s][off:off + T] for s, off, _ in batch]).astype(np.int64)
            where = torch.tensor([g for _, _, g in batch], device=device)
            if encoder is None:
                model(torch.from_numpy(ids).to(device), remember=True, corpus_pos=where)
            else:
                assert tokenizer is not None
                chunks = ids[:, :per_window * L].reshape(-1, L)
                entries = encoder.encode([tokenizer.decode(c.tolist()) for c in chunks])
                ends = where.view(-1, 1) + torch.arange(1, per_window + 1, device=device) * L - 1
                for memory in model._memories():
                    memory.queue(entries.view(len(batch), per_window, -1).to(device), ends)
            model.flush_memory()
    finally:
        model.train(was_training)
    return min(len(windows) * per_window, cfg.memory_capacity)
