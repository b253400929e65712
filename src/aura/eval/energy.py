"""Operation counts and an estimated energy of one forward pass, per layer, at 45 nm prices.

Spiking language-model papers (Spikformer, SpikeGPT, SpikeBERT, SpikeLM, ...) compare models by
counting arithmetic and pricing it with Horowitz's 45 nm figures (ISSCC 2014): a 32-bit float
multiply-accumulate (MAC) costs 4.6 pJ, an accumulate (AC) 0.9 pJ. A matmul whose input is
spikes (0/1 events) needs no multiplies: each spike adds its weight row into the outputs, one AC
per spike per fan-out (a synaptic operation); every other matmul costs its MACs. Element-wise
work (norms, activations, softmax, neuron membrane updates), embedding lookups and all memory
traffic are left out, as in those papers: this is a figure for comparing models, not a power
measurement.

How it counts, for any registry model and without model-specific code:

- Every ``F.linear``, matmul (``@``, ``mm``, ``bmm``, ``einsum``, ...) and
  ``F.scaled_dot_product_attention`` seen during the forward (a ``TorchFunctionMode``) is counted
  analytically from its shapes and charged to the innermost module running it. Attention counts
  the score (QK^T) and value (AV) products over the query-key pairs it needs: with a causal mask
  that is T(T+1)/2 pairs per head, not T^2. Embedding lookups are listed with 0 operations.
- A linear or matmul whose input holds only 0s and 1s is spike-driven: ACs = nonzeros x fan-out.
- A module can report its own operations instead (the protocol): a method ``energy_ops()`` that
  returns, after each of its forwards, a list of dicts ``{"name": str (relative to the module,
  "" for itself), "ops": int, "spike_input": bool, "kind": str = "custom", "dense_macs": int |
  None = None}``. Its subtree is then not counted generically. ``SNNFeedForward`` reports its
  dense ``fc`` (MACs) and its spike-fed ``proj`` (ACs, because ``proj(mean_t spikes_t)`` equals
  ``mean_t proj(spikes_t)``: each step's spikes drive accumulates, the 1/steps folds into the
  weights); neurons report nothing. ``dense_macs`` is what the layer would cost on a dense input.

The attention cost grows with the sequence, so per-token figures hold for the window they were
measured at (``seq_len`` in the report).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from aura.data.sampler import compute_features
from aura.data.tokenizers import Tokenizer
from aura.errors import DataError
from aura.eval.perplexity import UNBOUNDED_WINDOW, _batches, _device, _features, _windows
from aura.models.base import AuraModel

MAC_PJ = 4.6  # 32-bit float multiply (3.7 pJ) + add (0.9 pJ), 45 nm (Horowitz 2014)
AC_PJ = 0.9  # 32-bit float add, 45 nm

_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm,
            torch.bmm, torch.Tensor.bmm, torch.mv, torch.Tensor.mv}
_ADD_MATMULS = {torch.addmm, torch.Tensor.addmm, torch.baddbmm, torch.Tensor.baddbmm,
                torch.addmv, torch.Tensor.addmv}
_EMBEDDINGS = {F.embedding, torch.embedding}
_REPORT_KEYS = {"name", "ops", "spike_input", "kind", "dense_macs"}


@dataclass
class LayerOps:
    """One layer's operations in the forward: ``ops`` are ACs if ``spike_input`` else MACs."""

    name: str
    kind: str
    ops: int = 0
    spike_input: bool = False
    dense_macs: int | None = None  # the MACs on a dense input (for spike-fed layers)
    calls: int = 0

    @property
    def energy_pj(self) -> float:
        return self.ops * (AC_PJ if self.spike_input else MAC_PJ)


