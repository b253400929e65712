"""Optimizers: AdamW with decay on 2-D weights only (fused where available), or Muon for the
hidden 2-D matrices with AdamW for the rest (modded-nanogpt's recipe: orthogonalised updates
train hidden matrices faster per token; embeddings and the head stay on AdamW).

Each param group carries ``base_lr`` so a schedule sets ``lr = base_lr * factor`` on all of them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from aura.config import TrainConfig


class Optimizers:
    """Several torch optimizers stepped as one (Muon only accepts 2-D parameters)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def set_lr_factor(self, factor: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * factor

    def step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        for opt in self.optimizers:
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def unscale_(self, scaler: torch.amp.GradScaler) -> None:
        for opt in self.optimizers:
            scaler.unscale_(opt)

    def state_dict(self) -> list[dict[str, Any]]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        for opt, state in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(state)


def _fused_ok(device: torch.device) -> bool:
    return device.type in ("cuda", "cpu", "mps")


def muon_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The parameters ``optimizer="muon"`` gives to Muon: the hidden 2-D matrices. Embeddings
    and the output head stay on AdamW, as in modded-nanogpt (a tied head is the embedding, so
    it is excluded either way). Shared with the memory estimate (Muon keeps one state per
    parameter, AdamW two)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    heads = {id(p) for name, p in params.items() if name.split(".")[-1] == "lm_head"
             or name.startswith("lm_head")}
    return [p for p in params.values() if id(p) not in embeddings | heads and p.dim() == 2]


def build_optimizers(model: nn.Module, cfg: TrainConfig, device: torch.device) -> Optimizers:
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in params if p.dim() >= 2]
    others = [p for p in params if p.dim() < 2]
    betas = (cfg.beta1, cfg.beta2)
    fused = _fused_ok(device)
    if cfg.optimizer == "adamw":
        groups = [
            {"params": matrices, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
            {"params": others, "weight_decay": 0.0, "base_lr": cfg.lr},
        ]
        return Optimizers([torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=fused)])
    hidden = muon_matrices(model)
    hidden_ids = {id(p) for p in hidden}
    rest_matrices = [p for p in matrices if id(p) not in hidden_ids]
    muon = torch.optim.Muon(
        [{"params": hidden, "base_lr": cfg.lr}], lr=cfg.lr, weight_decay=cfg.weight_decay,
        adjust_lr_fn="match_rms_adamw",
    )
    adamw = torch.optim.AdamW(
        [
            {"params": rest_matrices, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
            {"params": others, "weight_decay": 0.0, "base_lr": cfg.lr},
        ],
        lr=cfg.lr, betas=betas, fused=fused,
    )
    return Optimizers([muon, adamw])
