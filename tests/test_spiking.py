"""Spiking neurons: LIF against a plain loop (all resets, and the parallel scan), surrogate
gradients, learnable parameters, GIF adaptation and graded spikes, explicit state, bf16."""

from __future__ import annotations

import itertools
import math
import pickle

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from aura.nn.spiking import GIF, LIF, GIFState, firing_rate, leaky_scan, spike_fn

F64 = torch.float64


def reference_lif(x: torch.Tensor, beta: float, thr: float, reset: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, one step and one neuron at a time."""
    T, N = x.shape
    spikes, mems = torch.zeros(T, N, dtype=x.dtype), torch.zeros(N, dtype=x.dtype)
    for n in range(N):
        m = 0.0
        for t in range(T):
            m = beta * m + x[t, n].item()
            s = 1.0 if m > thr else 0.0
            if reset == "soft":
                m -= s * thr
            elif reset == "hard" and s:
                m = 0.0
            spikes[t, n] = s
        mems[n] = m
    return spikes, mems


@pytest.mark.parametrize("reset", ["soft", "hard", "none"])
def test_lif_matches_a_loop(reset: str):
    torch.manual_seed(0)
    x = torch.randn(40, 6, dtype=F64) * 0.8 + 0.3
    spikes, mem = LIF(beta=0.8, threshold=1.0, reset=reset)(x)
    ref_spikes, ref_mem = reference_lif(x, 0.8, 1.0, reset)
    assert ref_spikes.sum() > 0
    assert torch.equal(spikes, ref_spikes)
    torch.testing.assert_close(mem, ref_mem, atol=1e-12, rtol=0)


@given(st.integers(1, 512), st.floats(0.5, 0.99), st.integers(0, 2**16))
@example(253, 0.9834495432751896, 0)  # once off by 1.2e-5 against a fixed 1e-5 tolerance
def test_leaky_scan_matches_the_recurrence(T: int, beta: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    x, mem0 = torch.randn(T, 3, 2, generator=g), torch.randn(3, 2, generator=g)
    out = leaky_scan(x, torch.tensor(beta), mem0)
    ref, m = [], mem0.double()
    for x_t in x.double():
        m = beta * m + x_t
        ref.append(m)
    assert out.shape == x.shape and out.dtype == torch.float32
    expected = torch.stack(ref)
    # fp32 rounding scales with the membrane's size (up to ~1/sqrt(1 - beta^2) here), not its value
    scale = float(expected.abs().max().clamp(min=1.0))
    torch.testing.assert_close(out.double(), expected, atol=1e-5 * scale, rtol=1e-5)


def test_scan_path_continues_from_a_given_state():
    torch.manual_seed(1)
    x, mem0 = torch.randn(100, 4, dtype=F64), torch.randn(4, dtype=F64)
    none, soft = LIF(0.95, reset="none"), LIF(0.95, reset="none")
    s_all, m_all = none(x, mem0)
    s_a, m_a = none(x[:37], mem0)
    s_b, m_b = soft(x[37:], m_a)
    torch.testing.assert_close(m_b, m_all)
    assert torch.equal(torch.cat([s_a, s_b]), s_all)


def surrogate_grad(name: str, x: torch.Tensor, **params: float) -> torch.Tensor:
    x = x.clone().requires_grad_()
    spikes = spike_fn(name, **params)(x)
    assert torch.equal(spikes, (x > 0).to(x.dtype))
    spikes.sum().backward()
    return x.grad


POINTS = torch.tensor([-1.0, -0.1, 0.0, 0.05, 0.5, 2.0], dtype=F64)


def test_surrogate_backward_matches_formulas():
    fast = surrogate_grad("fast_sigmoid", POINTS)
    torch.testing.assert_close(fast, 1 / (1 + 25 * POINTS.abs()) ** 2)
    torch.testing.assert_close(surrogate_grad("fast_sigmoid", POINTS, slope=5.0),
                               1 / (1 + 5 * POINTS.abs()) ** 2)
    at = surrogate_grad("atan", POINTS)
    torch.testing.assert_close(at, 1 / (1 + (math.pi * POINTS) ** 2))
    assert at[2] == 1.0 and fast[2] == 1.0  # both peak at 1 on the threshold ...
    assert (at - fast).abs()[[0, 1, 3, 4, 5]].min() > 1e-3  # ... and differ off it


def test_surrogate_registry_rejects_unknown_and_accepts_callables():
    with pytest.raises(ValueError, match="unknown surrogate"):
        spike_fn("boxcar")
    calls = []

    def straight_through(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        return (x > 0).to(x.dtype) + x - x.detach()

    lif = LIF(surrogate=straight_through, reset="none")
    x = torch.full((5, 3), 0.5, requires_grad=True)
    lif(x)[0].sum().backward()
    assert calls == [(5, 3)]
    # d spikes_t / d x_s = beta^(t-s) under the identity surrogate: sum over t >= s
    expected = torch.tensor([sum(0.9**k for k in range(5 - s)) for s in range(5)])
    torch.testing.assert_close(x.grad[:, 0], expected)
    pickle.dumps(LIF(surrogate="atan"))


def test_the_two_surrogates_give_different_input_gradients():
    torch.manual_seed(2)
    x = torch.randn(20, 8) + 0.5
    grads = []
    for name in ("fast_sigmoid", "atan"):
        xi = x.clone().requires_grad_()
        LIF(surrogate=name)(xi)[0].sum().backward()
        grads.append(xi.grad)
    assert not torch.allclose(*grads)


def test_hard_reset_zeroes_and_soft_reset_subtracts():
    x = torch.tensor([[1.5], [0.0]])
    s, m = LIF(beta=0.5, threshold=1.0, reset="hard").forward_step(x[0])
    assert s.item() == 1.0 and m.item() == 0.0
    s, m = LIF(beta=0.5, threshold=1.0, reset="soft").forward_step(x[0])
    assert s.item() == 1.0 and m.item() == pytest.approx(0.5)
    s, m = LIF(beta=0.5, threshold=1.0, reset="soft").forward_step(x[1], m)
    assert s.item() == 0.0 and m.item() == pytest.approx(0.25)
    _, m = LIF(beta=0.5, threshold=1.0, reset="none").forward_step(x[0])
    assert m.item() == pytest.approx(1.5)


@pytest.mark.parametrize("reset", ["soft", "none"])
def test_learnable_beta_and_threshold_get_gradients_and_beta_stays_in_range(reset: str):
    torch.manual_seed(3)
    lif = LIF(beta=0.9, reset=reset, learn_beta=True, learn_threshold=True)
    assert {n for n, _ in lif.named_parameters()} == {"beta_logit", "threshold"}
    opt = torch.optim.SGD(lif.parameters(), lr=5.0)
    x = torch.randn(30, 4, 8) + 0.3
    for _ in range(20):
        opt.zero_grad()
        lif(x)[0].mean().neg().backward()  # push the rate up: beta towards 1
        assert lif.beta_logit.grad.abs() > 0 and lif.threshold.grad.abs() > 0
        opt.step()
        assert 0 < lif.beta.item() < 1
    assert lif.beta.item() > 0.9


def test_lif_rejects_bad_settings():
    with pytest.raises(ValueError, match="beta"):
        LIF(beta=1.0)
    with pytest.raises(ValueError, match="reset"):
        LIF(reset="zero")


def test_two_instances_do_not_share_state():
    torch.manual_seed(4)
    x1, x2 = torch.randn(25, 2, 5) + 0.4, torch.randn(25, 2, 5) * 2
    a, b = LIF(), LIF()
    before = {k: v.clone() for k, v in a.state_dict().items()}
    alone, _ = a(x1)
    m1 = m2 = None
    interleaved = []
    for t in range(25):
        s1, m1 = a.forward_step(x1[t], m1)
        _, m2 = b.forward_step(x2[t], m2)
        interleaved.append(s1)
    assert torch.equal(torch.stack(interleaved), alone)
    assert torch.equal(a(x1)[0], alone)  # running again gives the same: nothing was kept
    assert a.state_dict().keys() == before.keys()
    assert not torch.equal(m1, m2)


@given(st.floats(0.0, 6.0), st.integers(1, 5))
def test_gif_spikes_are_graded_levels(scale: float, max_level: int):
    g = torch.Generator().manual_seed(5)
    x = torch.rand(30, 3, 4, generator=g) * scale
    spikes, state = GIF(max_level=max_level)(x)
    assert isinstance(state, GIFState)
    assert torch.equal(spikes, spikes.round())
    assert spikes.min() >= 0 and spikes.max() <= max_level


def test_gif_level_counts_threshold_crossings():
    gif = GIF(beta=0.5, threshold=1.0, adapt_scale=0.0, max_level=3)
    x = torch.tensor([0.5, 1.5, 2.5, 3.5, 9.0, -1.0])
    spikes, state = gif.forward_step(x)
    assert spikes.tolist() == [0, 1, 2, 3, 3, 0]
    torch.testing.assert_close(state.mem, x - spikes)
    # the surplus carries over: 2.6 -> 2 (0.6 left), 2.9 -> 2 (0.9 left), 3.05 -> 3
    assert gif(torch.full((3, 1), 2.6))[0].flatten().tolist() == [2, 2, 3]


def test_gif_with_one_level_and_no_adaptation_is_a_soft_lif():
    torch.manual_seed(6)
    x = torch.randn(50, 3, 4, dtype=F64) + 0.4
    gif_spikes, gif_state = GIF(beta=0.85, adapt_scale=0.0, max_level=1)(x)
    lif_spikes, lif_mem = LIF(beta=0.85, reset="soft")(x)
    assert torch.equal(gif_spikes, lif_spikes)
    torch.testing.assert_close(gif_state.mem, lif_mem)


def test_gif_threshold_rises_after_spikes_and_decays_back():
    gif = GIF(adapt_decay=0.9, adapt_scale=0.5)
    state, thresholds = None, []
    for t in range(60):
        x = torch.full((1,), 2.0 if t < 10 else 0.0)
        _, state = gif.forward_step(x, state)
        thresholds.append(gif.threshold_of(state).item())
    assert thresholds[9] > 1.5
    quiet = thresholds[10:]
    assert all(b < a for a, b in itertools.pairwise(quiet))
    assert quiet[-1] == pytest.approx(1.0, abs=0.02)


def test_gif_adaptation_lowers_the_rate_under_sustained_input():
    x = torch.full((200, 2, 8), 0.4)
    adapted, _ = GIF(max_level=1, adapt_scale=0.5)(x)
    plain, _ = LIF(reset="soft")(x)
    assert firing_rate(plain) > 0.1
    assert firing_rate(adapted) < 0.7 * firing_rate(plain)


def test_gif_gradients_reach_the_input():
    torch.manual_seed(7)
    x = (torch.randn(20, 4, 6) + 1.0).requires_grad_()
    spikes, state = GIF(max_level=3, surrogate="atan")(x)
    (spikes.sum() + state.mem.sum()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_firing_rate_is_a_float32_mean():
    spikes = torch.tensor([[0, 1, 2, 1]], dtype=torch.bfloat16)
    rate = firing_rate(spikes)
    assert rate.dtype == torch.float32 and rate.item() == 1.0 and rate.dim() == 0


@pytest.mark.parametrize("make", [lambda: LIF(reset="soft", learn_beta=True),
                                  lambda: LIF(reset="hard", learn_threshold=True),
                                  lambda: LIF(reset="none", learn_beta=True), lambda: GIF()],
                         ids=["soft", "hard", "none", "gif"])
def test_bf16_state_and_outputs_with_gradients(make):
    torch.manual_seed(8)
    neuron = make()
    x = (torch.randn(16, 2, 8) + 0.8).to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        spikes, state = neuron(x)
    mems = state if isinstance(state, tuple) else (state,)
    assert spikes.dtype == torch.bfloat16 and all(m.dtype == torch.bfloat16 for m in mems)
    assert spikes.sum() > 0
    (spikes.float().sum() + mems[0].float().sum()).backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.abs().sum() > 0
    for p in neuron.parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.abs() > 0


def test_fp32_under_bf16_autocast_keeps_fp32_scan():
    x = torch.randn(64, 4) * 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        spikes, mem = LIF(reset="none")(x)
    assert spikes.dtype == mem.dtype == torch.float32
    torch.testing.assert_close(mem, LIF(reset="none")(x)[1])


def step_by_step(lif: LIF, x: torch.Tensor, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused graph: one autograd-tracked ``forward_step`` per step."""
    out = []
    for x_t in x:
        spikes, mem = lif.forward_step(x_t, mem)
        out.append(spikes)
    return torch.stack(out), mem


# what wants a gradient besides the input: (learn_beta, learn_threshold, initial state)
LEARNS = {"input": (False, False, False), "state": (False, False, True),
          "beta": (True, False, False), "threshold": (False, True, True),
          "all": (True, True, True)}


@pytest.mark.parametrize("reset", ["soft", "hard"])
@pytest.mark.parametrize("constant", [False, True], ids=["sequence", "constant"])
@pytest.mark.parametrize("learn", list(LEARNS))
@pytest.mark.parametrize("surrogate", ["atan", "fast_sigmoid"])
def test_fused_lif_equals_the_step_by_step_graph(reset: str, constant: bool, learn: str,
                                                 surrogate: str):
    """Every path of the fused kernel against autograd through ``forward_step``: spikes (or
    counts), final state, and the gradients w.r.t. input, initial state, beta and threshold of a
    loss on the spikes, the final state or both. A constant input through a soft reset with only
    the input to learn takes the closed-form backward, every other case a reverse walk; without
    a gradient the plain run must give the same values."""
    torch.manual_seed(9)
    learn_beta, learn_threshold, state_grad = LEARNS[learn]
    lif = LIF(beta=0.8, reset=reset, surrogate=surrogate, learn_beta=learn_beta,
              learn_threshold=learn_threshold)
    steps = 12
    x = (torch.randn(3, 5, dtype=F64) + 0.6) if constant else torch.randn(steps, 3, 5, dtype=F64)
    mem0 = torch.randn(3, 5, dtype=F64) * 0.5
    weights = torch.randn(steps, 3, 5, dtype=F64)

    def run(fused: bool, use_spikes: bool, use_mem: bool
            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        lif.zero_grad()
        xi, mi = x.clone().requires_grad_(), mem0.clone().requires_grad_(state_grad)
        if not fused:
            spikes, mem = step_by_step(lif, xi.expand(steps, *xi.shape) if constant else xi, mi)
            out = spikes.sum(0) if constant else spikes
        elif constant:
            out, mem = lif.forward_constant(xi, steps, mi)
        else:
            out, mem = lif(xi, mi)
        loss = (out * (weights[0] if constant else weights)).sum() if use_spikes else 0.0
        if use_mem:
            loss = loss + (mem * weights[1]).sum()
        loss.backward()
        grads = [xi.grad, *([mi.grad] if state_grad else []),
                 *(torch.zeros_like(p) if p.grad is None else p.grad.clone()
                   for p in lif.parameters())]
        return [out.detach(), mem.detach()], grads

    for use_spikes, use_mem in ((True, True), (True, False), (False, True)):
        (out, mem), got = run(True, use_spikes, use_mem)
        (want_out, want_mem), want = run(False, use_spikes, use_mem)
        assert want_out.sum() > 0 and torch.equal(out, want_out)
        torch.testing.assert_close(mem, want_mem, rtol=1e-12, atol=1e-12)
        assert len(got) == 1 + state_grad + learn_beta + learn_threshold
        assert want[0].abs().sum() > 0
        assert not use_spikes or all(g.abs().sum() > 0 for g in want[1:])
        for g, w in zip(got, want, strict=True):  # float64; the parameters' grads are float32
            torch.testing.assert_close(g, w, rtol=1e-10 if g.dtype == F64 else 1e-6,
                                       atol=1e-12)
    with torch.no_grad():
        plain_out, plain_mem = lif.forward_constant(x, steps, mem0) if constant else lif(x, mem0)
    assert torch.equal(plain_out, out) and torch.equal(plain_mem, mem)


class DropsItsInputGradient(torch.autograd.Function):
    """``a * b`` whose backward gives ``a`` no gradient (None), unlike a multiplication by 0."""

    @staticmethod
    def forward(ctx: object, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, grad


@pytest.mark.parametrize("reset", ["soft", "hard"])
@pytest.mark.parametrize("constant", [False, True], ids=["sequence", "constant"])
def test_fused_lif_gives_zero_gradients_when_neither_output_reaches_the_loss(reset: str,
                                                                             constant: bool):
    lif = LIF(reset=reset, learn_beta=True)
    x = torch.randn(6, 4).requires_grad_()
    out, _ = lif.forward_constant(x, 5) if constant else lif(x)
    DropsItsInputGradient.apply(out, torch.ones(4, requires_grad=True)).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(lif.beta_logit.grad, torch.zeros(()))


@pytest.mark.parametrize("reset", ["soft", "hard"])
def test_scratch_reused_across_inference_and_training_calls(reset: str):
    """The fused kernels keep scratch buffers between calls; one made under inference_mode must
    still be writable by a later training call, and old contents must not leak into results."""
    torch.manual_seed(3)
    lif = LIF(reset=reset, surrogate="atan")
    x = torch.randn(6, 2, 9) + 0.5
    with torch.inference_mode():
        first, _ = lif(x)
        lif.forward_constant(x[0], 4)
    xi = x.clone().requires_grad_()
    spikes, _ = lif(xi)
    spikes.sum().backward()
    grad = xi.grad.clone()
    lif(torch.randn(6, 2, 9) * 5)  # scribbles over the scratch with other values
    xi.grad = None
    lif(xi)[0].sum().backward()
    assert torch.equal(spikes.detach(), first)
    torch.testing.assert_close(xi.grad, grad, rtol=0, atol=0)
