"""Sampling every row of a batch in one call, each row with its own settings and seed.

A server's concurrent requests ask for different temperatures, filters and seeds. Sampling them
one at a time costs a dozen small tensor ops per request per token; here the settings are per-row
tensors (``RowSettings``) and one call samples all rows, so a round's sampling is the same few
ops for one sequence or thirty-two.

Reproducibility: a row's random number for the token at position ``t`` is a hash of (its seed,
``t``) (SplitMix64's finaliser, as in counter-based generators), mapped to a token by the inverse
CDF. It depends on nothing else in the batch, so a seed gives the same text alone or next to any
other requests, and `aura generate` (which samples through the same function) agrees with
`aura serve`. The distribution is exactly the one ``sampling.sample_next`` draws from:
repetition penalty, temperature, top-k, top-p, typical in HF's order, greedy at temperature 0.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from aura.infer.sampling import SamplingConfig, typical_filter

_M64 = (1 << 64) - 1


def _signed(x: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    x &= _M64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9,
                                              0x94D049BB133111EB))


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """(B,) float64 in [0, 1): SplitMix64 of seed + (counter + 1) * golden ratio, per row.
    int64 products wrap modulo 2**64, which is the arithmetic SplitMix64 is defined in."""
    z = seeds + (counters + 1) * _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return _shr(z, 11).double() * 2.0 ** -53


def seed_of(cfg: SamplingConfig) -> int:
    """The request's seed as an int64, or a fresh random one when it has none."""
    return _signed(cfg.seed if cfg.seed is not None else secrets.randbits(64))


@dataclass
class RowSettings:
    """Per-row sampling settings as (B,) tensors, built once per request and updated in place
    when rows come and go; "off" is encoded as a value that filters nothing."""

    temperature: torch.Tensor  # float32; 0 = greedy
    top_k: torch.Tensor  # int64; vocab size = off
    top_p: torch.Tensor  # float32; 2 = off
    typical_p: torch.Tensor  # float32; 2 = off
    penalty: torch.Tensor  # float32; 1 = off
    seed: torch.Tensor  # int64

    @staticmethod
    def of(cfgs: Sequence[SamplingConfig], vocab: int, device: torch.device | str
           ) -> RowSettings:
        def col(values: list[float | int], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return RowSettings(
            col([c.temperature for c in cfgs], torch.float32),
            col([min(c.top_k, vocab) if c.top_k else vocab for c in cfgs], torch.long),
            col([c.top_p if c.top_p is not None and c.top_p < 1 else 2.0 for c in cfgs],
                torch.float32),
            col([c.typical_p if c.typical_p is not None and c.typical_p < 1 else 2.0
                 for c in cfgs], torch.float32),
            col([c.repetition_penalty for c in cfgs], torch.float32),
            col([seed_of(c) for c in cfgs], torch.long))

    def fields(self) -> tuple[torch.Tensor, ...]:
        return (self.temperature, self.top_k, self.top_p, self.typical_p, self.penalty,
                self.seed)


@dataclass
class _Uses:
    """Which transforms any row needs, known on the host when the settings change, so a
    round never syncs with the device to find out."""

    penalty: bool
    greedy: bool
    sampled: bool
    sort: bool
    typical: bool

    @staticmethod
    def of(cfgs: Sequence[SamplingConfig]) -> _Uses:
        tiny = torch.finfo(torch.float32).tiny
        return _Uses(
            any(c.repetition_penalty != 1.0 for c in cfgs),
            any(c.temperature < tiny for c in cfgs),
            any(c.temperature >= tiny for c in cfgs),
            any(c.temperature >= tiny and (c.top_k is not None or
                                           (c.top_p is not None and c.top_p < 1)) for c in cfgs),
            any(c.temperature >= tiny and c.typical_p is not None and c.typical_p < 1
                for c in cfgs))


def sample_rows(logits: torch.Tensor, seen: torch.Tensor | None, s: RowSettings,
                uses: _Uses, counters: torch.Tensor) -> torch.Tensor:
    """(B,) next ids from (B, V) logits; ``seen`` (B, V) marks each row's context tokens for
    the repetition penalty; ``counters`` (B,) are the positions being sampled (the hash's
    counter). The same distribution as ``sampling.sample_next``, row by row."""
    logits = logits.float()
    if uses.penalty and seen is not None:
        pen = s.penalty[:, None]
        hit = torch.where(logits < 0, logits * pen, logits / pen)
        finite = torch.finfo(logits.dtype)
        logits = torch.where(seen, hit.clamp(finite.min, finite.max), logits)
    if not uses.sampled:
        return logits.argmax(dim=-1)
    greedy = s.temperature < torch.finfo(torch.float32).tiny
    temperature = torch.where(greedy, 1.0, s.temperature)[:, None]
    x = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if uses.sort:  # top-k then top-p, both on the sorted logits, scattered back once
        ordered, order = x.sort(dim=-1, descending=True)
        kth = ordered.gather(-1, (s.top_k - 1)[:, None])
        ordered = ordered.masked_fill(ordered < kth, -math.inf)
        probs = ordered.softmax(dim=-1)
        ordered = ordered.masked_fill(probs.cumsum(dim=-1) - probs >= s.top_p[:, None],
                                      -math.inf)
        x = x.scatter(-1, order, ordered)
    if uses.typical:
        x = typical_filter(x, s.typical_p[:, None])
    cdf = x.softmax(dim=-1).double().cumsum(dim=-1)
    u = uniforms(s.seed, counters) * cdf[:, -1]
    drawn = torch.searchsorted(cdf, u[:, None], right=True)[:, 0].clamp_(max=x.size(-1) - 1)
    if uses.greedy:
        drawn = torch.where(greedy, logits.argmax(dim=-1), drawn)
    return drawn


class RowSampler:
    """The settings of a fixed set of rows (``generate``'s batch) and what they have seen:
    ``sample`` the position ``t``, then ``see`` the ids kept there."""

    def __init__(self, cfgs: Sequence[SamplingConfig], context: torch.Tensor, vocab: int):
        self.settings = RowSettings.of(cfgs, vocab, context.device)
        # Row r of a multi-row generate draws from (seed + r): rows differ, row 0 is the seed.
        self.settings.seed += torch.arange(len(cfgs), device=context.device)
        self.uses = _Uses.of(cfgs)
        self.seen = None
        if self.uses.penalty:
            self.seen = torch.zeros(len(cfgs), vocab, dtype=torch.bool, device=context.device)
            self.seen.scatter_(1, context, True)

    def sample(self, logits: torch.Tensor, t: int) -> torch.Tensor:
        counters = torch.full((logits.size(0),), t, dtype=torch.long, device=logits.device)
        return sample_rows(logits, self.seen, self.settings, self.uses, counters)

    def see(self, ids: torch.Tensor) -> None:
        if self.seen is not None:
            self.seen.scatter_(1, ids[:, None], True)
