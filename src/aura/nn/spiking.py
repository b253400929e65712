"""Spiking neurons with explicit state and swappable surrogate gradients (in the style of snnTorch).

A neuron is a small module whose membrane state is passed in and returned, never stored on the
module, so two instances (or two sequences through one instance) cannot leak into each other. The
spike is a Heaviside step in the forward pass; its backward pass is a smooth surrogate chosen by
name or given as any callable ``(x) -> spikes``.

State and outputs take the input's dtype: a bf16 input gets bf16 state, never float32 (the design
note's "dtype propagation" fix), and float parameters are cast to the input's dtype at use.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from aura.workspace import Workspace

SpikeFn = Callable[[torch.Tensor], torch.Tensor]


InverseSlope = Callable[[torch.Tensor, float, torch.Tensor | None], torch.Tensor]


def _surrogate(name: str, inverse_slope: InverseSlope, doc: str) -> type[torch.autograd.Function]:
    """A Heaviside spike whose backward divides by ``inverse_slope(x, param, out)``: one
    shape, many surrogates.

    A surrogate is registered by the reciprocal of its slope because both of ours are a
    reciprocal: the fused LIF backward then folds the slope into one ``addcdiv`` per step.
    It is kept on the class so the fused LIF can apply it without a graph per step; ``out``
    (which may be ``x`` itself) lets it write into a buffer instead of allocating.
    """

    class Surrogate(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, param: float) -> torch.Tensor:
            ctx.save_for_backward(x)
            ctx.param = param
            return (x > 0).to(x.dtype)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            (x,) = ctx.saved_tensors
            return grad / inverse_slope(x, ctx.param, None), None

    Surrogate.inverse_slope = staticmethod(inverse_slope)  # type: ignore[attr-defined]
    Surrogate.__name__ = Surrogate.__qualname__ = name
    Surrogate.__doc__ = doc
    return Surrogate


def _fast_sigmoid_inverse(x: torch.Tensor, slope: float, out: torch.Tensor | None
                          ) -> torch.Tensor:
    a = torch.abs(x, out=out)  # (1 + slope |x|)^2: three passes over x
    return torch.add(x.new_ones(()), a, alpha=slope, out=a).square_()


def _atan_inverse(x: torch.Tensor, alpha: float, out: torch.Tensor | None) -> torch.Tensor:
    # alpha/2 / (1 + k^2 x^2) = 1 / (2/alpha + (2/alpha) k^2 x^2): one pass over x
    k = math.pi / 2 * alpha
    return torch.addcmul(x.new_full((), 2 / alpha), x, x, value=2 * k * k / alpha, out=out)


FastSigmoid = _surrogate(
    "FastSigmoid", _fast_sigmoid_inverse,
    "Heaviside forward; backward ``1 / (1 + slope |x|)^2`` (Zenke & Ganguli's SuperSpike).")
ATan = _surrogate(
    "ATan", _atan_inverse,
    "Heaviside forward; backward ``alpha/2 / (1 + (pi/2 alpha x)^2)``, the derivative of "
    "``atan(pi/2 alpha x) / pi``: heavier tails than the fast sigmoid.")


def fast_sigmoid(x: torch.Tensor, slope: float = 25.0) -> torch.Tensor:
    return FastSigmoid.apply(x, slope)


def atan(x: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    return ATan.apply(x, alpha)


@dataclass(frozen=True)
class NamedSpike:
    """A registered surrogate with its parameter, callable as ``(x) -> spikes``.

    Unlike an arbitrary callable it exposes ``inverse_slope``, which lets ``LIF`` run all steps in
    one fused autograd node instead of a graph of small ops per step. A module-level class, so a
    neuron holding one pickles.
    """

    function: type[torch.autograd.Function]
    param: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.function.apply(x, self.param)

    def inverse_slope(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """1 / the surrogate's slope at ``x``, written into ``out`` (which may be ``x``)."""
        return self.function.inverse_slope(x, self.param, out)  # type: ignore[attr-defined]


# name -> (autograd function, parameter name, default value)
SURROGATES: dict[str, tuple[type[torch.autograd.Function], str, float]] = {
    "fast_sigmoid": (FastSigmoid, "slope", 25.0), "atan": (ATan, "alpha", 2.0)}


