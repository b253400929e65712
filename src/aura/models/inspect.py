"""What a model's parts do on one input, as named arrays: the ``brain_state`` capability.

A model's forward is left as it is; ``record_inputs`` hooks the parts worth looking at, keeps
what each was called with, and the readers below recompute from those inputs what the part
computed inside (the attention weights the fused kernel never materialises, the spikes of each
step the fused LIF never keeps, a memory read's ids and cosines). Every reader runs the part's
own weights, so the arrays are exactly the model's, and ``aura.eval.viz`` draws them without
knowing any model.

Names (each array on the CPU, the probe's batch dimension dropped):
``attention/L`` (heads, T, T); ``spikes/L`` (steps, T, neurons) spike counts per step;
``place/code`` (T, cells), ``place/active_fraction`` (); ``grid/position`` (T, 2),
``grid/rates`` (T, modules * cells), ``grid/field`` (modules, G, G) the first cell of each module
over the plane, ``grid/extent`` (4,); ``time/elapsed`` (T,), ``time/rates`` (T, cells),
``time/tuning`` (E, cells), ``time/preferred`` (cells,); ``theta_gamma/theta_phase``,
``theta_gamma/gamma_phase``, ``theta_gamma/gamma_amplitude`` (T,); ``routing/NAME`` (T, options)
each token's routing probabilities (thalamus over regions, LiquidMoE over experts, basal ganglia
over the regions' proposals and, last, no-go); ``memory/NAME/ids``,
``memory/NAME/scores`` (T, k; id -1 and score 0 where nothing was found), ``memory/NAME/gate``
(T,); ``bdh_x/L``, ``bdh_y/L`` (T, heads, N) activity; ``metric/KEY`` () the forward's aux.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from aura.nn.attention import CausalSelfAttention
from aura.nn.brain.basal_ganglia import BasalGanglia
from aura.nn.brain.liquid_moe import LiquidMoE
from aura.nn.brain.thalamus import Thalamus
from aura.nn.grid_cells import GridCellEncoder
from aura.nn.hippocampus import HippocampalMemory
from aura.nn.memory_attention import MemoryCrossAttention
from aura.nn.oscillations import TICKS, ThetaGammaEncoding
from aura.nn.place_cells import PlaceCellEncoder
from aura.nn.snn_ffn import SNNFeedForward
from aura.nn.spiking import LIF
from aura.nn.time_cells import TimeCellEncoder

Call = tuple[tuple[Any, ...], dict[str, Any]]
FIELD_SIZE = 64  # grid fields are drawn on a FIELD_SIZE x FIELD_SIZE mesh


@contextlib.contextmanager
def record_inputs(parts: dict[str, nn.Module]) -> Iterator[dict[str, Call]]:
    """Within the block, the latest (args, kwargs) each named part was called with."""
    seen: dict[str, Call] = {}
    handles = []
    for name, module in parts.items():
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 name: str = name) -> None:
            seen[name] = (args, kwargs)
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def attention_weights(attn: CausalSelfAttention, x: torch.Tensor,
                      gains: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """The causal softmax weights (B, heads, T, T) of ``attn`` on x, with the same gains."""
    B, T, _ = x.shape
    q, k, _v = attn.qkv(x).view(B, T, 3, attn.n_head, attn.head_dim).permute(2, 0, 3, 1, 4)
    if gains is not None:
        q, k = q * gains[0].to(q.dtype), k * gains[1].to(k.dtype)
    logits = (q.float() @ k.float().mT) / math.sqrt(attn.head_dim)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)


def spike_train(ffn: SNNFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Spike counts of every step (steps, B, T, neurons) of ``ffn`` on x, one step at a time
    (``LIF.forward_step``, the reference the fused kernel is tested against)."""
    current = ffn.fc(x)
    if isinstance(ffn.neuron, LIF):
        mem, out = None, []
        for _ in range(ffn.steps):
            spikes, mem = ffn.neuron.forward_step(current, mem)
            out.append(spikes)
        return torch.stack(out)
    return ffn.neuron(current.expand(ffn.steps, *current.shape))[0]


