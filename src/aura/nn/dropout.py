"""Dropout whose CPU mask costs a fifth of PyTorch's.

``F.dropout`` on a CPU draws one Bernoulli sample per element from the Mersenne Twister, about
70x the cost of the multiply it gates (14 ms for 2M elements against 0.2 ms for a ReLU); at
BDH's (batch, time, heads x neurons) activations that was 14% of a training step. Here one
63-bit draw gives four 15-bit uniforms, and an element is dropped when its uniform is below
``round(p * 2**15)``: the drop probability is ``p`` rounded to a multiple of 2**-15 (0.1 becomes
0.100006), and kept elements are scaled by the exact inverse of the keep probability, so the
expectation is preserved. Draws come from PyTorch's default generator: ``torch.manual_seed``
and the trainer's saved RNG state make masks reproducible. Off the CPU, where ``F.dropout``'s
Philox kernel is fused and fast, and under ``torch.compile``, which cannot trace the int64 draw
(a graph break per dropout) and fuses a random mask of its own into the kernel, it is
``F.dropout``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LANE_BITS = 15
LANES = 1 << LANE_BITS


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the cheaper CPU mask described above."""
    dropped, scale = unscaled_dropout(x, p, training)
    return dropped.mul_(scale) if scale != 1.0 else dropped


def unscaled_dropout(x: torch.Tensor, p: float, training: bool = True
                     ) -> tuple[torch.Tensor, float]:
    """``x`` with the dropped elements zeroed, and the factor the kept ones still need.

    For a caller whose next step is linear (a matrix product): it scales that step's output,
    often far smaller than ``x``, which saves a pass over ``x`` forward and one backward.
    """
    if not training or p == 0.0:
        return x, 1.0
    if x.device.type != "cpu" or p >= 1.0 or torch.compiler.is_compiling():
        return F.dropout(x, p, training), 1.0  # compiled: Inductor fuses its own random mask
    threshold = round(p * LANES)
    if threshold == 0:
        return x, 1.0
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_()  # 63 uniform bits each
    lanes = words.view(torch.int16)[:n].bitwise_and(LANES - 1)
    keep = lanes.ge(threshold).view(x.shape)
    return torch.where(keep, x, 0.0), LANES / (LANES - threshold)


class Dropout(nn.Module):
    """``nn.Dropout`` with the CPU mask of ``dropout``."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def unscaled(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``unscaled_dropout`` in this module's mode."""
        return unscaled_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
