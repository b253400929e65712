"""PlaceCellEncoder: exact top-k sparsity, learned sparsity that moves, causality, dtypes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aura.nn.place_cells import PlaceCellEncoder

C = 16


def encoder(seed: int = 0, **kw: object) -> PlaceCellEncoder:
    torch.manual_seed(seed)
    return PlaceCellEncoder(C, **{"n_place_cells": 200, **kw})  # type: ignore[arg-type]


def hidden(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, C, generator=torch.Generator().manual_seed(seed))


def test_default_sizes() -> None:
    enc = PlaceCellEncoder(C)
    assert enc.k == 60 and enc.k_max == 60 and enc.sparsity_logit is None
    assert enc.active_count().item() == 60
    learned = PlaceCellEncoder(C, learnable_sparsity=True)
    assert learned.k_max == 240 and learned.active_count().item() == pytest.approx(59.5)
    assert PlaceCellEncoder(C, n_place_cells=10, active_fraction=0.01).k == 1  # at least one


@settings(max_examples=25)
@given(n_cells=st.integers(8, 300), fraction=st.floats(0.005, 0.2), learnable=st.booleans(),
       shape=st.sampled_from([(3,), (2, 5), (1, 1, 4)]), seed=st.integers(0, 2**16))
def test_exactly_k_cells_fire_per_token(n_cells: int, fraction: float, learnable: bool,
                                        shape: tuple[int, ...], seed: int) -> None:
    enc = encoder(seed, n_place_cells=n_cells, active_fraction=fraction,
                  learnable_sparsity=learnable)
    with torch.no_grad():
        enc.w_in.weight.abs_()  # with a positive input every cell, so every top-k one, is positive
    h = hidden(*shape, seed=seed).abs() + 0.1
    code = enc.encode(h)
    assert code.shape == (*shape, n_cells)
    assert ((code != 0).sum(-1) == enc.k).all() and (code >= 0).all()
    assert enc.last_active_fraction.item() == pytest.approx(enc.k / n_cells, rel=1e-6)
    assert enc.metrics()["place_active"] is enc.last_active_fraction
    assert not enc.last_active_fraction.requires_grad
    out = enc(h)
    assert out.shape == h.shape and out.dtype == h.dtype


def test_the_code_keeps_the_strongest_cells() -> None:
    enc = encoder(active_fraction=0.05)
    h = hidden(4, 6)
    code = enc.encode(h)
    cells = torch.relu(enc.w_in(h))
    kth = cells.topk(enc.k, dim=-1).values[..., -1:]
    torch.testing.assert_close(code, torch.where(cells >= kth, cells, 0))
    torch.testing.assert_close(enc(h), h + 0.1 * code @ enc.w_out)


@pytest.mark.parametrize("learnable", [False, True])
def test_gradients_reach_every_parameter(learnable: bool) -> None:
    enc = encoder(learnable_sparsity=learnable)
    enc(hidden(2, 8)).pow(2).sum().backward()
    names = {n for n, p in enc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert names == ({"w_in.weight", "w_out"} | ({"sparsity_logit"} if learnable else set()))


def test_learned_sparsity_starts_at_the_target() -> None:
    enc = encoder(learnable_sparsity=True)
    enc(hidden(2, 8) * 10)
    metrics = enc.metrics()
    assert metrics["place_active"].item() == pytest.approx(enc.k / 200, rel=1e-6)
    assert metrics["place_target"].item() == pytest.approx((enc.k - 0.5) / 200, rel=1e-5)


@pytest.mark.parametrize("direction", [1, -1])
def test_learned_sparsity_moves_with_the_loss(direction: int) -> None:
    """Rewarding activity (direction 1) grows the active fraction; penalising it shrinks it."""
    enc = encoder(learnable_sparsity=True, active_fraction=0.1)
    assert enc.sparsity_logit is not None
    opt = torch.optim.Adam([enc.sparsity_logit], lr=0.2)
    h = hidden(4, 8)
    enc.encode(h)
    before = enc.last_active_fraction.item()
    for _ in range(5):
        opt.zero_grad()
        (-direction * enc.encode(h).sum()).backward()
        assert enc.sparsity_logit.grad is not None and enc.sparsity_logit.grad.item() != 0
        opt.step()
    enc.encode(h)
    after = enc.last_active_fraction.item()
    assert direction * (after - before) >= 5 / 200  # moved by at least five cells a token


@settings(max_examples=20)
@given(t=st.integers(0, 6), learnable=st.booleans(), seed=st.integers(0, 2**16))
def test_outputs_never_depend_on_later_tokens(t: int, learnable: bool, seed: int) -> None:
    enc = encoder(learnable_sparsity=learnable)
    h = hidden(2, 8, seed=seed)
    changed = h.clone()
    changed[:, t + 1:] = hidden(2, 7 - t, seed=seed + 1)
    with torch.no_grad():
        a, b = enc(h), enc(changed)
    assert torch.equal(a[:, :t + 1], b[:, :t + 1])
    assert not torch.equal(a[:, t + 1:], b[:, t + 1:])


@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast(learnable: bool, in_dtype: torch.dtype) -> None:
    enc = encoder(learnable_sparsity=learnable)
    h = hidden(2, 8).to(in_dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(h)
    assert out.dtype == in_dtype
    out.float().sum().backward()
    assert h.grad is not None and enc.w_in.weight.grad is not None
    assert enc.last_active_fraction.item() == pytest.approx(enc.k / 200, rel=1e-6)
    torch.testing.assert_close(out.float(), enc(h.float()).detach(), atol=3e-2, rtol=2e-2)


def test_zero_residual_scale_returns_h() -> None:
    enc = encoder(residual_scale=0.0)
    h = hidden(3, 5)
    assert torch.equal(enc(h), h)
    assert not torch.equal(encoder()(h), h)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="active_fraction"):
        PlaceCellEncoder(C, active_fraction=0.0)
    with pytest.raises(ValueError, match="n_place_cells"):
        PlaceCellEncoder(C, n_place_cells=0)


@pytest.mark.parametrize("learnable", [False, True])
def test_sparse_forward_equals_the_dense_code_through_w_out(learnable: bool) -> None:
    """The embedding-bag forward and its cheap backward match w_out over the dense code."""
    torch.manual_seed(0)
    enc = PlaceCellEncoder(16, n_place_cells=200, learnable_sparsity=learnable)
    h = torch.randn(3, 5, 16, requires_grad=True)
    fast = enc(h)
    fast.square().sum().backward()
    fast_grads = [h.grad.clone(), *(p.grad.clone() for p in enc.parameters())]
    h.grad = None
    enc.zero_grad()
    cells = enc.w_in(h)
    values, idx = cells.topk(enc.k_max, dim=-1)
    values = torch.relu(values)
    if learnable:
        k_soft = enc.active_count()
        rank = torch.arange(enc.k_max, dtype=k_soft.dtype)
        soft = torch.sigmoid(k_soft - rank)
        values = values * ((rank < k_soft).to(soft.dtype) + soft - soft.detach())
    slow = h + 0.1 * torch.zeros_like(cells).scatter(-1, idx, values) @ enc.w_out
    slow.square().sum().backward()
    torch.testing.assert_close(fast, slow)
    with torch.no_grad():  # the inference path reads the winners' drives directly
        torch.testing.assert_close(enc(h), fast)
    for a, b in zip(fast_grads, [h.grad, *(p.grad for p in enc.parameters())], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
