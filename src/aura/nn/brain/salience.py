"""Token STDP in Wernicke's attention (seed 001 §10: ``use_stdp``, ``stdp_alpha`` 0.2).

``aura.plasticity.TokenSTDP`` keeps one weight per vocabulary entry in [-1, 1]; here it scales
each token's attention keys by ``max(0, 1 + alpha * w[token])`` (the fused kernel's key gains,
as the hippocampal model's prosody gains), so a salient token's keys are longer and the
queries' preferences for or against it sharper. The rule, not backprop, moves the weights:
after each training forward, every predicted token whose surprise (its cross-entropy) is above
the batch's mean spiked and is potentiated, the others are depressed, one occurrence at a
time in order (``TokenSTDP.update``, exact). A forward reads the weights as they were before
it, so no token's gain depends on its own or a later position's surprise: the same rule as
the memories, which a forward writes only for the next ones to read.

The weights are a buffer of the module (``TokenSTDP``'s integers of 2**-24), so checkpoints
save them and a resumed run continues them bit-exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from aura.plasticity import TokenSTDP


class TokenSalience(nn.Module):
    """Per-token STDP weights and the key gains they give (see the module docstring)."""

    def __init__(self, vocab_size: int, n_head: int, alpha: float, lr_plus: float,
                 lr_minus: float):
        super().__init__()
        self.n_head = n_head
        self.rule = TokenSTDP(vocab_size, lr_plus=lr_plus, lr_minus=lr_minus, alpha=alpha)
        self.register_buffer("weights_q", self.rule.q)
        self._spike_rate = torch.zeros(())

    def _synced(self) -> TokenSTDP:
        """The rule, on the buffer as it is now (``.to()`` and loading replace or fill it)."""
        self.rule.q, self.rule.device = self.weights_q, self.weights_q.device
        return self.rule

    def gains(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(query, key) gains for ``idx`` (B, T), each (B, n_head, T, 1): queries unscaled,
        keys by the token's factor."""
        factor = self._synced().modulate(torch.ones(idx.shape, device=idx.device), idx)
        keys = factor[:, None, :, None].expand(-1, self.n_head, -1, -1)
        return torch.ones_like(keys), keys

    @torch.no_grad()
    def update(self, targets: torch.Tensor, logits: torch.Tensor) -> None:
        """One training forward's spikes: each predicted token (``targets`` >= 0) whose
        cross-entropy is above the forward's mean spiked."""
        flat = targets.reshape(-1)
        valid = flat >= 0
        if not bool(valid.any()):
            return
        ce = nn.functional.cross_entropy(logits.detach().float().reshape(flat.numel(), -1),
                                         flat, ignore_index=-1, reduction="none")[valid]
        spikes = (ce > ce.mean()).to(torch.int8)
        self._synced().update(flat[valid], spikes)
        self._spike_rate = spikes.float().mean()

    def metrics(self) -> dict[str, torch.Tensor]:
        w = self._synced().weights.float()
        return {"stdp_weight_mean": w.mean(), "stdp_weight_max": w.max(),
                "stdp_spike_rate": self._spike_rate}
