"""The cheaper CPU dropout: the drop rate, the scale, gradients, reproducibility, devices."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aura.nn.dropout import (
    LANES,
    Dropout,
    dropout,
    dropout_mask,
    keep_mask,
)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_drop_rate_and_scale_match_the_quantised_probability(p: float) -> None:
    torch.manual_seed(0)
    n = 1_000_003  # odd, not a multiple of the four lanes of a draw
    y = dropout(torch.ones(n), p)
    q = round(p * LANES) / LANES
    kept = y != 0
    sigma = math.sqrt(q * (1 - q) / n)
    assert abs(1 - float(kept.float().mean()) - q) < 5 * sigma
    assert torch.all(y[kept] == 1 / (1 - q))  # kept elements carry the exact inverse keep rate
    assert abs(float(y.mean()) - 1.0) < 5 * sigma / (1 - q)


def test_every_lane_of_a_draw_is_used_and_uniform() -> None:
    """Each of the four 16-bit lanes of a 64-bit word drops at the same rate."""
    torch.manual_seed(1)
    y = dropout(torch.ones(4 * 200_000), 0.3).view(-1, 4)
    rates = (y == 0).float().mean(0)
    assert torch.all((rates - round(0.3 * LANES) / LANES).abs() < 0.006), rates


def test_gradient_is_the_mask_times_the_scale() -> None:
    torch.manual_seed(2)
    x = torch.randn(3, 7, 11, requires_grad=True)
    y = dropout(x, 0.25)
    y.backward(torch.ones_like(y))
    mask = (y != 0).float()
    assert torch.allclose(x.grad, mask / (1 - round(0.25 * LANES) / LANES))
    assert torch.allclose(y, x.detach() * x.grad)


def test_seeded_masks_repeat_and_eval_is_identity() -> None:
    x = torch.randn(64, 33)
    torch.manual_seed(5)
    a = dropout(x, 0.2)
    torch.manual_seed(5)
    b = dropout(x, 0.2)
    assert torch.equal(a, b)
    layer = Dropout(0.2).eval()
    assert layer(x) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.5)


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
       p=st.floats(0.0, 0.99), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_any_shape_and_dtype_keeps_shape_dtype_and_zeros_or_scales(shape, p, dtype) -> None:
    x = torch.randn(*shape).to(dtype)
    y = dropout(x, p)
    assert y.shape == x.shape and y.dtype == x.dtype
    kept = y != 0
    t = round(p * LANES)
    expected = (x.float() * (LANES / (LANES - t))).to(dtype)
    assert torch.equal(y[kept], expected[kept])


def test_dropout_is_the_mask_then_the_scale() -> None:
    x = torch.randn(5, 9, 13)
    torch.manual_seed(6)
    scaled = dropout(x, 0.3)
    torch.manual_seed(6)
    mask, scale = Dropout(0.3).mask(x)
    assert mask is not None and scale == LANES / (LANES - round(0.3 * LANES))
    torch.testing.assert_close(x * mask * scale, scaled)
    assert Dropout(0.3).eval().mask(x) == (None, 1.0)
    assert Dropout(0.0).mask(x) == (None, 1.0)


def test_compiles_without_a_graph_break() -> None:
    """Under torch.compile the mask is Inductor's: the int64 draw would break the graph."""
    layer = Dropout(0.25)
    f = torch.compile(lambda x: layer(x), fullgraph=True, backend="eager")
    y = f(torch.ones(4000))
    assert torch.all((y == 0) | (y == torch.tensor(4 / 3)))
    assert 0.15 < float((y == 0).float().mean()) < 0.35


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_mask_is_a_float_mask_of_zeros_and_the_value(dtype: torch.dtype) -> None:
    """A float mask, not a bool one: CPU kernels reading a bool mask are 7-14x slower."""
    torch.manual_seed(7)
    m = keep_mask((50, 40), 0.25, dtype, value=2.0)
    assert m.shape == (50, 40) and m.dtype == dtype
    assert set(m.unique().tolist()) == {0.0, 2.0}
    assert 0.15 < float((m == 0).float().mean()) < 0.35


def test_dropout_mask_drops_everything_at_p_one() -> None:
    zeros, scale = dropout_mask(torch.randn(6, 20), 1.0)
    assert zeros is not None and not zeros.any() and scale == 1.0


def test_dropout_mask_compiles_without_a_graph_break() -> None:
    f = torch.compile(lambda x: dropout_mask(x, 0.25), fullgraph=True, backend="eager")
    mask, scale = f(torch.ones(4000))
    assert scale == pytest.approx(4 / 3)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert 0.15 < float((mask == 0).float().mean()) < 0.35
