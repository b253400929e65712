"""`gpt`: a clean pre-LN decoder-only transformer, the control for every comparison.

nanoGPT's architecture: learned positions, GELU MLP, weight-tied head, N(0, 0.02) init with
residual projections scaled by 1/sqrt(2 * n_layer).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from aura.models.base import AuraModel, ModelConfig, ModelOutput, lm_loss, register_model
from aura.nn.attention import CausalSelfAttention, KVCache
from aura.nn.snn_ffn import SNNFeedForward, layer_firing_rates


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg.n_embd, cfg.n_head, cfg.dropout, cfg.bias, layer)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp: MLP | SNNFeedForward
        if cfg.ffn == "snn":
            self.mlp = SNNFeedForward(cfg.n_embd, 4 * cfg.n_embd, cfg.snn_steps,
                                      dropout=cfg.dropout, bias=cfg.bias)
        else:
            self.mlp = MLP(cfg.n_embd, cfg.dropout, cfg.bias)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                gains: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, gains)
        return x + self.mlp(self.ln2(x))


def init_weights(model: nn.Module, blocks: nn.Module, n_layer: int) -> None:
    """GPT-2's init, shared by the decoders built on gpt's blocks: N(0, 0.02) for every Linear
    and Embedding, zero biases, and the blocks' residual projections (``*proj.weight``) at
    0.02 / sqrt(2 n_layer), so the residual stream's variance does not grow with depth."""
    model.apply(GPT._init)
    residual_std = 0.02 / math.sqrt(2 * n_layer)
    for name, p in blocks.named_parameters():
        if name.endswith("proj.weight"):
            nn.init.normal_(p, 0.0, residual_std)


@register_model("gpt")
class GPT(AuraModel):
    def __init__(self, config: ModelConfig):
        super().__init__()
        assert config.vocab_size is not None
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        init_weights(self, self.blocks, config.n_layer)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.wte.weight
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_head, min(max_len, c.block_size),
                       c.n_embd // c.n_head, p.device, p.dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, label_smoothing: float = 0.0,
                last_only: bool = False, **state: Any) -> ModelOutput:
        T = idx.size(1)
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size "
                             f"{self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            if self.grad_checkpoint and self.training and cache is None:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache)
        if cache is not None:
            cache.pos += T
        x = self.ln_f(x)
        if targets is None:
            return ModelOutput(self.lm_head(x[:, -1:] if last_only else x))
        logits = self.lm_head(x)
        loss = lm_loss(logits, targets, label_smoothing)
        aux = {"ce": loss.detach()}
        if self.config.ffn == "snn":  # so the trainer logs how sparse the spiking FFNs are
            aux.update(layer_firing_rates([b.mlp for b in self.blocks]))
        return ModelOutput(logits, loss, aux)
