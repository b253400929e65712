"""aura.plasticity: token STDP bit-identical to the sequential loop, textbook pair STDP, whitening
to identity covariance, batched Oja/GHA finding known components and growing to their number."""

from __future__ import annotations

import contextlib
import logging
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import aura.plasticity.stdp as stdp_module
from aura.errors import DataError
from aura.plasticity import OjaLayer, OnlineWhitener, PairSTDP, TokenSTDP
from aura.plasticity.stdp import QUANTUM, clamped_walk_ends, walk_fits_int64
from conftest import requires_extra


def seed_loop(stdp: TokenSTDP, batches: list[tuple[list[int], list[bool], list[float]]]
              ) -> tuple[dict[int, float], list[np.ndarray]]:
    """The rule as a plain loop: a dict of floats, one token at a time."""
    weights: dict[int, float] = {}
    modulated = []
    for tokens, spiked, sal in batches:
        for i, tok in enumerate(tokens):
            prev = weights.get(tok, 0.0)
            delta = stdp.lr_plus if spiked[i] else -stdp.lr_minus
            weights[tok] = float(np.clip(prev + delta, stdp.w_min, stdp.w_max))
        mod = np.ones(len(tokens), dtype=np.float64)
        for i, tok in enumerate(tokens):
            mod[i] = max(0.0, 1.0 + stdp.alpha * weights.get(tok, 0.0))
        modulated.append(np.asarray(sal, dtype=np.float64) * mod)
    return weights, modulated


def run_batched(stdp: TokenSTDP, batches: list[tuple[list[int], list[bool], list[float]]]
                ) -> list[np.ndarray]:
    out = []
    for tokens, spiked, sal in batches:
        tok = torch.tensor(tokens, dtype=torch.long)
        stdp.update(tok, torch.tensor(spiked, dtype=torch.bool))
        out.append(stdp.modulate(torch.tensor(sal, dtype=torch.float64), tok).numpy())
    return out


def assert_same_as_loop(stdp: TokenSTDP, batches: list) -> None:
    ref_w, ref_mod = seed_loop(stdp, batches)
    got_mod = run_batched(stdp, batches)
    expected = torch.zeros(stdp.vocab_size, dtype=torch.float64)
    for tok, w in ref_w.items():
        expected[tok] = w
    assert torch.equal(stdp.weights, expected), (stdp.weights, expected)
    for a, b in zip(got_mod, ref_mod, strict=True):
        assert np.array_equal(a, b)


# how TokenSTDP.update walks on the CPU: numba's compiled loop (the `jit` extra) or, without numba
# and on every other device, the vectorised passes
WALKS = ["compiled", "vectorised"]


@contextlib.contextmanager
def walking(walk: str) -> Iterator[None]:
    if walk == "compiled":
        requires_extra("numba", "jit")
        assert stdp_module.compiled_walk() is not None
        yield
    else:
        with mock.patch.object(stdp_module, "compiled_walk", lambda: None):
            yield


rates = st.sampled_from([0.01, 0.05, 0.1, 0.125, 0.3, 0.7])


@pytest.mark.parametrize("walk", WALKS)
@given(data=st.data(), vocab=st.integers(1, 6), lr_plus=rates, lr_minus=rates,
       w_min=st.sampled_from([-1.0, -0.3, 0.0, 0.2]), width=st.sampled_from([0.1, 0.5, 1.5]),
       alpha=st.sampled_from([0.2, 1.0, 4.0]))
def test_token_stdp_is_bit_identical_to_the_sequential_loop(walk, data, vocab, lr_plus, lr_minus,
                                                             w_min, width, alpha) -> None:
    """Many repeats of few tokens, bounds hit often, several batches: same bits as the loop."""
    stdp = TokenSTDP(vocab, lr_plus=lr_plus, lr_minus=lr_minus, w_min=w_min,
                     w_max=w_min + width, alpha=alpha, dtype=torch.float64)
    batches = []
    for _ in range(data.draw(st.integers(1, 3))):
        n = data.draw(st.integers(0, 120))
        tokens = data.draw(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n))
        spiked = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
        sal = data.draw(st.lists(st.floats(0, 10), min_size=n, max_size=n))
        batches.append((tokens, spiked, sal))
    with walking(walk):
        assert_same_as_loop(stdp, batches)


