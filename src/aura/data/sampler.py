"""Batches of random contiguous windows from the shards, a pure function of (seed, rank, step).

Because a batch depends on nothing but its step, a resumed run sees exactly the batches the
uninterrupted run would have seen, and DataLoader workers can build any step in any order.
Sources are mixed by the manifest's weights; within a source every window is equally likely.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Generator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from aura.data.shards import SplitData
from aura.errors import DataError

BlockSize = int | Callable[[int], int]
TokenFeatures = dict[str, Callable[[np.ndarray], np.ndarray]]
Batch = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


class FixedBlock:
    """The same block size at every step (a class, not a lambda, so samplers pickle to DataLoader
    workers started by spawn, as on macOS and Windows)."""

    def __init__(self, block: int):
        self.block = block

    def __call__(self, _step: int) -> int:
        return self.block


class Curriculum:
    """Block size by step from [from_step, block_size] stages; ``final`` before the first stage.

    Short sequences early are cheap and already carry useful gradient signal.
    """

    def __init__(self, stages: Sequence[Sequence[int]], final: int):
        points = sorted((int(s), int(b)) for s, b in stages)
        for _, block in points:
            if block < 1:
                raise DataError(f"curriculum block sizes must be positive, got {block}")
        self.starts = np.array([s for s, _ in points], dtype=np.int64)
        self.blocks = [b for _, b in points]
        self.final = final

    def __call__(self, step: int) -> int:
        i = int(np.searchsorted(self.starts, step, side="right")) - 1
        return self.blocks[i] if i >= 0 else self.final


class BatchSampler:
    """``sampler(step) -> (x, y)``: int64 tensors of shape (batch_size, block_size(step)).

    ``sampler.batch(step)`` adds the per-token ``features`` a model asked for (e.g. prosody),
    each computed once from ``x`` here, where DataLoader workers can build it ahead, and with
    ``corpus_pos`` each window's offset in the split, (batch_size,) int64 as ``"corpus_pos"``:
    token t of row b sits at ``corpus_pos[b] + t`` of the split's shards laid end to end (what a
    model with a memory of the corpus needs to read only text before each token).
    """

    def __init__(self, split: SplitData, batch_size: int, block_size: BlockSize, seed: int,
                 rank: int = 0, features: TokenFeatures | None = None, corpus_pos: bool = False,
                 part: tuple[int, int] = (0, 1)):
        if batch_size < 1:
            raise DataError(f"batch size must be positive, got {batch_size}")
        index, parts = part
        if batch_size % parts or not 0 <= index < parts:
            raise DataError(f"batch size {batch_size} does not split into {parts} equal parts")
        self.split, self.batch_size, self.seed, self.rank = split, batch_size, seed, rank
        # ``part=(i, n)``: only rows [i*B/n, (i+1)*B/n) of each batch (one data-parallel rank's
        # share), drawn from the same uniforms, so the n parts together are the whole batch.
        rows = batch_size // parts
        self._rows = slice(index * rows, (index + 1) * rows)
        self.features, self.corpus_pos = features or {}, corpus_pos
        self._shard_starts = np.cumsum([0] + [s.n_tokens for s in split.shards])[:-1]
        self.block_size = block_size if callable(block_size) else FixedBlock(block_size)
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
        maps, rows = self.split.maps, self._rows
        if len(maps) == 1:
            offsets = (u[: self.batch_size] * windows[0]).astype(np.int64)[rows]
            return maps[0][offsets[:, None] + span], offsets
        shard = np.searchsorted(cum, u[self.batch_size :], side="right")
        offsets = (u[: self.batch_size] * windows[shard]).astype(np.int64)[rows]
        shard = shard[rows]
        out = np.empty((offsets.size, block + 1), dtype=self.split.dtype)
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


def _ignore_stop_signals(_worker_id: int) -> None:
    """Workers leave SIGINT and SIGTERM to the main process: Ctrl-C reaches the whole process
    group, and a worker killed by it would fail the main process's next batch instead of
    letting it finish the step, save and stop the workers itself. A worker whose main process
    dies exits on its own (DataLoader's watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def batch_loader(sampler: BatchSampler, start_step: int, end_step: int, num_workers: int = 0,
                 pin_memory: bool = False, prefetch_factor: int = 2
                 ) -> Generator[Batch, None, None]:
    """Batches (x, y, features) for steps start..end-1, built ahead by worker processes when
    asked. Closing the generator (or exhausting it) stops the workers."""
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
        worker_init_fn=_ignore_stop_signals,
        # The batches need no worker seed; drawing it from the global generator would shift
        # the model's dropout stream, so a run with workers would differ from one without.
        generator=torch.Generator(),
    )
    return _closing(loader)


def _closing(loader: DataLoader) -> Generator[Batch, None, None]:
    """The loader's batches; its workers start at the first and stop as soon as this is closed,
    not whenever the iterator is garbage collected (DataLoader has no public close; Lightning
    calls the same method)."""
    batches = iter(loader)
    try:
        yield from batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class StepBatches:
    """The ``per_step`` batches of each optimizer step, batch i of step s being sampler index
    ``s * per_step + i``, read in order from ``batch_loader`` so workers can build them ahead.

    Asking for the step just returned again (a retried step) gives the same batches; asking for
    any step but the next (a resume or a rollback) restarts the loader there. So the batches of
    a step never depend on how the run got to it.
    """

    def __init__(self, sampler: BatchSampler, per_step: int, end_step: int,
                 num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int = 2):
        self.sampler, self.per_step, self.end_step = sampler, per_step, end_step
        self.loader_options = {"num_workers": num_workers, "pin_memory": pin_memory,
                               "prefetch_factor": prefetch_factor}
        self._loader: Generator[Batch, None, None] | None = None
        self._next_step: int | None = None  # the step whose batches the loader yields next
        self._step: int | None = None  # the step of ``_batches``
        self._batches: list[Batch] = []

    def __call__(self, step: int) -> list[Batch]:
        if step == self._step:
            return self._batches
        if self._loader is None or step != self._next_step:
            self.close()
            self._loader = batch_loader(self.sampler, step * self.per_step,
                                        self.end_step * self.per_step, **self.loader_options)
        self._batches = [next(self._loader) for _ in range(self.per_step)]
        self._step, self._next_step = step, step + 1
        return self._batches

    def close(self) -> None:
        """Stop the loader's workers (a no-op without any)."""
        if self._loader is not None:
            self._loader.close()
            self._loader = None
