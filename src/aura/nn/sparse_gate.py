"""BDH's gated sparse readout as one autograd function: ``x * relu(a @ w) * keep``.

Autograd's version makes a pass over a neuron-wide tensor for each step: forward the gate and the
dropout mask each write a fresh tensor, and backward takes four passes (the mask, the gate's two
factors, the ReLU). Here the ReLU, the mask and the gate are applied in place on the product
while it is still in cache, and the backward is three passes: the gate's two factors and the
ReLU's mask. A ``bdh-cpu`` training step was 5% faster than with autograd's version of the same
expression (the same float dropout mask; steps alternated in one process, one run). The
function also returns how many products are non-zero before dropout, BDH's y-sparsity metric,
counted while in cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable


class _SparseGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, w: torch.Tensor,
                keep: torch.Tensor | None, count: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        y = torch.bmm(a, w).relu_()  # under autocast, the product in the autocast dtype
        out = x * y
        # x, y >= 0: signs count non-zeros
        active = out.sign().sum(dtype=torch.float32) if count else None
        if keep is not None:
            out.mul_(keep)
            y.mul_(keep)  # the gate's factor as dropout left it, for the backward
        ctx.save_for_backward(x, a, w, y)
        if active is not None:
            ctx.mark_non_differentiable(active)
        return out, active

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor, _: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        x, a, w, y = ctx.saved_tensors
        grad_x = grad * y
        # dropped or ReLU-silent: y is 0 there, and so is the gradient into a @ w
        grad_pre = torch.ops.aten.threshold_backward(grad * x, y, 0)
        a, w = a.to(grad_pre.dtype), w.to(grad_pre.dtype)
        return grad_x, torch.bmm(grad_pre, w.mT), torch.bmm(a.mT, grad_pre), None, None


def sparse_gate(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor,
                keep: torch.Tensor | None = None, count: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x * relu(a @ w)``, times ``keep`` (dropout's 0/1 mask, shaped like ``x``) if given,
    and the count of that product's non-zeros before dropout (no gradient; None when not
    ``count``: the count is a pass over a neuron-wide tensor).

    x: (heads, rows, N), non-negative (a ReLU's output); a: (heads, rows, D); w: (heads, D, N).
    """
    return _SparseGate.apply(x, a, w, keep, count)
