"""Oja's rule on minibatches, with a residual-error EMA and neurogenesis.

``OjaLayer(dim, max_components=16, ...)`` holds ``k`` unit-norm components as rows of ``W``
(k, dim), starting from ``init_components``. ``step(batch (N, dim))`` does one Hebbian update
from the whole batch at once, with ``y = x W^T`` and ``C = y^T y / N``:

- ``rule="gha"`` (Sanger's generalised Hebbian algorithm): ``dW = lr (y^T x / N - tril(C) W)``;
  converges to the leading eigenvectors themselves, in order (up to sign);
- ``rule="subspace"`` (Oja's symmetric subspace rule): ``dW = lr (y^T x / N - C W)``; converges
  to an orthonormal basis of the leading subspace.

Both are the average of the textbook per-sample updates at a frozen ``W``: one pair of GEMMs per
batch instead of a Python step per sample. Feed centred data (e.g. ``OnlineWhitener`` output).

The residual is the fraction of the batch's energy the components do not reconstruct,
``|x - y W|^2 / |x|^2``, computed from k x k matrices without forming ``x - y W``. Its EMA
(``residual_momentum``) staying above ``grow_threshold`` for ``patience`` steps adds a component
(up to ``max_components``), initialised to the batch residual's leading direction, orthogonal to
the others, so it starts on the variance nobody explains yet. The EMA restarts after a growth
(it described the smaller layer). Each growth is appended to ``events`` as
``{"step", "residual", "components"}`` and logged on the ``aura.plasticity.oja`` logger.

``step`` returns ``{"y", "residual", "residual_ema", "grew", "components", "step"}``; ``y`` is a
view of an internal buffer that the next step overwrites (clone it to keep it). All work
buffers are preallocated and grown only when a larger batch than ever arrives.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from aura.errors import DataError
from aura.plasticity.state import SavedRule, as_batch, copy_into

log = logging.getLogger(__name__)


class OjaLayer(SavedRule):
    """Batched GHA / subspace Oja with residual-driven growth; see the module docstring."""

    kind = "OjaLayer"

    def __init__(self, dim: int, max_components: int = 16, *, init_components: int = 1,
                 lr: float = 0.01, rule: str = "gha", residual_momentum: float = 0.9,
                 grow_threshold: float = 0.1, patience: int = 20, seed: int = 0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if not 1 <= init_components <= max_components <= dim:
            raise ValueError(f"need 1 <= init_components ({init_components}) <= max_components "
                             f"({max_components}) <= dim ({dim})")
        if rule not in ("gha", "subspace"):
            raise ValueError(f"rule must be 'gha' or 'subspace', got {rule!r}")
        if lr <= 0 or not 0.0 <= residual_momentum < 1.0 or patience < 1:
            raise ValueError("need lr > 0, residual_momentum in [0, 1) and patience >= 1")
        self.dim, self.max_components, self.init_components = dim, max_components, init_components
        self.lr, self.rule, self.residual_momentum = lr, rule, residual_momentum
        self.grow_threshold, self.patience, self.seed = grow_threshold, patience, seed
        self.device, self.dtype = torch.device(device), dtype
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        init = torch.linalg.qr(torch.randn(dim, max_components, generator=self.generator,
                                           dtype=torch.float64)).Q.T
        self.weight = init.to(device=self.device, dtype=dtype).contiguous()  # rows: components
        self.k = init_components
        self.steps = 0
        self.residual_ema: float | None = None
        self.over = 0  # consecutive steps with the EMA above the threshold
        self.events: list[dict[str, Any]] = []
        new = dict(device=self.device, dtype=dtype)
        self._cov = torch.zeros(max_components, max_components, **new)
        self._gram = torch.zeros(max_components, max_components, **new)
        self._hebb = torch.zeros(max_components, dim, **new)
        self._y = torch.zeros(0, max_components, **new)

    @property
    def components(self) -> torch.Tensor:
        """The current ``(k, dim)`` component matrix (a view)."""
        return self.weight[: self.k]

    def _check(self, batch: torch.Tensor) -> torch.Tensor:
        return as_batch(batch, self.dim, self.device, self.dtype)

    @torch.no_grad()
    def transform(self, batch: torch.Tensor) -> torch.Tensor:
        """``y = x W^T`` for the current components, a new ``(N, k)`` tensor."""
        return self._check(batch) @ self.components.T

    @torch.no_grad()
    def step(self, batch: torch.Tensor) -> dict[str, Any]:
        """One Hebbian update from ``batch (N, dim)``; maybe grow a component."""
        x = self._check(batch)
        n, k = x.shape[0], self.k
        if self._y.shape[0] < n:
            self._y = torch.empty(n, self.max_components, device=self.device, dtype=self.dtype)
        w, y = self.weight[:k], self._y[:n, :k]
        cov, gram, hebb = self._cov[:k, :k], self._gram[:k, :k], self._hebb[:k]
        torch.mm(x, w.T, out=y)
        torch.mm(y.T, x, out=hebb).div_(n)
        torch.mm(hebb, w.T, out=cov)  # y^T y / N, as y = x W^T: k x k x dim, not N x k x k
        torch.mm(w, w.T, out=gram)
        energy = float(torch.dot(x.reshape(-1), x.reshape(-1))) / n
        explained = 2 * float(cov.diagonal().sum()) - float(torch.dot(gram.reshape(-1),
                                                                       cov.reshape(-1)))
        residual = max(0.0, 1.0 - explained / energy) if energy > 0 else 0.0
        if self.rule == "gha":
            cov.tril_()
        hebb.addmm_(cov, w, alpha=-1.0)
        w.add_(hebb, alpha=self.lr)
        self.steps += 1
        m = self.residual_momentum
        ema = residual if self.residual_ema is None else m * self.residual_ema + (1 - m) * residual
        self.residual_ema = ema
        self.over = self.over + 1 if ema > self.grow_threshold else 0
        grew = self.over >= self.patience and self.k < self.max_components
        if grew:
            self._grow(x, ema)
        return {"y": y, "residual": residual, "residual_ema": ema, "grew": grew,
                "components": self.k, "step": self.steps}

    def _grow(self, x: torch.Tensor, ema: float) -> None:
        """Add a unit component along the batch residual's leading direction (power iteration)."""
        w = self.weight[: self.k].double()
        r = x.double() - (x.double() @ w.T) @ w
        v = torch.randn(self.dim, generator=self.generator, dtype=torch.float64).to(r.device)
        for _ in range(30):
            v = r.T @ (r @ v)
            v -= w.T @ (w @ v)
            v /= v.norm().clamp(min=1e-30)
        self.weight[self.k].copy_(v)
        self.k += 1
        event = {"step": self.steps, "residual": ema, "components": self.k}
        self.events.append(event)
        log.info("oja: grew to %d components at step %d (residual EMA %.4f)",
                 self.k, self.steps, ema)
        self.over, self.residual_ema = 0, None

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "max_components": self.max_components,
                "init_components": self.init_components, "lr": self.lr, "rule": self.rule,
                "residual_momentum": self.residual_momentum,
                "grow_threshold": self.grow_threshold, "patience": self.patience,
                "seed": self.seed, "dtype": str(self.dtype).removeprefix("torch.")}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only; ``events`` are in ``extra_state()`` (JSON)."""
        return {"weight": self.weight, "k": torch.tensor(self.k),
                "steps": torch.tensor(self.steps), "over": torch.tensor(self.over),
                "rng": self.generator.get_state()}

    def extra_state(self) -> dict[str, Any]:
        return {"residual_ema": self.residual_ema, "events": self.events}

    def load_state_dict(self, tensors: dict[str, torch.Tensor],
                        extra: dict[str, Any] | None = None) -> None:
        copy_into({"weight": self.weight}, tensors, "OjaLayer state")
        k = int(tensors.get("k", torch.tensor(self.init_components)))
        if not 1 <= k <= self.max_components:
            raise DataError(f"OjaLayer state: {k} components, max is {self.max_components}")
        if "rng" in tensors:
            self.generator.set_state(tensors["rng"].cpu())
        self.k = k
        self.steps = int(tensors.get("steps", torch.tensor(0)))
        self.over = int(tensors.get("over", torch.tensor(0)))
        extra = extra or {}
        self.residual_ema = extra.get("residual_ema")
        self.events = list(extra.get("events", []))

    def saved_config(self) -> dict[str, Any]:
        return {**self.config(), "extra": self.extra_state()}

    def restore(self, tensors: dict[str, torch.Tensor], extra: Any) -> None:
        self.load_state_dict(tensors, extra)
