"""Dropout whose CPU mask costs a fraction of PyTorch's.

``F.dropout`` on a CPU draws one Bernoulli sample per element from the Mersenne Twister, about
70x the cost of the multiply it gates (14 ms for 2M elements against 0.2 ms for a ReLU); at
BDH's (batch, time, heads x neurons) activations that was 14% of a training step. Here one
64-bit word from NumPy's SFC64 generator, seeded by a draw from PyTorch's default generator, gives
four 16-bit uniforms, and an element is dropped when its uniform is below ``round(p * 2**16)``:
the drop probability is ``p`` rounded to a multiple of 2**-16 (0.1 becomes 0.100006), and kept
elements are scaled by the exact inverse of the keep probability, so the expectation is
preserved. ``torch.manual_seed`` and the trainer's saved RNG state make masks reproducible (and
gradient checkpointing, which restores that state, recomputes the same mask).

The mask is applied as a float multiply: on a CPU, kernels that read a boolean mask
(``torch.where``, ``masked_fill``, a multiply by a bool tensor) run 7-14x slower than a float
multiply of the same size. Off the CPU, where ``F.dropout``'s Philox kernel is fused and fast,
and under ``torch.compile``, which fuses a random mask of its own into the kernel, it is
``F.dropout``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LANE_BITS = 16
LANES = 1 << LANE_BITS


def keep_mask(shape: tuple[int, ...] | torch.Size, p: float, dtype: torch.dtype = torch.float32,
              value: float = 1.0) -> torch.Tensor:
    """A CPU tensor of ``shape``: ``value`` where an element is kept, 0 where it is dropped
    (with probability ``p`` rounded to a multiple of 2**-16), as a float mask of ``dtype``."""
    n = math.prod(shape)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    words = np.random.SFC64(seed).random_raw((n + 3) // 4)
    lanes = torch.from_numpy(words.view(np.int16)[:n])  # uniform over [-2**15, 2**15)
    low = round(p * LANES) - LANES // 2 - 1  # kept: the lanes above it
    # in fp32, which holds every int16 exactly; clamped to {low, low + 1}, less low: {0, 1}
    mask = lanes.to(torch.float32).clamp_(low, low + 1).sub_(low).view(shape)
    if value != 1.0:
        mask.mul_(value)
    return mask.to(dtype)


def keep_scale(p: float) -> float:
    """The factor kept elements need: the inverse of the quantised keep probability."""
    return LANES / (LANES - round(p * LANES))


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the cheaper CPU mask described above."""
    if _identity(p, training):
        return x
    if _native(x, p):
        return F.dropout(x, p, training)
    if x.dtype == torch.float32:  # the scale folded into the mask: exact in fp32
        return x * keep_mask(x.shape, p, value=keep_scale(p))
    return (x * keep_mask(x.shape, p, x.dtype)).mul_(keep_scale(p))  # scaled in fp32 opmath


def dropout_mask(x: torch.Tensor, p: float, training: bool = True
                 ) -> tuple[torch.Tensor | None, float]:
    """The 0/1 mask ``dropout`` would multiply ``x`` by (None when nothing is dropped), and
    the factor kept elements need: for a caller that applies the mask inside its own kernel,
    and the factor where it is cheapest (BDH scales its decoder's 16x smaller output)."""
    if _identity(p, training):
        return None, 1.0
    if _native(x, p):
        if p >= 1.0:
            return torch.zeros_like(x), 1.0
        return torch.empty_like(x).bernoulli_(1.0 - p), 1.0 / (1.0 - p)
    return keep_mask(x.shape, p, x.dtype), keep_scale(p)


def _identity(p: float, training: bool) -> bool:
    """Nothing to drop: eval mode, or p below half the mask's resolution."""
    return not training or round(p * LANES) == 0


def _native(x: torch.Tensor, p: float) -> bool:
    """``F.dropout`` does it: off the CPU, compiled, or everything dropped."""
    return (x.device.type != "cpu" or round(p * LANES) >= LANES
            or torch.compiler.is_compiling())


class Dropout(nn.Module):
    """``nn.Dropout`` with the CPU mask of ``dropout``."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def mask(self, x: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """``dropout_mask`` in this module's mode."""
        return dropout_mask(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