@dataclass
class EnergyReport:
    """Per-layer operations of one forward over ``batch`` x ``seq_len`` tokens, and totals."""

    batch: int
    seq_len: int
    layers: list[LayerOps] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def macs(self) -> int:
        return sum(r.ops for r in self.layers if not r.spike_input)

    @property
    def acs(self) -> int:
        return sum(r.ops for r in self.layers if r.spike_input)

    @property
    def energy_pj(self) -> float:
        return sum(r.energy_pj for r in self.layers)

    @property
    def dense_energy_pj(self) -> float:
        """The same forward if every spike-fed layer ran as a dense matmul."""
        return sum(r.energy_pj if not r.spike_input else (r.dense_macs or 0) * MAC_PJ
                   for r in self.layers)

    def to_dict(self) -> dict[str, Any]:
        per_token = 1e-3 / self.tokens  # pJ per forward -> nJ per token
        return {
            "batch": self.batch, "seq_len": self.seq_len, "tokens": self.tokens,
            "mac_pj": MAC_PJ, "ac_pj": AC_PJ, "macs": self.macs, "acs": self.acs,
            "energy_pj": self.energy_pj, "energy_per_token_nj": self.energy_pj * per_token,
            "dense_energy_per_token_nj": self.dense_energy_pj * per_token,
            "spike_layers": [r.name for r in self.layers if r.spike_input],
            "layers": [{**asdict(r), "energy_pj": r.energy_pj} for r in self.layers],
        }

    def describe(self) -> str:
        d = self.to_dict()
        lines = [f"energy of one forward over {self.batch} x {self.seq_len} tokens "
                 f"(45 nm: MAC {MAC_PJ} pJ, AC {AC_PJ} pJ)",
                 f"  {'layer':<32} {'kind':<17} {'input':<6} {'ops':>14} {'nJ':>12}"]
        for r in self.layers:
            if r.ops or r.spike_input:
                lines.append(f"  {r.name:<32} {r.kind:<17} "
                             f"{'spikes' if r.spike_input else 'dense':<6} "
                             f"{r.ops:>14,} {r.energy_pj / 1e3:>12,.1f}")
        lines.append(f"  total: {d['macs']:,} MACs + {d['acs']:,} ACs = "
                     f"{d['energy_per_token_nj']:,.1f} nJ/token (all dense: "
                     f"{d['dense_energy_per_token_nj']:,.1f} nJ/token)")
        return "\n".join(lines)


def _matmul_macs(a: torch.Size, b: torch.Size) -> int:
    """Multiply-adds of ``a @ b`` with torch.matmul's broadcasting and 1-D rules."""
    a2 = (1, *a) if len(a) == 1 else tuple(a)
    b2 = (*b, 1) if len(b) == 1 else tuple(b)
    batch = torch.broadcast_shapes(a2[:-2], b2[:-2])
    return math.prod(batch) * a2[-2] * a2[-1] * b2[-1]


def _einsum_macs(equation: str, operands: list[torch.Tensor]) -> int:
    """Naive cost of a two-operand einsum: the product of every index's size."""
    sizes: dict[str, int] = {}
    spec = equation.replace(" ", "").split("->")[0].split(",")
    for letters, t in zip(spec, operands, strict=False):
        if "..." in letters:
            head, tail = letters.split("...")
            ellipsis = t.shape[len(head):t.dim() - len(tail)]
            letters = head + "".join(f"<{i}>" for i in range(len(ellipsis))) + tail
            for i, n in enumerate(ellipsis):
                sizes[f"<{i}>"] = max(sizes.get(f"<{i}>", 1), n)
        for letter, n in zip(re.findall(r"<\d+>|[a-zA-Z]", letters), t.shape, strict=False):
            if not letter.startswith("<"):
                sizes[letter] = max(sizes.get(letter, 1), n)
    return math.prod(sizes.values())


def _attention_pairs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None,
                     causal: bool) -> int:
    """Query-key pairs attention needs, summed over the queries' batch and head dims."""
    L, S = q.size(-2), k.size(-2)
    batch = q.shape[:-2]
    if causal:  # PyTorch's is_causal: query i sees keys 0..i
        return math.prod(batch) * sum(min(i + 1, S) for i in range(L))
    if mask is None:
        return math.prod(batch) * L * S
    keep = mask if mask.dtype == torch.bool else mask > float("-inf")
    return int(keep.expand(*batch, L, S).sum())


def _is_spikes(x: torch.Tensor) -> bool:
    return x.is_floating_point() and bool(((x == 0) | (x == 1)).all())


