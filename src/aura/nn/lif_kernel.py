"""The fused LIF kernel behind ``LIF``: soft- or hard-reset LIF over all steps as one autograd node.

Autograd through ``LIF.forward_step`` builds a graph of small ops per step; here a whole run is
one node that saves its input and spikes, no membranes. Its backward is exactly the gradient
autograd would take through that graph (surrogate at each spike, reset detached)::

    dL/dh_t     = g_t s'(h_t - thr) + dL/dm_t * (1 for a soft reset, 1 - s_t for a hard one)
    dL/dm_{t-1} = beta dL/dh_t

walked from the last step over the pre-reset membranes ``h_t``, which it recomputes from the input
and the spikes into a reused buffer: two passes a step, cheaper than a tensor the size of the input
written by the forward, paged in, and read back.

One function per path, so each reads top to bottom: a sequence input (T, ...) or a constant input
held for ``steps`` steps (``LIF.forward_constant``), through a soft or a hard reset. A constant
input through a soft reset with nothing but the input to learn (the SNN FFN's case) has a
closed-form backward that runs forward in time, so its forward gathers it and saves that instead.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch.autograd.function import once_differentiable


class Surrogate(Protocol):
    """A spike whose surrogate slope the kernel can apply without a graph (``NamedSpike``)."""

    def inverse_slope(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """1 / the surrogate's slope at ``x``, written into ``out`` (which may be ``x``)."""


class Workspace:
    """Named, grow-only scratch buffers kept from call to call (not shared, not thread-safe).

    glibc serves a block of several MB with fresh ``mmap`` pages and returns them on free, so a
    kernel that allocates its per-step membranes (as large as its input) anew pays those page
    faults on every call. It lives in this file because this kernel is its only user.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D view of ``numel`` elements of the buffer ``name``, reallocated only when a larger
        size (or another dtype) is asked for; its contents are whatever the last user left."""
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            # a normal tensor even under inference_mode, or a later call outside it could not
            # write into the buffer
            with torch.inference_mode(False):
                buf = torch.empty(numel, dtype=dtype, device=self.device)
            self.buffers[name] = buf
        return buf[:numel]


_LOCAL = threading.local()


def _workspace(like: torch.Tensor) -> Workspace:
    """This thread's workspace on CPU; elsewhere a fresh one: CUDA's allocator already pools."""
    if like.device.type != "cpu":
        return Workspace(like.device)
    if getattr(_LOCAL, "workspace", None) is None:
        _LOCAL.workspace = Workspace("cpu")
    return _LOCAL.workspace


def _buffer(ws: Workspace, name: str, shape: tuple[int, ...], like: torch.Tensor
            ) -> torch.Tensor:
    return ws.get(name, math.prod(shape), like.dtype).view(shape)


Steps = list[torch.Tensor] | tuple[torch.Tensor, ...]
StepLoop = Callable[[Steps, torch.Tensor, torch.Tensor, torch.Tensor, Steps, torch.Tensor, Steps],
                    None]


# --- the recurrence ------------------------------------------------------------------------------
# Step t writes its pre-reset membrane into hs[t] and its spikes into spikes[t]; the state after
# the last step ends in ``state``. A buffer may repeat (one scratch for every step) where the
# caller needs only the last.


def _soft_steps(xs: Steps, m: torch.Tensor, beta: torch.Tensor, thr: torch.Tensor, hs: Steps,
                state: torch.Tensor, spikes: Steps) -> None:
    """Soft reset, three passes a step: ``h = beta m + x``, ``s = h > thr``, ``m = h - thr s``."""
    neg_thr = -thr
    for x_t, h, fired in zip(xs, hs, spikes, strict=True):
        torch.addcmul(x_t, m, beta, out=h)
        torch.gt(h, thr, out=fired)
        m = torch.addcmul(h, fired, neg_thr, out=state)