@given(data=st.data(), lo=st.integers(-40, 0), width=st.integers(0, 40))
def test_both_walk_backends_end_where_the_loop_does(data, lo: int, width: int) -> None:
    """The NumPy passes (CPU) and the PyTorch passes (other devices, run here on CPU tensors)
    give the loop's clamped ends for every segment, with ``step`` any bound of the steps."""
    hi = lo + width
    counts = data.draw(st.lists(st.integers(1, 25), min_size=1, max_size=12))
    d = data.draw(st.lists(st.integers(-15, 15), min_size=sum(counts), max_size=sum(counts)))
    start = data.draw(st.lists(st.integers(lo, hi), min_size=len(counts), max_size=len(counts)))
    expected, steps = [], iter(d)
    for x, n in zip(start, counts, strict=True):
        for _ in range(n):
            x = min(max(x + next(steps), lo), hi)
        expected.append(x)
    args = (torch.tensor(start), torch.tensor(counts), torch.tensor(d), lo, hi)
    step = max(map(abs, d)) + data.draw(st.integers(0, 3))
    assert clamped_walk_ends(*args).tolist() == expected
    assert clamped_walk_ends(*args, step).tolist() == expected
    assert stdp_module._walk_ends(stdp_module._TorchOps, *args, step).tolist() == expected


@pytest.mark.parametrize("vocab", [3, 70_000])
@pytest.mark.parametrize(("walk", "chunk"), [("compiled", None), ("vectorised", None),
                                             ("vectorised", 1000)])
def test_token_stdp_long_runs_and_large_vocabularies(vocab: int, walk: str, chunk: int | None,
                                                     monkeypatch) -> None:
    """Runs of thousands of one token and ids past 2**16, in one pass and in chunks of 1000."""
    if chunk:
        monkeypatch.setattr(stdp_module, "UPDATE_CHUNK", chunk)
    rng = np.random.default_rng(vocab)
    ids = rng.choice([0, 1, 2, vocab - 1], size=6000, p=[0.6, 0.25, 0.1, 0.05])
    spiked = rng.random(6000) < rng.random(6000)
    stdp = TokenSTDP(vocab, lr_plus=0.013, lr_minus=0.011, w_min=-0.2, w_max=0.4,
                     dtype=torch.float64)
    batch = (ids.tolist(), spiked.tolist(), rng.random(6000).tolist())
    with walking(walk):
        assert_same_as_loop(stdp, [batch])
    unclamped, clamped = {}, 0  # the bounds did matter: the unclamped walk leaves them
    for tok, spike in zip(batch[0], batch[1], strict=True):
        unclamped[tok] = unclamped.get(tok, 0.0) + (stdp.lr_plus if spike else -stdp.lr_minus)
        clamped += not stdp.w_min <= unclamped[tok] <= stdp.w_max
    assert clamped > 100


@pytest.mark.parametrize("walk", WALKS)
def test_token_stdp_largest_rates_split_the_batch_and_stay_exact(walk: str) -> None:
    """Rates and bounds near the 2**20 limit: one batch's vectorised walk would overflow int64,
    so it runs in halves; the weights still equal the loop's, bit for bit, on both walks."""
    stdp = TokenSTDP(2, lr_plus=2.0**19 + 0.25, lr_minus=2.0**19 - 0.5, w_min=-(2.0**20),
                     w_max=2.0**20, alpha=1e-6, dtype=torch.float64)
    n = 2**17
    assert not walk_fits_int64(2, n, stdp.q_plus, stdp.q_min, stdp.q_max)
    rng = np.random.default_rng(3)
    batch = (rng.integers(0, 2, n).tolist(), (rng.random(n) < 0.5).tolist(), [1.0] * n)
    with walking(walk):
        assert_same_as_loop(stdp, [batch])


def test_the_compiled_walk_reads_strided_inputs_as_the_vectorised_one_does() -> None:
    """Every other token of a (2, 50) batch, spikes from a transposed tensor: views the compiled
    loop reads through their strides."""
    requires_extra("numba", "jit")
    rng = np.random.default_rng(5)
    tokens = torch.from_numpy(rng.integers(0, 7, (2, 100)))[:, ::2]
    spikes = torch.from_numpy(rng.random((50, 2)) < 0.4).T
    assert not tokens.is_contiguous() and not spikes.is_contiguous()
    weights = []
    for walk in WALKS:
        stdp = TokenSTDP(7, lr_plus=0.1, lr_minus=0.05, w_min=-0.2, w_max=0.3)
        with walking(walk):
            stdp.update(tokens, spikes)
        weights.append(stdp.weights)
    assert torch.equal(*weights) and weights[0].abs().sum() > 0


