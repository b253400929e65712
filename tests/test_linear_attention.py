"""BDH's causal linear attention and complex RoPE: the fast forms equal the plain expressions,
values and gradients, in every precision the model trains in."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aura.models.bdh import apply_rope, rope_freqs, rope_tables
from aura.nn.linear_attention import MIN_SPLIT, causal_linear_attention


def plain(q: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The expression autograd differentiates by itself: heads lead, values broadcast."""
    return ((q @ q.mT).tril(diagonal=-1) * scale) @ v.unsqueeze(0)


@settings(max_examples=25, deadline=None)
@given(heads=st.integers(1, 3), batch=st.integers(1, 3), t=st.integers(1, 70),
       n=st.integers(1, 12), d=st.integers(1, 6), scale=st.sampled_from([1.0, 0.125]))
def test_values_and_gradients_equal_the_plain_expression(heads: int, batch: int, t: int, n: int,
                                                         d: int, scale: float) -> None:
    g = torch.Generator().manual_seed(heads * 1000 + batch * 100 + t * 10 + n + d)
    q = torch.randn(heads, batch, t, n, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(batch, t, d, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(heads, batch, t, d, dtype=torch.float64, generator=g)
    ours = causal_linear_attention(q, v, scale)
    assert ours.shape == (heads, batch, t, d)
    dq, dv = torch.autograd.grad((ours * w).sum(), (q, v))
    want = plain(q, v, scale)
    want_dq, want_dv = torch.autograd.grad((want * w).sum(), (q, v))
    torch.testing.assert_close(ours, want)
    torch.testing.assert_close(dq, want_dq)
    torch.testing.assert_close(dv, want_dv)


def test_gradcheck() -> None:
    torch.manual_seed(0)
    q = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: causal_linear_attention(a, b, 0.5), (q, v))


def test_a_token_sees_neither_itself_nor_the_future() -> None:
    torch.manual_seed(1)
    q = torch.randn(2, 1, 6, 8)
    v = torch.randn(1, 6, 4)
    a = causal_linear_attention(q, v)
    assert torch.equal(a[:, :, 0], torch.zeros_like(a[:, :, 0]))  # the first token sees nothing
    v2 = v.clone()
    v2[:, 3:] += 1.0  # changing a token's value changes only the tokens after it
    b = causal_linear_attention(q, v2)
    torch.testing.assert_close(a[:, :, :4], b[:, :, :4])
    assert not torch.allclose(a[:, :, 4:], b[:, :, 4:])


def test_low_precision_queries_take_fp32_values_and_give_their_gradient_back_in_fp32() -> None:
    torch.manual_seed(2)
    q = torch.randn(2, 2, 8, 16).bfloat16().requires_grad_()
    v = torch.randn(2, 8, 4, requires_grad=True)
    a = causal_linear_attention(q, v)
    assert a.dtype == torch.bfloat16
    a.float().sum().backward()
    assert v.grad is not None and v.grad.dtype == torch.float32
    assert q.grad is not None and q.grad.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), plain(q.float(), v.bfloat16().float(), 1.0),
                               rtol=0.05, atol=0.05)


def real_rope(v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The reference's rotation in real arithmetic: (even, odd) -> (e c - o s, o c + e s)."""
    rotated = torch.stack((-v[..., 1::2], v[..., ::2]), dim=-1).view(*v.shape)
    return v * cos + rotated * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_complex_rope_equals_the_real_rotation_values_and_gradients(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    n, t = 16, 7
    cos, sin = rope_tables(torch.arange(t), rope_freqs(n))
    v = torch.randn(3, 2, t, n).transpose(0, 1).to(dtype).requires_grad_()  # strided, as in BDH
    w = torch.randn(2, 3, t, n, dtype=dtype)
    ours = apply_rope(v, cos, sin)
    want = real_rope(v.float(), cos, sin)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(ours.float(), want, **tol)
    assert ours.dtype == dtype
    (g,) = torch.autograd.grad((ours * w).sum(), v)
    (want_g,) = torch.autograd.grad((want * w.float()).sum(), v)
    torch.testing.assert_close(g.float(), want_g.float(), **tol)


@pytest.mark.parametrize("t", [MIN_SPLIT - 1, MIN_SPLIT, MIN_SPLIT + 1, 2 * MIN_SPLIT + 1])
def test_the_split_product_equals_the_whole_one_either_side_of_the_threshold(t: int) -> None:
    torch.manual_seed(t)
    q = torch.randn(2, 3, t, 8, dtype=torch.float64)
    v = torch.randn(3, t, 5, dtype=torch.float64)
    torch.testing.assert_close(causal_linear_attention(q, v), plain(q, v, 1.0))
