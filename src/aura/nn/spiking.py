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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

SpikeFn = Callable[[torch.Tensor], torch.Tensor]


def _surrogate(name: str, derivative: Callable[[torch.Tensor, float], torch.Tensor],
               doc: str) -> type[torch.autograd.Function]:
    """A Heaviside spike whose backward is ``derivative(x, param)``: one shape, many surrogates.

    The derivative is kept on the class so the fused LIF can apply it without a graph per step.
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
            return grad * derivative(x, ctx.param), None

    Surrogate.derivative = staticmethod(derivative)  # type: ignore[attr-defined]
    Surrogate.__name__ = Surrogate.__qualname__ = name
    Surrogate.__doc__ = doc
    return Surrogate


def _fast_sigmoid_grad(x: torch.Tensor, slope: float) -> torch.Tensor:
    return torch.add(x.new_ones(()), x.abs(), alpha=slope).pow_(-2)  # three passes over x


def _atan_grad(x: torch.Tensor, alpha: float) -> torch.Tensor:
    # alpha/2 / (1 + k^2 x^2) = 1 / (2/alpha + (2/alpha) k^2 x^2): two passes over x
    k = math.pi / 2 * alpha
    return torch.addcmul(x.new_full((), 2 / alpha), x, x, value=2 * k * k / alpha).reciprocal_()


FastSigmoid = _surrogate(
    "FastSigmoid", _fast_sigmoid_grad,
    "Heaviside forward; backward ``1 / (1 + slope |x|)^2`` (Zenke & Ganguli's SuperSpike).")
ATan = _surrogate(
    "ATan", _atan_grad,
    "Heaviside forward; backward ``alpha/2 / (1 + (pi/2 alpha x)^2)``, the derivative of "
    "``atan(pi/2 alpha x) / pi``: heavier tails than the fast sigmoid.")


def fast_sigmoid(x: torch.Tensor, slope: float = 25.0) -> torch.Tensor:
    return FastSigmoid.apply(x, slope)


def atan(x: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    return ATan.apply(x, alpha)


@dataclass(frozen=True)
class NamedSpike:
    """A registered surrogate with its parameter, callable as ``(x) -> spikes``.

    Unlike an arbitrary callable it exposes ``derivative``, which lets ``LIF`` run all steps in
    one fused autograd node instead of a graph of small ops per step. A module-level class, so a
    neuron holding one pickles.
    """

    function: type[torch.autograd.Function]
    param: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.function.apply(x, self.param)

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        return self.function.derivative(x, self.param)  # type: ignore[attr-defined]


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


_BLOCK = 1 << 15  # neurons per block on CPU: in cache over the steps, and one thread per op
_ONE_BLOCK = 1 << 17  # up to this many neurons, one block whose ops use PyTorch's own threads


def _each_block(like: torch.Tensor, n: int, work: Callable[[int, int], None]) -> None:
    """``work(start, end)`` over blocks of ``n`` neurons, without autograd.

    Many neurons on CPU: blocks of 2^15 shared among ``torch.get_num_threads()`` Python threads
    (the ops release the GIL). A block is below PyTorch's grain size, so each op runs on the
    thread that issued it: an OpenMP barrier per small op costs more than the op as soon as the
    cores are shared (the SNN FFN ran 2-3x slower under load). Up to ``_ONE_BLOCK`` neurons, or
    off CPU, one block whose ops PyTorch parallelises itself: there, on an idle machine, the
    Python work per op of two threads contending for the GIL costs more (2x at 64Ki neurons).
    """
    if like.device.type != "cpu" or n <= _ONE_BLOCK:
        with torch.no_grad():
            work(0, n)
        return
    starts = range(0, n, _BLOCK)
    workers = min(torch.get_num_threads(), len(starts))
    inference = torch.is_inference_mode_enabled()

    def run(first: int) -> None:
        with torch.inference_mode(inference), torch.no_grad():  # modes are per thread
            for s in starts[first::workers]:
                work(s, min(n, s + _BLOCK))

    if workers <= 1:
        run(0)
        return
    with ThreadPoolExecutor(workers - 1) as pool:
        others = [pool.submit(run, i) for i in range(1, workers)]
        run(0)
        for f in others:
            f.result()


def _lif_run(x: torch.Tensor, mem: torch.Tensor, beta: torch.Tensor, thr: torch.Tensor,
             hard: bool, steps: int | None, keep: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The LIF recurrence on plain tensors: spikes (or, for a constant input held ``steps``
    steps, the spike count), the final state and, if ``keep``, every pre-reset membrane.

    Three or four passes per step into preallocated buffers, no autograd. Neurons go through
    all the steps one block at a time, so memory sees the input, the outputs and the kept
    membranes once, and the state and spikes of a block stay in cache.
    """
    T = x.size(0) if steps is None else steps
    shape, n = mem.shape, mem.numel()
    xf, mf = x.reshape(-1, n), mem.reshape(n)
    h_all = x.new_empty((T, n)) if keep else None
    out = x.new_empty((T, n)) if steps is None else x.new_zeros(n)
    final = x.new_empty(n)
    neg_thr = -thr

    def work(s: int, e: int) -> None:
        m, state, spikes = mf[s:e], final[s:e], x.new_empty(e - s)
        # per-step views made in one call each: Python work per op holds the GIL
        hs = [x.new_empty(e - s)] * T if h_all is None else h_all[:, s:e].unbind()
        xs = [xf[0, s:e]] * T if steps is not None else xf[:, s:e].unbind()
        outs = out[:, s:e].unbind() if steps is None else None
        for t in range(T):
            h = torch.addcmul(xs[t], m, beta, out=hs[t])  # beta m + x
            if outs is not None:
                fired = torch.gt(h, thr, out=outs[t])
            else:
                fired = torch.gt(h, thr, out=spikes)
                out[s:e].add_(fired)
            if hard:  # h (1 - s), exactly 0 where it fired
                m = torch.addcmul(h, h, fired, value=-1, out=state)
            else:
                m = torch.addcmul(h, fired, neg_thr, out=state)

    _each_block(x, n, work)
    return (out.view(T, *shape) if steps is None else out.view(shape), final.view(shape),
            None if h_all is None else h_all.view(T, *shape))