def test_the_compiled_walk_runs_where_numba_cannot_keep_its_cache(monkeypatch) -> None:
    """A read-only install with no writable cache directory compiles anew in each process."""
    numba = requires_extra("numba", "jit")
    real_njit = numba.njit

    def no_cache_dir(*args, **kwargs):
        if kwargs.get("cache"):
            raise RuntimeError("cannot cache function: no locator available")
        return real_njit(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", no_cache_dir)
    stdp_module.compiled_walk.cache_clear()
    try:
        walk = stdp_module.compiled_walk()
        q = np.zeros(3, dtype=np.int64)
        walk(q, np.array([2, 2, 0]), np.array([True, True, False]), 5, 2, -3, 8)
        assert q.tolist() == [-2, 0, 8]
    finally:
        stdp_module.compiled_walk.cache_clear()


@pytest.mark.parametrize("walk", WALKS)
def test_token_stdp_updates_inside_a_compiled_forward(walk: str) -> None:
    """`natural_brain` updates its STDP weights in its forward, which train.compile compiles:
    the walk is an op Dynamo keeps in its graph, not numba's dispatcher, which it fails on
    (and the trainer would fall back to eager)."""
    tokens = torch.tensor([1, 2, 1, 6, 1, 1])
    spikes = torch.tensor([True, False, True, True, False, True])
    compiled, eager = (TokenSTDP(7, lr_plus=0.1, lr_minus=0.05) for _ in range(2))

    @torch.compile(backend="eager")
    def forward(tok: torch.Tensor, spk: torch.Tensor) -> torch.Tensor:
        compiled.update(tok, spk)
        return tok * 2

    with walking(walk):
        assert forward(tokens, spikes).tolist() == [2, 4, 2, 12, 2, 2]
        eager.update(tokens, spikes)
    assert torch.equal(compiled.weights, eager.weights) and compiled.weights[1] > 0
    torch.compiler.reset()


def test_importing_the_rules_leaves_dynamo_and_numba_unloaded() -> None:
    """Every `aura` command imports the plasticity package; Dynamo (with sympy, ~70 MB and a
    second of start-up) and numba load only when something needs them."""
    heavy = "{'torch._dynamo', 'sympy', 'numba'}"
    code = f"import sys, aura.plasticity; print(sorted({heavy} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert proc.stdout.strip() == "[]"


def test_token_stdp_reads_2d_batches_row_major_and_sums_channels() -> None:
    tokens = torch.tensor([[4, 4, 1], [4, 2, 1]])
    channels = torch.tensor([[[1, 0, 0], [0, 0, 0], [0, 2, -3]],
                             [[0, 0, 1], [0, 0, 0], [1, 1, 0]]], dtype=torch.float32)
    a = TokenSTDP(5, lr_plus=0.5, lr_minus=0.25, w_min=-0.5, w_max=1.0)
    a.update(tokens, channels)
    b = TokenSTDP(5, lr_plus=0.5, lr_minus=0.25, w_min=-0.5, w_max=1.0)
    flat_spikes = torch.tensor([True, False, False, True, False, True])  # sum > 0 per token
    b.update(tokens.reshape(-1), flat_spikes)
    assert torch.equal(a.weights, b.weights)
    # token 4: +0.5, -0.25, +0.5; token 1: -0.25 (1 + 2 - 3 = 0 did not spike), +0.5
    assert a.weights.tolist() == [0.0, 0.25, -0.25, 0.0, 0.75]
    sal = torch.ones(2, 3)
    assert a.modulate(sal, tokens).shape == (2, 3)


def test_token_stdp_modulation_is_clamped_at_zero_and_rates_are_snapped() -> None:
    stdp = TokenSTDP(3, lr_plus=0.01, lr_minus=0.3, w_min=-1.0, w_max=1.0, alpha=5.0)
    assert abs(stdp.lr_plus - 0.01) <= QUANTUM / 2 and stdp.lr_plus / QUANTUM == round(
        stdp.lr_plus / QUANTUM)
    stdp.update(torch.tensor([1, 1, 1, 1]), torch.zeros(4))
    assert stdp.weights[1].item() == -1.0
    out = stdp.modulate(torch.tensor([2.0, 2.0]), torch.tensor([1, 0]))
    assert out.tolist() == [0.0, 2.0]


@pytest.mark.parametrize("n_tokens", [4, 40])  # a gather per token, or one table for all
def test_token_stdp_modulate_keeps_dtype_promotion_gradients_and_its_input(n_tokens) -> None:
    """``modulate`` multiplies into its own factor only where that cannot show: the result has
    ``salience * factor``'s dtype, gradients reach salience, and salience is left as it was."""
    stdp = TokenSTDP(5, lr_plus=0.5, lr_minus=0.25, alpha=1.0, dtype=torch.float32)
    tokens = torch.arange(n_tokens) % 5
    stdp.update(tokens, tokens % 2 == 0)
    factor = (stdp.weights[tokens] + 1.0).clamp_min(0.0)
    for sal_dtype in (torch.float32, torch.float64):
        sal = torch.linspace(0.5, 2.0, n_tokens, dtype=sal_dtype)
        before = sal.clone()
        out = stdp.modulate(sal, tokens)
        assert out.dtype == torch.promote_types(sal_dtype, torch.float32)
        assert torch.allclose(out.double(), before.double() * factor, atol=1e-6)
        assert torch.equal(sal, before)
    sal = torch.ones(n_tokens, requires_grad=True)
    stdp.modulate(sal, tokens).sum().backward()
    assert sal.grad is not None and torch.allclose(sal.grad.double(), factor, atol=1e-6)


def test_token_stdp_rejects_bad_input() -> None:
    stdp = TokenSTDP(10)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        stdp.update(torch.tensor([3, 10]), torch.ones(2))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        stdp.modulate(torch.ones(1), torch.tensor([-1]))
    with pytest.raises(ValueError, match="spikes"):
        stdp.update(torch.tensor([1, 2]), torch.ones(3))
    with pytest.raises(ValueError, match="integers"):
        stdp.update(torch.tensor([1.5]), torch.ones(1))
    with pytest.raises(ValueError, match="w_min"):
        TokenSTDP(10, w_min=1.0, w_max=0.0)
    stdp.update(torch.tensor([], dtype=torch.long), torch.tensor([]))
    assert stdp.weights.abs().sum().item() == 0.0


def test_token_stdp_saves_and_loads(tmp_path: Path) -> None:
    stdp = TokenSTDP(50, lr_plus=0.02, alpha=0.5)
    stdp.update(torch.randint(0, 50, (400,), generator=torch.Generator().manual_seed(0)),
                torch.rand(400, generator=torch.Generator().manual_seed(1)) > 0.4)
    stdp.save(tmp_path / "stdp")
    back = TokenSTDP.load(tmp_path / "stdp")
    assert torch.equal(back.weights, stdp.weights)
    assert back.config() == stdp.config()
    (tmp_path / "stdp" / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError, match="corrupt"):
        TokenSTDP.load(tmp_path / "stdp")
    with pytest.raises(DataError, match="not a saved"):
        stdp.save(tmp_path)  # a directory with other things in it is never replaced


# --- pair STDP ---------------------------------------------------------------------------------


def spike_pair(t_pre: int, t_post: int, steps: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    pre, post = torch.zeros(steps, 1, 1), torch.zeros(steps, 1, 1)
    pre[t_pre], post[t_post] = 1.0, 1.0
    return pre, post


def test_pair_stdp_textbook_window() -> None:
    """Pre before post potentiates, post before pre depresses, both decaying as exp(-dt/tau)."""
    rule = PairSTDP(a_plus=0.01, a_minus=0.012, tau_plus=10.0, tau_minus=20.0, chunk=16)
    for dt in (0, 1, 5, 17, 30):
        ltp = rule.delta(*spike_pair(10, 10 + dt)).item()
        assert ltp == pytest.approx(0.01 * math.exp(-dt / 10.0), rel=1e-5)
    for dt in (1, 5, 17, 30):
        ltd = rule.delta(*spike_pair(10 + dt, 10)).item()
        assert ltd == pytest.approx(-0.012 * math.exp(-dt / 20.0), rel=1e-5)


def test_pair_stdp_matches_all_pairs_and_is_chunk_independent() -> None:
    g = torch.Generator().manual_seed(0)
    pre = (torch.rand(50, 3, 4, generator=g) < 0.2).float()
    post = (torch.rand(50, 3, 2, generator=g) < 0.2).float()
    rule = PairSTDP(a_plus=0.02, a_minus=0.01, tau_plus=7.0, tau_minus=11.0, chunk=8)
    expected = torch.zeros(2, 4, dtype=torch.float64)
    for tp, b, i in pre.nonzero().tolist():
        for tq, b2, j in post.nonzero().tolist():
            if b != b2:
                continue
            if tq >= tp:
                expected[j, i] += 0.02 * math.exp(-(tq - tp) / 7.0)
            else:
                expected[j, i] -= 0.01 * math.exp(-(tp - tq) / 11.0)
    expected /= 3
    got = rule.delta(pre, post)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
    whole = PairSTDP(a_plus=0.02, a_minus=0.01, tau_plus=7.0, tau_minus=11.0, chunk=1000)
    torch.testing.assert_close(whole.delta(pre, post), got, rtol=1e-5, atol=1e-7)
    w = torch.zeros(2, 4)
    rule.apply_(w, pre, post, lr=100.0, w_min=-0.05, w_max=0.05)
    assert bool((w.abs() <= torch.tensor(0.05)).all()) and w.abs().max().item() > 0.04
    with pytest.raises(ValueError, match="same T and B"):
        rule.delta(pre, post[:10])


# --- whitening ---------------------------------------------------------------------------------


def correlated(n: int, dim: int, seed: int, shift: float = 3.0) -> torch.Tensor:
    g, fixed = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(99)
    rotation = torch.linalg.qr(torch.randn(dim, dim, generator=fixed)).Q
    mixing = rotation * torch.linspace(0.3, 5.0, dim)  # condition number ~280 in variance
    return torch.randn(n, dim, generator=g) @ mixing.T + shift


@pytest.mark.parametrize("mode", ["zca", "pca"])
def test_whitened_data_has_identity_covariance(mode: str) -> None:
    dim = 16
    wh = OnlineWhitener(dim, momentum=0.9, mode=mode)
    for i in range(40):
        wh.update(correlated(1024, dim, seed=i))
    z = wh.transform(correlated(20_000, dim, seed=1000))
    cov = torch.cov(z.T.double())
    assert (cov - torch.eye(dim, dtype=torch.float64)).abs().max().item() < 0.08
    assert z.mean(0).abs().max().item() < 0.05
    if mode == "zca":
        torch.testing.assert_close(wh.matrix, wh.matrix.T, atol=1e-4, rtol=1e-4)
    pca = OnlineWhitener(dim, mode="pca", n_components=4, eps=1.0)
    pca.update(correlated(4096, dim, seed=5))
    var = pca.transform(correlated(4096, dim, seed=6)).var(0)
    assert var.shape == (4,) and bool((var[:-1] >= var[1:] - 0.02).all())


def test_whitener_mixes_batches_as_one_mixture_and_never_reallocates() -> None:
    wh = OnlineWhitener(3, momentum=0.75, dtype=torch.float64)
    a = torch.randn(100, 3, dtype=torch.float64)
    b = torch.randn(50, 3, dtype=torch.float64) * 2 + 5
    wh.update(a)
    buffers = [t.data_ptr() for t in (wh.mean, wh.cov, wh._centered)]
    wh.update(b)
    wh.transform(b)
    wh.update(a[:60])
    wh.update(b)  # smaller batches than the first reuse its buffer
    assert [t.data_ptr() for t in (wh.mean, wh.cov, wh._centered)] == buffers
    fresh = OnlineWhitener(3, momentum=0.75, dtype=torch.float64)
    fresh.update(a)
    fresh.update(b)
    ca, cb = torch.cov(a.T, correction=0), torch.cov(b.T, correction=0)
    ma, mb = a.mean(0), b.mean(0)
    mean = 0.75 * ma + 0.25 * mb
    cov = 0.75 * ca + 0.25 * cb + 0.75 * 0.25 * torch.outer(ma - mb, ma - mb)
    torch.testing.assert_close(fresh.mean, mean)
    torch.testing.assert_close(fresh.cov, cov)


def test_whitener_saves_loads_and_rejects_bad_batches(tmp_path: Path) -> None:
    wh = OnlineWhitener(8, mode="pca", n_components=3)
    with pytest.raises(RuntimeError, match="before any update"):
        wh.transform(torch.zeros(1, 8))
    wh.update(correlated(500, 8, seed=1))
    x = correlated(10, 8, seed=2)
    wh.save(tmp_path / "wh")
    back = OnlineWhitener.load(tmp_path / "wh")
    torch.testing.assert_close(back.transform(x), wh.transform(x))
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        wh.update(torch.zeros(4, 7))
    with pytest.raises(ValueError, match="n_components"):
        OnlineWhitener(8, mode="zca", n_components=3)
    with pytest.raises(DataError, match="holds a OnlineWhitener"):
        OjaLayer.load(tmp_path / "wh")


# --- Oja ---------------------------------------------------------------------------------------


def known_components(n_strong: int = 5, dim: int = 32, noise: float = 0.05, seed: int = 0):
    """A sampler of data with ``n_strong`` known orthonormal directions of decreasing variance."""
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(7))).Q
    stds = torch.linspace(3.0, 1.3, n_strong)
    g = torch.Generator().manual_seed(seed)

    def sample(n: int) -> torch.Tensor:
        z = torch.randn(n, n_strong, generator=g) * stds
        return z @ basis[:, :n_strong].T + noise * torch.randn(n, dim, generator=g)

    return basis[:, :n_strong].T.contiguous(), sample


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angles between the row spaces of ``a`` and ``b``, in radians."""
    qa = torch.linalg.qr(a.double().T).Q
    qb = torch.linalg.qr(b.double().T).Q
    return torch.arccos(torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0))


def test_oja_finds_known_components_and_grows_to_their_number(caplog) -> None:
    truth, sample = known_components()
    oja = OjaLayer(32, max_components=12, init_components=1, lr=0.02, grow_threshold=0.05,
                   patience=15)
    with caplog.at_level(logging.INFO, logger="aura.plasticity.oja"):
        for _ in range(500):
            out = oja.step(sample(256))
    assert oja.k == 5 and out["components"] == 5
    assert [e["components"] for e in oja.events] == [2, 3, 4, 5]
    assert all(e["residual"] > 0.05 for e in oja.events)
    assert sum("grew to" in r.message for r in caplog.records) == 4
    assert out["residual_ema"] < 0.05
    assert principal_angles(oja.components, truth).max().item() < 0.05
    cosines = (oja.components @ truth.T).abs().diagonal()  # GHA: each in order, up to sign
    assert cosines.min().item() > 0.99


def test_oja_subspace_rule_finds_the_subspace() -> None:
    truth, sample = known_components(n_strong=4, dim=20, noise=0.02, seed=3)
    oja = OjaLayer(20, max_components=4, init_components=4, lr=0.02, rule="subspace")
    for _ in range(300):
        oja.step(sample(256))
    assert principal_angles(oja.components, truth).max().item() < 0.05
    gram = oja.components @ oja.components.T
    torch.testing.assert_close(gram, torch.eye(4), atol=0.02, rtol=0)


def test_oja_batch_step_is_the_mean_of_per_sample_updates_and_residual_is_exact() -> None:
    oja = OjaLayer(6, max_components=3, init_components=3, lr=0.1, dtype=torch.float64)
    w0 = oja.components.clone()
    x = torch.randn(9, 6, dtype=torch.float64)
    out = oja.step(x)
    updates = []
    for xi in x:
        y = w0 @ xi
        updates.append(torch.outer(y, xi) - torch.tril(torch.outer(y, y)) @ w0)
    torch.testing.assert_close(oja.components, w0 + 0.1 * torch.stack(updates).mean(0))
    recon = (x @ w0.T) @ w0
    expected = ((x - recon) ** 2).sum() / (x**2).sum()
    assert out["residual"] == pytest.approx(expected.item(), rel=1e-9)
    assert out["y"].shape == (9, 3)


def test_oja_saves_and_resumes_identically(tmp_path: Path) -> None:
    _, sample = known_components(seed=4)
    batches = [sample(64) for _ in range(60)]
    a = OjaLayer(32, max_components=8, lr=0.02, grow_threshold=0.05, patience=5)
    for x in batches[:30]:
        a.step(x)
    a.save(tmp_path / "oja")
    b = OjaLayer.load(tmp_path / "oja")
    for x in batches[30:]:
        ra, rb = a.step(x), b.step(x)
        assert ra["residual"] == rb["residual"] and ra["grew"] == rb["grew"]
    assert torch.equal(a.components, b.components) and a.events == b.events
    with pytest.raises(ValueError, match=r"\(N, 32\)"):
        a.step(torch.zeros(0, 32))