def spike_fn(surrogate: str | SpikeFn, **params: float) -> SpikeFn:
    """``(x) -> spikes`` for a registered surrogate name (with its ``params``), or a callable."""
    if callable(surrogate):
        if params:
            raise ValueError("params apply to named surrogates only")
        return surrogate
    if surrogate not in SURROGATES:
        raise ValueError(f"unknown surrogate {surrogate!r}; known: {sorted(SURROGATES)}")
    function, name, default = SURROGATES[surrogate]
    if set(params) - {name}:
        raise ValueError(f"surrogate {surrogate!r} takes only {name!r}, got {sorted(params)}")
    return NamedSpike(function, params.get(name, default))


def firing_rate(spikes: torch.Tensor) -> torch.Tensor:
    """Mean spikes per neuron per step (graded spikes count their level), a float32 scalar.

    Averaged in float32 so a long bf16 run does not lose the small rates to rounding.
    """
    return spikes.detach().float().mean()


def leaky_scan(x: torch.Tensor, beta: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
    """All of ``m_t = beta m_{t-1} + x_t`` (``m_{-1} = mem``) at once: (T, ...) -> (T, ...).

    Two-level chunked scan. The textbook closed form ``beta^t cumsum(x_s beta^-s)`` overflows
    (0.5^-512 > float32 max) and cancels catastrophically, so it is avoided: here only powers
    ``beta^n`` with ``n >= 0`` appear, all in (0, 1], and underflow to 0 is their correct limit.
    Time is cut into K chunks of C ~ sqrt(T) steps; a (C, C) lower-triangular Toeplitz matrix of
    powers of beta scans inside every chunk, a (K, K) one in ``beta^C`` carries the chunk ends
    across chunks, and each step adds ``beta^(i+1)`` times the carry entering its chunk. Every
    output is a sum of at most C + K positive-weighted terms (no subtraction), so the rounding error
    is that of a short dot product. Cost O(T sqrt(T)) per neuron, vectorised; memory O(T).
    """
    T = x.size(0)
    C = max(1, math.isqrt(T - 1) + 1)
    K = -(-T // C)
    flat = x.reshape(T, -1)
    xc = torch.cat([flat, flat.new_zeros(K * C - T, flat.size(1))]).view(K, C, -1)

    def toeplitz(n: int, base: torch.Tensor) -> torch.Tensor:
        lag = torch.arange(n, device=x.device)[:, None] - torch.arange(n, device=x.device)
        return torch.where(lag >= 0, base ** lag.clamp(min=0).to(x.dtype), 0)

    local = torch.einsum("ij,kjn->kin", toeplitz(C, beta), xc)  # scan from 0 inside each chunk
    beta_c = beta**C
    k = torch.arange(K, device=x.device, dtype=x.dtype)
    carry = torch.einsum("ij,jn->in", toeplitz(K, beta_c), local[:, -1])  # chunk ends, from 0 ...
    carry = carry + beta_c ** (k + 1)[:, None] * mem.reshape(1, -1)  # ... plus the initial state
    entering = torch.cat([mem.reshape(1, -1), carry[:-1]])  # state before each chunk
    steps = beta ** torch.arange(1, C + 1, device=x.device, dtype=x.dtype)
    out = local + steps[None, :, None] * entering[:, None, :]
    return out.reshape(K * C, *x.shape[1:])[:T]


_LOCAL = threading.local()


def _workspace(like: torch.Tensor) -> Workspace:
    """This thread's scratch for the LIF kernels on CPU, kept from call to call: the per-step
    membranes of a backward are as large as its input, and a fresh buffer that size is paged in
    anew on every call (aura.workspace). Elsewhere a fresh one: CUDA's allocator already pools."""
    if like.device.type != "cpu":
        return Workspace(like.device)
    if getattr(_LOCAL, "workspace", None) is None:
        _LOCAL.workspace = Workspace("cpu")
    return _LOCAL.workspace


def _buffer(ws: Workspace, name: str, shape: tuple[int, ...], like: torch.Tensor,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    return ws.get(name, math.prod(shape), like.dtype if dtype is None else dtype).view(shape)


Steps = list[torch.Tensor] | tuple[torch.Tensor, ...]


def _lif_steps(xs: Steps, m: torch.Tensor, beta: torch.Tensor, thr: torch.Tensor, hard: bool,
               hs: Steps, state: torch.Tensor, spikes: Steps, known: bool = False) -> None:
    """The recurrence over every step, three passes per step into given buffers.

    Step t writes its pre-reset membrane into ``hs[t]`` and its spikes into ``spikes[t]``; the
    state after the last step ends in ``state``. A buffer may repeat (one scratch for every
    step) where the caller needs only the last. With ``known``, ``spikes`` already holds the
    forward's spikes and is only read (two passes a step): the backward's recompute, which
    repeats the forward's arithmetic exactly, so its membranes are the forward's bit for bit.
    """
    neg_thr = -thr
    for t in range(len(hs)):
        h = torch.addcmul(xs[t], m, beta, out=hs[t])  # beta m + x
        fired = spikes[t] if known else torch.gt(h, thr, out=spikes[t])
        if hard:  # h (1 - s), exactly 0 where it fired
            m = torch.addcmul(h, h, fired, value=-1, out=state)
        else:
            m = torch.addcmul(h, fired, neg_thr, out=state)


@torch.no_grad()
def _lif_run(x: torch.Tensor, mem: torch.Tensor, beta: torch.Tensor, thr: torch.Tensor,
             hard: bool, steps: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The LIF recurrence on plain tensors: spikes (or, for a constant input held ``steps``
    steps, the spike count) and the final state."""
    T = x.size(0) if steps is None else steps
    ws, final = _workspace(x), torch.empty_like(mem)
    hs = [_buffer(ws, "h", mem.shape, x)] * T
    if steps is None:
        out = torch.empty_like(x)
        _lif_steps(x.unbind(), mem, beta, thr, hard, hs, final, out.unbind())
        return out, final
    spikes = _buffer(ws, "spikes", (T, *mem.shape), x)
    _lif_steps([x] * T, mem, beta, thr, hard, hs, final, spikes.unbind())
    return spikes.sum(0), final


class _FusedLIF(torch.autograd.Function):
    """Soft- or hard-reset LIF over all steps as one autograd node that saves its input and
    spikes, no membranes.

    Backward is exactly the gradient autograd would take through the step-by-step graph
    (surrogate at each spike, reset detached): ``dL/dh_t = g_t s'(h_t - thr) + dL/dm_t * (1, or
    1 - s_t if hard)`` and ``dL/dm_{t-1} = beta dL/dh_t``, walked in reverse over the pre-reset
    membranes ``h_t``, which it recomputes from the input and the spikes into a reused buffer
    (two passes a step, cheaper than a tensor the size of the input written by the forward,
    paged in, and read back). For a constant input with a soft reset and fixed parameters (the
    SNN FFN) the walk has a closed form, ``dL/dx = g sum_u c_u s'_u + c_{T-1} dL/dm_{T-1}`` with
    ``c_u = 1 + beta c_{u-1}``, ``c_0 = 1``, which runs forward in time.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mem: torch.Tensor, beta: torch.Tensor,
                thr: torch.Tensor, hard: bool, steps: int | None, spike: NamedSpike
                ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.closed_form = steps is not None and not hard and not any(ctx.needs_input_grad[1:4])
        out, final = _lif_run(x, mem, beta, thr, hard, steps)
        # a count (constant input) does not say which steps fired: those are recomputed
        ctx.save_for_backward(x, mem, beta, thr, out if steps is None else None)
        ctx.set_materialize_grads(False)  # an unused output (often the state) costs nothing
        ctx.hard, ctx.steps, ctx.spike = hard, steps, spike
        return out, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_out: torch.Tensor | None, g_mem: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, ...]:
        x, mem0, beta, thr, spikes = ctx.saved_tensors
        if ctx.closed_form:
            gx = _constant_soft_grad(x, mem0, beta, thr, ctx.steps, ctx.spike, g_out, g_mem)
            return gx, None, None, None, None, None, None
        need_x, need_mem, need_beta, need_thr = ctx.needs_input_grad[:4]
        grads = _reverse_grad(x, spikes, mem0, beta, thr, ctx.hard, ctx.steps, ctx.spike,
                              g_out, g_mem, need_beta, need_thr)
        gx, g_mem0, g_beta, g_thr = grads
        return (gx if need_x else None, g_mem0 if need_mem else None, g_beta, g_thr,
                None, None, None)


@torch.no_grad()
def _constant_soft_grad(x: torch.Tensor, mem0: torch.Tensor, beta: torch.Tensor,
                        thr: torch.Tensor, steps: int, spike: NamedSpike,
                        g_out: torch.Tensor | None, g_mem: torch.Tensor | None) -> torch.Tensor:
    """dL/dx by the closed form in ``_FusedLIF``, re-running the recurrence."""
    coef = [torch.ones_like(beta)]
    for _ in range(steps - 1):
        coef.append(1 + beta * coef[-1])
    gx = torch.zeros_like(x)
    if g_out is not None:
        ws, m = _workspace(x), mem0
        h, inv, spikes, state, acc = (_buffer(ws, name, x.shape, x) for name in
                                      ("h", "inv", "spikes", "state", "acc"))
        acc.zero_()
        for u in range(steps):
            torch.addcmul(x, m, beta, out=h)
            acc.addcdiv_(coef[u], spike.inverse_slope(torch.sub(h, thr, out=inv), out=inv))
            if u < steps - 1:
                m = torch.addcmul(h, torch.gt(h, thr, out=spikes), -thr, out=state)
        torch.mul(acc, g_out, out=gx)
    if g_mem is not None:
        gx.addcmul_(g_mem, coef[-1])
    return gx


@torch.no_grad()
def _reverse_grad(x: torch.Tensor, spikes: torch.Tensor | None, mem0: torch.Tensor,
                  beta: torch.Tensor, thr: torch.Tensor, hard: bool, steps: int | None,
                  spike: NamedSpike, g_out: torch.Tensor | None, g_mem: torch.Tensor | None,
                  need_beta: bool, need_thr: bool) -> tuple[torch.Tensor, ...]:
    """The general backward: the membranes recomputed forward, then the recurrence of
    ``_FusedLIF`` walked from the last step. ``spikes`` are the forward's (None for a constant
    input: then recomputed too)."""
    constant = steps is not None
    T = x.size(0) if steps is None else steps
    ws, shape = _workspace(x), mem0.shape
    # per-step views made in one call each
    xs = [x] * T if constant else x.unbind()
    hs = _buffer(ws, "h", (T, *shape), x).unbind()
    fired = (_buffer(ws, "spikes", (T, *shape), x) if spikes is None else spikes).unbind()
    _lif_steps(xs, mem0, beta, thr, hard, hs, _buffer(ws, "state", shape, x), fired,
               known=spikes is not None)
    gx = torch.zeros_like(mem0 if constant else x) if g_out is None else (
        torch.zeros_like(mem0) if constant else torch.empty_like(x))
    g_beta, g_thr = torch.zeros_like(beta), torch.zeros_like(thr)
    inv = _buffer(ws, "inv", shape, x)
    carry = None if g_mem is None else _buffer(ws, "carry", shape, x).copy_(g_mem)  # dL/dm_t
    gos = None if g_out is None else [g_out] * T if constant else g_out.unbind()
    gxs = None if constant or g_out is None else gx.unbind()
    gh_buf = _buffer(ws, "gh", shape, x) if gxs is None else None
    for t in range(T - 1, -1, -1):
        h = hs[t]
        if carry is not None and need_thr and not hard:  # the soft reset subtracts thr
            g_thr -= torch.sum(carry * fired[t])
        if carry is not None and hard:  # dL/dm_t (1 - s_t): no gradient through a reset
            carry = torch.addcmul(carry, carry, fired[t], value=-1, out=carry)
        gh = carry
        if gos is not None:  # dL/dh_t = g_t s'(h_t - thr) + carry, in one pass if we can
            slope_inv = spike.inverse_slope(torch.sub(h, thr, out=inv), out=inv)
            target = gh_buf if gxs is None else gxs[t]
            if carry is None or need_thr:
                gh = torch.div(gos[t], slope_inv, out=target)
                if need_thr:
                    g_thr -= gh.sum()
                if carry is not None:
                    gh.add_(carry)
            else:
                gh = torch.addcdiv(carry, gos[t], slope_inv, out=target)
        if gh is None:  # no gradient reaches this step or any before it
            break
        if constant:
            gx.add_(gh)
        elif gos is None:
            gx[t] = gh
        if need_beta:  # the state m_{t-1} that beta multiplied
            prev = mem0 if t == 0 else torch.addcmul(
                hs[t - 1], hs[t - 1] if hard else thr, fired[t - 1], value=-1)
            g_beta += torch.sum(gh * prev)
        carry = torch.mul(gh, beta, out=_buffer(ws, "carry", shape, x))
    g_mem0 = torch.zeros_like(mem0) if carry is None else carry.clone()
    return gx, g_mem0, g_beta if need_beta else None, g_thr if need_thr else None


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class LIF(nn.Module):
    """Leaky integrate-and-fire: ``m_t = beta m_{t-1} + x_t``, spike when ``m_t > threshold``.

    ``reset`` after a spike: "soft" subtracts the threshold (keeps the surplus, so the rate tracks
    the input), "hard" sets the membrane to 0, "none" leaves it (the membrane is then a linear
    recurrence, computed for all steps at once by ``leaky_scan``). The reset is applied to the
    returned state and, as in snnTorch, detached: Zenke & Vogels (2021) find gradients through the
    reset hurt learning. ``learn_beta`` learns ``beta`` through a sigmoid so it stays in (0, 1).
    """

    def __init__(self, beta: float = 0.9, threshold: float = 1.0, reset: str = "soft",
                 surrogate: str | SpikeFn = "fast_sigmoid", learn_beta: bool = False,
                 learn_threshold: bool = False):
        super().__init__()
        if not 0 < beta < 1:
            raise ValueError(f"beta must be in (0, 1), got {beta}")
        if reset not in ("soft", "hard", "none"):
            raise ValueError(f"reset must be 'soft', 'hard' or 'none', got {reset!r}")
        self.reset, self.spike = reset, spike_fn(surrogate)
        self._beta, self._threshold = beta, threshold
        self.beta_logit = nn.Parameter(torch.tensor(_logit(beta))) if learn_beta else None
        self.threshold = nn.Parameter(torch.tensor(threshold)) if learn_threshold else None

    @property
    def beta(self) -> torch.Tensor:
        if self.beta_logit is None:
            return torch.tensor(self._beta)
        return torch.sigmoid(self.beta_logit)

    def _params(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """beta and threshold as 0-d tensors in ``like``'s dtype, so nothing promotes the state."""
        def cast(param: torch.Tensor | None, value: float) -> torch.Tensor:
            if param is None:  # built in like's dtype, not rounded through float32
                return torch.tensor(value, device=like.device, dtype=like.dtype)
            return param.to(like.device, like.dtype)

        beta = None if self.beta_logit is None else torch.sigmoid(self.beta_logit)
        return cast(beta, self._beta), cast(self.threshold, self._threshold)

    def energy_ops(self) -> list[dict[str, Any]]:
        """Nothing for ``aura.eval.energy``: membrane updates are element-wise, not synaptic
        (without this, the reset-free scan's small Toeplitz matmuls would count as MACs)."""
        return []

    def forward_step(self, x: torch.Tensor, mem: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: (B, ...) input and state (None: zeros) -> spikes, new state."""
        beta, thr = self._params(x)
        mem = beta * (torch.zeros_like(x) if mem is None else mem.to(x.dtype)) + x
        spikes = self.spike(mem - thr)
        if self.reset == "soft":
            mem = mem - spikes.detach() * thr
        elif self.reset == "hard":
            mem = mem * (1 - spikes.detach())
        return spikes, mem

    def forward(self, x: torch.Tensor, mem: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """All steps: (T, B, ...) input -> spikes (T, B, ...), final state (B, ...)."""
        if self.reset == "none":
            beta, thr = self._params(x)
            mem0 = torch.zeros_like(x[0]) if mem is None else mem.to(x.dtype)
            with torch.autocast(x.device.type, enabled=False):  # keep the scan in x's dtype
                mems = leaky_scan(x, beta, mem0)
            return self.spike(mems - thr), mems[-1]
        if isinstance(self.spike, NamedSpike):
            return self._fused(x, mem, None)
        out = []
        for x_t in x:
            spikes, mem = self.forward_step(x_t, mem)
            out.append(spikes)
        return torch.stack(out), mem

    def forward_constant(self, x: torch.Tensor, steps: int, mem: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, ...) held for ``steps`` steps -> spike count per neuron (B, ...), final state.

        The same as summing ``forward(x.expand(steps, ...))[0]`` over time, values and gradients,
        without materialising the repeated input or the per-step spikes.
        """
        if self.reset != "none" and isinstance(self.spike, NamedSpike):
            return self._fused(x, mem, steps)
        spikes, mem = self(x.expand(steps, *x.shape), mem)
        return spikes.sum(0), mem

    def _fused(self, x: torch.Tensor, mem: torch.Tensor | None, steps: int | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        beta, thr = self._params(x)
        mem0 = torch.zeros_like(x if steps is not None else x[0]) if mem is None else (
            mem.to(x.dtype))
        hard = self.reset == "hard"
        with torch.autocast(x.device.type, enabled=False):  # state and spikes in x's dtype
            if torch.is_grad_enabled() and any(
                    t.requires_grad for t in (x, mem0, beta, thr)):
                return _FusedLIF.apply(x, mem0, beta, thr, hard, steps, self.spike)
            return _lif_run(x, mem0, beta, thr, hard, steps)


class GIFState(NamedTuple):
    mem: torch.Tensor
    adaptation: torch.Tensor


class GIF(nn.Module):
    """Generalised integrate-and-fire: an adaptive threshold and graded (multi-level) spikes.

    ``threshold_t = threshold + adapt_scale * adaptation_{t-1}``, and the adaptation decays by
    ``adapt_decay`` per step and jumps by each spike's level: a neuron driven hard raises its own
    threshold and fires less (spike-frequency adaptation). A spike is the number of threshold
    multiples the membrane exceeds, clipped to ``max_level``, so one step carries more than a bit;
    the reset subtracts ``spike * threshold``. Reset and adaptation jump are detached, as in
    ``LIF``. With ``max_level=1, adapt_scale=0`` this is ``LIF`` with a soft reset.

    The level is ``m - 1 + spike(mem - m * threshold)`` with ``m`` the nearest level in
    [1, max_level] (no gradient): the forward pass is exactly the clipped count of crossings, and
    the surrogate sees the membrane's signed distance to the nearest level (its fractional part),
    one surrogate call per step rather than one per level.
    """

    def __init__(self, beta: float = 0.9, threshold: float = 1.0, adapt_decay: float = 0.95,
                 adapt_scale: float = 0.2, max_level: int = 4,
                 surrogate: str | SpikeFn = "fast_sigmoid"):
        super().__init__()
        if not (0 < beta < 1 and 0 <= adapt_decay < 1):
            raise ValueError("need beta in (0, 1) and adapt_decay in [0, 1)")
        if threshold <= 0 or adapt_scale < 0 or max_level < 1:
            raise ValueError("need threshold > 0, adapt_scale >= 0 and max_level >= 1")
        self.beta, self.threshold, self.max_level = beta, threshold, max_level
        self.adapt_decay, self.adapt_scale = adapt_decay, adapt_scale
        self.spike = spike_fn(surrogate)

    def energy_ops(self) -> list[dict[str, Any]]:
        """Nothing for ``aura.eval.energy``: neuron updates are element-wise, not synaptic."""
        return []

    def threshold_of(self, state: GIFState) -> torch.Tensor:
        """The threshold the next step will use."""
        return self.threshold + self.adapt_scale * state.adaptation

    def forward_step(self, x: torch.Tensor, state: GIFState | None = None
                     ) -> tuple[torch.Tensor, GIFState]:
        """One step: (B, ...) input and state (None: zeros) -> graded spikes, new state."""
        if state is None:
            state = GIFState(torch.zeros_like(x), torch.zeros_like(x))
        state = GIFState(*(s.to(x.dtype) for s in state))
        thr = self.threshold_of(state)
        mem = self.beta * state.mem + x
        level = (mem / thr).detach().round().clamp(1, self.max_level)
        spikes = level - 1 + self.spike(mem - level * thr)
        mem = mem - spikes.detach() * thr
        adaptation = self.adapt_decay * state.adaptation + spikes.detach()
        return spikes, GIFState(mem, adaptation)

    def forward(self, x: torch.Tensor, state: GIFState | None = None
                ) -> tuple[torch.Tensor, GIFState]:
        """All steps: (T, B, ...) input -> graded spikes (T, B, ...), final state."""
        out = []
        for x_t in x:
            spikes, state = self.forward_step(x_t, state)
            out.append(spikes)
        return torch.stack(out), state
