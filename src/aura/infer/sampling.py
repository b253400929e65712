"""Next-token sampling: a validated config and vectorised logits transforms on (B, V) tensors.

Transforms run in HF `generate`'s order (repetition penalty, temperature, top-k, top-p, typical)
so settings carry over from HF-trained intuitions. Filters set removed logits to -inf rather than
renormalising, so they compose and the final softmax does the normalisation once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from aura.errors import AuraError


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class SamplingConfig:
    """How to pick each next token. ``temperature == 0`` is greedy (filters are then moot), and so
    is one below float32's smallest normal number (1.2e-38), which no logit can be divided by."""

    temperature: float = 1.0
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # nucleus: the smallest set holding this much probability
    typical_p: float | None = None  # locally typical sampling's probability mass
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context
    seed: int | None = None  # None: a fresh random seed per generation
    # False: ignore the model's own factors on temperature and top-k (its declared
    # ``sampling_modulation``, e.g. natural_brain's hormones); sample exactly as set here
    modulation: bool = True

    def __post_init__(self) -> None:
        if not _is_number(self.temperature) or self.temperature < 0:
            raise AuraError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (
            not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1
        ):
            raise AuraError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        for name in ("top_p", "typical_p"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not 0 < value <= 1):
                raise AuraError(f"{name} must be in (0, 1], got {value!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise AuraError(
                f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}"
            )
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool)
            or not 0 <= self.seed < 2**64
        ):
            raise AuraError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if not isinstance(self.modulation, bool):
            raise AuraError(f"modulation must be true or false, got {self.modulation!r}")


def apply_repetition_penalty(logits: torch.Tensor, prev_ids: torch.Tensor, penalty: float
                             ) -> torch.Tensor:
    """CTRL's penalty (as HF): divide positive and multiply negative logits of seen tokens.

    Dividing a negative logit would *raise* its probability, hence the sign split. Each token is
    penalised once however often it occurred (gather/scatter of duplicates write equal values).
    """
    if penalty == 1.0 or prev_ids.numel() == 0:
        return logits
    seen = logits.gather(-1, prev_ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    finite = torch.finfo(seen.dtype)  # an extreme penalty must not make a logit infinite
    return logits.scatter(-1, prev_ids, seen.clamp(finite.min, finite.max))


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (all tied with the k-th survive)."""
    if k >= logits.size(-1):
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their mass reaches p.

    A token is dropped when the tokens ranked above it already hold mass >= p, so the top token
    (nothing above it) always survives.
    """
    if p >= 1:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_above >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def typical_filter(logits: torch.Tensor, mass: float | torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2022) with HF's TypicalLogitsWarper semantics.

    Tokens are ranked by how far their surprisal -log p is from the distribution's entropy; the
    closest are kept until their probability reaches ``mass`` (ties with the last one kept too).
    The most *likely* token can be dropped: that is the point, it is often atypically dull.
    ``mass`` may be a (B, 1) tensor, one per row (a mass >= 1 there keeps every token).
    """
    if not isinstance(mass, torch.Tensor) and mass >= 1:
        return logits
    logp = logits.log_softmax(dim=-1)
    p = logp.exp()
    entropy = -(logp * p).nansum(dim=-1, keepdim=True)  # nansum: -inf * 0 for filtered tokens
    distance = (-logp - entropy).abs()
    sorted_distance, order = distance.sort(dim=-1)
    cum = p.gather(-1, order).cumsum(dim=-1)
    last = (cum < mass).sum(dim=-1, keepdim=True).clamp_(max=logits.size(-1) - 1)
    return logits.masked_fill(distance > sorted_distance.gather(-1, last), -math.inf)


def sample_next(logits: torch.Tensor, prev_ids: torch.Tensor | None, cfg: SamplingConfig,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) next ids from (B, V) logits; ``prev_ids`` (B, L) feeds the repetition penalty.

    Work is in fp32 so bf16/fp16 logits sample the same distribution. ``generator`` makes a
    sequence of draws reproducible (None uses torch's global RNG).
    """
    logits = logits.float()
    if prev_ids is not None:
        logits = apply_repetition_penalty(logits, prev_ids, cfg.repetition_penalty)
    if cfg.temperature < torch.finfo(logits.dtype).tiny:  # 0, or too small to divide by
        return logits.argmax(dim=-1)
    # Softmax and every filter below ignore a shift of the logits: with the largest at 0, no
    # temperature however small can make one +inf (and the softmax inf - inf = nan).
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / cfg.temperature
    if cfg.top_k is not None:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p is not None:
        logits = top_p_filter(logits, cfg.top_p)
    if cfg.typical_p is not None:
        logits = typical_filter(logits, cfg.typical_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
