"""Batches of random contiguous windows from the shards, a pure function of (seed, rank, step).

Because a batch depends on nothing but its step, a resumed run sees exactly the batches the
uninterrupted run would have seen, and DataLoader workers can build any step in any order.
Sources are mixed by the manifest's weights; within a source every window is equally likely.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from aura.data.shards import SplitData
from aura.errors import DataError

BlockSize = int | Callable[[int], int]
TokenFeatures = dict[str, Callable[[np.ndarray], np.ndarray]]
Batch = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def curriculum(stages: Sequence[Sequence[int]], final: int) -> Callable[[int], int]:
    """Block size by step from [from_step, block_size] stages; ``final`` before the first stage.

    Seed 004 (H): short sequences early are cheap and already carry useful gradient signal.
    """
    points = sorted((int(s), int(b)) for s, b in stages)
    for _, block in points:
        if block < 1:
            raise DataError(f"curriculum block sizes must be positive, got {block}")
    starts = np.array([s for s, _ in points], dtype=np.int64)
    blocks = [b for _, b in points]

    def block_size(step: int) -> int:
        i = int(np.searchsorted(starts, step, side="right")) - 1
        return blocks[i] if i >= 0 else final

    return block_size


class BatchSampler:
    """``sampler(step) -> (x, y)``: int64 tensors of shape (batch_size, block_size(step)).

    ``sampler.batch(step)`` adds the per-token ``features`` a model asked for (e.g. prosody),
    each computed once from ``x`` here, where DataLoader workers can build it ahead, and with
    ``corpus_pos`` each window's offset in the split, (batch_size,) int64 as ``"corpus_pos"``:
    token t of row b sits at ``corpus_pos[b] + t`` of the split's shards laid end to end (what a
    model with a memory of the corpus needs to read only text before each token).
    """

    def __init__(self, split: SplitData, batch_size: int, block_size: BlockSize, seed: int,
                 rank: int = 0, features: TokenFeatures | None = None, corpus_pos: bool = False):
        if batch_size < 1:
            raise DataError(f"batch size must be positive, got {batch_size}")
        self.split, self.batch_size, self.seed, self.rank = split, batch_size, seed, rank
        self.features, self.corpus_pos = features or {}, corpus_pos
        self._shard_starts = np.cumsum([0] + [s.n_tokens for s in split.shards])[:-1]
        self.block_size = block_size if callable(block_size) else (lambda _s, b=block_size: b)
        self._tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._bits = np.random.Philox(key=np.array([seed, rank], dtype=np.uint64))
        self._rng = np.random.Generator(self._bits)

    def _uniforms(self, step: int, n: int) -> np.ndarray:
        """``n`` uniforms from Philox keyed by (seed, rank) at counter ``step``.

        A counter-based generator gives each step its own stream without seeding a new
        generator (3x cheaper per batch than ``default_rng((seed, rank, step))``).
        """
        self._bits.state = {
            "bit_generator": "Philox",
            "state": {"counter": np.array([0, 0, step, 0], dtype=np.uint64),
                      "key": np.array([self.seed, self.rank], dtype=np.uint64)},
            "buffer": np.zeros(4, dtype=np.uint64), "buffer_pos": 4,
            "has_uint32": 0, "uinteger": 0,
        }
        return self._rng.random(n)

    def _table(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative window probabilities over shards, and each shard's number of windows."""
        if block not in self._tables:
            shards = self.split.shards
            windows = np.array([max(s.n_tokens - block, 0) for s in shards], dtype=np.float64)
            if not windows.any():
                longest = max((s.n_tokens for s in shards), default=0)
                raise DataError(
                    f"{self.split.name} split: no shard holds block_size + 1 = {block + 1} tokens "
                    f"(longest has {longest}); use a smaller block size or more data"
                )
            weights = np.asarray(self.split.source_weights, dtype=np.float64)
            per_source = np.zeros_like(weights)
            for s, w in zip(shards, windows, strict=True):
                per_source[s.source] += w
            p = np.array([
                weights[s.source] * w / per_source[s.source] if per_source[s.source] else 0.0
                for s, w in zip(shards, windows, strict=True)
            ])
            if p.sum() <= 0:  # every weighted source is too short: fall back to any window
                p = windows
            cum = np.cumsum(p / p.sum())
            cum[-1] = 1.0
            self._tables[block] = (cum, windows.astype(np.int64))
        return self._tables[block]

    def sample(self, step: int) -> np.ndarray:
        """The (batch_size, block_size + 1) window matrix of ``step``, as stored dtype."""
        return self._windows(step)[0]

    def _windows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """``sample(step)`` and each row's offset in the split (shards end to end)."""
        block = self.block_size(step)
        cum, windows = self._table(block)
        u = self._uniforms(step, 2 * self.batch_size)
        span = np.arange(block + 1, dtype=np.int64)
        maps = self.split.maps
        if len(maps) == 1:
            offsets = (u[: self.batch_size] * windows[0]).astype(np.int64)
            return maps[0][offsets[:, None] + span], offsets
        shard = np.searchsorted(cum, u[self.batch_size :], side="right")
        offsets = (u[: self.batch_size] * windows[shard]).astype(np.int64)
        out = np.empty((self.batch_size, block + 1), dtype=self.split.dtype)
        for k in np.unique(shard):
            rows = shard == k
            out[rows] = maps[k][offsets[rows, None] + span]
        return out, self._shard_starts[shard] + offsets

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._split(self.sample(step))

    @staticmethod
    def _split(window: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        window = window.astype(np.int64)
        # Contiguous copies: models may .view() targets, as nanoGPT-style code does.
        return torch.from_numpy(window[:, :-1].copy()), torch.from_numpy(window[:, 1:].copy())

    def batch(self, step: int) -> Batch:
        window, offsets = self._windows(step)
        x, y = self._split(window)
        feats = compute_features(self.features, x)
        if self.corpus_pos:
            feats["corpus_pos"] = torch.from_numpy(offsets.astype(np.int64))
        return x, y, feats


def compute_features(features: TokenFeatures, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each feature of token ids (B, T), as a tensor on the ids' device."""
    host = ids.cpu().numpy()
    return {name: torch.from_numpy(f(host)).to(ids.device) for name, f in features.items()}


class _StepBatches(Dataset):
    def __init__(self, sampler: BatchSampler):
        self.sampler = sampler

    def __getitem__(self, step: int) -> Batch:
        return self.sampler.batch(step)


def batch_loader(sampler: BatchSampler, start_step: int, end_step: int, num_workers: int = 0,
                 pin_memory: bool = False, prefetch_factor: int = 2) -> Iterator[Batch]:
    """Batches (x, y, features) for steps start..end-1, built ahead by worker processes when
    asked."""
    if num_workers == 0 and not pin_memory:
        return (sampler.batch(step) for step in range(start_step, end_step))
    loader = DataLoader(
        _StepBatches(sampler),
        batch_size=None,
        sampler=range(start_step, end_step),
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers else None,
        persistent_workers=False,
    )
    return iter(loader)
