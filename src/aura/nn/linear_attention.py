"""Causal linear attention with queries = keys and values shared by heads (BDH's attention).

``a[h, b] = tril(q[h, b] q[h, b]^T, -1) @ v[b] * scale``: no softmax, a token does not see
itself, and every head reads its sequence's values. The heads lead (``q`` is heads x batch x
time x neurons) so that BDH's per-head neuron tensors stay contiguous from the encoder to the
decoder. Written as an autograd function because autograd's backward of that expression does
more work than it needs: the scores are a product of q with itself, so autograd runs one GEMM
for each side of it (``ds @ q`` and ``ds^T @ q``) and adds them; here ``(ds + ds^T) @ q`` is
one GEMM, which at ``bdh-cpu``'s shape is 40% of the attention backward's FLOPs saved. Forward,
the strictly lower triangle of the scores takes three quarters of the full product.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

MIN_SPLIT = 32
"""Shorter sequences take the whole product, in one GEMM."""


class _CausalLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        h, b, t, n = q.shape
        scores = _lower_scores(q.view(h * b, t, n))
        if scale != 1.0:
            scores.mul_(scale)
        a = torch.bmm(scores, _per_head(v, h))
        ctx.save_for_backward(q, v, scores)
        ctx.scale = scale
        return a.view(h, b, t, v.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, da: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        q, v, scores = ctx.saved_tensors
        h, b, t, n = q.shape
        d = v.shape[-1]
        da = da.reshape(h * b, t, d)
        dv = torch.bmm(scores.mT, da).view(h, b, t, d).sum(0)
        ds = torch.bmm(da, _per_head(v, h).mT).tril_(-1)
        if ctx.scale != 1.0:
            ds.mul_(ctx.scale)
        dq = torch.bmm(ds + ds.mT, q.view(h * b, t, n))
        return dq.view(h, b, t, n), dv, None


def _lower_scores(rows: torch.Tensor) -> torch.Tensor:
    """tril(rows rows^T, -1) from three quarters of the product: above the diagonal is masked
    anyway, so the first half of the rows is multiplied only by the first half of the columns.
    bmm, not matmul: the transposed operand stays a view, no copy."""
    t = rows.shape[1]
    if t < MIN_SPLIT:
        return torch.bmm(rows, rows.mT).tril_(-1)
    half = t // 2
    top = torch.bmm(rows[:, :half], rows[:, :half].mT)
    bottom = torch.bmm(rows[:, half:], rows.mT)
    return torch.cat((F.pad(top, (0, t - half)), bottom), dim=1).tril_(-1)


def _per_head(v: torch.Tensor, heads: int) -> torch.Tensor:
    """(heads * B, T, D): each head's copy of the values, a GEMM batch."""
    return v.expand(heads, *v.shape).reshape(heads * v.shape[0], *v.shape[1:])


def causal_linear_attention(q: torch.Tensor, v: torch.Tensor, scale: float = 1.0
                            ) -> torch.Tensor:
    """(heads, B, T, D) readout of q (heads, B, T, N) as queries and keys over values v
    (B, T, D), strictly causal, scores times ``scale``."""
    if v.dtype != q.dtype:  # autocast made q low-precision: the products run in its dtype
        v = v.to(q.dtype)
    return _CausalLinearAttention.apply(q.contiguous(), v.contiguous(), scale)
