"""Sleep consolidation (after Tadros et al. 2022, sleep replay consolidation): every N training
steps, M steps on replayed windows only (from the replay buffer, the episodic store or both:
``aura.continual.episodes``), at a low learning rate, optionally distilled toward the pre-sleep
model's own outputs so consolidation does not drift.

By default a sleep step is plain SGD on the weights: the main optimizer's moments and step
counts never see it (the issue asks that the main phase's state be untouched unless configured;
``continual.sleep_optimizer=main`` routes sleep steps through it instead). A sleep phase runs whole
between two training steps, so a checkpoint never falls inside one.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from aura.continual.episodes import EpisodeSource
from aura.continual.ewc import trainable
from aura.continual.replay import keyed_generator

Logits = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (model, ids (B, T)) -> logits


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy per sequence (B,), fp32; targets < 0 are skipped."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets.clamp_min(0), reduction="none")
    mask = (targets >= 0).float()
    return (ce * mask).sum(1) / mask.sum(1).clamp_min(1)


def sleep_phase(model: nn.Module, logits: Logits, buffer: EpisodeSource, *, steps: int,
                batch_size: int, lr: float, distill: float, grad_clip: float,
                key: tuple[int, ...], optimizer_step: Callable[[], None] | None = None
                ) -> dict[str, float]:
    """Run ``steps`` replay-only steps drawn from ``buffer``; returns the phase's mean replay
    loss (and KL)."""
    teacher = None
    if distill > 0:
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    params = list(trainable(model).values())
    losses, kls = [], []
    for s in range(steps):
        idx, windows, weights = buffer.sample(batch_size, keyed_generator(*key, s))
        device = params[0].device
        x, y = windows[:, :-1].to(device), windows[:, 1:].to(device)
        out = logits(model, x)
        per_seq = token_losses(out, y)
        loss = (per_seq * weights.to(device)).mean()
        kl = torch.zeros((), device=device)
        if teacher is not None:
            with torch.no_grad():
                target = torch.log_softmax(logits(teacher, x).float(), -1)
            kl = F.kl_div(torch.log_softmax(out.float(), -1), target, log_target=True,
                          reduction="batchmean") / x.size(1)
        for p in params:
            p.grad = None
        (loss + distill * kl).backward()
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf)
        if not math.isfinite(float(norm)):
            continue  # a non-finite sleep step is dropped, like a training one
        if optimizer_step is not None:
            optimizer_step()
        else:
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-lr)
        for p in params:
            p.grad = None
        buffer.update(idx, per_seq)
        losses.append(loss.item())
        kls.append(kl.item())
    n = max(len(losses), 1)
    return {"sleep_loss": sum(losses) / n, "sleep_kl": sum(kls) / n}