def _hard_steps(xs: Steps, m: torch.Tensor, beta: torch.Tensor, thr: torch.Tensor, hs: Steps,
                state: torch.Tensor, spikes: Steps) -> None:
    """Hard reset, three passes a step: ``m = h (1 - s)``, exactly 0 where it fired."""
    for x_t, h, fired in zip(xs, hs, spikes, strict=True):
        torch.addcmul(x_t, m, beta, out=h)
        torch.gt(h, thr, out=fired)
        m = torch.addcmul(h, h, fired, value=-1, out=state)


def _soft_membranes(xs: Steps, m: torch.Tensor, beta: torch.Tensor, thr: torch.Tensor,
                    hs: Steps, state: torch.Tensor, spikes: Steps) -> None:
    """``_soft_steps`` with the forward's spikes known (two passes a step): the backward's
    recompute, the forward's arithmetic exactly, so its membranes are the forward's bit for bit."""
    neg_thr = -thr
    for x_t, h, fired in zip(xs, hs, spikes, strict=True):
        torch.addcmul(x_t, m, beta, out=h)
        m = torch.addcmul(h, fired, neg_thr, out=state)


def _hard_membranes(xs: Steps, m: torch.Tensor, beta: torch.Tensor, thr: torch.Tensor,
                    hs: Steps, state: torch.Tensor, spikes: Steps) -> None:
    """``_hard_steps`` with the forward's spikes known, as ``_soft_membranes``."""
    for x_t, h, fired in zip(xs, hs, spikes, strict=True):
        torch.addcmul(x_t, m, beta, out=h)
        m = torch.addcmul(h, h, fired, value=-1, out=state)


