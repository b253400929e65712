"""Where a sleep phase's episodes come from: the replay buffer, the model's episodic stores, or
both (``continual.sleep_source``).

An episodic store keeps hidden states, not text, but every memory a training forward forms
records where in the train split it was formed (``source_pos``, the corpus position the model's
causal reads use). Replaying a stored episode is replaying the window of training text that
ends at that position, so the model rehearses what its hippocampus chose to keep (the most
novel states) for as long as the store keeps it, drawn in proportion to the store's own
retention (strength x (importance + recency): what eviction would keep longest).

Only memories formed in this run are replayed: a store carried over by ``--init-from`` holds
positions in another run's data, which would name the wrong text here. The store's clock at the
run's start (``since``) marks them, and is saved with the run's continual state.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from aura.continual.replay import ReplayBuffer
from aura.data.shards import SplitData
from aura.memory.store import EpisodicStore


class EpisodeSource(Protocol):
    """What a sleep phase draws from (``ReplayBuffer`` is one)."""

    def __len__(self) -> int: ...

    def sample(self, k: int, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def update(self, idx: torch.Tensor, losses: torch.Tensor) -> None: ...


class StoreEpisodes:
    """The training windows (``length`` = block + 1 tokens) that end where the memories of
    ``stores`` formed in this run (``created_step > since[name]``) were formed."""

    def __init__(self, stores: dict[str, EpisodicStore], split: SplitData, length: int,
                 since: dict[str, int]):
        self.stores, self.split, self.length, self.since = stores, split, length, since
        sizes = np.array([s.n_tokens for s in split.shards], dtype=np.int64)
        self._ends = np.cumsum(sizes)
        self._starts = self._ends - sizes
        self.starts = torch.zeros(0, dtype=torch.int64)
        self.weights = torch.zeros(0, dtype=torch.float64)

    def refresh(self) -> int:
        """Read the stores as they are now; returns how many episodes can be replayed."""
        starts, weights = [], []
        for name, store in self.stores.items():
            live = (store.ids >= 0) & (store.created_step > self.since.get(name, 0))
            pos = store.source_pos[live].cpu().numpy().astype(np.int64)
            ret = store.retention()[live].detach().cpu().double().numpy()
            shard = np.searchsorted(self._ends, pos, side="right")
            ok = (pos >= 0) & (shard < len(self._ends))
            shard, pos, ret = shard[ok], pos[ok], ret[ok]
            lo, hi = self._starts[shard], self._ends[shard]
            fits = hi - lo >= self.length
            # the window ends with the token that formed the memory (its context leads to it)
            start = np.clip(pos - self.length + 2, lo, hi - self.length)
            starts.append(start[fits])
            weights.append(np.clip(ret[fits], 1e-12, None))
        self.starts = torch.from_numpy(np.concatenate(starts) if starts else np.zeros(0, np.int64))
        self.weights = torch.from_numpy(np.concatenate(weights) if weights else np.zeros(0))
        return len(self)

    def __len__(self) -> int:
        return int(self.starts.numel())

    def window(self, start: int) -> torch.Tensor:
        shard = int(np.searchsorted(self._ends, start, side="right"))
        off = start - int(self._starts[shard])
        return torch.from_numpy(np.asarray(self.split.maps[shard][off:off + self.length],
                                           dtype=np.int64))

    def sample(self, k: int, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices, windows (k, length), weights all 1): episodes drawn by retention."""
        idx = torch.multinomial(self.weights / self.weights.sum(), k, replacement=True,
                                generator=generator)
        windows = torch.stack([self.window(int(self.starts[i])) for i in idx])
        return idx, windows, torch.ones(k, dtype=torch.float32)

    def update(self, idx: torch.Tensor, losses: torch.Tensor) -> None:
        """The store's own reads and decay keep its priorities; sleep changes none."""


class BothSources:
    """Half of each sleep batch (rounded up) from the store, the rest from the buffer."""

    def __init__(self, store: StoreEpisodes, buffer: ReplayBuffer):
        self.store, self.buffer = store, buffer
        self._split = 0

    def __len__(self) -> int:
        return min(len(self.store), len(self.buffer))

    def sample(self, k: int, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ks = (k + 1) // 2
        _, ws, wts = self.store.sample(ks, generator)
        self._split = ks
        if k == ks:
            return torch.zeros(0, dtype=torch.int64), ws, wts
        idx, wb, wtb = self.buffer.sample(k - ks, generator)
        n = min(ws.size(1), wb.size(1))  # a buffer from --init-from may hold shorter windows
        return idx, torch.cat([ws[:, :n], wb[:, :n]]), torch.cat([wts, wtb])

    def update(self, idx: torch.Tensor, losses: torch.Tensor) -> None:
        """Buffer priorities follow the buffer rows' losses."""
        if idx.numel():
            self.buffer.update(idx, losses[self._split:])
