"""BDH's fused gate, x * relu(a @ w) * keep: values, gradients, the count, autocast."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aura.nn.sparse_gate import sparse_gate


def plain(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, keep: torch.Tensor | None
          ) -> torch.Tensor:
    out = x * torch.relu(a @ w)
    return out if keep is None else out * keep


def inputs(h: int, rows: int, d: int, n: int, dtype: torch.dtype, seed: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(h, rows, n, generator=g, dtype=dtype).relu()
    a = torch.randn(h, rows, d, generator=g, dtype=dtype)
    w = torch.randn(h, d, n, generator=g, dtype=dtype)
    keep = (torch.rand(h, rows, n, generator=g) > 0.3).to(dtype)
    return x, a, w, keep


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 3), rows=st.integers(1, 9), d=st.integers(1, 5), n=st.integers(1, 7),
       dropped=st.booleans(), count=st.booleans(), seed=st.integers(0, 2**16))
def test_values_gradients_and_count_match_the_plain_expression(h, rows, d, n, dropped, count,
                                                               seed) -> None:
    x, a, w, keep = inputs(h, rows, d, n, torch.float64, seed)
    mask = keep if dropped else None
    leaves = [t.clone().requires_grad_() for t in (x, a, w)]
    out, active = sparse_gate(*leaves, mask, count)
    ref_leaves = [t.clone().requires_grad_() for t in (x, a, w)]
    ref = plain(*ref_leaves, mask)
    torch.testing.assert_close(out, ref)
    if count:
        assert active.item() == (plain(x, a, w, None) > 0).sum().item()  # before dropout
        assert not active.requires_grad
    else:  # the values and gradients do not depend on counting
        assert active is None
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    for got, want in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(got.grad, want.grad)


def test_gradcheck() -> None:
    x, a, w, keep = inputs(2, 5, 3, 4, torch.float64, 0)
    x = x + 0.1  # away from the ReLU's kink, where finite differences are not the gradient
    leaves = [t.requires_grad_() for t in (x, a, w)]
    assert torch.autograd.gradcheck(lambda *t: sparse_gate(*t, keep)[0], leaves)


def test_under_cpu_autocast_it_matches_autograd_and_gradients_keep_their_dtypes() -> None:
    x, a, w, keep = inputs(2, 16, 8, 32, torch.float32, 1)
    x, keep = x.bfloat16(), keep.bfloat16()  # as the encoder's product under autocast makes it
    leaves = [a.clone().requires_grad_(), w.clone().requires_grad_()]
    ref = [t.clone().requires_grad_() for t in (a, w)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = sparse_gate(x, *leaves, keep)
        want = plain(x, *ref, keep)
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out, want)
    out.float().sum().backward()
    want.float().sum().backward()
    for got, expected in zip(leaves, ref, strict=True):
        assert got.grad.dtype == torch.float32
        torch.testing.assert_close(got.grad, expected.grad, rtol=0.02, atol=0.02)