def cross_attention_reads(memory: MemoryCrossAttention, h: torch.Tensor,
                          positions: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Which bank entries each token read, their cosines and its gate (no read is counted)."""
    B, T, _ = h.shape
    limit = None if positions is None else positions.reshape(B * T)
    got = memory.writer.store.read(memory.retrieve(h).reshape(B * T, -1), memory.top_k,
                                   max_source_pos=limit, touch=False)
    return _reads(got.ids, got.scores, got.mask, torch.sigmoid(memory.gate(h)), B, T)


def hippocampal_reads(memory: HippocampalMemory, h: torch.Tensor, access: Any
                      ) -> dict[str, torch.Tensor]:
    """The memories each token recalled (top-k, before the cognitive map's neighbours), their
    cosines and its gate; nothing when recall was off or the store empty."""
    if not access.read or not len(memory.store):
        return {}
    B, T, _ = h.shape
    where = None if access.positions is None else access.positions.reshape(-1)
    got = memory.store.read(memory.query(h).reshape(B * T, -1).float(), memory.top_k,
                            max_source_pos=where, touch=False)
    return _reads(got.ids, got.scores, got.mask, torch.sigmoid(memory.gate(h)), B, T)


def _reads(ids: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, gate: torch.Tensor,
           B: int, T: int) -> dict[str, torch.Tensor]:
    return {"ids": ids.masked_fill(~mask, -1).view(B, T, -1),
            "scores": scores.masked_fill(~mask, 0.0).view(B, T, -1),
            "gate": gate.view(B, T)}


def place_state(place: PlaceCellEncoder, h: torch.Tensor) -> dict[str, torch.Tensor]:
    """The dense place code (B, T, cells); ``encode`` recomputes the forward's top-k exactly."""
    return {"code": place.encode(h)}


def grid_state(grid: GridCellEncoder, h: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each token's point on the learned plane and its grid code, and every module's first
    cell's field over the square the probe's points span (plus one finest spacing)."""
    pos = grid.position(h)
    flat = pos.reshape(-1, 2)
    pad = float(grid.base_scale)
    lo, hi = flat.min(0).values - pad, flat.max(0).values + pad
    side = float((hi - lo).max())
    lo = (lo + hi) / 2 - side / 2
    xs = lo[0] + torch.linspace(0, side, FIELD_SIZE, device=h.device)
    ys = lo[1] + torch.linspace(0, side, FIELD_SIZE, device=h.device)
    mesh = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)  # (G, G, 2), rows are y
    cells = grid.rates_at(mesh).view(FIELD_SIZE, FIELD_SIZE, grid.n_modules,
                                     grid.cells_per_module)
    extent = torch.stack([xs[0], xs[-1], ys[0], ys[-1]])
    return {"position": pos, "rates": grid.rates(h), "field": cells[..., 0].permute(2, 0, 1),
            "extent": extent}


def time_state(time: TimeCellEncoder, elapsed: torch.Tensor) -> dict[str, torch.Tensor]:
    """Elapsed tokens, the code, and every cell's tuning over 0 .. max(64, longest) tokens."""
    span = max(64, int(elapsed.max()) + 1)
    tau, _ = time.tuning(elapsed.device)
    return {"elapsed": elapsed, "rates": time.rates(elapsed),
            "tuning": time.rates(torch.arange(span, device=elapsed.device)), "preferred": tau}


def theta_gamma_state(enc: ThetaGammaEncoding, positions: torch.Tensor
                      ) -> dict[str, torch.Tensor]:
    """Theta and gamma phase (radians, [0, 2π)) per position, reduced exactly as the encoding
    does, and the gamma amplitude theta imposes, (1 + cos theta) / 2."""
    n = enc.period_ticks[:2]
    ticks = positions.long().unsqueeze(-1) % n * TICKS % n
    phase = ticks.double() / n.double() * (2 * math.pi)
    theta, gamma = phase.float().unbind(-1)
    return {"theta_phase": theta, "gamma_phase": gamma,
            "gamma_amplitude": (1 + theta.cos()) / 2}


def routing(module: Thalamus | LiquidMoE | BasalGanglia, x: torch.Tensor) -> torch.Tensor:
    """The probabilities (B, T, options) a router of the modular brain gave each token of x."""
    if isinstance(module, Thalamus):
        assert module.router is not None  # a bypassed thalamus routes nothing, is not inspected
        logits = module.router(x)
    elif isinstance(module, LiquidMoE):
        logits = module.router(x)
    else:
        logits = module.select(module.norm(x))
    return torch.softmax(logits.float(), dim=-1)


def read_part(name: str, module: nn.Module, args: tuple[Any, ...]) -> dict[str, torch.Tensor]:
    """The arrays of one recorded part, named under ``name``, for the probe's one sequence."""
    if isinstance(module, CausalSelfAttention):
        gains = args[2] if len(args) > 2 else None
        return {name: attention_weights(module, args[0], gains)[0]}
    if isinstance(module, SNNFeedForward):
        return {name: spike_train(module, args[0])[:, 0]}
    if isinstance(module, Thalamus | LiquidMoE | BasalGanglia):
        return {name: routing(module, args[0])[0]}
    if isinstance(module, MemoryCrossAttention):
        parts = cross_attention_reads(module, args[0], args[1] if len(args) > 1 else None)
    elif isinstance(module, HippocampalMemory):
        parts = hippocampal_reads(module, args[0], args[1])
    elif isinstance(module, PlaceCellEncoder):
        measured = module.last_active_fraction.clone()
        parts = place_state(module, args[0])
        return {f"{name}/code": parts["code"][0], f"{name}/active_fraction": measured}
    elif isinstance(module, GridCellEncoder):
        parts = grid_state(module, args[0])
        return {f"{name}/{k}": v if k in ("field", "extent") else v[0] for k, v in parts.items()}
    elif isinstance(module, TimeCellEncoder):
        parts = time_state(module, args[1][:1])
        return {f"{name}/{k}": v if k in ("tuning", "preferred") else v[0]
                for k, v in parts.items()}
    elif isinstance(module, ThetaGammaEncoding):
        return {f"{name}/{k}": v for k, v in theta_gamma_state(module, args[0]).items()}
    else:
        raise TypeError(f"no reader for {type(module).__name__}")
    return {f"{name}/{k}": v[0] for k, v in parts.items()}


@torch.no_grad()
def brain_state_of(model: nn.Module, parts: dict[str, nn.Module], idx: torch.Tensor,
                   inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One forward of ``model`` on ``idx`` (1, T) with ``parts`` recorded, read back: each
    part's arrays, and the forward's scalar aux metrics as ``metric/KEY``; float32 on the CPU
    (spike counts and ids keep integers' exactness in float32 at these sizes)."""
    if idx.dim() != 2 or idx.size(0) != 1:
        raise ValueError(f"brain_state reads one sequence, (1, T); got {tuple(idx.shape)}")
    with record_inputs(parts) as seen:
        out = model(idx, **inputs)
    state: dict[str, torch.Tensor] = {}
    for name, (args, _kwargs) in seen.items():
        state.update(read_part(name, parts[name], args))
    state.update({f"metric/{k}": v for k, v in out.aux.items() if v.dim() == 0})
    return {k: v.detach().cpu() if v.dtype == torch.bool else v.detach().float().cpu()
            for k, v in state.items()}
