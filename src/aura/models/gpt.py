"""`gpt`: a clean pre-LN decoder-only transformer, the control for every comparison.

nanoGPT's architecture (aura.models.decoder): learned positions, GELU MLP (or, with
``model.ffn=snn``, spiking feed-forwards), weight-tied head, N(0, 0.02) init with residual
projections scaled by 1/sqrt(2 * n_layer).
"""

from __future__ import annotations

import torch

from aura.models.base import ModelOutput, lm_loss, register_model
from aura.models.decoder import Decoder
from aura.nn.attention import KVCache


@register_model("gpt")
class GPT(Decoder):
    batched_decoding = True

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, label_smoothing: float = 0.0,
                last_only: bool = False) -> ModelOutput:
        pos = self.positions(idx, cache)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = self.run_block(block, x, cache)
        hidden, logits = self.head(x, cache, last_only and targets is None)
        aux = self.feed_forward_metrics()
        if targets is None:
            return ModelOutput(logits, None, aux, hidden)
        loss = lm_loss(logits, targets, label_smoothing)
        return ModelOutput(logits, loss, {"ce": loss.detach(), **aux}, hidden)
