"""Memories written under data parallelism keep their source text: ``gather_queue`` (the
all-gather of every rank's queued memories over gloo) carries each memory's source token ids
with it, through the importance top-k, so ``--show-memory`` can print text for a DDP run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aura.memory.writer import _Queued
from aura.train.distributed import Group, gather_queue

WIDTH = 4


def queue(ids: list[int], importance: list[float] | None, tokens: bool = True) -> _Queued:
    """Memories whose key, source position and source tokens all name ``ids``: (1, n) rows as
    the hippocampus queues them (batch row, memory)."""
    t = torch.tensor(ids, dtype=torch.float32)
    return _Queued(keys=t[None, :, None].expand(1, -1, 3).clone(), values=t[None, :, None],
                   importance=None if importance is None else torch.tensor([importance]),
                   source_pos=torch.tensor([ids]),
                   source_tokens=(torch.tensor(ids)[None, :, None].expand(1, -1, WIDTH).clone()
                                  if tokens else None))


def _check(got: _Queued | None, want_ids: list[int]) -> None:
    assert got is not None and got.source_tokens is not None and got.source_pos is not None
    assert got.keys[:, 0].long().tolist() == want_ids
    assert got.source_pos.tolist() == want_ids
    assert got.source_tokens.shape == (len(want_ids), WIDTH)
    assert (got.source_tokens == torch.tensor(want_ids)[:, None]).all()


def _init(rank: int, world: int, store: str) -> Group:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    return Group(rank=rank, world=world)


def test_one_rank_gather_keeps_source_tokens_through_the_top_k(tmp_path: Path) -> None:
    group = _init(0, 1, str(tmp_path / "store"))
    try:
        _check(gather_queue(group, queue([5, 7, 9], None)), [5, 7, 9])
        untexted = gather_queue(group, queue([1, 2], None, tokens=False))
        assert untexted is not None and untexted.source_tokens is None
    finally:
        dist.destroy_process_group()


def _two_ranks(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    group = _init(rank, 2, store)
    try:
        if rank == 0:  # importance picks the 3 most important of both ranks' 5
            got = gather_queue(group, queue([10, 11, 12], [0.1, 0.9, 0.5]))
        else:
            got = gather_queue(group, queue([20, 21], [0.8, 0.2]))
        _check(got, [11, 20, 12])
        # a rank that queued nothing still receives the other's memories with their text
        got = gather_queue(group, queue([30, 31], None) if rank == 1 else None)
        _check(got, [30, 31])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_gather_each_others_memories_with_their_source_tokens(tmp_path: Path) -> None:
    mp.spawn(_two_ranks, args=(str(tmp_path / "store"),), nprocs=2, join=True)
