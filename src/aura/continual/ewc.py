"""Elastic weight consolidation with a diagonal Fisher (Kirkpatrick et al. 2017), accumulated
online across tasks (Schwarz et al. 2018, "Progress & Compress": F = gamma F_old + F_new, one
anchor, the latest weights).

A "sample" is one sequence: its log-likelihood is the sum over its tokens, so F_i is the mean over
sequences of (d log p(sequence) / d theta_i)^2. "empirical" differentiates at the data's own next
tokens, "sampled" at next tokens drawn from the model's predictive distribution (the true Fisher).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

Forward = Callable[[torch.Tensor], torch.Tensor]  # token ids (B, T) -> logits (B, T, V)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def sequence_log_likelihood(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of log p(target | prefix), per sequence (B,); targets < 0 are skipped."""
    logp = -F.cross_entropy(logits.float().transpose(1, 2), targets.clamp_min(0),
                            reduction="none")
    return (logp * (targets >= 0)).sum(1)


def diagonal_fisher(model: nn.Module, forward: Forward, windows: Iterable[torch.Tensor],
                    kind: str = "empirical", generator: torch.Generator | None = None
                    ) -> dict[str, torch.Tensor]:
    """Mean over sequences of the squared gradient of each sequence's log-likelihood.

    ``windows`` yields (B, T + 1) token windows; each row is one sample, differentiated on its
    own (one backward per sequence: exact, and it works for every model, custom kernels
    included). Gradients already on the parameters are left as they were."""
    params = trainable(model)
    saved = {name: None if p.grad is None else p.grad.clone() for name, p in params.items()}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    count = 0
    for window in windows:
        for row in window:
            x, y = row[None, :-1], row[None, 1:]
            model.zero_grad(set_to_none=True)
            logits = forward(x)
            if kind == "sampled":
                probs = torch.softmax(logits.detach().float(), -1)
                flat = torch.multinomial(probs.reshape(-1, probs.size(-1)), 1,
                                         generator=generator)
                y = flat.reshape(y.shape)
            sequence_log_likelihood(logits, y).sum().backward()
            for name, p in params.items():
                if p.grad is not None:
                    fisher[name] += p.grad.detach().float() ** 2
            count += 1
    for name, p in params.items():
        p.grad = saved[name]
    return {name: f / max(count, 1) for name, f in fisher.items()}


class EWC:
    """The anchor theta*, its Fisher F and the penalty lambda/2 sum F (theta - theta*)^2."""

    def __init__(self, lam: float, decay: float = 1.0):
        self.lam, self.decay = lam, decay
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return bool(self.fisher) and self.lam > 0

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """lambda/2 sum F (theta - theta*)^2 over the anchored parameters; its gradient is
        lambda F (theta - theta*)."""
        params = trainable(model)
        total = torch.zeros((), device=next(iter(params.values())).device)
        for name, f in self.fisher.items():
            p = params[name]
            total = total + (f.to(p.device) * (p.float() - self.anchor[name].to(p.device)) ** 2
                             ).sum()
        return 0.5 * self.lam * total

    def consolidate(self, model: nn.Module, fisher: dict[str, torch.Tensor]) -> None:
        """Online EWC: fold ``fisher`` (this task's) into the running Fisher, anchor here."""
        self.fisher = {name: (self.decay * self.fisher[name] + f if name in self.fisher else f)
                       for name, f in fisher.items()}
        params = trainable(model)
        self.anchor = {name: params[name].detach().float().cpu().clone() for name in self.fisher}
        self.fisher = {name: f.detach().cpu() for name, f in self.fisher.items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        return ({f"fisher.{k}": v.contiguous() for k, v in self.fisher.items()}
                | {f"anchor.{k}": v.contiguous() for k, v in self.anchor.items()})

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.fisher = {k[7:]: v for k, v in tensors.items() if k.startswith("fisher.")}
        self.anchor = {k[7:]: v for k, v in tensors.items() if k.startswith("anchor.")}
