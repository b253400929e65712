"""`hippocampal`: the Aura Hippocampal Transformer on Aura's engine.

gpt's pre-LN decoder with every hippocampal mechanism as a switch, so each can be ablated:

    tokens -> embedding (+ theta-gamma positions, or learned ones when off)
           -> place cells (sparse ~3% code, 0.1 residual) -> grid cells -> time cells
           -> blocks, attention modulated by prosody, the hippocampal memory recalled into the
              residual after block ``memory_layer``
           -> LayerNorm -> tied head;  loss = CE - entropy_reg * predictive entropy

A switched-off mechanism is never built: its parameters and its cost are gone. Prosody and the
event boundaries the time cells count from come with the batch from the data pipeline
(aura.data.prosody), so the model declares ``token_features = ("prosody",)`` when it needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from aura.data.prosody import N_FEATURES, PARAGRAPH, SENTENCE_END
from aura.memory.store import EpisodicStore
from aura.memory.writer import MemoryAccess, MemoryWriter, token_positions
from aura.models.base import ModelConfig, ModelOutput, lm_loss, register_model
from aura.models.decoder import Decoder
from aura.nn.attention import KVCache
from aura.nn.grid_cells import GridCellEncoder
from aura.nn.hippocampus import HippocampalMemory, recall_activation_bytes, store_problems
from aura.nn.oscillations import ThetaGammaEncoding
from aura.nn.place_cells import PlaceCellEncoder
from aura.nn.prosody_modulation import ProsodyModulation
from aura.nn.time_cells import TimeCellEncoder, elapsed_since

COMPONENTS = ("theta_gamma", "place_cells", "grid_cells", "time_cells", "prosody", "memory")
_ENTROPY_STRIDE = 16  # the entropy *metric* samples every 16th position (unbiased, 1/16 the cost)


@dataclass
class HippocampalConfig(ModelConfig):
    name: str = "hippocampal"
    # switches, one per mechanism (ablations turn them off one at a time)
    theta_gamma: bool = True
    """Theta-gamma oscillations (gamma cycles nested in theta, plus a bank of sinusoids) as the
    position encoding instead of learned embeddings; needs an even n_embd >= 6."""
    place_cells: bool = True
    """A sparse place-cell code of each token added to its embedding: the top
    place_active_fraction of n_place_cells cells fire."""
    grid_cells: bool = True
    """Multi-scale hexagonal grid-cell codes of where each token's state sits on a learned
    plane."""
    time_cells: bool = True
    """Log-spaced time cells coding how many tokens ago the last sentence or paragraph ended."""
    prosody: bool = True
    """Prosody of the text (punctuation, sentence ends, capitals, valence, ...) scales each
    head's queries and keys."""
    memory: bool = True
    """The episodic memory: the most novel token states are stored, and every token recalls its
    nearest memories into the residual stream after block memory_layer."""
    # the mechanisms' sizes
    n_place_cells: int = 2000
    """Place cells each token drives."""
    place_active_fraction: float = 0.03
    """Fraction of place cells that fire for a token (the strongest), in (0, 1]; about 3% fire
    in the hippocampus."""
    place_learnable: bool = False
    """Learn how many place cells fire (up to 4 times the initial count) instead of keeping
    place_active_fraction fixed."""
    grid_modules: int = 4
    """Grid-cell modules; each module's lattice spacing is ~1.42 times the previous one's."""
    grid_cells_per_module: int = 16
    """Grid cells per module, at phases spread evenly over its lattice."""
    n_time_cells: int = 32
    """Time cells, preferring log-spaced intervals since the last boundary; at least 2."""
    theta_period: float = 64.0
    """Tokens per theta cycle."""
    gammas_per_theta: int = 8
    """Gamma cycles nested in each theta cycle; a gamma cycle (theta_period / gammas_per_theta)
    must last at least 2 tokens."""
    memory_layer: int = -1
    """The block after which memories are recalled; -1: the middle one (n_layer // 2)."""
    memory_capacity: int = 4096
    """Memories the store holds; a full store evicts by importance and recency."""
    memory_dim: int = 64
    """Size of the learned keys memories are stored and recalled by."""
    memory_top_k: int = 8
    """Memories each token recalls, by cosine similarity of keys."""
    memory_decay: float = 0.03
    """Strength each memory loses per training step, in [0, 1)."""
    memory_decay_mode: Literal["fixed", "adaptive"] = "fixed"
    """How memories fade: "fixed" (each loses ``memory_decay`` of its strength per step) or
    "adaptive" (slower for memories novel when formed and for each recall; see
    aura.memory.store)."""
    memory_index: Literal["exact", "faiss", "auto"] = "exact"
    """The store's search: "exact" (torch's exact scan), "faiss" (needs faiss-cpu; IVF for
    big stores), or "auto" (FAISS for big CPU stores only), as snn_rag's banks."""
    memory_graph_k: int = 4
    """Cognitive-map neighbours of a token's best match that join its recall (spreading
    activation); 0: no map."""
    memory_writes: int = 64
    """Memories formed per training step, from the batch's most novel token states; at most
    memory_capacity."""
    memory_tied_key: bool = False
    """Write memories keyed by the read's own trained query projection instead of a separate
    key projection (which gets no gradient, memories being written without one, and so stays
    random): a state then finds the memories of states like it."""
    entropy_reg: float = 0.0
    """Weight of a bonus for the entropy of the predicted next-token distributions, which
    counters collapse onto a few tokens; 0: off."""

    def problems(self) -> list[str]:
        out = []
        if not -1 <= self.memory_layer < self.n_layer:
            out.append(f"model.memory_layer must be -1 or in [0, {self.n_layer}), "
                       f"got {self.memory_layer}")
        if not 0 < self.place_active_fraction <= 1:
            out.append(f"model.place_active_fraction must be in (0, 1], got "
                       f"{self.place_active_fraction}")
        if self.memory_writes > self.memory_capacity:
            out.append(f"model.memory_writes ({self.memory_writes}) exceeds "
                       f"model.memory_capacity ({self.memory_capacity})")
        sizes = {"n_place_cells": self.n_place_cells, "grid_modules": self.grid_modules,
                 "grid_cells_per_module": self.grid_cells_per_module, "memory_dim":
                 self.memory_dim, "memory_top_k": self.memory_top_k, "memory_capacity":
                 self.memory_capacity, "memory_writes": self.memory_writes}
        out += [f"model.{k} must be > 0, got {v}" for k, v in sizes.items() if v <= 0]
        if self.n_time_cells < 2:
            out.append(f"model.n_time_cells must be >= 2, got {self.n_time_cells}")
        out += store_problems(self.memory_capacity, self.memory_decay, self.memory_graph_k)
        if self.entropy_reg < 0:
            out.append(f"model.entropy_reg must be >= 0, got {self.entropy_reg}")
        if self.theta_gamma and (self.n_embd < 6 or self.n_embd % 2):
            out.append("model.theta_gamma needs an even model.n_embd >= 6")
        return out



