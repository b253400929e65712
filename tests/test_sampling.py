"""Sampling: the config's validation and each logits transform against a plain reference."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aura.errors import AuraError
from aura.infer.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    sample_next,
    top_k_filter,
    top_p_filter,
    typical_filter,
)


def random_logits(seed: int, batch: int, vocab: int, scale: float,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Tie-free logits (continuous draws), peaked or flat depending on ``scale``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)


logit_args = st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 4), st.integers(2, 120),
                       st.sampled_from([0.1, 1.0, 3.0, 10.0]))


@given(logit_args, st.floats(1.0, 3.0))
def test_greedy_is_argmax_of_penalised_logits(args: tuple, penalty: float) -> None:
    logits = random_logits(*args)
    prev = torch.randint(0, logits.size(1), (logits.size(0), 5))
    greedy = SamplingConfig(temperature=0, top_k=1, top_p=0.5, typical_p=0.2)
    assert torch.equal(sample_next(logits, None, greedy), logits.argmax(-1))
    cfg = SamplingConfig(temperature=0, repetition_penalty=penalty)
    expected = apply_repetition_penalty(logits, prev, penalty).argmax(-1)
    assert torch.equal(sample_next(logits, prev, cfg), expected)


def test_same_seed_same_draws_different_seed_different() -> None:
    logits = torch.zeros(64, 50)  # uniform: 64 draws from 50 tokens
    cfg = SamplingConfig(temperature=1.0)

    def draw(seed: int) -> torch.Tensor:
        return sample_next(logits, None, cfg, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))  # equal with probability 50**-64


def test_draws_follow_the_filtered_tempered_distribution() -> None:
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = p.log().expand(40_000, 4)
    gen = torch.Generator().manual_seed(0)

    def freqs(cfg: SamplingConfig) -> torch.Tensor:
        ids = sample_next(logits, None, cfg, gen)
        return torch.bincount(ids, minlength=4).double() / ids.numel()

    assert torch.allclose(freqs(SamplingConfig()), p.double(), atol=0.01)
    hot = p.double() ** 2 / (p.double() ** 2).sum()  # temperature 0.5 squares the odds
    assert torch.allclose(freqs(SamplingConfig(temperature=0.5)), hot, atol=0.01)
    top2 = torch.tensor([0.625, 0.375, 0, 0], dtype=torch.float64)
    assert torch.allclose(freqs(SamplingConfig(top_k=2)), top2, atol=0.01)
    assert torch.allclose(freqs(SamplingConfig(top_p=0.7)), top2, atol=0.01)  # 0.5 < 0.7 <= 0.8


@given(logit_args, st.data())
def test_top_k_keeps_exactly_the_k_largest(args: tuple, data: st.DataObject) -> None:
    logits = random_logits(*args)
    k = data.draw(st.integers(1, logits.size(1) + 3))
    out = top_k_filter(logits, k)
    kept = torch.isfinite(out)
    assert (kept.sum(-1) == min(k, logits.size(1))).all()
    assert torch.equal(out[kept], logits[kept])  # survivors are untouched
    top = logits.topk(min(k, logits.size(1)), dim=-1).indices
    assert kept.gather(-1, top).all()


@given(logit_args, st.floats(0.001, 1.0))
def test_top_p_keeps_the_smallest_set_reaching_p(args: tuple, p: float) -> None:
    logits = random_logits(*args)
    kept = torch.isfinite(top_p_filter(logits, p))
    probs = logits.double().softmax(-1)
    for row, keep, prob in zip(logits, kept, probs, strict=True):
        assert keep.any()
        if (~keep).any():
            assert row[keep].min() > row[~keep].max()  # the most likely tokens
        mass = prob[keep].sum().item()
        assert mass >= p - 1e-5  # enough mass ...
        assert mass - prob[keep].min().item() < p + 1e-5  # ... and no token more than needed


def typical_reference(row: np.ndarray, mass: float) -> set[int]:
    """Meister et al. written out: rank by |surprisal - entropy|, take tokens until the mass is
    reached, and keep every token as close to the entropy as the last one taken."""
    logp = row - row.max() - np.log(np.exp(row - row.max()).sum())
    p = np.exp(logp)
    entropy = -(p * logp).sum()
    distance = np.abs(-logp - entropy)
    total, last = 0.0, 0
    for i in np.argsort(distance, kind="stable"):
        total += p[i]
        last = i
        if total >= mass:
            break
    return {i for i in range(len(row)) if distance[i] <= distance[last]}


@given(logit_args, st.floats(0.01, 0.99))
def test_typical_matches_reference(args: tuple, mass: float) -> None:
    logits = random_logits(*args, dtype=torch.float64)  # fp64 on both sides: no rounding ties
    kept = torch.isfinite(typical_filter(logits, mass))
    for row, keep in zip(logits, kept, strict=True):
        assert set(torch.nonzero(keep).flatten().tolist()) == typical_reference(row.numpy(), mass)


@given(logit_args)
def test_typical_always_keeps_a_token(args: tuple) -> None:
    logits = random_logits(*args)
    assert (torch.isfinite(typical_filter(logits, 1e-9)).sum(-1) >= 1).all()
    assert torch.equal(typical_filter(logits, 1.0), logits)


@given(logit_args, st.floats(0.2, 5.0), st.integers(0, 30))
def test_repetition_penalty_matches_loop(args: tuple, penalty: float, n_prev: int) -> None:
    logits = random_logits(*args).round()  # many exact zeros, positives and negatives
    batch, vocab = logits.shape
    prev = torch.randint(0, vocab, (batch, n_prev), generator=torch.Generator().manual_seed(1))
    expected = logits.clone()
    for b in range(batch):
        for tok in set(prev[b].tolist()):  # once per token, however often it occurred
            v = expected[b, tok].item()
            expected[b, tok] = v * penalty if v < 0 else v / penalty
    out = apply_repetition_penalty(logits, prev, penalty)
    assert torch.allclose(out, expected, rtol=1e-6, atol=0)
    assert torch.equal(logits, random_logits(*args).round())  # the input is not modified


def test_sampled_ids_survive_every_filter() -> None:
    logits = random_logits(3, 1, 200, 2.0).expand(2000, 200)
    cfg = SamplingConfig(top_k=40, top_p=0.9, typical_p=0.8)
    allowed = typical_filter(top_p_filter(top_k_filter(logits[:1], 40), 0.9), 0.8)
    ids = sample_next(logits, None, cfg, torch.Generator().manual_seed(0))
    assert torch.isfinite(allowed[0, ids]).all()
    assert len(set(ids.tolist())) > 1


@pytest.mark.parametrize("kwargs", [
    {"temperature": -0.1}, {"temperature": math.inf}, {"temperature": math.nan},
    {"temperature": "1"}, {"top_k": 0}, {"top_k": 2.5}, {"top_k": True}, {"top_p": 0.0},
    {"top_p": 1.5}, {"typical_p": -0.2}, {"typical_p": 1.01}, {"repetition_penalty": 0},
    {"repetition_penalty": -1.0}, {"seed": -1}, {"seed": 2**64}, {"seed": 1.5},
])
def test_invalid_config_raises(kwargs: dict) -> None:
    with pytest.raises(AuraError) as exc:
        SamplingConfig(**kwargs)
    (name,) = kwargs
    message = str(exc.value)
    assert name in message and "\n" not in message


def test_valid_edges_are_accepted_and_filter_nothing() -> None:
    edges = {"temperature": 0, "top_k": 1, "top_p": 1.0, "typical_p": 1.0,
             "repetition_penalty": 1, "seed": 2**64 - 1, "modulation": False}
    greedy = SamplingConfig(**edges)
    assert dataclasses.asdict(greedy) == edges  # kept as given, nothing clamped
    logits = random_logits(5, 16, 50, 1.0)
    prev = torch.randint(0, 50, (16, 8), generator=torch.Generator().manual_seed(2))
    assert torch.equal(sample_next(logits, prev, greedy), logits.argmax(-1))
    # At the permissive edges every token survives.
    assert torch.equal(apply_repetition_penalty(logits, prev, 1), logits)
    assert torch.equal(top_k_filter(logits, 50), logits)
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    assert torch.equal(typical_filter(logits, 1.0), logits)
    torch.Generator().manual_seed(edges["seed"])  # the largest seed is one torch takes
