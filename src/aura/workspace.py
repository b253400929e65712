"""Reusable scratch buffers: seed 001's ArrayPool, only where the allocator was measured to cost.

glibc serves blocks of several MB with fresh ``mmap`` pages and returns them on free, so a hot
path that allocates such temporaries on every call pays the page faults every call. Two places
measured it: token STDP over a batch of a million tokens (42 ms of CPU per 2^20 tokens, 25 ms
with a ``Workspace``), and the fused LIF backward, whose per-step membranes are as large as its
input (aura.nn.spiking). The whitener and Oja steps already preallocate their state and
scratch; a pool has nothing left to win there. On CUDA, PyTorch's caching allocator already is
a pool.
"""

from __future__ import annotations

import torch


class Workspace:
    """Named, grow-only buffers for one owner's hot path (not shared, not thread-safe).

    ``get(name, numel, dtype)`` returns a 1-D view of ``numel`` elements of the buffer called
    ``name``, reallocated only when a larger size (or another dtype) is asked for; its contents
    are whatever the last user left. ``release()`` frees everything.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """``numel`` elements of the buffer ``name``, contents undefined."""
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            # a normal tensor even under inference_mode, or a later call outside it could not
            # write into the buffer
            with torch.inference_mode(False):
                buf = torch.empty(numel, dtype=dtype, device=self.device)
            self.buffers[name] = buf
        return buf[:numel]

    def arange(self, n: int) -> torch.Tensor:
        """``0 .. n-1`` as int64, computed once per size reached."""
        buf = self.buffers.get("arange")
        if buf is None or buf.numel() < n:
            with torch.inference_mode(False):
                buf = torch.arange(n, device=self.device)
            self.buffers["arange"] = buf
        return buf[:n]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def release(self) -> None:
        self.buffers.clear()
