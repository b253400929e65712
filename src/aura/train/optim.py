"""Optimizers: AdamW with decay on 2-D weights only (fused where available), or Muon for the
hidden 2-D matrices with AdamW for the rest (modded-nanogpt's recipe: orthogonalised updates
train hidden matrices faster per token; embeddings and the head stay on AdamW), or Adafactor
(torch's: a factored second moment, a row and a column per matrix, and no first moment, when
AdamW's two moments per parameter do not fit). ``optimizer_state_bytes`` is what each keeps,
for the memory estimate; ``cast_weights`` stores the parameters in ``train.weights``.

Each param group carries ``base_lr`` so a schedule sets ``lr = base_lr * factor`` on all of them.
"""

from __future__ import annotations

import math
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
    if cfg.optimizer == "adafactor":
        groups = [
            {"params": matrices, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
            {"params": others, "weight_decay": 0.0, "base_lr": cfg.lr},
        ]
        return Optimizers([torch.optim.Adafactor(groups, lr=cfg.lr)])
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


WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def weight_dtypes(model: nn.Module, weights: str) -> dict[int, torch.dtype]:
    """Each floating parameter's dtype (by ``id``) under ``train.weights``: that dtype, except
    in a module that computes in fp32 whatever autocast says (``fp32_weights = True``, e.g. the
    PFC's recurrence), whose parameters stay fp32. Shared with the memory estimate."""
    dtype = WEIGHT_DTYPES[weights]
    out: dict[int, torch.dtype] = {}
    for module in model.modules():
        keep = getattr(module, "fp32_weights", False)
        for p in module.parameters():
            if p.is_floating_point() and (keep or id(p) not in out):
                out[id(p)] = torch.float32 if keep else dtype
    return out


def cast_weights(model: nn.Module, weights: str) -> None:
    """Store ``model``'s parameters (not its buffers: memories and running state keep fp32)
    in ``train.weights``' dtype (``weight_dtypes``); their gradients and optimizer state
    follow."""
    dtypes = weight_dtypes(model, weights)
    for p in model.parameters():
        dtype = dtypes.get(id(p))
        if dtype is not None and p.dtype != dtype:
            p.data = p.data.to(dtype)


def optimizer_state_bytes(shape: tuple[int, ...], optimizer: str, itemsize: int,
                          muon: bool = False) -> int:
    """Bytes ``optimizer`` keeps for one trained parameter of ``shape`` stored at ``itemsize``:
    AdamW two moments, Muon one momentum (``muon``: a matrix Muon trains; the rest is AdamW's),
    Adafactor a row and a column of second moments per matrix (over the leading dimensions) and
    a full second moment for a vector. Step counters (a scalar each) are not counted."""
    numel = math.prod(shape)
    if optimizer == "adafactor":
        if len(shape) < 2:
            return numel * itemsize
        lead = math.prod(shape[:-2])
        return lead * (shape[-2] + shape[-1]) * itemsize
    return numel * itemsize * (1 if muon else 2)
