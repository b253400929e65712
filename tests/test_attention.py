"""The written-out causal attention CPU training takes with dropout or under native bf16: the
same function as SDPA's, its dropout on the weights, and when the layer takes it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aura import cpu
from aura.nn import attention


def qkv(B: int, H: int, T: int, D: int, dtype: torch.dtype = torch.float32
        ) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(T * 31 + D)
    return [torch.randn(B, H, T, D, generator=g).to(dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("shape", [(2, 3, 1, 8), (2, 4, 17, 8), (1, 2, 64, 32)])
def test_it_is_sdpas_causal_attention_with_its_gradients(shape: tuple[int, int, int, int]
                                                         ) -> None:
    ours, theirs = qkv(*shape), qkv(*shape)
    y = attention.causal_attention(*ours, 0.0)
    ref = F.scaled_dot_product_attention(*theirs, is_causal=True)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


def test_in_bf16_it_stays_within_bf16_rounding_of_fp32() -> None:
    exact = F.scaled_dot_product_attention(*qkv(2, 4, 64, 32), is_causal=True)
    y = attention.causal_attention(*qkv(2, 4, 64, 32, torch.bfloat16), 0.0)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), exact, atol=3e-2, rtol=3e-2)


def test_dropout_drops_attention_weights_and_rescales_the_kept() -> None:
    """With one-hot values each output row is its row of (dropped) weights: about p of the
    visible weights are zero and the kept ones are softmax's divided by the keep rate."""
    T, p = 64, 0.25
    q, k = (torch.randn(1, 1, T, 16) for _ in range(2))
    v = torch.eye(T).view(1, 1, T, T)
    torch.manual_seed(0)
    dropped = attention.causal_attention(q, k, v, p)[0, 0]
    weights = attention.causal_attention(q, k, v, 0.0)[0, 0]
    visible = torch.ones(T, T, dtype=torch.bool).tril()
    zeros = (dropped == 0) & visible
    assert abs(zeros.sum().item() / visible.sum().item() - p) < 0.05
    kept = visible & ~zeros
    torch.testing.assert_close(dropped[kept], weights[kept] / (1 - p), rtol=1e-4, atol=1e-6)
    assert (dropped[~visible] == 0).all()


@pytest.mark.parametrize(("dropout", "dtype", "native", "written"), [
    (0.1, torch.float32, False, True),
    (0.0, torch.float32, True, False),
    (0.0, torch.bfloat16, True, True),
    (0.0, torch.bfloat16, False, False),
])
def test_the_layer_writes_it_out_only_where_it_pays(
        monkeypatch: pytest.MonkeyPatch, dropout: float, dtype: torch.dtype, native: bool,
        written: bool) -> None:
    monkeypatch.setattr(cpu, "native_bf16", lambda: native)
    calls: list[float] = []
    real = attention.causal_attention
    monkeypatch.setattr(attention, "causal_attention",
                        lambda q, k, v, p: calls.append(p) or real(q, k, v, p))
    layer = attention.CausalSelfAttention(n_embd=16, n_head=2, dropout=dropout, bias=False,
                                          layer=0).to(dtype)
    x = torch.randn(2, 8, 16, dtype=dtype)
    layer(x)
    assert calls == ([dropout] if written else [])
    layer.eval()
    calls.clear()
    layer(x)
    assert calls == ([0.0] if written and dropout == 0 else [])
