"""Online whitening: running mean and covariance with momentum, PCA or ZCA transform.

``OnlineWhitener(dim, momentum=0.99, eps=1e-5, mode="zca")``:

- ``update(batch (N, dim))`` mixes the batch's mean and covariance into the running ones,
  ``cov <- m cov + (1 - m) cov_batch + m (1 - m) (mean - mean_batch)(...)^T`` (the covariance
  of the mixture, so a drifting mean is not mistaken for variance lost); the first batch sets
  both. Every step runs in place on preallocated buffers (``out=``), so a long stream of
  updates allocates nothing.
- ``transform(batch, out=None)`` returns ``(batch - mean) @ W.T``. ``W`` comes from an
  eigendecomposition ``cov = U diag(lam) U^T`` redone lazily, at most every ``refresh_every``
  updates: ZCA ``W = U diag(f) U^T`` (stays closest to the input, so features keep their
  meaning), PCA ``W = diag(f) U^T`` over the top ``n_components`` directions, largest first,
  with ``f = 1 / sqrt(lam + eps * mean(lam))``. ``eps`` is relative to the mean variance, so it
  is scale-free: 1e-5 whitens fully, ~1 equalises scales but keeps the order of the variances
  (what a Hebbian layer after it needs to still find principal directions).
- ``state_dict()`` / ``load_state_dict()`` / ``config()``, and ``save(dir)`` / ``load(dir)``
  (safetensors + JSON, atomic).
"""

from __future__ import annotations

from typing import Any

import torch

from aura.plasticity.state import SavedRule, as_batch, copy_into


class OnlineWhitener(SavedRule):
    """Running mean/covariance and a PCA or ZCA whitening transform; see the module docstring."""

    kind = "OnlineWhitener"

    def __init__(self, dim: int, *, momentum: float = 0.99, eps: float = 1e-5,
                 mode: str = "zca", n_components: int | None = None, refresh_every: int = 1,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if mode not in ("zca", "pca"):
            raise ValueError(f"mode must be 'zca' or 'pca', got {mode!r}")
        k = dim if n_components is None else n_components
        if not 1 <= k <= dim or (mode == "zca" and k != dim):
            raise ValueError(f"n_components must be in [1, {dim}] (pca only), got {n_components}")
        if eps <= 0 or refresh_every < 1:
            raise ValueError(f"eps must be > 0 and refresh_every >= 1, got {eps}, {refresh_every}")
        self.dim, self.momentum, self.eps, self.mode = dim, momentum, eps, mode
        self.n_components, self.refresh_every = k, refresh_every
        self.device, self.dtype = torch.device(device), dtype
        new = dict(device=self.device, dtype=dtype)
        self.mean = torch.zeros(dim, **new)
        self.cov = torch.zeros(dim, dim, **new)
        self.steps = 0
        self.matrix = torch.zeros(k, dim, **new)
        self._refreshed_at: int | None = None  # ``steps`` when ``matrix`` was computed
        self._batch_mean, self._diff = torch.zeros(dim, **new), torch.zeros(dim, **new)
        self._batch_cov = torch.zeros(dim, dim, **new)
        self._evals, self._evecs = torch.zeros(dim, **new), torch.zeros(dim, dim, **new)
        self._scaled = torch.zeros(dim, dim, **new)
        self._order = torch.arange(dim - 1, dim - 1 - k, -1, device=self.device)
        self._centered = torch.zeros(0, dim, **new)

    def _buffer(self, n: int) -> torch.Tensor:
        """A (n, dim) scratch view, reallocated only when a larger batch than ever arrives."""
        if self._centered.shape[0] < n:
            self._centered = torch.empty(n, self.dim, device=self.device, dtype=self.dtype)
        return self._centered[:n]

    def _check(self, batch: torch.Tensor) -> torch.Tensor:
        return as_batch(batch, self.dim, self.device, self.dtype)

    @torch.no_grad()
    def update(self, batch: torch.Tensor) -> None:
        """Mix one batch's statistics into the running mean and covariance, in place."""
        x = self._check(batch)
        n = x.shape[0]
        centered = self._buffer(n)
        torch.mean(x, 0, out=self._batch_mean)
        torch.sub(x, self._batch_mean, out=centered)
        torch.mm(centered.T, centered, out=self._batch_cov)
        self._batch_cov.div_(n)
        if self.steps == 0:
            self.mean.copy_(self._batch_mean)
            self.cov.copy_(self._batch_cov)
        else:
            m = self.momentum
            torch.sub(self._batch_mean, self.mean, out=self._diff)
            self.cov.mul_(m).add_(self._batch_cov, alpha=1 - m)
            self.cov.addr_(self._diff, self._diff, alpha=m * (1 - m))
            self.mean.add_(self._diff, alpha=1 - m)
        self.steps += 1

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the whitening matrix from the current covariance."""
        torch.linalg.eigh(self.cov, out=(self._evals, self._evecs))
        floor = self.eps * float(self._evals.clamp(min=0).mean().clamp(min=1e-30))
        scale = self._evals.clamp_(min=0).add_(floor).rsqrt_()
        torch.mul(self._evecs, scale, out=self._scaled)
        if self.mode == "zca":
            torch.mm(self._scaled, self._evecs.T, out=self.matrix)
        else:
            torch.index_select(self._scaled.T, 0, self._order, out=self.matrix)
        self._refreshed_at = self.steps

    @torch.no_grad()
    def transform(self, batch: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``(batch - mean) @ W.T``: ``(N, dim)`` for ZCA, ``(N, n_components)`` for PCA."""
        if self.steps == 0:
            raise RuntimeError("OnlineWhitener.transform before any update")
        x = self._check(batch)
        if self._refreshed_at is None or self.steps - self._refreshed_at >= self.refresh_every:
            self.refresh()
        centered = self._buffer(x.shape[0])
        torch.sub(x, self.mean, out=centered)
        if out is None:
            return centered @ self.matrix.T
        return torch.mm(centered, self.matrix.T, out=out)

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "momentum": self.momentum, "eps": self.eps, "mode": self.mode,
                "n_components": self.n_components, "refresh_every": self.refresh_every,
                "dtype": str(self.dtype).removeprefix("torch.")}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Statistics, plus the whitening matrix when one was computed (loading then needs no
        eigendecomposition)."""
        out = {"mean": self.mean, "cov": self.cov, "steps": torch.tensor(self.steps)}
        if self._refreshed_at is not None:
            out |= {"matrix": self.matrix, "refreshed_at": torch.tensor(self._refreshed_at)}
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        copy_into({"mean": self.mean, "cov": self.cov}, tensors, "OnlineWhitener state")
        self.steps = int(tensors.get("steps", torch.tensor(0)))
        self._refreshed_at = None
        if "matrix" in tensors and "refreshed_at" in tensors:
            copy_into({"matrix": self.matrix}, tensors, "OnlineWhitener state")
            self._refreshed_at = int(tensors["refreshed_at"])

