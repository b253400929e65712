"""The pre-LN decoder that `gpt`, `hippocampal` and `snn_rag` are built on (nanoGPT's):

    tokens -> wte (+ wpe, learned positions, unless the model brings its own) -> dropout
           -> blocks: x + attn(ln1(x)) [+ memory(ln_m(x))] + ffn(ln2(x))
           -> ln_f -> lm_head (tied to wte)

What the three share lives here once: the block, whose feed-forward the config picks (litgpt's
``mlp_class``: ``ffn="mlp"`` the GELU MLP, ``ffn="snn"`` spiking neurons of kind ``neuron``),
GPT-2's init, the KV cache, the context-length check, the gradient-checkpointing choice and the
tied head. What differs is what each model file shows: its embedding extras, its loop over the
blocks, its loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from aura.memory.writer import MemoryAccess
from aura.models.base import AuraModel, ModelConfig
from aura.nn.attention import CausalSelfAttention, KVCache, keeps_attention_weights
from aura.nn.dropout import Dropout
from aura.nn.memory_attention import MemoryCrossAttention
from aura.nn.mlp import MLP
from aura.nn.snn_ffn import SNNFeedForward, layer_firing_rates


def layer_norm_bytes(width: int) -> int:
    """What a LayerNorm keeps per row for backward: its input in fp32 (autocast runs it there)
    and two statistics."""
    return 4 * width + 8


def feed_forward(config: ModelConfig) -> MLP | SNNFeedForward:
    """The block's feed-forward as the config names it; only the chosen one is built."""
    if config.ffn == "snn":
        return SNNFeedForward(config.n_embd, 4 * config.n_embd, config.snn_steps, config.neuron,
                              config.dropout, config.bias)
    return MLP(config.n_embd, config.dropout, config.bias)


class Block(nn.Module):
    """``x + attn(ln1(x))``, then with a ``memory`` layer ``+ memory(ln_m(x))``, then
    ``+ ffn(ln2(x))``."""

    def __init__(self, config: ModelConfig, layer: int,
                 memory: MemoryCrossAttention | None = None):
        super().__init__()
        c = config
        self.ln1 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.attn = CausalSelfAttention(c.n_embd, c.n_head, c.dropout, c.bias, layer)
        self.ln_m = nn.LayerNorm(c.n_embd, bias=c.bias) if memory is not None else None
        self.memory = memory
        self.ln2 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.mlp = feed_forward(c)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                gains: tuple[torch.Tensor, torch.Tensor] | None = None,
                access: MemoryAccess | None = None) -> torch.Tensor:
        """``gains`` modulate the attention (see ``CausalSelfAttention``); ``access`` says what
        the memory layer may do this forward."""
        x = x + self.attn(self.ln1(x), cache, gains)
        if self.memory is not None and self.ln_m is not None and access is not None:
            h = self.ln_m(x)
            if access.write:
                self.memory.remember(h, access.positions, access.tokens, access.salience)
            if access.read:
                x = x + self.memory(h, access.positions)
        return x + self.mlp(self.ln2(x))


