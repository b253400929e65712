"""How a model writes its episodic memories: one step late, at causal positions, with its device
and its checkpoints.

A memory layer reads its store during a forward and queues what that forward should remember; the
queue is written at the start of the model's *next* forward (``flush``). So no token reads a
memory formed from its own sequence, and a gradient-checkpointing recompute, which repeats the
forward's reads and re-queues the same writes (a queue replaces, never adds), sees the same
store. The writer is owned by the model, one per store: the model flushes it, moves it with its
weights, and checkpoints save it with the queue applied, so a checkpoint holds exactly what the
next forward would read.

Positions make reads causal across batches too. A training window at corpus offset ``o`` holds
tokens at ``o .. o+T-1`` (``token_positions``); a memory records where it was formed
(``source_pos``), and a token reads only memories formed at or before its own position, so an
earlier batch's overlapping window cannot hand it text that comes after it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from aura.memory.store import EpisodicStore


@dataclass(frozen=True)
class MemoryAccess:
    """What one forward may do with its model's memories: ``read`` them, ``write`` (queue) what
    it forms, and at which corpus ``positions`` (B, T) its tokens sit (None: unknown; reads then
    see every memory, and writes record the store's step), the ``tokens`` (B, T) themselves, so a
    memory can keep the text it was formed from. ``salience`` (B, T), when given, chooses what is
    written: every token with salience > 0, that salience its importance, in place of the
    memory's own choice (``aura learn`` keeps what it found salient). ``floor`` (B, T), when
    given, is the lowest corpus position each token may read a memory from (its document's
    start: ``train.memory_stream``)."""

    read: bool = True
    write: bool = False
    positions: torch.Tensor | None = None
    tokens: torch.Tensor | None = None  # (B, T) ids, kept with what is written as its snippet
    salience: torch.Tensor | None = None
    floor: torch.Tensor | None = None


def token_positions(corpus_pos: torch.Tensor | None, pos: torch.Tensor) -> torch.Tensor | None:
    """Each token's corpus position (B, T): the window offsets ``corpus_pos`` (B,) plus the
    tokens' positions ``pos`` (T,) in their window."""
    if corpus_pos is None:
        return None
    return corpus_pos.to(pos.device).view(-1, 1) + pos


@dataclass
class _Queued:
    keys: torch.Tensor
    values: torch.Tensor
    importance: torch.Tensor | None
    source_pos: torch.Tensor | None
    source_tokens: torch.Tensor | None = None


def snippets(tokens: torch.Tensor, width: int) -> torch.Tensor:
    """(B, T, width) ids: for each token the ``width`` tokens ending at it, -1 before the
    window's start (what a memory formed at that token keeps as its source text)."""
    padded = torch.nn.functional.pad(tokens, (width - 1, 0), value=-1)
    return padded.unfold(1, width, 1)


class MemoryWriter:
    """Deferred writes into one ``EpisodicStore`` (see the module docstring)."""

    def __init__(self, store: EpisodicStore):
        self.store = store
        self._queued: _Queued | None = None
        # Applied to the queue (None when empty) as ``flush`` starts. Under data parallelism
        # (aura.train.distributed) it returns the union of every rank's queue, in rank order, so
        # every rank writes the same memories and the stores stay identical.
        self.gather: Callable[[_Queued | None], _Queued | None] | None = None

    @property
    def queued(self) -> torch.Tensor | None:
        """The keys waiting for the next ``flush``, in the shape they were queued; None if
        nothing waits."""
        return None if self._queued is None else self._queued.keys

    @torch.no_grad()
    def queue(self, keys: torch.Tensor, values: torch.Tensor | None = None,
              importance: torch.Tensor | None = None, source_pos: torch.Tensor | None = None,
              source_tokens: torch.Tensor | None = None) -> None:
        """Queue memories (..., dim) for the next ``flush``, replacing anything queued; ``values``
        default to the keys (entries stored as both), ``importance`` and ``source_pos`` have the
        memories' leading shape, ``source_tokens`` that shape plus the snippet's width."""
        values = keys if values is None else values
        self._queued = _Queued(keys.detach(), values.detach(),
                               None if importance is None else importance.detach(), source_pos,
                               source_tokens)

    @torch.no_grad()
    def flush(self) -> int:
        """Write the queue as one store step, after one decay step; returns how many were written.

        Non-finite memories (from a step the trainer will skip) are dropped, so one bad batch
        cannot poison the store, and at most the newest ``capacity`` are kept. The store's
        arithmetic runs in fp32 outside autocast.
        """
        if self.gather is not None:
            self._queued = self.gather(self._queued)
        if self._queued is None:
            return 0
        q, self._queued = self._queued, None
        keys = q.keys.reshape(-1, q.keys.size(-1))
        values = q.values.reshape(-1, q.values.size(-1))
        keep = torch.isfinite(keys).all(-1) & torch.isfinite(values).all(-1)
        keys, values = keys[keep][-self.store.capacity:], values[keep][-self.store.capacity:]
        if keys.numel() == 0:
            return 0

        def kept(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.reshape(-1).to(keep.device)[keep][-keys.size(0):]

        snippet = None
        if q.source_tokens is not None:
            rows = q.source_tokens.reshape(-1, q.source_tokens.size(-1)).to(keep.device)
            snippet = rows[keep][-keys.size(0):]

        step = self.store.step + 1  # the store's clock counts writing steps, and is saved with it
        self.store.decay_step()
        with torch.autocast(keys.device.type, enabled=False):
            self.store.write(keys.float(), values.float(), kept(q.importance), step=step,
                             source_pos=kept(q.source_pos), source_tokens=snippet)
        return keys.size(0)

    def discard(self) -> None:
        """Forget the queue (e.g. before the store is replaced from a checkpoint)."""
        self._queued = None

    def to(self, device: torch.device | str) -> None:
        """Move the store (and anything queued) to ``device``."""
        self.store.to(device)
        if self._queued is not None:
            q = self._queued
            self._queued = _Queued(*(None if t is None else t.to(device) for t in
                                     (q.keys, q.values, q.importance, q.source_pos,
                                      q.source_tokens)))

    def save(self, directory: Path) -> None:
        """Apply the queue, then save the store into ``directory`` (atomically)."""
        self.flush()
        self.store.save(directory)

    def restore(self, directory: Path) -> None:
        """Replace the store's memories by those saved in ``directory``; the queue is dropped."""
        self.discard()
        self.store.restore(directory)
