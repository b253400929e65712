"""A spiking drop-in for the transformer's MLP: ``fc`` -> spiking neurons -> rate -> ``proj``.

Each token's ``fc(x)`` drives its neurons as a constant current for ``steps`` time steps; the
spike count averaged over the steps (a rate in [0, 1] for LIF) replaces the GELU activation. All
tokens are run at once, as (steps, B, T, hidden), so the only Python loop is the short one over
the steps inside the neuron. Surrogate gradients carry the loss back through the spikes to ``fc``.

The projection is fed by spikes, so on neuromorphic hardware it costs one accumulate per spike per
output (synaptic operations), while ``fc`` stays a dense matmul: ``metrics()`` reports both, and
``energy_ops()`` hands them to ``aura.eval.energy``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from aura.nn.dropout import Dropout
from aura.nn.spiking import GIF, LIF


class SNNFeedForward(nn.Module):
    """``proj(mean_t spikes_t(fc(x)))`` with dropout; ``neuron`` is "lif" (soft reset) or "gif".

    The projection is named ``proj`` so the GPT's residual-projection init scales it like the
    MLP's.
    """

    def __init__(self, n_embd: int, hidden: int | None = None, steps: int = 4,
                 neuron: str = "lif", dropout: float = 0.0, bias: bool = False):
        super().__init__()
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if neuron not in ("lif", "gif"):
            raise ValueError(f"neuron must be 'lif' or 'gif', got {neuron!r}")
        hidden = 4 * n_embd if hidden is None else hidden
        self.steps = steps
        self.fc = nn.Linear(n_embd, hidden, bias=bias)
        self.neuron: LIF | GIF = LIF(reset="soft") if neuron == "lif" else GIF()
        self.proj = nn.Linear(hidden, n_embd, bias=bias)
        self.drop = Dropout(dropout)
        self._metrics: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        current = self.fc(x)
        if isinstance(self.neuron, LIF):  # fused: no (steps, ...) copies of input or spikes
            counts, _ = self.neuron.forward_constant(current, self.steps)
        else:
            counts = self.neuron(current.expand(self.steps, *current.shape))[0].sum(0)
        with torch.no_grad():
            total = self._spike_total(counts)
            self._metrics = {
                "firing_rate": (total / (counts.numel() * self.steps)).float(),
                "synops": total * self.proj.out_features,
                "macs": torch.tensor(current.numel() * self.fc.in_features, device=x.device),
            }
        return self.drop(self.proj(counts / self.steps))

    def _spike_total(self, counts: torch.Tensor) -> torch.Tensor:
        """All spikes, exactly, as an int64 0-d tensor. A float32 sum of integers is exact while
        the total stays below 2**24 and is 4-16x cheaper than a float64 sum on a CPU (a float64
        sum was 3% of an ``snn-rag-cpu`` step, for a metric); beyond that bound it is float64."""
        peak = self.steps * getattr(self.neuron, "max_level", 1)  # a neuron's largest count
        dtype = torch.float32 if counts.numel() * peak < 2**24 else torch.float64
        return counts.sum(dtype=dtype).to(torch.int64)

    def metrics(self) -> dict[str, torch.Tensor]:
        """The last forward's detached ``firing_rate`` (spikes per neuron per step), ``synops``
        (spike-driven accumulates in ``proj``: spikes x fan-out, a graded GIF spike of level k
        counting k) and ``macs`` (dense multiply-adds in ``fc``)."""
        if not self._metrics:
            raise RuntimeError("metrics are recorded by forward; call the module first")
        return dict(self._metrics)

    def energy_ops(self) -> list[dict[str, Any]]:
        """The last forward's operations for ``aura.eval.energy``: ``fc`` is a dense matmul (MACs),
        ``proj`` is driven by the spikes (``synops`` accumulates, since ``proj(mean_t s_t) =
        mean_t proj(s_t)``); the neurons' membrane updates are element-wise and not counted."""
        m = self.metrics()
        macs = int(m["macs"])
        tokens = macs // (self.fc.in_features * self.fc.out_features)
        return [{"name": "fc", "kind": "linear", "ops": macs, "spike_input": False},
                {"name": "proj", "kind": "linear", "ops": int(m["synops"]), "spike_input": True,
                 "dense_macs": tokens * self.proj.in_features * self.proj.out_features}]


def layer_firing_rates(ffns: list[SNNFeedForward]) -> dict[str, torch.Tensor]:
    """Aux metrics of a stack's spiking FFNs after a forward: ``firing_rate`` (their mean) and
    ``firing_rate_L`` for the FFN of each layer L (the trainer logs both, ``aura eval`` reports
    them), so a layer that falls silent or saturates shows up on its own."""
    rates = [f.metrics()["firing_rate"] for f in ffns]
    return {"firing_rate": torch.stack(rates).mean(),
            **{f"firing_rate_{i}": r for i, r in enumerate(rates)}}

