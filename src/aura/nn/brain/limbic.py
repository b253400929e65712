"""The limbic/endocrine system: a three-hormone state that modulates named training quantities.

Hormones (buffers, saved with the checkpoint, so a resumed run continues the same state):

    arousal  in [0, 1], neutral 0.5: the text's own arousal (the prosody channel) plus surprise
    valence  in [-1, 1], neutral 0:  the text's valence (the prosody channel)
    stress   in [0, 1], neutral 0.5: novelty, the model's surprise (its training cross-entropy)
             against its slow running average; 0.5 when it is as surprised as usual

Each follows its drive with an exponential moving average (``rate`` per training forward). The
drive is a fixed, documented function: the hormones are a control signal, not something
backprop should learn to game. Each modulated quantity is ``1 + range * signal`` with the
signal in [-1, 1], so it stays in ``[1 - range, 1 + range]``; a range of 0 switches that
modulation off. For the first ``warmup`` training steps (seed 000: 1000) every hormone stays
neutral and every multiplier is exactly 1; the surprise averages are tracked throughout, so the
state is calibrated when the warmup ends.
"""

from __future__ import annotations

import torch
from torch import nn

from aura.data.prosody import FEATURES

AROUSAL, VALENCE = FEATURES.index("arousal"), FEATURES.index("valence")
NEUTRAL = (0.5, 0.0, 0.5)  # arousal, valence, stress
MODULATED = ("lr", "memory_write", "dropout", "temperature", "top_k")
_SLOW = 0.01  # the slow surprise average's rate: ~100 forwards
_STRESS_GAIN = 10.0  # stress = sigmoid(10 * (surprise / usual - 1)): 10% above usual -> 0.73


class LimbicSystem(nn.Module):
    """Hormone state and the bounded multipliers it sets (see the module docstring)."""

    def __init__(self, ranges: dict[str, float], warmup: int, rate: float = 0.05):
        super().__init__()
        unknown = set(ranges) - set(MODULATED)
        if unknown:
            raise ValueError(f"unknown modulated quantities {sorted(unknown)}")
        self.ranges = {name: float(ranges.get(name, 0.0)) for name in MODULATED}
        self.warmup, self.rate = warmup, rate
        self.register_buffer("hormones", torch.tensor(NEUTRAL))
        # fast and slow averages of the training cross-entropy; 0 = not yet seen
        self.register_buffer("surprise", torch.zeros(2))
        self.register_buffer("clock", torch.zeros((), dtype=torch.long))

    def set_step(self, step: int) -> None:
        """The trainer's step (``AuraModel.on_step``): the warmup counts these."""
        self.clock.fill_(step)

    @property
    def warming_up(self) -> bool:
        return int(self.clock) < self.warmup

    def signals(self) -> dict[str, torch.Tensor]:
        """Each modulated quantity's signal in [-1, 1] from the hormones: arousal raises the
        learning rate and the sampling temperature, stress (novelty) opens the memory-write
        gate and raises dropout; at generation arousal also widens top-k (more candidates
        for a hotter sampler)."""
        arousal, _valence, stress = self.hormones.unbind()
        return {"lr": 2 * arousal - 1, "memory_write": 2 * stress - 1,
                "dropout": 2 * stress - 1, "temperature": 2 * arousal - 1,
                "top_k": 2 * arousal - 1}

    def multiplier(self, name: str) -> float:
        """``1 + range * signal`` for quantity ``name``, in [1 - range, 1 + range]; exactly 1
        while warming up or with a range of 0."""
        r = self.ranges[name]
        if r == 0.0 or self.warming_up:
            return 1.0
        return 1.0 + r * float(self.signals()[name].clamp(-1.0, 1.0))

    @torch.no_grad()
    def update(self, ce: torch.Tensor, prosody: torch.Tensor | None) -> None:
        """One training forward's drive: its cross-entropy and the batch's mean prosody."""
        ce = ce.detach().float()
        if not torch.isfinite(ce):
            return  # a step the trainer skips must not move the state
        s = self.surprise
        if float(s[1]) == 0.0:
            s.fill_(float(ce))
        s[0].lerp_(ce, self.rate)
        s[1].lerp_(ce, _SLOW)
        if self.warming_up:
            return
        stress = torch.sigmoid(_STRESS_GAIN * (s[0] / s[1].clamp(min=1e-6) - 1))
        text_arousal = text_valence = torch.zeros((), device=ce.device)
        if prosody is not None:
            text_arousal = prosody[..., AROUSAL].float().mean()
            text_valence = prosody[..., VALENCE].float().mean()
        arousal = (0.5 + 0.5 * text_arousal + 0.5 * (stress - 0.5)).clamp(0.0, 1.0)
        target = torch.stack([arousal, text_valence.clamp(-1.0, 1.0), stress])
        self.hormones.lerp_(target.to(self.hormones), self.rate)

    def metrics(self) -> dict[str, torch.Tensor]:
        h = self.hormones.detach()
        out = {"limbic_arousal": h[0], "limbic_valence": h[1], "limbic_stress": h[2]}
        for name in MODULATED:
            if self.ranges[name]:
                out[f"limbic_{name}_x"] = torch.tensor(self.multiplier(name))
        return out