class Decoder(AuraModel):
    """The skeleton above; subclasses write ``forward`` from its parts."""

    cache_type: type[KVCache] = KVCache  # what ``new_cache`` builds

    def __init__(self, config: ModelConfig, *, learned_positions: bool = True,
                 memories: Mapping[int, MemoryCrossAttention] | None = None):
        super().__init__()
        assert config.vocab_size is not None
        c = self.config = config
        memories = memories or {}
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd) if learned_positions else None
        self.drop = Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c, i, memories.get(i)) for i in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's init: N(0, 0.02) for every Linear and Embedding, zero biases, and the blocks'
        residual projections (``*proj.weight``) at 0.02 / sqrt(2 n_layer), so the residual
        stream's variance does not grow with depth. Modules a subclass adds later initialise
        themselves."""
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.blocks.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, residual_std)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p, c = self.wte.weight, self.config
        return self.cache_type(c.n_layer, batch_size, c.n_head, min(max_len, c.block_size),
                               c.n_embd // c.n_head, p.device, p.dtype)

    def positions(self, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """The positions of ``idx``'s tokens (T,), after what ``cache`` holds; more than
        ``block_size`` tokens in all is an error."""
        start = cache.pos if cache is not None else 0
        end = start + idx.size(1)
        if end > self.config.block_size:
            raise ValueError(f"sequence of {end} tokens exceeds block_size "
                             f"{self.config.block_size}")
        if cache is not None:  # (B, T) for a cache whose rows sit at different positions
            return cache.positions(idx.size(1), idx.device)
        return torch.arange(start, end, device=idx.device)

    def run_block(self, block: Block, x: torch.Tensor, cache: KVCache | None,
                  gains: tuple[torch.Tensor, torch.Tensor] | None = None,
                  access: MemoryAccess | None = None) -> torch.Tensor:
        """One block, recomputed in backward when the trainer asked for gradient checkpointing
        (training without a cache only)."""
        if self.grad_checkpoint and self.training and cache is None:
            return checkpoint(block, x, None, gains, access, use_reentrant=False)
        return block(x, cache, gains, access)

    def head(self, x: torch.Tensor, cache: KVCache | None, last_only: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(final hidden states, logits): the cache moves past x's tokens, then the final
        LayerNorm and the tied head, on the last position only when ``last_only``."""
        if cache is not None:
            cache.pos += x.size(1)
        x = self.ln_f(x)
        return x, self.lm_head(x[:, -1:] if last_only else x)

    def activation_bytes(self, batch: int, seq: int, dtype: torch.dtype = torch.float32,
                         device_type: str = "cpu") -> int:
        """The blocks' saved tensors, then the ids, the final LayerNorm, the head's input and
        the log-softmax. With ``grad_checkpoint`` each block keeps only its input, and backward
        recomputes one block at a time, whose tensors and the gradients its backward makes
        measured 1.5 blocks' worth."""
        c = self.config
        blocks = [self.block_activation_bytes(i, seq, dtype, device_type)
                  for i in range(c.n_layer)]
        kept = (3 * max(blocks) // 2 + 4 * c.n_embd * c.n_layer if self.grad_checkpoint
                else sum(blocks))
        embedding_mask = 4 * c.n_embd if c.dropout > 0 else 0
        outside = (8 + embedding_mask + layer_norm_bytes(c.n_embd) + c.n_embd * dtype.itemsize
                   + 4 * c.vocab_size)  # type: ignore[operator]
        return batch * seq * (kept + outside)

    def block_activation_bytes(self, layer: int, seq: int, dtype: torch.dtype,
                               device_type: str) -> int:
        """Bytes per token block ``layer`` keeps for backward: LayerNorm inputs, each Linear's
        input, the attention kernel's tensors (q, k, v and output, or where the (T x T) weights are
        kept, q, k, v and those weights), the feed-forward's hidden activations, dropout masks
        (CPU keeps them in the input's dtype) and a memory layer's retrieved entries."""
        c, h = self.config, dtype.itemsize
        width, hidden, drop = c.n_embd, 4 * c.n_embd, c.dropout > 0
        attention = layer_norm_bytes(width) + 2 * width * h  # the qkv and proj inputs
        if keeps_attention_weights(device_type, dtype, c.dropout, seq):  # (+ mask, weights)
            w = h if device_type == "cpu" else 4  # written out in the dtype; MPS's math in fp32
            attention += 3 * width * w + c.n_head * seq * w * (3 if drop else 1)
        else:
            attention += 4 * width * h + 4 * c.n_head  # q, k, v, output; logsumexp
        ffn = layer_norm_bytes(width) + width * h  # the fc input
        if c.ffn == "mlp":
            ffn += 2 * hidden * h  # GELU's input and output
        elif c.neuron == "lif":
            ffn += 2 * hidden * h  # the fused kernel's surrogate sum; the rates
        else:
            ffn += (c.snn_steps + 1) * hidden * h  # GIF keeps its surrogate's input per step
        masks = 2 * width * h if drop else 0
        memory = self.blocks[layer].memory
        if memory is not None:
            store = memory.writer.store
            k, dim = memory.top_k, store.dim_key
            # LayerNorm, the read's input, q, output, projection; the k entries and their keys
            # and values; a causal mask over the bank
            memory_bytes = (layer_norm_bytes(width) + 4 * (4 * width + k * dim + 2 * k * width)
                            + store.capacity + 16 * k)
        else:
            memory_bytes = 0
        return attention + ffn + masks + memory_bytes

    def inspected_parts(self) -> dict[str, nn.Module]:
        """Every block's attention, its spiking feed-forward (``ffn=snn``) and its memory read."""
        parts: dict[str, nn.Module] = {}
        for i, block in enumerate(self.blocks):
            parts[f"attention/{i}"] = block.attn
            if isinstance(block.mlp, SNNFeedForward):
                parts[f"spikes/{i}"] = block.mlp
            if block.memory is not None:
                parts[f"memory/layer{i}"] = block.memory
        return parts

    def feed_forward_metrics(self) -> dict[str, torch.Tensor]:
        """With spiking feed-forwards, their firing rates of the last forward (mean and per
        layer), so a layer that falls silent or saturates shows up in the logs."""
        if self.config.ffn != "snn":
            return {}
        return layer_firing_rates([b.mlp for b in self.blocks])  # type: ignore[misc]