class HippocampalCache(KVCache):
    """Keys and values, plus each row's latest event boundary (for the time cells)."""

    row_state = ("last_boundary",)

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype):
        super().__init__(n_layer, batch_size, n_head, max_len, head_dim, device, dtype)
        self.last_boundary = torch.zeros(batch_size, dtype=torch.long, device=device)

    def reset(self) -> None:
        super().reset()
        self.last_boundary.zero_()


def time_since_event(prosody: torch.Tensor, pos: torch.Tensor, cache: HippocampalCache | None
                     ) -> torch.Tensor:
    """(B, T) tokens since each token's latest sentence or paragraph end (from the prosody
    features), carried across a cache's windows: what time cells are tuned to. ``pos`` is (T,),
    or (B, T) from a cache whose rows sit at their own positions."""
    boundary = (prosody[..., SENTENCE_END] > 0.5) | (prosody[..., PARAGRAPH] > 0.5)
    start, previous = (cache.pos, cache.last_boundary) if cache is not None else (0, None)
    elapsed = elapsed_since(boundary, pos[:, :1] if pos.dim() == 2 else start, previous)
    if cache is not None:
        cache.last_boundary = pos[..., -1] - elapsed[:, -1]
    return elapsed


def predictive_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the predicted next-token distributions at scored positions."""
    logp = F.log_softmax(logits.float(), dim=-1)
    scored = targets >= 0
    return -(logp.exp() * logp).sum(-1).mul(scored).sum() / scored.sum().clamp(min=1)


@register_model("hippocampal", config=HippocampalConfig)
class HippocampalTransformer(Decoder):
    cache_type = HippocampalCache
    batched_decoding = True  # the cache through KVCache's methods and its row_state only
    has_memory_switch = True  # train.memory_warmup_steps keeps recall off at the start

    def __init__(self, config: HippocampalConfig):
        c = config
        # gpt's decoder and init; each hippocampal module below initialises itself
        super().__init__(c, learned_positions=not c.theta_gamma)
        self.token_features = ("prosody",) if c.prosody or c.time_cells else ()
        self.wants_corpus_pos = c.memory  # memories then hide text after each token
        self.wants_memory_floor = c.memory  # train.memory_stream: ... and other documents
        self.remembers_at_inference = c.memory
        self.remembers_by_salience = c.memory
        self.theta_gamma = (ThetaGammaEncoding(c.n_embd, c.theta_period, c.gammas_per_theta)
                            if c.theta_gamma else None)
        self.place = (PlaceCellEncoder(c.n_embd, c.n_place_cells, c.place_active_fraction,
                                       c.place_learnable) if c.place_cells else None)
        self.grid = (GridCellEncoder(c.n_embd, c.grid_modules, c.grid_cells_per_module)
                     if c.grid_cells else None)
        self.time = TimeCellEncoder(c.n_embd, c.n_time_cells) if c.time_cells else None
        self.prosody = (nn.ModuleList(ProsodyModulation(N_FEATURES, c.n_head)
                                      for _ in range(c.n_layer)) if c.prosody else None)
        self.memory_at = c.n_layer // 2 if c.memory_layer < 0 else c.memory_layer
        self.memory = None
        if c.memory:
            store = EpisodicStore(c.memory_dim, c.n_embd, c.memory_capacity, c.memory_decay,
                                  graph_k=c.memory_graph_k, index=c.memory_index,
                                  decay_mode=c.memory_decay_mode)
            self.writers = {"hippocampus": MemoryWriter(store)}
            self.memory = HippocampalMemory(c.n_embd, self.writers["hippocampus"],
                                            c.memory_top_k, c.memory_writes,
                                            tied_key=c.memory_tied_key)

    def _encode(self, idx: torch.Tensor, pos: torch.Tensor, cache: HippocampalCache | None,
                prosody: torch.Tensor | None) -> torch.Tensor:
        """Token + position embedding, then the place, grid and time-cell codes."""
        x = self.wte(idx)
        if self.theta_gamma is not None:
            x = x + self.theta_gamma(pos, dtype=x.dtype)
        else:
            x = x + self.wpe(pos)
        x = self.drop(x)
        if self.place is not None:
            x = self.place(x)
        if self.grid is not None:
            x = self.grid(x)
        if self.time is not None:
            assert prosody is not None
            x = self.time(x, time_since_event(prosody, pos, cache))
        return x

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: HippocampalCache | None = None, label_smoothing: float = 0.0,
                last_only: bool = False, prosody: torch.Tensor | None = None,
                use_memory: bool = True, corpus_pos: torch.Tensor | None = None,
                remember: bool | None = None, memory_salience: torch.Tensor | None = None,
                memory_floor: torch.Tensor | None = None) -> ModelOutput:
        """``prosody`` (B, T, N_FEATURES) comes from the data pipeline; with a cache it is the
        new tokens' rows, and the cache remembers the last boundary the time cells count from.
        ``corpus_pos`` (B,), the windows' corpus offsets (training), keeps memory reads to text
        before each token. Training forms memories (``remember``, default: training without a
        cache; True also at inference); they are written as the next forward starts.
        ``memory_salience`` (B, T) makes those the tokens of positive salience.
        ``memory_floor`` (B, T), each token's document start in the corpus
        (``train.memory_stream``), hides memories formed before it.
        """
        B, T = idx.shape
        self.flush_memory()
        pos = self.positions(idx, cache)
        if self.token_features and (prosody is None or prosody.shape != (B, T, N_FEATURES)):
            raise ValueError(f"the hippocampal model needs prosody of shape {(B, T, N_FEATURES)}"
                             f" from the data pipeline, got "
                             f"{None if prosody is None else tuple(prosody.shape)}")
        if remember is None:
            remember = self.training and cache is None
        access = MemoryAccess(read=use_memory, write=remember and self.memory is not None,
                              positions=token_positions(corpus_pos, pos), tokens=idx,
                              salience=memory_salience, floor=memory_floor)
        x = self._encode(idx, pos, cache, prosody)
        for i, block in enumerate(self.blocks):
            gains = self.prosody[i](prosody) if self.prosody is not None else None
            x = self.run_block(block, x, cache, gains)
            if i == self.memory_at and self.memory is not None:
                x = self.memory(x, access)
        hidden, logits = self.head(x, cache, last_only and targets is None)
        if targets is None:
            return ModelOutput(logits, None, self.metrics(), hidden)
        ce = lm_loss(logits, targets, label_smoothing)
        reg = self.config.entropy_reg
        if reg:
            entropy = predictive_entropy(logits, targets)
            loss = ce - reg * entropy
        else:  # a metric only: every position's would cost ~8% of a 157M step at vocab 32k
            with torch.no_grad():
                s = _ENTROPY_STRIDE
                entropy, loss = predictive_entropy(logits[:, ::s], targets[:, ::s]), ce
        return ModelOutput(logits, loss, {"ce": ce.detach(), "entropy": entropy.detach(),
                                          **self.metrics()}, hidden)

    def block_activation_bytes(self, layer: int, seq: int, dtype: torch.dtype,
                               device_type: str) -> int:
        """The decoder block's, plus, with prosody, the modulated queries and keys and the
        gains."""
        c = self.config
        modulation = 2 * c.n_embd * dtype.itemsize + 16 * c.n_head if self.prosody else 0
        return super().block_activation_bytes(layer, seq, dtype, device_type) + modulation

    def activation_bytes(self, batch: int, seq: int, dtype: torch.dtype = torch.float32,
                         device_type: str = "cpu") -> int:
        """The decoder's, plus per token what the place, grid and time cells, the prosody
        features, the memory's recall and the entropy bonus keep."""
        c = self.config
        extra = 4 * N_FEATURES if self.token_features else 0
        if self.place is not None:  # the drives' input, the winners' ids and weights
            extra += 4 * c.n_embd + 12 * self.place.k_max + 24
        if self.grid is not None:  # the plane's input, three waves per cell, the code
            extra += 4 * c.n_embd + 20 * c.grid_modules * c.grid_cells_per_module + 8
        if self.time is not None:
            extra += 4 * c.n_time_cells + 40
        if c.entropy_reg:  # the entropy of every position's prediction
            extra += 8 * c.vocab_size  # type: ignore[operator]
        recall = 0 if self.memory is None else recall_activation_bytes(
            batch * seq, c.n_embd, c.memory_top_k, c.memory_graph_k, c.memory_dim,
            c.memory_capacity)
        return (super().activation_bytes(batch, seq, dtype, device_type) + batch * seq * extra
                + recall)

    def inspected_parts(self) -> dict[str, nn.Module]:
        """The decoder's, plus each hippocampal mechanism that is switched on."""
        parts = super().inspected_parts()
        named = {"theta_gamma": self.theta_gamma, "place": self.place, "grid": self.grid,
                 "time": self.time, "memory/hippocampus": self.memory}
        return parts | {name: m for name, m in named.items() if m is not None}

    def metrics(self) -> dict[str, torch.Tensor]:
        """Place-cell sparsity, memory recall statistics and (``ffn=snn``) the spiking FFNs'
        firing rates of the last forward."""
        out = self.feed_forward_metrics()
        if self.place is not None:
            out.update(self.place.metrics())
        if self.memory is not None:
            out.update(self.memory.metrics())
        return out
