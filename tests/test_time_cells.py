"""Time cells: elapsed-since-boundary against a loop, log-spaced scale-invariant tuning, bounds,
gradients, bf16."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aura.nn.time_cells import TimeCellEncoder, elapsed_since

E, N = 32, 32
F64 = torch.float64

masks = st.integers(1, 40).flatmap(
    lambda t: st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=1, max_size=4))


def reference_elapsed(row: list[bool]) -> list[int]:
    """The definition, one token at a time: the sequence start counts as a boundary."""
    out, last = [], 0
    for t, is_boundary in enumerate(row):
        if is_boundary:
            last = t
        out.append(t - last)
    return out


@given(masks)
def test_elapsed_since_matches_a_loop(rows: list[list[bool]]):
    elapsed = elapsed_since(torch.tensor(rows, dtype=torch.bool))
    assert elapsed.dtype == torch.long
    assert elapsed.tolist() == [reference_elapsed(row) for row in rows]


def test_elapsed_since_takes_any_leading_dims():
    torch.manual_seed(0)
    boundary = torch.rand(2, 3, 17) < 0.2
    flat = elapsed_since(boundary.reshape(6, 17)).reshape(2, 3, 17)
    assert torch.equal(elapsed_since(boundary), flat)
    assert torch.equal(elapsed_since(torch.zeros(1, 5, dtype=torch.bool)), torch.arange(5)[None])


@given(st.integers(2, 64), st.floats(2.0, 1e4))
def test_preferred_intervals_are_log_spaced_from_1_to_max(n_cells: int, max_interval: float):
    tau, _ = TimeCellEncoder(E, n_cells, max_interval).tuning(dtype=F64)
    assert tau.shape == (n_cells,)
    assert tau[0].item() == pytest.approx(1.0) and tau[-1].item() == pytest.approx(max_interval)
    ratios = tau[1:] / tau[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, max_interval ** (1 / (n_cells - 1))))


def test_each_cell_peaks_at_its_preferred_interval():
    enc = TimeCellEncoder(E, N)
    tau, _ = enc.tuning(dtype=F64)
    torch.testing.assert_close(enc.rates(tau).diagonal(), torch.ones(N, dtype=F64))
    for nearby in (0.97, 1.03):
        assert (enc.rates(tau * nearby).diagonal() < 1 - 1e-4).all()
    # On integer counts too: each cell's best integer is one next to its preferred interval.
    best = enc.rates(torch.arange(2048)).argmax(0)
    assert ((best - tau).abs() < 1).all()


def test_fields_widen_in_proportion_to_the_preferred_interval():
    enc = TimeCellEncoder(E, N)
    tau, sigma = enc.tuning(dtype=F64)
    assert (sigma.diff() > 0).all()  # wider in log(1 + elapsed) too
    grid = torch.linspace(0.5, 1.7, 2401, dtype=F64)
    rates = enc.rates(tau[:, None] * grid)  # (N, 2401, N): each cell around its own interval
    own = rates[torch.arange(N), :, torch.arange(N)]
    half_width = (own >= 0.5).sum(-1) * (grid[1] - grid[0]) * tau  # in tokens
    assert (half_width.diff() > 0).all()
    weber = half_width / tau  # scale invariance: the same relative width for every cell
    assert weber.max() / weber.min() < 1.02


def test_rates_far_beyond_max_interval_are_finite_and_vanish():
    enc = TimeCellEncoder(E, N, max_interval=512.0)
    far = torch.tensor([10 * 512, 10**6, 2**40, 2**62])
    rates = enc.rates(far)
    assert torch.isfinite(rates).all()
    assert rates.min() >= 0 and rates.max() < 1e-6
    everywhere = enc.rates(torch.arange(0, 10**5, 7))
    assert everywhere.min() >= 0 and everywhere.max() <= 1


def gaussian_in_float64(enc: TimeCellEncoder, counts: torch.Tensor) -> torch.Tensor:
    """The tuning curves at ``counts`` (n,), in float64: nothing underflows before 1e-308."""
    tau, sigma = enc.tuning(dtype=F64)
    z = (torch.log1p(counts.to(F64))[:, None] - torch.log1p(tau)) / sigma
    return torch.exp(-0.5 * z.square())


@given(st.integers(2, 64), st.floats(2.0, 1e4), st.floats(0.1, 4.0),
       st.lists(st.integers(0, 10**7), min_size=1, max_size=64))
def test_rates_are_never_subnormal_and_otherwise_the_gaussian(
        n_cells: int, max_interval: float, width: float, elapsed: list[int]):
    """exp underflows through float32's subnormals, which x86 multiplies ~100x slower: those
    cells are exactly silent, every other rate is the tuning curve's (to float32's rounding of
    z, which the exponential magnifies in the tails)."""
    enc = TimeCellEncoder(E, n_cells, max_interval, width)
    counts = torch.tensor(elapsed)
    rates = enc.rates(counts)
    tiny = torch.finfo(torch.float32).tiny
    assert not ((rates > 0) & (rates < tiny)).any()
    exact = gaussian_in_float64(enc, counts)
    normal = exact >= 2 * tiny
    torch.testing.assert_close(rates[normal].double(), exact[normal], rtol=2e-3, atol=0)
    assert (rates[exact < tiny / 2] == 0).all()


def test_subnormal_range_is_reached_and_flushed():
    """Elapsed counts whose z lands in exp's subnormal range (|z| ~ 13.2-14.0) for some cell:
    the code at the default setting has such cells, and they come out 0."""
    enc = TimeCellEncoder(E, N)
    counts = torch.arange(0, 20_000)
    exact = gaussian_in_float64(enc, counts)
    tiny = torch.finfo(torch.float32).tiny
    subnormal = (exact < tiny) & (exact > tiny * 2**-23)
    assert subnormal.sum() > 100
    assert (enc.rates(counts)[subnormal] == 0).all()


def test_a_boundary_token_is_silent():
    assert TimeCellEncoder(E, N).rates(torch.zeros(3, dtype=torch.long)).max() < 1e-10


def test_gradients_reach_the_readout_and_the_residual():
    enc = TimeCellEncoder(E, N)
    torch.manual_seed(1)
    h = torch.randn(2, 24, E, requires_grad=True)
    elapsed = elapsed_since(torch.rand(2, 24) < 0.1)
    out = enc(h, elapsed)
    with torch.no_grad():
        torch.testing.assert_close(out - h, enc.rates(elapsed) @ enc.out.weight.T)
    (out * torch.randn(2, 24, E)).sum().backward()
    for grad in (enc.out.weight.grad, h.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_bf16_autocast_keeps_the_residual_dtype_and_the_code_in_float32():
    enc = TimeCellEncoder(E, N)
    torch.manual_seed(2)
    h = torch.randn(2, 16, E)
    elapsed = elapsed_since(torch.rand(2, 16) < 0.2) * 9
    with torch.no_grad():
        ref = enc(h, elapsed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, rates = enc(h, elapsed), enc.rates(elapsed)
        half = enc.to(torch.bfloat16)(h.to(torch.bfloat16), elapsed)
    assert out.dtype == torch.float32 and rates.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=0)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), ref, atol=5e-2, rtol=0)


@pytest.mark.parametrize("args", [(1, 512.0), (8, 1.0), (8, 0.5)])
def test_rejects_degenerate_settings(args: tuple[int, float]):
    with pytest.raises(ValueError):
        TimeCellEncoder(E, *args)


def test_width_scales_every_field():
    narrow, wide = TimeCellEncoder(E, N, width=1.0), TimeCellEncoder(E, N, width=2.0)
    torch.testing.assert_close(wide.tuning()[1], 2 * narrow.tuning()[1])
    assert wide.rates(torch.tensor(0)).max() > narrow.rates(torch.tensor(0)).max()
    assert math.isclose(wide.tuning()[0][-1].item(), 512.0, rel_tol=1e-6)
