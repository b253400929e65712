"""`bdh`: the Dragon Hatchling (Pathway, arXiv 2509.26507) on Aura's engine.

Reference semantics: byte vocabulary, D-dimensional stream, N = multiplier * D / heads neurons per
head, ReLU-sparse activations, linear attention with Q = K = RoPE(x_sparse) over the N neuron
dims (theta 2^16), values = the stream, strictly causal (a token does not see itself), no softmax
and no score scaling, y = relu(LN(a) Dy) * x gating, parameter-free LayerNorms, untied head, and by
default one set of encoder / encoder_v / decoder weights shared by all layers.

Options: per-layer weights instead of shared ones, score normalisation by 1/N (the scores are
divided before they are summed over positions, which keeps those sums under fp16's 65504 in
training; bf16 has fp32's exponent range and stays finite without it), RoPE cos/sin computed once
for ``block_size`` positions, per-layer gradient checkpointing. Generation keeps a fixed
(heads x N x D) state per layer, because the attention is linear: O(1) work per new token instead
of re-running the prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from aura.models.base import AuraModel, ModelConfig, ModelOutput, lm_loss, register_model
from aura.nn.dropout import Dropout
from aura.nn.linear_attention import causal_linear_attention
from aura.nn.sparse_gate import sparse_gate

ROPE_THETA = 2.0**16


@dataclass
class BDHConfig(ModelConfig):
    name: str = "bdh"
    vocab_size: int | None = None
    """Token vocabulary size; None: taken from the prepared data (the reference is byte-level,
    256)."""
    block_size: int = 512
    """Training context length: RoPE tables are precomputed up to it; generation, carried by a
    recurrent state, runs past it."""
    n_layer: int = 6
    """Layers; with shared_weights, the same weights applied n_layer times."""
    n_head: int = 4
    """Heads, each over its own N = mlp_multiplier * n_embd / n_head neurons."""
    n_embd: int = 256
    """D, the width of the dense stream between layers."""
    dropout: float = 0.1
    """Dropout probability while training, in [0, 1) (the reference's is 0.1)."""
    mlp_multiplier: int = 128
    """Sets the neurons per head, N = mlp_multiplier * n_embd / n_head: the sparse dimension
    attention runs over."""
    shared_weights: bool = True
    """One encoder / encoder_v / decoder for all layers, as the reference; false gives each layer
    its own."""
    score_norm: bool = False
    """Divide attention scores by N before they are summed over positions, which keeps fp16
    training finite (bf16 has fp32's exponent range and needs none); off in the reference."""



def rope_freqs(n: int) -> torch.Tensor:
    """The reference's frequencies (cycles per position), equal in each (even, odd) pair."""
    pair = torch.arange(0, n, dtype=torch.float32).div(2).floor().mul(2)
    return 1.0 / (ROPE_THETA ** (pair / n)) / (2 * math.pi)


def rope_tables(positions: torch.Tensor, freqs: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the phases, computed exactly as the reference does (fp32, wrapped to [0, 1))."""
    phases = (positions.float()[:, None] * freqs[None, :]) % 1 * (2 * math.pi)
    return torch.cos(phases), torch.sin(phases)


def apply_rope(v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (even, odd) pair of the last dim by its phase: the reference's rope.

    In fp32 the pair is a complex number and the rotation one complex multiply, a single pass
    forward and backward (the real-arithmetic form takes seven, 4.7x the time at ``bdh-cpu``).
    Half precisions have no complex type that every device supports, so they take that form.
    """
    c, s = cos[..., 0::2], sin[..., 0::2]
    if v.dtype in (torch.float32, torch.float64):
        rotation = torch.complex(c.to(v.dtype), s.to(v.dtype))
        return torch.view_as_real(torch.view_as_complex(v.unflatten(-1, (-1, 2))) * rotation
                                  ).flatten(-2)
    pairs = v.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    c, s = c.to(v.dtype), s.to(v.dtype)
    return torch.stack((even * c - odd * s, odd * c + even * s), dim=-1).flatten(-2)


class BDHState:
    """Recurrent generation state: per layer sum_s RoPE(x_s)^T x_s, and the next position."""

    # A prompt's padding would be summed into the state like any token: a batching server
    # prefills each prompt alone (``KVCache.padded_prefill``).
    padded_prefill = False

    def __init__(self, n_layer: int, batch: int, n_head: int, n: int, d: int,
                 device: torch.device, dtype: torch.dtype):
        self.kv = torch.zeros(n_layer, batch, n_head, n, d, device=device, dtype=dtype)
        self.pos = 0

    def layer_state(self, layer: int) -> torch.Tensor:
        """(B, heads, N, D): the state ``layer`` reads and adds to."""
        return self.kv[layer]

    def ragged(self, capacity: int) -> RaggedBDHState:
        """An empty state of this shape for ``capacity`` sequences at their own positions."""
        n_layer, _, n_head, n, d = self.kv.shape
        return RaggedBDHState(n_layer, capacity, n_head, n, d, self.kv.device, self.kv.dtype)


class RaggedBDHState(BDHState):
    """``capacity`` rows of state for a batching server (``aura.infer.batching``): the first
    ``rows`` in use, row b at position ``lengths[b]``. A decode step feeds every row its newest
    token, each rotated at its own position; the methods are ``RaggedKVCache``'s."""

    def __init__(self, n_layer: int, capacity: int, n_head: int, n: int, d: int,
                 device: torch.device, dtype: torch.dtype):
        self.capacity, self.rows = capacity, 0
        self.lengths = torch.zeros(capacity, dtype=torch.long, device=device)
        self.sizes = [0] * capacity  # ``lengths`` on the host
        super().__init__(n_layer, capacity, n_head, n, d, device, dtype)

    @property  # type: ignore[override]
    def pos(self) -> int:
        return max(self.sizes[:self.rows], default=0)

    @pos.setter
    def pos(self, value: int) -> None:  # the forward's ``cache.pos += T`` moves every row on
        delta = value - self.pos
        self.lengths[:self.rows] += delta
        self.sizes[:self.rows] = [n + delta for n in self.sizes[:self.rows]]

    def layer_state(self, layer: int) -> torch.Tensor:
        return self.kv[layer, :self.rows]

    def set_length(self, row: int, n: int) -> None:
        self.lengths[row] = n
        self.sizes[row] = n

    def reset(self) -> None:
        self.kv.zero_()
        self.lengths.zero_()
        self.sizes = [0] * self.capacity
        self.rows = 0

    def put(self, rows: list[int], state: BDHState, lengths: list[int] | None = None) -> None:
        """Rows ``rows`` become the rows of ``state`` (in order), at ``lengths`` (default:
        ``state.pos``)."""
        lengths = lengths or [state.pos] * len(rows)
        index = torch.tensor(rows, device=self.kv.device)
        self.kv[:, index] = state.kv[:, :len(rows)]
        self.lengths[index] = torch.tensor(lengths, device=self.kv.device)
        for r, length in zip(rows, lengths, strict=True):
            self.sizes[r] = length

    def move(self, src: int, dst: int) -> None:
        """Copy row ``src`` over row ``dst``."""
        self.kv[:, dst] = self.kv[:, src]
        self.set_length(dst, self.sizes[src])

    def grown(self, capacity: int) -> RaggedBDHState:
        """A copy with room for ``capacity`` rows."""
        new = self.ragged(capacity)
        new.kv[:, :self.capacity] = self.kv
        new.lengths[:self.capacity] = self.lengths
        new.sizes[:self.capacity] = self.sizes
        new.rows = self.rows
        return new


@register_model("bdh", config=BDHConfig)
class BDH(AuraModel):
    batched_decoding = True  # through ``RaggedBDHState``: each row's state and position

    def __init__(self, config: BDHConfig):
        super().__init__()
        assert config.vocab_size is not None
        self.config = config
        nh, d = config.n_head, config.n_embd
        self.n = config.mlp_multiplier * d // nh
        sets = 1 if config.shared_weights else config.n_layer
        # The reference's encoder is (heads, D, N); stored as (D, heads * N) it is one GEMM
        # instead of a batch-broadcast matmul that copies the weight once per sequence.
        # Lists, not a stacked tensor: indexing a stacked parameter per layer costs a full-size
        # zero-filled gradient per layer in backward (20% of a reference-size step).
        self.encoder = self._params(sets, d, nh * self.n)
        self.encoder_v = self._params(sets, nh, d, self.n)
        self.decoder = self._params(sets, nh * self.n, d)
        self.embed = nn.Embedding(config.vocab_size, d)
        nn.init.normal_(self.embed.weight, 0.0, 0.02)
        self.lm_head = nn.Parameter(torch.randn(d, config.vocab_size) * 0.02)
        self.drop = Dropout(config.dropout)
        freqs = rope_freqs(self.n)
        self.register_buffer("freqs", freqs, persistent=False)
        cos, sin = rope_tables(torch.arange(config.block_size), freqs)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # (x_sparse, gated y) of each layer while ``brain_state`` records, else None
        self._probe: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @staticmethod
    def _params(sets: int, *shape: int) -> nn.ParameterList:
        return nn.ParameterList(nn.Parameter(torch.randn(*shape) * 0.02) for _ in range(sets))

    @property
    def max_context(self) -> int | None:
        return None  # the recurrent state has no length limit

    def _ln(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:])

    def _weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        i = 0 if self.config.shared_weights else layer
        return self.encoder[i], self.encoder_v[i], self.decoder[i]

    def _tables(self, start: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start + t <= self.config.block_size:
            return self.rope_cos[start:start + t], self.rope_sin[start:start + t]
        return rope_tables(torch.arange(start, start + t, device=self.freqs.device), self.freqs)

    def _row_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, N) cos/sin of each row's position: the same numbers ``_tables`` gives a
        sequence alone (the precomputed rows below ``block_size``)."""
        cos, sin = rope_tables(positions, self.freqs)
        inside = (positions < self.config.block_size)[:, None]
        at = positions.clamp(max=self.config.block_size - 1)
        cos = torch.where(inside, self.rope_cos[at], cos)
        sin = torch.where(inside, self.rope_sin[at], sin)
        return cos[:, None], sin[:, None]

    def _layer(self, x: torch.Tensor, layer: int, cos: torch.Tensor, sin: torch.Tensor,
               state: BDHState | None, stats: list[torch.Tensor]) -> torch.Tensor:
        """One BDH layer on x of shape (B, 1, T, D).

        The neuron tensors are heads-major, (heads, B*T, N): the encoder, the attention,
        encoder_v and the decoder are each one batched GEMM per head over contiguous operands,
        and the 16x wide tensors are never transposed or copied between them.
        """
        enc, enc_v, dec = self._weights(layer)
        B, _, T, D = x.shape
        nh, n = self.config.n_head, self.n
        stream = x.view(B * T, D)
        per_head = enc.view(D, nh, n).transpose(0, 1)  # a view: head h's (D, N) columns
        x_sparse = torch.bmm(stream.expand(nh, B * T, D), per_head).relu_()  # nh, B*T, N
        qr = apply_rope(x_sparse.view(nh, B, T, n), cos, sin)
        scale = 1.0 / self.n if self.config.score_norm else 1.0
        if state is None:
            a = causal_linear_attention(qr, x.view(B, T, D), scale)  # nh, B, T, D
        else:  # recurrent: each token reads the state of the tokens before it, then adds itself
            q = qr.transpose(0, 1)  # B, nh, T, N: the state's layout
            kv = state.layer_state(layer)
            a = q @ kv
            if T > 1:  # a prompt: its tokens also see each other, strictly causally
                a = a + (q @ q.mT).tril(diagonal=-1) @ x
                kv += q.mT @ x
            else:  # one token's rank-1 update in place: no (N x D) temporary per head and row
                kv.addcmul_(q.mT, x)
            a = (a * scale if scale != 1.0 else a).transpose(0, 1)
        a = self._ln(a).reshape(nh, B * T, D)
        # the paper's y, gated and sparse: x * relu(a Dy), dropped out, in one function
        keep, rescale = self.drop.mask(x_sparse)
        xy, y_active = sparse_gate(x_sparse, a, enc_v, keep, self.report_metrics)
        if y_active is not None:
            with torch.no_grad():  # a ReLU output, >= 0: the sum of signs counts non-zeros
                x_active = x_sparse.sign().sum(dtype=torch.float32)
                stats.append(torch.stack([x_active, y_active]) / xy.numel())
        if self._probe is not None:  # which neurons fire, as (B, T, nh, N)
            x_on, xy_on = ((t > 0).view(nh, B, T, n).permute(1, 2, 0, 3) for t in (x_sparse, xy))
            self._probe.append((x_on, xy_on))
        # dropout's 1 / (1 - p) scales the decoder's (B, T, D) output, not its 16x wider input
        y = torch.bmm(xy, dec.view(nh, n, D)).sum(0).view(B, 1, T, D)
        y = self._ln(y * rescale if rescale != 1.0 else y)
        return self._ln(x + y)

    def activation_bytes(self, batch: int, seq: int, dtype: torch.dtype = torch.float32,
                         device_type: str = "cpu") -> int:
        """Per layer and token: the sparse x, its rotation, y (dropped out, as the gate keeps
        it) and the decoder's input (each mlp_multiplier x n_embd wide, the bulk), the stream
        broadcast over heads, the per-head readout and its LayerNorm, the (T x T) scores per
        head; with
        ``grad_checkpoint`` each layer's input, plus the layer backward recomputes and the
        gradients it makes (1.5 layers' worth, measured)."""
        c, h = self.config, dtype.itemsize
        d, heads, neurons = c.n_embd, c.n_head, c.n_head * self.n
        layer = (4 * neurons * h + 2 * heads * d * h + heads * seq * h + d * h
                 + heads * (4 * d + 8) + 2 * (4 * d + 8))
        kept = 3 * layer // 2 + 4 * d * c.n_layer if self.grad_checkpoint else layer * c.n_layer
        outside = 8 + (4 * d + 8) + d * h + 4 * c.vocab_size  # type: ignore[operator]
        return batch * seq * (kept + outside)

    def new_cache(self, batch_size: int, max_len: int) -> BDHState:
        p = self.lm_head
        c = self.config
        return BDHState(c.n_layer, batch_size, c.n_head, self.n, c.n_embd, p.device, p.dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: BDHState | None = None, label_smoothing: float = 0.0,
                last_only: bool = False) -> ModelOutput:
        B, T = idx.shape
        if isinstance(cache, RaggedBDHState):  # one token per row, each at its own position
            cos, sin = self._row_tables(cache.lengths[:B])
        else:
            cos, sin = self._tables(cache.pos if cache is not None else 0, T)
        x = self._ln(self.embed(idx).unsqueeze(1))  # B, 1, T, D
        stats: list[torch.Tensor] = []
        for layer in range(self.config.n_layer):
            if self.grad_checkpoint and self.training and cache is None:
                x = checkpoint(self._layer, x, layer, cos, sin, None, stats, use_reentrant=False)
            else:
                x = self._layer(x, layer, cos, sin, cache, stats)
        if cache is not None:
            cache.pos += T
        hidden = x.view(B, T, -1)
        logits = (hidden[:, -1:] if last_only else hidden) @ self.lm_head
        aux = self._sparsity(stats)
        if targets is None:
            return ModelOutput(logits, None, aux, hidden)
        loss = lm_loss(logits, targets, label_smoothing)
        return ModelOutput(logits, loss, {"ce": loss.detach(), **aux}, hidden)

    @torch.no_grad()
    def brain_state(self, idx: torch.Tensor, **inputs: Any) -> dict[str, torch.Tensor]:
        """The base's (aux metrics), plus which x and y neurons fire: ``bdh_x/L``, ``bdh_y/L``
        (T, heads, N) booleans per layer, the paper's sparsity and "concept neuron" pictures."""
        self._probe = []
        try:
            state = super().brain_state(idx, **inputs)
            probe = self._probe
        finally:
            self._probe = None
        for i, (x, y) in enumerate(probe):
            state[f"bdh_x/{i}"], state[f"bdh_y/{i}"] = x[0].cpu(), y[0].cpu()
        return state

    def _sparsity(self, stats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fraction of non-zero x and y neurons per layer (the paper reports about 5% of y);
        none when ``report_metrics`` is off."""
        if not stats:
            return {}
        per_layer = torch.stack(stats[-self.config.n_layer:]).detach()
        out = {f"x_active/{i}": v[0] for i, v in enumerate(per_layer)}
        out |= {f"y_active/{i}": v[1] for i, v in enumerate(per_layer)}
        out["x_active"], out["y_active"] = per_layer.mean(0).unbind()
        return out
