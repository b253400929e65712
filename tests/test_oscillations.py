"""ThetaGammaEncoding: shapes and dtypes, exact phases far out, periodicity, coupling, init."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aura.nn.oscillations import SCALE, ThetaGammaEncoding


def reference_features(enc: ThetaGammaEncoding, position: int) -> torch.Tensor:
    """The features of one position from exact rational phases, in float64."""
    out = []
    for i, period in enumerate(enc.periods.tolist()):  # float64 of ticks / 1024: exact
        turns = Fraction(position) / Fraction(period)
        phase = 2 * math.pi * float(turns - math.floor(turns))
        out += [math.cos(phase), math.sin(phase)]
        if i == 1:
            envelope = (1 + out[0]) / 2
            out[2:4] = [envelope * out[2], envelope * out[3]]
    return torch.tensor(out, dtype=torch.float64)


@given(n_embd=st.integers(3, 40).map(lambda n: 2 * n), learnable=st.booleans(),
       shape=st.sampled_from([(7,), (2, 5), (1, 1)]))
def test_shape_and_dtype(n_embd: int, learnable: bool, shape: tuple[int, ...]) -> None:
    enc = ThetaGammaEncoding(n_embd, learnable_mix=learnable)
    pos = torch.arange(math.prod(shape)).view(shape)
    out = enc(pos)
    assert out.shape == (*shape, n_embd) and out.dtype == torch.float32
    assert enc(pos, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("learnable", [True, False])
def test_adds_to_bf16_activations_under_autocast(learnable: bool) -> None:
    enc = ThetaGammaEncoding(32, learnable_mix=learnable)
    x = torch.randn(2, 8, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pe = enc(torch.arange(8), dtype=x.dtype)
        y = x + pe
        mixed = enc(torch.arange(8))
    assert pe.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    # the learned mix is a matmul, so autocast itself brings it to bf16
    assert mixed.dtype == (torch.bfloat16 if learnable else torch.float32)
    torch.testing.assert_close(y.float(), x.float() + enc(torch.arange(8)).float(),
                               atol=2e-2, rtol=1e-2)


@given(position=st.one_of(st.integers(10**7, 10**7 + 10**4), st.integers(0, 10**9)))
def test_phases_are_exact_far_beyond_the_training_length(position: int) -> None:
    enc = ThetaGammaEncoding(48, learnable_mix=False)
    got = enc.features(torch.tensor([position, 10])).double()
    torch.testing.assert_close(got[0], reference_features(enc, position), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], reference_features(enc, 10), atol=1e-5, rtol=0)


@given(position=st.integers(0, 10**6), cycles=st.integers(1, 10**6))
def test_every_component_is_exactly_periodic(position: int, cycles: int) -> None:
    enc = ThetaGammaEncoding(40, learnable_mix=False)
    whole = enc.period_ticks  # n ticks = n / 1024 tokens: n tokens are 1024 whole cycles
    pairs = len(whole)
    shifted = enc.features(position + cycles * whole).view(pairs, pairs, 2)
    here = enc.features(torch.tensor(position)).view(pairs, 2)
    # pair i shifted by pair i's period; gamma (pair 1) rides on theta's envelope, so it repeats
    # with theta's period, which is a whole number of gamma cycles
    keep = [i for i in range(pairs) if i != 1]
    assert torch.equal(shifted.diagonal().T[keep], here[keep])
    assert torch.equal(shifted[0, :2], here[:2])


def test_finite_and_bounded_out_to_a_billion_and_beyond() -> None:
    pos = torch.tensor([0, 1, 10**7, 10**9 - 1, 10**9, 2**62])
    fixed = ThetaGammaEncoding(64, learnable_mix=False)
    assert fixed.features(pos).abs().max() <= 1.0
    assert fixed(pos).abs().max() <= SCALE * (1 + 1e-6)
    mixed = ThetaGammaEncoding(64)
    assert torch.isfinite(mixed(pos)).all()
    torch.testing.assert_close(mixed(pos), fixed(pos))  # the mix starts at SCALE * identity


@pytest.mark.parametrize("learnable", [True, False])
def test_positions_within_a_training_length_are_distinct(learnable: bool) -> None:
    enc = ThetaGammaEncoding(64, learnable_mix=learnable)
    with torch.no_grad():
        x = enc(torch.arange(1024)).double()
    dist = torch.cdist(x, x)
    dist.fill_diagonal_(math.inf)
    assert dist.min() > 0.5 * SCALE  # far above float32 noise, not merely > 0


def test_gamma_amplitude_follows_theta_phase() -> None:
    enc = ThetaGammaEncoding(32, theta_period=64.0, gammas_per_theta=8, learnable_mix=False)
    f = enc.features(torch.arange(64 * 3))
    theta, gamma_amp = f[:, 0], f[:, 2:4].norm(dim=-1)
    peak, trough = gamma_amp[0::64], gamma_amp[32::64]  # theta phase 0 and π
    assert torch.allclose(peak, torch.ones(3)) and trough.max() < 1e-6
    torch.testing.assert_close(gamma_amp, (1 + theta) / 2, atol=1e-6, rtol=0)
    # 8 gamma cycles per theta cycle: the gamma phase repeats every 8 tokens
    gamma_dir = f[:, 2:4] / gamma_amp.clamp_min(1e-12)[:, None]
    awake = gamma_amp > 0.1
    torch.testing.assert_close(gamma_dir[8:][awake[8:] & awake[:-8]],
                               gamma_dir[:-8][awake[8:] & awake[:-8]], atol=1e-5, rtol=0)


def test_parameters_and_init() -> None:
    fixed = ThetaGammaEncoding(64, learnable_mix=False)
    assert list(fixed.parameters()) == [] and fixed.state_dict() == {}
    mixed = ThetaGammaEncoding(768)
    assert [p.shape for p in mixed.parameters()] == [(768, 768)]
    with torch.no_grad():
        std = mixed(torch.arange(2048)).std().item()
    assert 0.015 < std < 0.025  # like an N(0, 0.02) embedding


def test_casting_the_module_keeps_the_periods_exact() -> None:
    enc = ThetaGammaEncoding(32).to(torch.bfloat16)
    assert enc.period_ticks.dtype == torch.int64
    out = enc(torch.tensor([10**9]))
    assert out.dtype == torch.bfloat16
    ref = ThetaGammaEncoding(32)(torch.tensor([10**9]))
    torch.testing.assert_close(out.float(), ref, atol=5e-4, rtol=0)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="even"):
        ThetaGammaEncoding(33)
    with pytest.raises(ValueError, match="shorter than 2"):
        ThetaGammaEncoding(32, theta_period=12.0, gammas_per_theta=8)
    with pytest.raises(ValueError, match="gammas_per_theta"):
        ThetaGammaEncoding(32, gammas_per_theta=0)
    with pytest.raises(TypeError, match="integers"):
        ThetaGammaEncoding(32)(torch.arange(4.0))
