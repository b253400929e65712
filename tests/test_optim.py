"""``Optimizers.step``: a lone fused AdamW on CPU steps through ``direct_adamw_step``, which must
give torch's update bit for bit (clipped or not, over param groups and dtypes); any other
optimizer goes through torch's ``step``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from aura.train.optim import Optimizers, steps_directly


def small_model(weights: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.Linear(12, 3))
    model[2].to(weights)  # a second dtype: the direct step groups by it
    return model


def adamw(model: nn.Module, lr: float, **kw: bool) -> torch.optim.AdamW:
    params = list(model.parameters())
    return torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() == 2], "weight_decay": 0.1},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=lr, **kw)


def backward(model: nn.Module, step: int) -> None:
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(step))
    out = model[2](model[1](model[0](x)).to(model[2].weight.dtype))
    (out.float() ** 2).sum().mul(3.0).backward()


def step_both(max_norm: float, lr: float, weights: torch.dtype, steps: int = 5
              ) -> tuple[nn.Module, nn.Module, Optimizers, torch.optim.AdamW]:
    """The same model stepped by torch (``clip_grad_norm_`` + ``step``) and by ``Optimizers``."""
    theirs = small_model(weights)
    ours = copy.deepcopy(theirs)
    torch_opt = adamw(theirs, lr, fused=True)
    opt = Optimizers([adamw(ours, lr, fused=True)])
    in_group_order = [p for g in torch_opt.param_groups for p in g["params"]]
    for step in range(steps):
        backward(theirs, step)
        torch.nn.utils.clip_grad_norm_(in_group_order, max_norm)  # the norm's summation order
        torch_opt.step()
        torch_opt.zero_grad()
        backward(ours, step)
        norm = torch.nn.utils.get_total_norm([p.grad for p in opt.params])
        opt.step(None, clip=(norm, max_norm))
        opt.zero_grad()
    return theirs, ours, opt, torch_opt


@settings(max_examples=15, deadline=None)
@given(max_norm=st.one_of(st.just(math.inf), st.floats(0.01, 100.0)),
       lr=st.floats(1e-5, 0.1), bf16=st.booleans())
def test_the_direct_step_is_torchs_update_bit_for_bit(max_norm: float, lr: float,
                                                       bf16: bool) -> None:
    theirs, ours, opt, torch_opt = step_both(max_norm, lr,
                                             torch.bfloat16 if bf16 else torch.float32)
    for a, b in zip(theirs.parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b)
    ours_state, = opt.state_dict()
    torch_state = torch_opt.state_dict()
    assert ours_state["param_groups"] == torch_state["param_groups"]
    for i, state in torch_state["state"].items():
        for name, value in state.items():
            assert torch.equal(ours_state["state"][i][name], value), name


def test_only_the_first_step_goes_through_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first step makes the state (torch's ``step``); every later one is direct."""
    calls: list[int] = []
    original = torch.optim.AdamW.step

    def counted(self: torch.optim.AdamW, *args: object, **kw: object) -> object:
        calls.append(1)
        return original(self, *args, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    *_, opt, _ = step_both(1.0, 1e-3, torch.float32, steps=4)
    assert opt._direct and len(calls) == 1 + 4  # torch's own run: 4; ours: the first


def test_what_is_not_a_lone_fused_cpu_adamw_steps_through_torch() -> None:
    model = small_model()
    assert steps_directly(adamw(model, 1e-3, fused=True))
    assert not steps_directly(adamw(model, 1e-3, fused=False))
    assert not steps_directly(adamw(model, 1e-3, fused=True, amsgrad=True))
    assert not steps_directly(torch.optim.Adam(model.parameters(), fused=True))
    two = Optimizers([adamw(model, 1e-3, fused=True), adamw(model, 1e-3, fused=True)])
    assert not two._direct


def test_zero_grad_clears_every_optimizers_gradients() -> None:
    model = small_model()
    params = list(model.parameters())
    opt = Optimizers([torch.optim.AdamW(params[:2]), torch.optim.SGD(params[2:])])
    backward(model, 0)
    assert all(p.grad is not None for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
