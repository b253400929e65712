"""LiquidMoE: a top-k routed mixture of closed-form continuous-time (CfC) experts.

Each expert is a CfC cell (Hasani et al., "Closed-form continuous-time neural networks", 2022)
evaluated on one token: a backbone ``z = tanh(W_b x)`` feeds three heads f, g, h and the state
after a learned time ``t`` (per channel, positive) has the closed form

    x(t) = sigmoid(-f(z) * t) * tanh(g(z)) + (1 - sigmoid(-f(z) * t)) * tanh(h(z))

the solution of a liquid-time-constant ODE without an ODE solver; a projection maps it back to
the stream. A linear router picks each token's top-k experts (softmax renormalised over them);
tokens are gathered per expert, so only chosen experts compute. There is no capacity limit, so
no token is dropped because of others in the batch: a token's output depends on that token
only (causal). The Switch Transformer's load-balancing loss ``E * sum_e f_e * P_e`` (f_e the
fraction of routed slots expert e received, P_e its mean router probability) keeps the
experts in use; per-expert usage is logged.

Under CPU bf16 each expert's batch is padded with zero rows to a multiple of ``ROW_BUCKET``:
oneDNN builds a kernel per matrix shape, and a new token count per expert per step cost ~1.3 ms a
GEMM, a third of a ``brain-cpu`` step (docs/BENCHMARKS.md). The padded rows are dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ROW_BUCKET = 64


def _bucket_padding(x: torch.Tensor) -> int:
    """How many zero rows round ``x``'s row count up to a multiple of ``ROW_BUCKET`` where its
    GEMMs run on oneDNN bf16 kernels built per shape (CPU, bf16 by autocast or by weights);
    elsewhere none."""
    bf16 = x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                          and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    if x.device.type != "cpu" or not bf16:
        return 0
    return -x.size(0) % ROW_BUCKET


class CfCExpert(nn.Module):
    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        self.backbone = nn.Linear(n_embd, hidden)
        self.heads = nn.Linear(hidden, 3 * hidden)  # f, g, h in one GEMM
        self.log_time = nn.Parameter(torch.zeros(hidden))  # t = exp(0) = 1 token at init
        self.proj = nn.Linear(hidden, n_embd, bias=False)
        for lin in (self.backbone, self.heads, self.proj):
            nn.init.normal_(lin.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(self.backbone(x))
        f, g, h = self.heads(z).chunk(3, dim=-1)
        gate = torch.sigmoid(-f * self.log_time.exp())
        return self.proj(gate * torch.tanh(g) + (1 - gate) * torch.tanh(h))


class LiquidMoE(nn.Module):
    def __init__(self, n_embd: int, n_experts: int, top_k: int, hidden: int):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"moe_top_k must be in [1, {n_experts}], got {top_k}")
        self.top_k = top_k
        self.router = nn.Linear(n_embd, n_experts, bias=False)
        nn.init.normal_(self.router.weight, 0.0, 0.02)
        self.experts = nn.ModuleList(CfCExpert(n_embd, hidden) for _ in range(n_experts))
        self._metrics: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output like x, the load-balancing loss)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        E = len(self.experts)
        probs = F.softmax(self.router(flat).float(), dim=-1)  # (N, E)
        top, idx = probs.topk(self.top_k, dim=-1)
        weights = top / top.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if rows.numel():
                chosen = flat[rows]
                pad = _bucket_padding(chosen)
                if pad:  # F.pad copies even when it adds nothing
                    chosen = F.pad(chosen, (0, 0, 0, pad))
                y = expert(chosen)[:rows.numel()] * weights[rows, slot, None].to(flat.dtype)
                out = out.index_add(0, rows, y.to(out.dtype))
        usage = F.one_hot(idx, E).float().sum((0, 1)) / idx.numel()  # f_e
        balance = E * (usage * probs.mean(0)).sum()
        with torch.no_grad():
            self._metrics = {"moe_balance_loss": balance.detach(),
                             **{f"moe_usage/{e}": usage[e] for e in range(E)}}
        return out.view(shape), balance

    def metrics(self) -> dict[str, torch.Tensor]:
        """The load-balancing loss and each expert's share of the routed slots (1/E each is
        balanced)."""
        return dict(self._metrics)
