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
        # what they step, listed once: walking the modules or groups for it every step cost
        # ~0.07 ms of a 17 ms step (gpt 4 x 128 under bf16 on AMX)
        self.params = [p for g in self.param_groups for p in g["params"]]
        self._direct = len(optimizers) == 1 and steps_directly(optimizers[0])

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def set_lr_factor(self, factor: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * factor

    def step(self, scaler: torch.amp.GradScaler | None = None,
             clip: tuple[torch.Tensor, float] | None = None) -> None:
        """One update. ``clip`` (the gradients' total norm, the largest norm allowed) first
        scales the gradients down to that norm, as ``clip_grad_norm_`` would. A lone fused
        AdamW on CPU then steps through ``direct_adamw_step``: the same update, bit for bit."""
        if clip is not None and math.isfinite(clip[1]):
            torch.nn.utils.clip_grads_with_norm_(self.params, clip[1], clip[0])
        if scaler is None and self._direct and direct_adamw_step(self.optimizers[0]):
            return
        for opt in self.optimizers:
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)

    def zero_grad(self) -> None:
        """``zero_grad(set_to_none=True)`` without its per-optimizer bookkeeping (~0.05 ms)."""
        for p in self.params:
            p.grad = None

    def unscale_(self, scaler: torch.amp.GradScaler) -> None:
        for opt in self.optimizers:
            scaler.unscale_(opt)

    def state_dict(self) -> list[dict[str, Any]]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        for opt, state in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(state)


def steps_directly(opt: torch.optim.Optimizer) -> bool:
    """Whether ``direct_adamw_step`` can step ``opt``: a fused AdamW without amsgrad, maximize
    or capturable, over plain (not DTensor) CPU tensors."""
    if type(opt) is not torch.optim.AdamW:
        return False
    d = opt.defaults
    if not d["fused"] or d["amsgrad"] or d["maximize"] or d["capturable"] or d["differentiable"]:
        return False
    params = [p for g in opt.param_groups for p in g["params"]]
    return all(p.device.type == "cpu" and type(p.data) is torch.Tensor for p in params)


def direct_adamw_step(opt: torch.optim.AdamW) -> bool:
    """``opt.step()`` as the kernel calls it ends in, one per param group and dtype:
    ``Optimizer.step``'s bookkeeping around them cost ~0.4 ms of a ~24 ms step (`gpt` at
    nanoGPT's CPU shape, docs/BENCHMARKS.md). False, and nothing done, before the first step
    has made the state."""
    groups = []
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        states = [opt.state.get(p) for p in params]
        if not all(states):
            return False
        groups.append((group, params, states))
    for group, params, states in groups:
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(params):
            by_dtype.setdefault(p.dtype, []).append(i)
        for index in by_dtype.values():
            steps = [states[i]["step"] for i in index]
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(
                [params[i] for i in index], [params[i].grad for i in index],
                [states[i]["exp_avg"] for i in index], [states[i]["exp_avg_sq"] for i in index],
                [], steps, lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                maximize=False, grad_scale=None, found_inf=None)
    return True


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