class _FusedLIF(torch.autograd.Function):
    """Soft- or hard-reset LIF over all steps as one autograd node.

    Backward is exactly the gradient autograd would take through the step-by-step graph
    (surrogate at each spike, reset detached): ``dL/dh_t = g_t s'(h_t - thr) + dL/dm_t * (1, or
    1 - s_t if hard)`` and ``dL/dm_{t-1} = beta dL/dh_t``, walked in reverse over the kept
    pre-reset membranes ``h_t``. For a constant input with a soft reset and fixed parameters
    (the SNN FFN) the walk has a closed form, ``dL/dx = g sum_u c_u s'_u + c_{T-1} dL/dm_{T-1}``
    with ``c_u = 1 + beta c_{u-1}``, ``c_0 = 1``, which runs forward in time: the membranes are
    recomputed block by block instead of kept, so the layer stores only its input.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mem: torch.Tensor, beta: torch.Tensor,
                thr: torch.Tensor, hard: bool, steps: int | None, spike: NamedSpike
                ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.closed_form = steps is not None and not hard and not any(ctx.needs_input_grad[1:4])
        out, final, h_all = _lif_run(x, mem, beta, thr, hard, steps, keep=not ctx.closed_form)
        ctx.save_for_backward(x if ctx.closed_form else h_all, mem, beta, thr)
        ctx.set_materialize_grads(False)  # an unused output (often the state) costs nothing
        ctx.hard, ctx.steps, ctx.spike = hard, steps, spike
        return out, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_out: torch.Tensor | None, g_mem: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, ...]:
        saved, mem0, beta, thr = ctx.saved_tensors
        if ctx.closed_form:
            gx = _constant_soft_grad(saved, mem0, beta, thr, ctx.steps, ctx.spike, g_out, g_mem)
            return gx, None, None, None, None, None, None
        need_x, need_mem, need_beta, need_thr = ctx.needs_input_grad[:4]
        grads = _reverse_grad(saved, mem0, beta, thr, ctx.hard, ctx.steps is not None,
                              ctx.spike, g_out, g_mem, need_beta, need_thr)
        gx, g_mem0, g_beta, g_thr = grads
        return (gx if need_x else None, g_mem0 if need_mem else None, g_beta, g_thr,
                None, None, None)


def _constant_soft_grad(x: torch.Tensor, mem0: torch.Tensor, beta: torch.Tensor,
                        thr: torch.Tensor, steps: int, spike: NamedSpike,
                        g_out: torch.Tensor | None, g_mem: torch.Tensor | None) -> torch.Tensor:
    """dL/dx by the closed form in ``_FusedLIF``, re-running the recurrence block by block."""
    n = x.numel()
    coef = [torch.ones_like(beta)]
    for _ in range(steps - 1):
        coef.append(1 + beta * coef[-1])
    gx = x.new_zeros(n)
    xf, mf = x.reshape(n), mem0.reshape(n)
    go = None if g_out is None else g_out.reshape(n)
    gm = None if g_mem is None else g_mem.reshape(n)

    def work(s: int, e: int) -> None:
        if go is not None:
            m, h, spikes, state = mf[s:e], *(x.new_empty(e - s) for _ in range(3))
            acc = None
            for u in range(steps):
                torch.addcmul(xf[s:e], m, beta, out=h)
                sg = spike.derivative(h - thr)
                acc = sg if acc is None else acc.addcmul_(sg, coef[u])
                if u < steps - 1:
                    m = torch.addcmul(h, torch.gt(h, thr, out=spikes), -thr, out=state)
            torch.mul(acc, go[s:e], out=gx[s:e])
        if gm is not None:
            gx[s:e].addcmul_(gm[s:e], coef[-1])

    _each_block(x, n, work)
    return gx.view(x.shape)


def _reverse_grad(h_all: torch.Tensor, mem0: torch.Tensor, beta: torch.Tensor,
                  thr: torch.Tensor, hard: bool, constant: bool, spike: NamedSpike,
                  g_out: torch.Tensor | None, g_mem: torch.Tensor | None, need_beta: bool,
                  need_thr: bool) -> tuple[torch.Tensor, torch.Tensor, ...]:
    """The general backward: the recurrence of ``_FusedLIF`` walked from the last step, one
    block of neurons at a time (so the carried gradient stays in cache). The parameters'
    gradients are summed per block, then over blocks in order, whatever thread ran them."""
    T, n = h_all.size(0), mem0.numel()
    hf, mf = h_all.reshape(T, n), mem0.reshape(n)
    go = None if g_out is None else g_out.reshape(-1, n)  # (1 or T, n)
    gm = None if g_mem is None else g_mem.reshape(n)
    gx = h_all.new_zeros(n) if constant or go is None else h_all.new_empty((T, n))
    g_mem0 = mem0.new_zeros(n)
    partial: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def work(s: int, e: int) -> None:
        g_beta, g_thr = torch.zeros_like(beta), torch.zeros_like(thr)
        carry = None if gm is None else gm[s:e].clone()  # dL/dm_t, owned
        hs = hf[:, s:e].unbind()  # per-step views in one call: Python work holds the GIL
        gos = None if go is None else [go[0, s:e]] * T if constant else go[:, s:e].unbind()
        gxs = None if constant or go is None else gx[:, s:e].unbind()
        spare = None  # the buffer the next carry is written into
        for t in range(T - 1, -1, -1):
            h = hs[t]
            fired = h > thr if hard or need_thr else None
            if carry is not None and need_thr and not hard:  # the soft reset subtracts thr
                g_thr -= carry[fired].sum()
            if carry is not None and hard:
                carry.masked_fill_(fired, 0)
            gh = carry
            if gos is not None:
                gh = torch.mul(spike.derivative(h - thr), gos[t],
                               out=None if gxs is None else gxs[t])
                if need_thr:
                    g_thr -= gh.sum()
                if carry is not None:
                    gh.add_(carry)
            if gh is None:  # no gradient reaches this step or any before it
                break
            if constant:
                gx[s:e].add_(gh)
            elif go is None:
                gx[t, s:e] = gh
            if need_beta:
                prev = mf[s:e] if t == 0 else hs[t - 1]
                if t > 0:
                    s_prev = prev > thr
                    prev = torch.where(s_prev, 0, prev) if hard else prev - s_prev * thr
                g_beta += (gh * prev).sum()
            if gh is not carry:
                spare = carry
            carry = torch.mul(gh, beta, out=spare)
        if carry is not None:
            g_mem0[s:e] = carry
        partial[s] = (g_beta, g_thr)

    _each_block(h_all, n, work)
    sums = [torch.stack([partial[s][i] for s in sorted(partial)]).sum() for i in (0, 1)]
    return (gx.view(mem0.shape if constant else h_all.shape), g_mem0.view(mem0.shape),
            sums[0] if need_beta else None, sums[1] if need_thr else None)


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
            out, final, _ = _lif_run(x, mem0, beta, thr, hard, steps, keep=False)
            return out, final


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
