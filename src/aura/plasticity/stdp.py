"""Spike-timing dependent plasticity: a token-level rule, batched, and pair-based STDP.

``TokenSTDP(vocab_size, ...)`` keeps one weight per token in ``[w_min, w_max]``.
``update(token_ids, spikes)`` walks the tokens in row-major order and, for each, adds ``lr_plus``
to its weight if its salience channels spiked (their sum is > 0) and subtracts ``lr_minus``
otherwise, clamping after every step; ``modulate(salience, token_ids)`` multiplies salience by
``max(0, 1 + alpha * w[token])``. That is exactly the sequential per-token loop, computed for a
whole batch at once:

- a stable sort groups each token's occurrences in order; the end of each token's clamped
  walk then has a closed form (the two-sided Skorokhod map, ``clamped_walk_ends``) computed
  for all tokens at once in a few linear passes;
- weights live as integers of ``QUANTUM = 2**-24`` (``lr_plus``, ``lr_minus``, ``w_min``,
  ``w_max`` are snapped to that grid, a relative change below 1e-5 for rates >= 0.01). Integer
  arithmetic is exact, so the batched result is bit-identical to the sequential loop run
  with the same (snapped) values, in any order and on any device; float64 ``weights`` are exact.

On the CPU, with numba installed (the ``jit`` extra), ``update`` runs the sequential loop itself,
compiled (``sequential_walk``): one pass of a few instructions per token, 20x faster than the
vectorised passes, which have to sort first (docs/BENCHMARKS.md, "Plasticity"). Both are exact,
so both give the same bits; the vectorised form serves every other device, and the CPU without
numba.

``PairSTDP(a_plus, a_minus, tau_plus, tau_minus).delta(pre, post)`` is textbook pair-based STDP
for a spiking layer: spikes ``(T, B, n_pre)`` and ``(T, B, n_post)`` give ``dW (n_post, n_pre)``,
``+a_plus * exp(-dt / tau_plus)`` for every pre spike ``dt >= 0`` steps before a post spike and
``-a_minus * exp(-dt / tau_minus)`` for every post spike ``dt > 0`` steps before a pre spike,
averaged over the batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from aura.errors import DataError
from aura.plasticity.state import SavedRule, copy_into

QUANTUM_BITS = 24
QUANTUM = 2.0**-QUANTUM_BITS
_MAX_ABS_WEIGHT = 2.0**20  # weights and rates: 44-bit integers, exact in float64
# tokens per pass of the batched walk: its working arrays then stay in cache (1.35x faster per
# token than one pass over 2**20 tokens, benchmarks/plasticity_bench.py); the walk is sequential,
# so consecutive chunks give the same weights as one pass
UPDATE_CHUNK = 2**18


def sequential_walk(q: np.ndarray, tok: np.ndarray, spiked: np.ndarray, q_plus: int,
                    q_minus: int, q_min: int, q_max: int) -> None:
    """The rule as written: each token in turn steps its weight up or down, then clamps (in
    place, on integer weights). Plain Python here; ``compiled_walk`` compiles it."""
    for i in range(tok.shape[0]):
        t = tok[i]
        w = q[t] + q_plus if spiked[i] else q[t] - q_minus
        q[t] = q_min if w < q_min else (q_max if w > q_max else w)


@functools.cache
def compiled_walk() -> Callable[..., None] | None:
    """``sequential_walk`` compiled by numba, or None without numba. The machine code is kept
    on disk for the next process where numba finds a writable cache directory."""
    try:
        import numba
    except ImportError:
        return None
    try:
        return numba.njit(cache=True, nogil=True)(sequential_walk)
    except RuntimeError:  # numba's "no locator available": nowhere to keep the cache
        return numba.njit(nogil=True)(sequential_walk)


def _snap(value: float, name: str) -> int:
    if not math.isfinite(value) or abs(value) > _MAX_ABS_WEIGHT:
        raise ValueError(f"{name} must be finite and at most {_MAX_ABS_WEIGHT:g} in size, "
                         f"got {value}")
    return round(value / QUANTUM)


def stable_argsort(keys: torch.Tensor, bound: int) -> torch.Tensor:
    """Indices that sort ``keys`` (ints in ``[0, bound)``), equal keys kept in input order.

    On the CPU numpy's stable sort of 16-bit keys is a radix sort, ~10x faster than a
    comparison sort of int64; larger keys take two 16-bit passes (least significant first).
    """
    if keys.device.type != "cpu" or bound > 1 << 32:
        return torch.sort(keys, stable=True).indices
    k = keys.numpy()
    if bound <= 1 << 16:
        return torch.from_numpy(np.argsort(k.astype(np.uint16), kind="stable"))
    order = np.argsort((k & 0xFFFF).astype(np.uint16), kind="stable")
    order = order[np.argsort((k[order] >> 16).astype(np.uint16), kind="stable")]
    return torch.from_numpy(order)


def clamped_walk_ends(start: torch.Tensor, counts: torch.Tensor, d: torch.Tensor, lo: int,
                      hi: int, step: int | None = None) -> torch.Tensor:
    """Per segment of ``d`` (lengths ``counts``, all >= 1), the end of the walk
    ``x <- clamp(x + d_i, lo, hi)`` from ``start``; integers in, exact integers out. ``step``
    bounds ``|d_i|`` (taken from ``d`` when not given).

    After the first step puts ``y = x - lo`` in ``[0, a]`` (``a = hi - lo``), the rest is the
    discrete two-sided Skorokhod map of the path ``psi`` (``y`` plus the later steps' prefix
    sums), whose end has a closed form (Kruk, Lehoczky, Ramanan, Shreve 2007):
    ``psi(n) - max(min(0, min psi), max_s min(psi(s) - a, min_{u >= s} psi(u)))``. Each term is
    one vectorised pass (cumsum, a reversed cummin, a segment max): linear in the batch, no
    rounds. Segments stay apart inside the single cummin by lifting segment ``j`` by
    ``j * _span(...)``, which the caller keeps inside int64 (``walk_fits_int64``); the lift is
    added once with the cumsum's re-basing and taken off per segment, never per step.

    On the CPU the passes run in NumPy, except the cumsum, which PyTorch's kernel does 3x
    faster: NumPy's running minimum writes no indices, and its segment max reads the segments'
    starts instead of a segment id per step (docs/BENCHMARKS.md, "Plasticity").
    """
    if step is None:
        step = int(d.abs().max()) if d.numel() else 0
    if d.device.type == "cpu":
        return torch.from_numpy(_walk_ends(_NumpyOps, start.numpy(), counts.numpy(), d.numpy(),
                                           lo, hi, step))
    return _walk_ends(_TorchOps, start, counts, d, lo, hi, step)


def _span(lo: int, hi: int, longest: int, step: int) -> int:
    """More than the range of one segment's re-based path: ``y`` starts in ``[0, hi - lo]``
    and moves at most ``step`` for each of at most ``longest`` steps."""
    return 2 * (hi - lo + longest * step) + 1


class _NumpyOps:
    """The passes ``_walk_ends`` needs, on NumPy arrays (the cumsum by PyTorch, in place)."""

    copy = staticmethod(np.copy)
    minimum, maximum = staticmethod(np.minimum), staticmethod(np.maximum)

    @staticmethod
    def lifts(n: int, span: int, like: np.ndarray) -> np.ndarray:
        return np.arange(n, dtype=np.int64) * span

    @staticmethod
    def cumsum_(x: np.ndarray) -> np.ndarray:
        torch.from_numpy(x).cumsum_(0)
        return x

    @staticmethod
    def repeat(values: np.ndarray, counts: np.ndarray, total: int) -> np.ndarray:
        return np.repeat(values, counts)

    @staticmethod
    def suffix_min(x: np.ndarray) -> np.ndarray:
        return np.minimum.accumulate(x[::-1])[::-1]

    @staticmethod
    def segment_max(x: np.ndarray, first: np.ndarray, counts: np.ndarray, total: int
                    ) -> np.ndarray:
        return np.maximum.reduceat(x, first)


class _TorchOps:
    """The same passes on tensors of any device."""

    copy = staticmethod(torch.clone)
    minimum, maximum = staticmethod(torch.minimum), staticmethod(torch.maximum)

    @staticmethod
    def lifts(n: int, span: int, like: torch.Tensor) -> torch.Tensor:
        return torch.arange(n, device=like.device) * span

    @staticmethod
    def cumsum_(x: torch.Tensor) -> torch.Tensor:
        return x.cumsum_(0)

    @staticmethod
    def repeat(values: torch.Tensor, counts: torch.Tensor, total: int) -> torch.Tensor:
        """The known ``total`` spares an accelerator the sync its length would cost."""
        return torch.repeat_interleave(values, counts, output_size=total)

    @staticmethod
    def suffix_min(x: torch.Tensor) -> torch.Tensor:
        return torch.flip(torch.cummin(torch.flip(x, (0,)), 0).values, (0,))

    @staticmethod
    def segment_max(x: torch.Tensor, first: torch.Tensor, counts: torch.Tensor, total: int
                    ) -> torch.Tensor:
        seg = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device),
                                      counts, output_size=total)
        empty = torch.full_like(first, torch.iinfo(torch.int64).min)
        return empty.scatter_reduce_(0, seg, x, "amax")


def _walk_ends(xp: Any, start: Any, counts: Any, d: Any, lo: int, hi: int, step: int) -> Any:
    """``clamped_walk_ends`` on the arrays of ``xp`` (``_NumpyOps`` or ``_TorchOps``)."""
    a, total = hi - lo, len(d)
    last = xp.cumsum_(xp.copy(counts)) - 1
    first = last - counts + 1
    y1 = (start + d[first]).clip(lo, hi) - lo
    psi = xp.copy(d)
    psi[first] = y1
    psi = xp.cumsum_(psi)
    lift = xp.lifts(len(counts), _span(lo, hi, int(counts.max()), step), counts)
    psi += xp.repeat(lift - (psi[first] - y1), counts, total)
    suffix_min = xp.suffix_min(psi)
    inner = psi - a
    inner = xp.minimum(inner, suffix_min, out=inner)
    inner_max = xp.segment_max(inner, first, counts, total) - lift
    floor = (suffix_min[first] - lift).clip(None, 0)
    return psi[last] - lift - xp.maximum(floor, inner_max) + lo


def walk_fits_int64(n_seg: int, longest: int, step: int, lo: int, hi: int) -> bool:
    """Whether ``clamped_walk_ends``' lifted path (``n_seg`` segments, each at most
    ``longest`` steps of size at most ``step``) stays below 2**62."""
    return (n_seg + 1) * _span(lo, hi, longest, step) < 2**62


def vectorised_walk(q: torch.Tensor, tok: torch.Tensor, spiked: torch.Tensor, q_plus: int,
                    q_minus: int, q_min: int, q_max: int) -> None:
    """The walk of every token in ``tok`` (int64) in order, on the integer weights ``q`` in
    place, as a few passes per chunk of ``UPDATE_CHUNK`` tokens: on any device."""
    for i in range(0, tok.numel(), UPDATE_CHUNK):
        _walk_chunk(q, tok[i:i + UPDATE_CHUNK], spiked[i:i + UPDATE_CHUNK], q_plus, q_minus,
                    q_min, q_max)


def _walk_chunk(q: torch.Tensor, tok: torch.Tensor, spiked: torch.Tensor, q_plus: int,
                q_minus: int, q_min: int, q_max: int) -> None:
    counts = torch.bincount(tok, minlength=q.numel())
    uniq = counts.nonzero().squeeze(1)
    counts = counts[uniq]
    step = max(q_plus, q_minus)
    if not walk_fits_int64(uniq.numel(), int(counts.max()), step, q_min, q_max):
        half = tok.numel() // 2  # the walk is sequential: two halves in order are the same
        for part in (slice(None, half), slice(half, None)):
            _walk_chunk(q, tok[part], spiked[part], q_plus, q_minus, q_min, q_max)
        return
    order = stable_argsort(tok, q.numel())
    d = torch.index_select(spiked, 0, order).to(torch.int64)
    d.mul_(q_plus + q_minus).sub_(q_minus)
    q[uniq] = clamped_walk_ends(q[uniq], counts, d, q_min, q_max, step)


def _cpu_walk(q: torch.Tensor, tok: torch.Tensor, spiked: torch.Tensor, q_plus: int,
              q_minus: int, q_min: int, q_max: int) -> None:
    walk = compiled_walk()
    if walk is None:
        vectorised_walk(q, tok, spiked, q_plus, q_minus, q_min, q_max)
    else:
        walk(q.numpy(), tok.numpy(), spiked.numpy(), q_plus, q_minus, q_min, q_max)


def _no_output(*_: Any) -> None:
    """What the op makes besides its in-place update: nothing (its shape function)."""


# The CPU walk as a PyTorch op: a forward under torch.compile (natural_brain updates the rule in
# its forward) keeps the call in its graph, where Dynamo would fail on numba's dispatcher. The
# low-level registration adds ~3 us a call and imports nothing (``custom_op`` loads Dynamo on
# its first call, 1.3 s, and costs 0.5 ms a call). The namespace is the importing package's,
# so two copies of Aura in one process (benchmarks/before_after.py) coexist.
_OPS = torch.library.Library(__name__.split(".")[0], "FRAGMENT")
_OPS.define("token_stdp_walk(Tensor(a!) q, Tensor tok, Tensor spiked, int q_plus, int q_minus, "
            "int q_min, int q_max) -> ()")
_OPS.impl("token_stdp_walk", _cpu_walk, "CPU")
_OPS.impl("token_stdp_walk", _no_output, "Meta")
cpu_walk = getattr(torch.ops, __name__.split(".")[0]).token_stdp_walk
"""``vectorised_walk`` on CPU tensors, by ``compiled_walk`` where numba is installed."""


class TokenSTDP(SavedRule):
    """Per-token STDP weights that scale salience; see the module docstring for the rule.

    ``update`` and ``modulate`` accept token ids of any shape (read in row-major order);
    ``spikes`` has the same shape (spiked if > 0) or one more trailing dimension of salience
    channels (spiked if their sum is > 0). ``dtype`` is the dtype of ``modulate``'s factor.
    """

    kind = "TokenSTDP"

    def __init__(self, vocab_size: int, *, lr_plus: float = 0.01, lr_minus: float = 0.005,
                 w_min: float = -1.0, w_max: float = 1.0, alpha: float = 0.2,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.vocab_size, self.alpha, self.dtype = vocab_size, float(alpha), dtype
        self.device = torch.device(device)
        self.q_plus, self.q_minus = _snap(lr_plus, "lr_plus"), _snap(lr_minus, "lr_minus")
        self.q_min, self.q_max = _snap(w_min, "w_min"), _snap(w_max, "w_max")
        if self.q_plus < 0 or self.q_minus < 0:
            raise ValueError(f"lr_plus and lr_minus must be >= 0, got {lr_plus}, {lr_minus}")
        if self.q_min > self.q_max:
            raise ValueError(f"w_min must be <= w_max, got {w_min} > {w_max}")
        self.q = torch.zeros(vocab_size, dtype=torch.int64, device=self.device)

    lr_plus = property(lambda self: self.q_plus * QUANTUM, doc="potentiation step (snapped)")
    lr_minus = property(lambda self: self.q_minus * QUANTUM, doc="depression step (snapped)")
    w_min = property(lambda self: self.q_min * QUANTUM, doc="lower bound (snapped)")
    w_max = property(lambda self: self.q_max * QUANTUM, doc="upper bound (snapped)")

    def _as_float(self, q: torch.Tensor) -> torch.Tensor:
        """Exact in float64; float32 where the device has no float64 (MPS)."""
        return q.to(torch.float32 if self.device.type == "mps" else torch.float64) * QUANTUM

    @property
    def weights(self) -> torch.Tensor:
        """The weights as floats (see ``_as_float``)."""
        return self._as_float(self.q)

    def _check_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        if token_ids.is_floating_point() or token_ids.is_complex():
            raise ValueError(f"token ids must be integers, got {token_ids.dtype}")
        tok = token_ids.reshape(-1).to(device=self.device, dtype=torch.int64)
        if tok.numel():
            low, high = (int(x) for x in torch.aminmax(tok))
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"token ids must be in [0, {self.vocab_size}), got "
                                 f"[{low}, {high}]")
        return tok

    def update(self, token_ids: torch.Tensor, spikes: torch.Tensor) -> None:
        """Potentiate the tokens whose channels spiked, depress the others, one token at a time."""
        tok = self._check_tokens(token_ids)
        if spikes.shape == token_ids.shape:
            spiked = spikes.reshape(-1).to(self.device)
            if spiked.dtype != torch.bool:
                spiked = spiked > 0
        elif spikes.shape[:-1] == token_ids.shape:
            spiked = spikes.sum(-1).reshape(-1).to(self.device) > 0
        else:
            raise ValueError(f"spikes {tuple(spikes.shape)} must have token_ids' shape "
                             f"{tuple(token_ids.shape)}, optionally plus a channel dimension")
        if tok.numel() == 0:
            return
        walk = cpu_walk if self.device.type == "cpu" else vectorised_walk
        walk(self.q, tok, spiked, self.q_plus, self.q_minus, self.q_min, self.q_max)

    def modulate(self, salience: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """``salience * max(0, 1 + alpha * w[token])``, elementwise over ``token_ids``' shape."""
        tok = self._check_tokens(token_ids)
        if tok.numel() > self.vocab_size:  # one factor per vocabulary entry, then one gather
            table = (self.weights.to(self.dtype) * self.alpha + 1.0).clamp_min_(0.0)
            factor = torch.index_select(table, 0, tok)
        else:
            w = self._as_float(self.q[tok]).to(self.dtype)
            factor = (w * self.alpha + 1.0).clamp_min_(0.0)
        factor = factor.reshape(token_ids.shape).to(salience.device)
        if (salience.shape == factor.shape and not salience.requires_grad
                and torch.result_type(salience, factor) == factor.dtype):
            return factor.mul_(salience)  # the factor is ours: no second tensor of this size
        return salience * factor

    def config(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "lr_plus": self.lr_plus,
                "lr_minus": self.lr_minus, "w_min": self.w_min, "w_max": self.w_max,
                "alpha": self.alpha, "dtype": str(self.dtype).removeprefix("torch.")}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"weights_q": self.q}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Weights must lie in the range the rule can produce, [min(w_min, 0), max(w_max, 0)]."""
        copy_into({"weights_q": self.q}, tensors, "TokenSTDP state")
        if self.q.numel() and (int(self.q.min()) < min(self.q_min, 0)
                               or int(self.q.max()) > max(self.q_max, 0)):
            self.q.zero_()
            raise DataError("TokenSTDP state: weights outside [min(w_min, 0), max(w_max, 0)]")



class PairSTDP:
    """Pair-based STDP with exponential pre/post traces, all-to-all pairing, batched.

    The pre trace includes the current step (simultaneous spikes potentiate); the post trace is
    strictly earlier, so no pair counts twice. Time is cut into chunks whose traces come from a
    (chunk x chunk) decay matrix in one matmul, carried across chunks: linear in ``T``.
    """

    def __init__(self, a_plus: float = 0.01, a_minus: float = 0.0105, tau_plus: float = 20.0,
                 tau_minus: float = 20.0, chunk: int = 128):
        if tau_plus <= 0 or tau_minus <= 0:
            raise ValueError(f"time constants must be positive, got {tau_plus}, {tau_minus}")
        self.a_plus, self.a_minus = a_plus, a_minus
        self.tau_plus, self.tau_minus, self.chunk = tau_plus, tau_minus, chunk

    def _kernel(self, n: int, tau: float, strict: bool, like: torch.Tensor) -> torch.Tensor:
        t = torch.arange(n, device=like.device, dtype=like.dtype)
        lag = t[:, None] - t[None, :]
        mask = lag > 0 if strict else lag >= 0
        return torch.where(mask, torch.exp(-lag / tau), torch.zeros((), dtype=like.dtype,
                                                                     device=like.device))

    def delta(self, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        """``dW (n_post, n_pre)`` for spikes ``pre (T, B, n_pre)``, ``post (T, B, n_post)``."""
        if pre.dim() != 3 or post.dim() != 3 or pre.shape[:2] != post.shape[:2]:
            raise ValueError(f"pre {tuple(pre.shape)} and post {tuple(post.shape)} must be "
                             "(T, B, n) with the same T and B")
        dtype = torch.promote_types(pre.dtype, torch.float32)
        pre, post = pre.to(dtype), post.to(dtype)
        n_steps, batch, n_pre = pre.shape
        n_post = post.shape[2]
        x_carry = pre.new_zeros(batch * n_pre)
        y_carry = pre.new_zeros(batch * n_post)
        dw = pre.new_zeros(n_post, n_pre)
        for c0 in range(0, n_steps, self.chunk):
            p, q = pre[c0:c0 + self.chunk], post[c0:c0 + self.chunk]
            n = p.shape[0]
            k_plus = self._kernel(n, self.tau_plus, False, p)
            k_minus = self._kernel(n, self.tau_minus, True, p)
            steps = torch.arange(n, device=p.device, dtype=dtype)
            x = k_plus @ p.reshape(n, -1) + torch.outer(torch.exp(-steps / self.tau_plus),
                                                         x_carry)
            y = k_minus @ q.reshape(n, -1) + torch.outer(torch.exp(-steps / self.tau_minus),
                                                          y_carry)
            q_rows, p_rows = q.reshape(n * batch, n_post), p.reshape(n * batch, n_pre)
            dw += self.a_plus * (q_rows.T @ x.reshape(n * batch, n_pre))
            dw -= self.a_minus * (y.reshape(n * batch, n_post).T @ p_rows)
            x_carry = x[-1] * math.exp(-1 / self.tau_plus)
            y_carry = (y[-1] + q[-1].reshape(-1)) * math.exp(-1 / self.tau_minus)
        return dw / batch

    def apply_(self, weight: torch.Tensor, pre: torch.Tensor, post: torch.Tensor,
               lr: float = 1.0, w_min: float | None = None,
               w_max: float | None = None) -> torch.Tensor:
        """Add ``lr * delta(pre, post)`` to ``weight (n_post, n_pre)`` in place, then clamp."""
        with torch.no_grad():
            weight.add_(self.delta(pre, post).to(weight.dtype), alpha=lr)
            if w_min is not None or w_max is not None:
                weight.clamp_(w_min, w_max)
        return weight
