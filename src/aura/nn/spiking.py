"""Spiking neurons with explicit state and swappable surrogate gradients (in the style of snnTorch).

A neuron is a small module whose membrane state is passed in and returned, never stored on the
module, so two instances (or two sequences through one instance) cannot leak into each other. The
spike is a Heaviside step in the forward pass; its backward pass is a smooth surrogate chosen by
name or given as any callable ``(x) -> spikes``.

State and outputs take the input's dtype: a bf16 input gets bf16 state, never float32 (which
would promote the spikes and everything computed from them), and float parameters are cast to the
input's dtype at use. Soft- and hard-reset ``LIF`` with a named surrogate runs on the fused kernel
in ``aura.nn.lif_kernel``; ``LIF.forward_step`` is its reference, one autograd graph per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from aura.nn.lif_kernel import lif_constant, lif_sequence

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
            beta, thr = self._params(x)
            mem0 = torch.zeros_like(x[0]) if mem is None else mem.to(x.dtype)
            return lif_sequence(x, mem0, beta, thr, self.reset == "hard", self.spike)
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
            beta, thr = self._params(x)
            mem0 = torch.zeros_like(x) if mem is None else mem.to(x.dtype)
            return lif_constant(x, steps, mem0, beta, thr, self.reset == "hard", self.spike)
        spikes, mem = self(x.expand(steps, *x.shape), mem)
        return spikes.sum(0), mem


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
        level = (mem.detach() / thr.detach()).round_().clamp_(1, self.max_level)  # builds no graph
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