@torch.no_grad()
def _run_sequence(loop: StepLoop, x: torch.Tensor, mem0: torch.Tensor, beta: torch.Tensor,
                  thr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Spikes (T, ...) and the final state, on plain tensors."""
    ws, final = _workspace(x), torch.empty_like(mem0)
    hs = [_buffer(ws, "h", mem0.shape, x)] * x.size(0)
    spikes = torch.empty_like(x)
    loop(x.unbind(), mem0, beta, thr, hs, final, spikes.unbind())
    return spikes, final


@torch.no_grad()
def _run_constant(loop: StepLoop, x: torch.Tensor, steps: int, mem0: torch.Tensor,
                  beta: torch.Tensor, thr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The spike count per neuron and the final state, on plain tensors; the per-step spikes
    live in the workspace, since a count does not need them past this call."""
    ws, final = _workspace(x), torch.empty_like(mem0)
    hs = [_buffer(ws, "h", mem0.shape, x)] * steps
    spikes = _buffer(ws, "spikes", (steps, *mem0.shape), x)
    loop([x] * steps, mem0, beta, thr, hs, final, spikes.unbind())
    return spikes.sum(0), final


# --- the backward walks --------------------------------------------------------------------------
# ``carry`` is dL/dm_t, None where nothing reaches it (the last step of a loss on the spikes
# alone). ``g_beta`` and ``g_thr`` are 0-d accumulators, None when their gradient is not wanted.


def _through_spike(g_t: torch.Tensor, h: torch.Tensor, thr: torch.Tensor, spike: Surrogate,
                   carry: torch.Tensor | None, inv: torch.Tensor, out: torch.Tensor,
                   g_thr: torch.Tensor | None) -> torch.Tensor:
    """``dL/dh_t = g_t s'(h_t - thr) + carry`` into ``out``: one ``addcdiv`` pass, unless the
    threshold's gradient needs the surrogate term on its own (``-thr`` is inside the spike)."""
    slope_inv = spike.inverse_slope(torch.sub(h, thr, out=inv), out=inv)
    if carry is not None and g_thr is None:
        return torch.addcdiv(carry, g_t, slope_inv, out=out)
    gh = torch.div(g_t, slope_inv, out=out)
    if g_thr is not None:
        g_thr -= gh.sum()
    if carry is not None:
        gh.add_(carry)
    return gh


def _grad_of_state0(carry: torch.Tensor | None, mem0: torch.Tensor) -> torch.Tensor:
    """dL/dm_{-1}: the carry once the walk has passed step 0, zeros if nothing reached it (no
    steps and no loss on the state)."""
    return torch.zeros_like(mem0) if carry is None else carry.clone()


@torch.no_grad()
def _sequence_soft_grad(x: torch.Tensor, spikes: torch.Tensor, mem0: torch.Tensor,
                        beta: torch.Tensor, thr: torch.Tensor, spike: Surrogate,
                        g_spikes: torch.Tensor | None, g_final: torch.Tensor | None,
                        g_beta: torch.Tensor | None, g_thr: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/dx and dL/dm_{-1} of a sequence through a soft reset, which passes dL/dm_t on whole
    and, where it fired, subtracted the threshold."""
    T, shape, ws = x.size(0), mem0.shape, _workspace(x)
    hs, fired = _buffer(ws, "h", (T, *shape), x).unbind(), spikes.unbind()
    _soft_membranes(x.unbind(), mem0, beta, thr, hs, _buffer(ws, "state", shape, x), fired)
    gx = torch.empty_like(x)
    gxs, inv, carry_buf = gx.unbind(), _buffer(ws, "inv", shape, x), _buffer(ws, "carry", shape, x)
    g_steps = None if g_spikes is None else g_spikes.unbind()
    carry = None if g_final is None else carry_buf.copy_(g_final)
    for t in range(T - 1, -1, -1):
        if carry is not None and g_thr is not None:  # the reset subtracted thr where it fired
            g_thr -= torch.sum(carry * fired[t])
        if g_steps is None:  # the loss reads only the final state
            gh = gxs[t].copy_(carry)
        else:
            gh = _through_spike(g_steps[t], hs[t], thr, spike, carry, inv, gxs[t], g_thr)
        if g_beta is not None:  # the state m_{t-1} that beta multiplied
            prev = mem0 if t == 0 else torch.addcmul(hs[t - 1], thr, fired[t - 1], value=-1)
            g_beta += torch.sum(gh * prev)
        carry = torch.mul(gh, beta, out=carry_buf)
    return gx, _grad_of_state0(carry, mem0)


@torch.no_grad()
def _sequence_hard_grad(x: torch.Tensor, spikes: torch.Tensor, mem0: torch.Tensor,
                        beta: torch.Tensor, thr: torch.Tensor, spike: Surrogate,
                        g_spikes: torch.Tensor | None, g_final: torch.Tensor | None,
                        g_beta: torch.Tensor | None, g_thr: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/dx and dL/dm_{-1} of a sequence through a hard reset, which stops dL/dm_t where it
    fired (the reset is detached)."""
    T, shape, ws = x.size(0), mem0.shape, _workspace(x)
    hs, fired = _buffer(ws, "h", (T, *shape), x).unbind(), spikes.unbind()
    _hard_membranes(x.unbind(), mem0, beta, thr, hs, _buffer(ws, "state", shape, x), fired)
    gx = torch.empty_like(x)
    gxs, inv, carry_buf = gx.unbind(), _buffer(ws, "inv", shape, x), _buffer(ws, "carry", shape, x)
    g_steps = None if g_spikes is None else g_spikes.unbind()
    carry = None if g_final is None else carry_buf.copy_(g_final)
    for t in range(T - 1, -1, -1):
        if carry is not None:  # dL/dm_t (1 - s_t)
            carry = torch.addcmul(carry, carry, fired[t], value=-1, out=carry)
        if g_steps is None:  # the loss reads only the final state
            gh = gxs[t].copy_(carry)
        else:
            gh = _through_spike(g_steps[t], hs[t], thr, spike, carry, inv, gxs[t], g_thr)
        if g_beta is not None:  # the state m_{t-1} that beta multiplied
            prev = mem0 if t == 0 else torch.addcmul(hs[t - 1], hs[t - 1], fired[t - 1],
                                                     value=-1)
            g_beta += torch.sum(gh * prev)
        carry = torch.mul(gh, beta, out=carry_buf)
    return gx, _grad_of_state0(carry, mem0)


@torch.no_grad()
def _constant_soft_grad(x: torch.Tensor, steps: int, mem0: torch.Tensor, beta: torch.Tensor,
                        thr: torch.Tensor, spike: Surrogate, g_counts: torch.Tensor | None,
                        g_final: torch.Tensor | None, g_beta: torch.Tensor | None,
                        g_thr: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``_sequence_soft_grad`` for ``x`` held every step: the count's gradient reaches every
    step, and every step's dL/dh_t adds to dL/dx. The spikes are recomputed too (a count does
    not say which steps fired)."""
    shape, ws = mem0.shape, _workspace(x)
    hs = _buffer(ws, "h", (steps, *shape), x).unbind()
    fired = _buffer(ws, "spikes", (steps, *shape), x).unbind()
    _soft_steps([x] * steps, mem0, beta, thr, hs, _buffer(ws, "state", shape, x), fired)
    gx = torch.zeros_like(mem0)
    inv, gh_buf = _buffer(ws, "inv", shape, x), _buffer(ws, "gh", shape, x)
    carry_buf = _buffer(ws, "carry", shape, x)
    carry = None if g_final is None else carry_buf.copy_(g_final)
    for t in range(steps - 1, -1, -1):
        if carry is not None and g_thr is not None:  # the reset subtracted thr where it fired
            g_thr -= torch.sum(carry * fired[t])
        if g_counts is None:  # the loss reads only the final state
            gh = carry
        else:
            gh = _through_spike(g_counts, hs[t], thr, spike, carry, inv, gh_buf, g_thr)
        gx.add_(gh)
        if g_beta is not None:  # the state m_{t-1} that beta multiplied
            prev = mem0 if t == 0 else torch.addcmul(hs[t - 1], thr, fired[t - 1], value=-1)
            g_beta += torch.sum(gh * prev)
        carry = torch.mul(gh, beta, out=carry_buf)
    return gx, _grad_of_state0(carry, mem0)


@torch.no_grad()
def _constant_hard_grad(x: torch.Tensor, steps: int, mem0: torch.Tensor, beta: torch.Tensor,
                        thr: torch.Tensor, spike: Surrogate, g_counts: torch.Tensor | None,
                        g_final: torch.Tensor | None, g_beta: torch.Tensor | None,
                        g_thr: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``_sequence_hard_grad`` for ``x`` held every step, as ``_constant_soft_grad``."""
    shape, ws = mem0.shape, _workspace(x)
    hs = _buffer(ws, "h", (steps, *shape), x).unbind()
    fired = _buffer(ws, "spikes", (steps, *shape), x).unbind()
    _hard_steps([x] * steps, mem0, beta, thr, hs, _buffer(ws, "state", shape, x), fired)
    gx = torch.zeros_like(mem0)
    inv, gh_buf = _buffer(ws, "inv", shape, x), _buffer(ws, "gh", shape, x)
    carry_buf = _buffer(ws, "carry", shape, x)
    carry = None if g_final is None else carry_buf.copy_(g_final)
    for t in range(steps - 1, -1, -1):
        if carry is not None:  # dL/dm_t (1 - s_t)
            carry = torch.addcmul(carry, carry, fired[t], value=-1, out=carry)
        if g_counts is None:  # the loss reads only the final state
            gh = carry
        else:
            gh = _through_spike(g_counts, hs[t], thr, spike, carry, inv, gh_buf, g_thr)
        gx.add_(gh)
        if g_beta is not None:  # the state m_{t-1} that beta multiplied
            prev = mem0 if t == 0 else torch.addcmul(hs[t - 1], hs[t - 1], fired[t - 1],
                                                     value=-1)
            g_beta += torch.sum(gh * prev)
        carry = torch.mul(gh, beta, out=carry_buf)
    return gx, _grad_of_state0(carry, mem0)


@torch.no_grad()
def _run_constant_soft_with_slopes(x: torch.Tensor, steps: int, mem0: torch.Tensor,
                                   beta: torch.Tensor, thr: torch.Tensor, spike: Surrogate
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_run_constant`` through a soft reset with fixed beta, threshold and initial state,
    plus what its backward needs, gathered beside the recurrence.

    The reverse walk then has a closed form, ``dL/dx = g sum_u c_u s'_u + c_{T-1} dL/dm_{T-1}``
    with ``c_u = 1 + beta c_{u-1}``, ``c_0 = 1``: it runs forward in time, so the forward sums
    ``slopes = sum_u c_u s'_u`` while each step's membrane is at hand, and the backward is one
    multiply instead of the recurrence again (5 passes a step here against 8 there)."""
    ws, final = _workspace(x), torch.empty_like(mem0)
    h, inv = _buffer(ws, "h", x.shape, x), _buffer(ws, "inv", x.shape, x)
    spikes = _buffer(ws, "spikes", (steps, *mem0.shape), x)
    slopes, m, neg_thr = torch.zeros_like(x), mem0, -thr
    for coef, fired in zip(_walk_coefficients(beta, steps), spikes.unbind(), strict=True):
        torch.addcmul(x, m, beta, out=h)
        slopes.addcdiv_(coef, spike.inverse_slope(torch.sub(h, thr, out=inv), out=inv))
        torch.gt(h, thr, out=fired)
        m = torch.addcmul(h, fired, neg_thr, out=final)
    return spikes.sum(0), final, slopes


def _walk_coefficients(beta: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """``c_u = 1 + beta c_{u-1}``, ``c_0 = 1``: how much of step u's input reaches the end."""
    coef = [torch.ones_like(beta)]
    for _ in range(steps - 1):
        coef.append(1 + beta * coef[-1])
    return coef


# --- the autograd nodes --------------------------------------------------------------------------


def _zero_grads(ctx: Any, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, ...]:
    """Zeros for the wanted ``tensors`` (the node's first inputs), None for the rest: the
    gradients when neither output reached the loss."""
    return tuple(torch.zeros_like(tensors[i]) if need and i < len(tensors) else None
                 for i, need in enumerate(ctx.needs_input_grad))


def _accumulators(ctx: Any, beta: torch.Tensor, thr: torch.Tensor
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Zeroed accumulators for dL/dbeta and dL/dthr, None where not wanted."""
    need_beta, need_thr = ctx.needs_input_grad[2:4]
    return (torch.zeros_like(beta) if need_beta else None,
            torch.zeros_like(thr) if need_thr else None)


class _SequenceLIF(torch.autograd.Function):
    """A sequence (T, ...) through every step; saves its input and spikes."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mem0: torch.Tensor, beta: torch.Tensor,
                thr: torch.Tensor, hard: bool, spike: Surrogate
                ) -> tuple[torch.Tensor, torch.Tensor]:
        spikes, final = _run_sequence(_hard_steps if hard else _soft_steps, x, mem0, beta, thr)
        ctx.save_for_backward(x, mem0, beta, thr, spikes)
        ctx.set_materialize_grads(False)  # an unused output (often the state) costs nothing
        ctx.hard, ctx.spike = hard, spike
        return spikes, final

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_spikes: torch.Tensor | None, g_final: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, ...]:
        x, mem0, beta, thr, spikes = ctx.saved_tensors
        if g_spikes is None and g_final is None:
            return _zero_grads(ctx, (x, mem0, beta, thr))
        g_beta, g_thr = _accumulators(ctx, beta, thr)
        walk = _sequence_hard_grad if ctx.hard else _sequence_soft_grad
        gx, g_mem0 = walk(x, spikes, mem0, beta, thr, ctx.spike, g_spikes, g_final, g_beta,
                          g_thr)
        need_x, need_mem = ctx.needs_input_grad[:2]
        return gx if need_x else None, g_mem0 if need_mem else None, g_beta, g_thr, None, None


class _ConstantLIF(torch.autograd.Function):
    """``x`` held for ``steps`` steps -> spike count and final state. Through a soft reset with
    only ``x`` to learn it saves the surrogate sum of the closed form; otherwise only the input
    (the backward recomputes the spikes)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mem0: torch.Tensor, beta: torch.Tensor,
                thr: torch.Tensor, steps: int, hard: bool, spike: Surrogate
                ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)  # an unused output (often the state) costs nothing
        ctx.steps, ctx.hard, ctx.spike = steps, hard, spike
        ctx.closed_form = not hard and not any(ctx.needs_input_grad[1:4])
        if ctx.closed_form:
            counts, final, slopes = _run_constant_soft_with_slopes(x, steps, mem0, beta, thr,
                                                                   spike)
            ctx.save_for_backward(slopes, beta)
            return counts, final
        counts, final = _run_constant(_hard_steps if hard else _soft_steps, x, steps, mem0,
                                      beta, thr)
        ctx.save_for_backward(x, mem0, beta, thr)
        return counts, final

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_counts: torch.Tensor | None, g_final: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, ...]:
        if ctx.closed_form:
            slopes, beta = ctx.saved_tensors
            gx = torch.zeros_like(slopes) if g_counts is None else slopes * g_counts
            if g_final is not None:
                gx.addcmul_(g_final, _walk_coefficients(beta, ctx.steps)[-1])
            return gx, None, None, None, None, None, None
        x, mem0, beta, thr = ctx.saved_tensors
        if g_counts is None and g_final is None:
            return _zero_grads(ctx, (x, mem0, beta, thr))
        g_beta, g_thr = _accumulators(ctx, beta, thr)
        walk = _constant_hard_grad if ctx.hard else _constant_soft_grad
        gx, g_mem0 = walk(x, ctx.steps, mem0, beta, thr, ctx.spike, g_counts, g_final, g_beta,
                          g_thr)
        need_x, need_mem = ctx.needs_input_grad[:2]
        return (gx if need_x else None, g_mem0 if need_mem else None, g_beta, g_thr,
                None, None, None)


# --- entry points --------------------------------------------------------------------------------


def _wants_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def lif_sequence(x: torch.Tensor, mem0: torch.Tensor, beta: torch.Tensor, thr: torch.Tensor,
                 hard: bool, spike: Surrogate) -> tuple[torch.Tensor, torch.Tensor]:
    """Spikes (T, ...) and final state of ``x`` (T, ...) from ``mem0``, in ``x``'s dtype: one
    autograd node if anything needs a gradient, plain tensors otherwise."""
    with torch.autocast(x.device.type, enabled=False):  # state and spikes in x's dtype
        if _wants_grad(x, mem0, beta, thr):
            return _SequenceLIF.apply(x, mem0, beta, thr, hard, spike)
        return _run_sequence(_hard_steps if hard else _soft_steps, x, mem0, beta, thr)


def lif_constant(x: torch.Tensor, steps: int, mem0: torch.Tensor, beta: torch.Tensor,
                 thr: torch.Tensor, hard: bool, spike: Surrogate
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Spike count per neuron and final state of ``x`` held for ``steps`` steps, as
    ``lif_sequence`` without the repeated input or the per-step spikes."""
    with torch.autocast(x.device.type, enabled=False):  # state and spikes in x's dtype
        if _wants_grad(x, mem0, beta, thr):
            return _ConstantLIF.apply(x, mem0, beta, thr, steps, hard, spike)
        return _run_constant(_hard_steps if hard else _soft_steps, x, steps, mem0, beta, thr)