class _Counter(TorchFunctionMode):
    """Counts operations during a forward, charged to the innermost running module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.names = {m: n for n, m in model.named_modules()}
        self.rows: dict[tuple[str, str], LayerOps] = {}
        self.stack: list[nn.Module] = []
        self.muted_at: int | None = None  # stack depth of the reporting module being run
        self.handles = []
        for m in model.modules():
            self.handles.append(m.register_forward_pre_hook(self._enter))
            self.handles.append(m.register_forward_hook(self._leave, always_call=True))

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def _enter(self, module: nn.Module, _args: Any) -> None:
        self.stack.append(module)
        if self.muted_at is None and callable(getattr(module, "energy_ops", None)):
            self.muted_at = len(self.stack)

    def _leave(self, module: nn.Module, _args: Any, _out: Any) -> None:
        if self.muted_at == len(self.stack):
            self.muted_at = None
            prefix = self.names[module]
            for item in module.energy_ops():  # type: ignore[operator]
                self._add_reported(prefix, item)
        self.stack.pop()

    def _add_reported(self, prefix: str, item: dict[str, Any]) -> None:
        unknown = set(item) - _REPORT_KEYS
        if unknown or not {"name", "ops", "spike_input"} <= set(item):
            raise TypeError(f"energy_ops() of {prefix!r} returned {sorted(item)}; expected "
                            f"name, ops, spike_input and optionally kind, dense_macs")
        name = ".".join(p for p in (prefix, item["name"]) if p) or "(model)"
        self._add(name, item.get("kind", "custom"), int(item["ops"]),
                  bool(item["spike_input"]), item.get("dense_macs"))

    def _add(self, name: str, kind: str, ops: int, spike_input: bool = False,
             dense_macs: int | None = None) -> None:
        row = self.rows.setdefault((name, kind), LayerOps(name, kind, spike_input=spike_input))
        row.ops += ops
        row.calls += 1
        if dense_macs is not None or not spike_input:
            row.dense_macs = (row.dense_macs or 0) + (ops if dense_macs is None else dense_macs)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.muted_at is None:
            self._count(func, args, kwargs)
        return func(*args, **kwargs)

    def _matmul(self, name: str, kind: str, operands: tuple[torch.Tensor, ...], macs: int) -> None:
        """Dense MACs, or one AC per nonzero per fan-out when an operand holds only 0s and 1s."""
        for x in operands:
            if x.numel() and _is_spikes(x):
                self._add(name, kind, int(torch.count_nonzero(x)) * (macs // x.numel()), True,
                          macs)
                return
        self._add(name, kind, macs)

    def _count(self, func: Any, args: tuple, kwargs: dict) -> None:
        name = self.names[self.stack[-1]] if self.stack else ""
        name = name or "(model)"
        if func is F.linear:
            x = kwargs.get("input", args[0] if args else None)
            w = kwargs.get("weight", args[1] if len(args) > 1 else None)
            self._matmul(name, "linear", (x,), x.numel() // x.size(-1) * w.numel())
        elif func in _MATMULS or func in _ADD_MATMULS:
            a, b = args[:2] if func in _MATMULS else args[1:3]
            self._matmul(name, "matmul", (a, b), _matmul_macs(a.shape, b.shape))
        elif func is torch.Tensor.__rmatmul__:
            b, a = args[:2]
            self._matmul(name, "matmul", (a, b), _matmul_macs(a.shape, b.shape))
        elif func is torch.einsum:
            equation, *ops = args
            operands = list(ops[0]) if len(ops) == 1 and isinstance(ops[0], list | tuple) else ops
            self._add(name, "matmul", _einsum_macs(equation, operands))
        elif func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            causal = kwargs.get("is_causal", args[5] if len(args) > 5 else False)
            pairs = _attention_pairs(q, k, mask, bool(causal))
            self._add(name, "attention_scores", pairs * q.size(-1))
            self._add(name, "attention_values", pairs * v.size(-1))
        elif func in _EMBEDDINGS:
            self._add(name, "embedding", 0)


def count_energy(model: nn.Module, idx: torch.Tensor, **forward_kwargs: Any) -> EnergyReport:
    """Operations of ``model(idx)`` (B, T) per layer, in eval mode and without gradients."""
    counter = _Counter(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), counter:
            model(idx, **forward_kwargs)
    finally:
        counter.close()
        model.train(was_training)
    return EnergyReport(idx.size(0), idx.size(1), list(counter.rows.values()))


def energy_of_stream(model: AuraModel, chunks: Iterable[np.ndarray], *, batch_size: int = 8,
                     block_size: int | None = None, tokenizer: Tokenizer | None = None
                     ) -> EnergyReport:
    """``count_energy`` on the first batch of windows ``aura eval`` scores from a token stream
    (``tokenizer`` builds the token features a model reads, such as prosody)."""
    chunks = list(chunks)
    bs = block_size or model.max_context or UNBOUNDED_WINDOW
    n = min(sum(len(c) for c in chunks), batch_size * bs + 1)
    if n < 2:
        raise DataError(f"nothing to count: {n} token(s), need at least 2")
    x, _ = next(_batches(_windows(chunks, n, bs + 1), batch_size))
    idx = torch.from_numpy(x).to(_device(model))
    return count_energy(model, idx, **compute_features(_features(model, tokenizer), idx))
