"""Causal multi-head self-attention on the fused `scaled_dot_product_attention`, with a KV cache.

The cache is an explicit object owned by the caller (the generator), not hidden module state, so
two generations never share or clobber each other's keys and values.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from aura import cpu
from aura.nn.dropout import Dropout, dropout

# Longest query for which, under native CPU bf16, SDPA's math kernel beats its flash kernel: on a
# Xeon with AMX, a bf16 training step on the math kernel took 0.75-0.97x flash's time at T 64-128
# and 1.5-2.2x at T 256-512, where its T x T weights grow (docs/BENCHMARKS.md). Only cached
# attention still asks SDPA for it; the causal case is written out.
MATH_KERNEL_MAX_LEN = 128
# Longest sequence for which, under native CPU bf16, the written-out causal attention beats the
# flash kernel: a bf16 training step of `cpu-small` without dropout ran 1.13-1.17x faster at T 256
# and level at T 512, where its (T x T) weights grow (docs/BENCHMARKS.md).
WRITTEN_OUT_MAX_LEN = 256


def _math_kernel_pays(device_type: str, dtype: torch.dtype, seq_len: int) -> bool:
    """On a CPU with native bf16, under bf16 and for short sequences the math kernel runs on
    bf16 matmuls and beat the flash kernel (benchmarks/train_bench.py); longer sequences and
    CPUs where bf16 is emulated keep PyTorch's choice, as everywhere else."""
    return (device_type == "cpu" and dtype == torch.bfloat16 and seq_len <= MATH_KERNEL_MAX_LEN
            and cpu.native_bf16())


def _kernel_for(q: torch.Tensor) -> contextlib.AbstractContextManager[None]:
    if _math_kernel_pays(q.device.type, q.dtype, q.size(-2)):
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def _written_out_pays(device_type: str, dtype: torch.dtype, dropout: float, seq_len: int) -> bool:
    """Where causal attention on a CPU runs ``causal_attention`` rather than SDPA: with dropout,
    where SDPA could only take its math kernel (CPU's flash kernel has none), and under native
    bf16 for sequences up to ``WRITTEN_OUT_MAX_LEN``, where its bf16 matmuls beat flash."""
    if device_type != "cpu":
        return False
    return dropout > 0 or (dtype == torch.bfloat16 and seq_len <= WRITTEN_OUT_MAX_LEN
                           and cpu.native_bf16())


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float
                     ) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + causal mask)``, dropped out, times ``v``: SDPA's math kernel
    without what costs it on a CPU. That kernel upcasts bf16 to fp32 matmuls, guards every row
    against being fully masked (which a causal row never is) and draws its dropout mask from
    the Mersenne Twister; here the matmuls stay in the input's dtype (bf16 on AMX tiles), the
    mask is added inside ``baddbmm`` and dropout is ``aura.nn.dropout``'s. (B, H, T, D) in and
    out."""
    B, H, T, D = q.shape
    future = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
    scores = torch.baddbmm(future, q.reshape(B * H, T, D), k.reshape(B * H, T, D).transpose(1, 2),
                           alpha=D ** -0.5)
    weights = dropout(scores.softmax(-1), dropout_p)
    return torch.bmm(weights, v.reshape(B * H, T, v.size(-1))).view(B, H, T, v.size(-1))


def keeps_attention_weights(device_type: str, dtype: torch.dtype, dropout: float,
                            seq_len: int) -> bool:
    """Whether training attention over ``seq_len`` tokens keeps every (T x T) attention weight
    for backward (``causal_attention``, on a CPU with dropout or under native bf16 for short
    sequences; SDPA's math kernel on MPS, assumed) rather than O(T) (a fused kernel)."""
    if device_type == "cpu":
        return _written_out_pays(device_type, dtype, dropout, seq_len)
    return device_type == "mps"


class KVCache:
    """Preallocated keys/values for every layer; ``pos`` tokens are filled so far."""

    # Per-row tensors (batch_size, ...) a subclass carries besides keys and values, by attribute
    # name; a batching server keeps them per row (``aura.infer.batching.RaggedKVCache``).
    row_state: tuple[str, ...] = ()
    # Whether rows of different lengths may be prefilled together, right-padded: true when
    # padding after a row's tokens changes none of its state (causal attention); false for
    # state a recurrence carries through every token (the batching server then prefills each).
    padded_prefill: bool = True

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values at pos..pos+T and return everything cached for ``layer``."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens, asked for {end}")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def positions(self, n: int, device: torch.device) -> torch.Tensor:
        """The positions of ``n`` new tokens (n,), after what the cache holds."""
        return torch.arange(self.pos, self.pos + n, device=device)

    def attn_mask(self, n: int, device: torch.device) -> torch.Tensor | None:
        """Which cached and new keys each of ``n`` new queries sees (None: all of them): with
        several new tokens each sees the cache and the new ones up to itself."""
        if n == 1:
            return None
        rows = torch.arange(n, device=device)[:, None] + self.pos
        return torch.arange(self.pos + n, device=device)[None, :] <= rows


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, layer: int):
        super().__init__()
        self.n_head, self.head_dim, self.layer = n_head, n_embd // n_head, layer
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self.resid_drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                gains: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``gains`` (query, key), each (B, n_head, T, 1), scale queries (a per-token attention
        temperature) and keys (a per-token salience) before the fused kernel, so modulated
        attention keeps the fused path; cached keys are stored scaled."""
        B, T, C = x.shape
        # split, not unbind of a (B, T, 3, H, D) view: the same strided views, but the backward
        # joins the three gradients with one copy instead of a stack and a clone (a layer's
        # forward + backward 1.07x at nanoGPT's CPU shape; a whole step about 1%)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
                   for t in self.qkv(x).split(C, dim=2))
        if gains is not None:
            q, k = q * gains[0].to(q.dtype), k * gains[1].to(k.dtype)
        p = self.dropout if self.training else 0.0
        if cache is None or cache.pos == 0:
            if cache is not None:
                cache.append(self.layer, k, v)
            if _written_out_pays(q.device.type, q.dtype, p, T):
                y = causal_attention(q, k, v, p)
            else:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            mask = cache.attn_mask(T, x.device)
            k, v = cache.append(self.layer, k, v)
            with _kernel_for(q):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))
