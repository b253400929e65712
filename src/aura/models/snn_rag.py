"""`snn_rag`: a spiking transformer that retrieves from a memory bank of its own training text.

gpt's pre-LN decoder (learned positions, tied head, the same init) whose feed-forwards are
``SNNFeedForward`` (spike rates instead of GELU) and whose ``memory_layers`` also hold a
``MemoryCrossAttention`` between self-attention and the FFN:

    x = x + attn(ln1(x));  x = x + memory(ln_m(x));  x = x + ffn(ln2(x))

Each memory layer reads a bank (an ``EpisodicStore`` the model writes through its
``MemoryWriter``) of chunk encodings: with ``memory_encoder="self"``
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
from typing import Literal

import torch

from aura.data.shards import PreparedData, SplitData
from aura.data.tokenizers import Tokenizer
from aura.errors import ConfigError
from aura.memory.build import fill_chunk_memory
from aura.memory.http_encoder import HTTPEncoder
from aura.memory.store import EpisodicStore
from aura.memory.text_encoder import MINILM_DIM
from aura.memory.writer import MemoryAccess, MemoryWriter, token_positions
from aura.models.base import ModelConfig, ModelOutput, lm_loss, register_model
from aura.models.decoder import Decoder
from aura.nn.attention import KVCache
from aura.nn.memory_attention import MemoryCrossAttention


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
    memory_decay_mode: Literal["fixed", "adaptive"] = "fixed"
    """How memories fade: "fixed" (each loses ``memory_decay`` of its strength per step) or
    "adaptive" (slower for memories novel when formed and for each recall; see
    aura.memory.store)."""
    memory_index: Literal["exact", "faiss", "auto"] = "exact"
    """The bank's search: "exact" (torch's exact scan), "faiss" (needs faiss-cpu), or "auto"
    (FAISS for big CPU banks only)."""
    memory_encoder: Literal["self", "minilm", "http"] = "self"
    """What an entry holds: "self" (the layer's own encoding of the chunk), "minilm"
    (all-MiniLM-L6-v2's embedding of its text, filled from the corpus) or "http" (an
    OpenAI-compatible embeddings endpoint's, cached on disk; the key comes from
    AURA_EMBEDDINGS_KEY)."""
    memory_encoder_url: str = ""
    """The "http" encoder's base URL (e.g. https://openrouter.ai/api/v1); empty: the
    AURA_EMBEDDINGS_URL environment variable."""
    memory_encoder_model: str = ""
    """The "http" encoder's model name; empty: AURA_EMBEDDINGS_MODEL."""
    memory_encoder_dim: int = 1536
    """Width of the "http" encoder's embeddings (1536 for text-embedding-3-small)."""

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



@register_model("snn_rag", config=SNNRAGConfig)
class SNNRAG(Decoder):
    wants_corpus_pos = True
    has_memory_switch = True
    batched_decoding = True

    def __init__(self, config: SNNRAGConfig):
        problems = config.problems()
        if problems:
            raise ConfigError(problems[0])
        layers = config.memory_layer_indices()
        dim = {"minilm": MINILM_DIM, "http": config.memory_encoder_dim}.get(
            config.memory_encoder, config.n_embd)
        writers = {i: MemoryWriter(EpisodicStore(dim, dim, config.memory_capacity,
                                                 config.memory_decay, index=config.memory_index,
                                                 decay_mode=config.memory_decay_mode))
                   for i in layers}
        memories = {i: MemoryCrossAttention(config.n_embd, config.n_head, writers[i],
                                            config.memory_top_k, config.memory_chunk,
                                            config.dropout, config.bias)
                    for i in layers}
        super().__init__(config, memories=memories)
        self.memory_layers = layers
        self.writers = {f"layer{i}": writers[i] for i in layers}
        # a MiniLM bank needs the text, which a forward does not see: only build_memory fills it
        self.writes_own_memory = config.memory_encoder == "self"
        self.remembers_at_inference = self.writes_own_memory
        self.remembers_by_salience = self.writes_own_memory  # aura learn sets importance
        for memory in memories.values():  # the GPT-2 init overwrote their identity query
            memory.reset_memory_parameters()

    def on_train_start(self, data: PreparedData) -> None:
        """A MiniLM bank is built from the train split before the first step (a forward has
        only token ids, not the text MiniLM reads)."""
        if self.config.memory_encoder != "self":
            self.build_memory(data.split("train"), data.tokenizer)

    def build_memory(self, split: SplitData, tokenizer: Tokenizer | None = None,
                     max_chunks: int | None = None, batch_size: int = 8) -> int:
        """Refill the banks from ``split``: encoded by the model itself, window by window in
        corpus order with memory reads on (aura.memory.build), or by MiniLM from the chunks'
        text, which ``tokenizer`` decodes."""
        def encode(ids: torch.Tensor, where: torch.Tensor) -> None:
            self(ids, remember=True, corpus_pos=where)

        was_training = self.training
        self.eval()
        try:
            return fill_chunk_memory(
                list(self.writers.values()), split, window=self.config.block_size,
                chunk=self.config.memory_chunk, device=self.wte.weight.device,
                encode=encode if self.writes_own_memory else None, tokenizer=tokenizer,
                text_encoder=self._text_encoder(),
                max_chunks=max_chunks, batch_size=batch_size)
        finally:
            self.train(was_training)

    def _text_encoder(self) -> HTTPEncoder | None:
        """The "http" encoder (MiniLM is fill_chunk_memory's default), None otherwise."""
        c = self.config
        if c.memory_encoder != "http":
            return None
        return HTTPEncoder(c.memory_encoder_dim, c.memory_encoder_url or None,
                           c.memory_encoder_model or None)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, label_smoothing: float = 0.0,
                last_only: bool = False, use_memory: bool = True, remember: bool | None = None,
                corpus_pos: torch.Tensor | None = None,
                memory_salience: torch.Tensor | None = None) -> ModelOutput:
        """``use_memory=False`` skips every read; ``remember`` (default: training without a
        cache, self-encoded banks only) queues this input's chunks for the bank; ``corpus_pos``
        (B,) are the windows' corpus offsets: each token reads only entries from text at or
        before it, and written chunks carry their last token's offset as ``source_pos``;
        ``memory_salience`` (B, T) keeps the chunks holding a salient token (see
        ``MemoryCrossAttention.remember``)."""
        self.flush_memory()
        if remember is None:
            remember = self.training and cache is None
        pos = self.positions(idx, cache)
        access = MemoryAccess(read=use_memory, write=remember and self.writes_own_memory,
                              positions=token_positions(corpus_pos, pos), tokens=idx,
                              salience=memory_salience)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = self.run_block(block, x, cache, None, access)
        hidden, logits = self.head(x, cache, last_only and targets is None)
        aux = self._aux(use_memory)
        if targets is None:
            return ModelOutput(logits, None, aux, hidden)
        loss = lm_loss(logits, targets, label_smoothing)
        return ModelOutput(logits, loss, {"ce": loss.detach(), **aux}, hidden)

    def _aux(self, read: bool) -> dict[str, torch.Tensor]:
        """Spike rate of the FFNs; per-bank fill, and when the banks were read, the mean gate,
        the mean best retrieval score and the fraction of top-k slots filled."""
        aux = self.feed_forward_metrics()
        memories = [b.memory for b in self.blocks if b.memory is not None]
        if not memories:
            return aux
        aux["mem_fill"] = torch.stack([(w.store.ids >= 0).float().mean()
                                       for w in self.writers.values()]).mean()
        if read:
            stats = [m.metrics() for m in memories]
            for key in ("gate", "top_score", "hit_rate"):
                aux[f"mem_{key}"] = torch.stack([s[key] for s in stats]).mean()
        return aux
