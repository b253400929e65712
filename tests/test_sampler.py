"""Batch sampling: a pure function of (seed, rank, step), windows of one shard, source weights."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aura.data.prepare import PrepareOptions, prepare
from aura.data.sampler import BatchSampler, Curriculum, StepBatches, batch_loader
from aura.data.shards import PreparedData, SplitData
from aura.errors import DataError
from conftest import make_docs, prepared_bytes, write_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    """Byte tokens of 40 documents in 4096-token shards (several per split)."""
    return prepared_bytes(tmp_path_factory.mktemp("sampler"), 40, seed=21, shard_tokens=4096,
                          val_fraction=0.2)


@pytest.fixture(scope="module")
def train(data: PreparedData) -> SplitData:
    split = data.split("train")
    assert len(split.shards) > 2
    return split


def same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_batches_are_a_function_of_seed_and_step(train: SplitData) -> None:
    a = BatchSampler(train, batch_size=8, block_size=32, seed=5)
    b = BatchSampler(train, batch_size=8, block_size=32, seed=5)
    for step in (0, 1, 17, 10_000):
        assert same(a(step), b(step))
    assert same(a(3), a(3))
    assert not same(a(0), a(1))
    assert not same(a(0), BatchSampler(train, 8, 32, seed=6)(0))
    assert not same(a(0), BatchSampler(train, 8, 32, seed=5, rank=1)(0))


def test_shapes_dtype_and_shift(train: SplitData) -> None:
    x, y = BatchSampler(train, batch_size=6, block_size=24, seed=0)(2)
    assert x.shape == y.shape == (6, 24)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted left by one token


def test_every_row_is_a_window_of_one_shard(train: SplitData) -> None:
    shards = [np.asarray(m).astype(np.uint8).tobytes() for m in train.maps]
    sampler = BatchSampler(train, batch_size=16, block_size=64, seed=1)
    used = set()
    for step in range(20):
        x, y = sampler(step)
        window = torch.cat([x, y[:, -1:]], dim=1).numpy().astype(np.uint8)
        for row in window:
            hits = [k for k, s in enumerate(shards) if s.find(row.tobytes()) >= 0]
            assert hits, "a row that is no contiguous window of any one shard"
            used.update(hits)
    assert len(used) == len(shards)  # all shards are drawn from


@given(seed=st.integers(0, 2**32 - 1), rank=st.integers(0, 64), step=st.integers(0, 10**9),
       batch=st.integers(1, 8), block=st.integers(1, 200))
def test_any_step_gives_in_range_windows(train: SplitData, seed: int, rank: int, step: int,
                                         batch: int, block: int) -> None:
    sampler = BatchSampler(train, batch, block, seed=seed, rank=rank)
    window = sampler.sample(step)
    assert window.shape == (batch, block + 1)
    x, y = sampler(step)
    assert torch.equal(x, torch.from_numpy(window[:, :-1].astype(np.int64)))
    assert torch.equal(y[:, -1], torch.from_numpy(window[:, -1].astype(np.int64)))
    assert int(x.min()) >= 0 and int(x.max()) < 256


def test_resume_gives_the_same_batches(train: SplitData) -> None:
    running = BatchSampler(train, 4, 16, seed=9)
    for step in range(5):
        running(step)
    after = [running(step) for step in range(5, 10)]
    fresh = BatchSampler(train, 4, 16, seed=9)
    assert all(same(a, fresh(step)) for a, step in zip(after, range(5, 10), strict=True))
    # A loader resumed at step 5 yields those batches too.
    resumed = list(batch_loader(BatchSampler(train, 4, 16, seed=9), 5, 10))
    assert all(same(a, b) for a, b in zip(after, resumed, strict=True))


def test_sources_are_mixed_by_weight(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "a.txt").write_text("a" * 3000, encoding="utf-8")
    (tmp_path / "b" / "b.txt").write_text("b" * 20000, encoding="utf-8")
    opts = PrepareOptions([str(tmp_path / "a"), str(tmp_path / "b")], "byte", weights=[9, 1],
                          val_fraction=0.0, shard_tokens=4096)
    split = prepare(opts, tmp_path / "out", progress=False).data.split("train")
    assert split.source_weights == pytest.approx([0.9, 0.1])
    sampler = BatchSampler(split, batch_size=32, block_size=16, seed=3)
    rows = np.concatenate([sampler.sample(step) for step in range(200)])  # 6400 rows
    from_a = (rows == ord("a")).all(axis=1)
    from_b = (rows == ord("b")).all(axis=1)
    assert (from_a | from_b).all()  # no window mixes sources
    # Binomial(6400, 0.9) has sd 0.004: 0.03 is over 7 sd. By size alone A would be 0.13.
    assert from_a.mean() == pytest.approx(0.9, abs=0.03)


def test_curriculum_block_sizes() -> None:
    schedule = Curriculum([[0, 16], [100, 32]], final=64)
    assert [schedule(s) for s in (0, 1, 50, 99)] == [16] * 4
    assert [schedule(s) for s in (100, 101, 5000)] == [32] * 3
    later = Curriculum([[10, 8]], final=64)  # ``final`` applies before the first stage
    assert [later(0), later(9), later(10)] == [64, 64, 8]
    with pytest.raises(DataError):
        Curriculum([[0, 0]], final=64)


def test_sampler_follows_the_curriculum(train: SplitData) -> None:
    sampler = BatchSampler(train, 3, Curriculum([[0, 16], [100, 32]], final=64), seed=0)
    assert sampler(0)[0].shape == (3, 16)
    assert sampler(99)[1].shape == (3, 16)
    assert sampler(100)[0].shape == (3, 32)
    assert sampler(1234)[0].shape == (3, 32)


def test_worker_processes_give_the_same_batches(train: SplitData) -> None:
    sampler = BatchSampler(train, 4, Curriculum([[0, 16], [3, 24]], final=64), seed=2)
    expected = [sampler(step) for step in range(0, 6)]
    got = list(batch_loader(sampler, 0, 6, num_workers=2))
    assert len(got) == 6
    assert all(same(a, b) for a, b in zip(expected, got, strict=True))
    assert got[-1][0].shape == (4, 24)


def test_a_block_larger_than_every_shard_is_a_data_error(train: SplitData) -> None:
    longest = max(s.n_tokens for s in train.shards)
    with pytest.raises(DataError, match="block") as err:
        BatchSampler(train, 2, longest, seed=0)(0)
    assert str(longest) in str(err.value)
    assert BatchSampler(train, 2, longest - 1, seed=0)(0)[0].shape == (2, longest - 1)


def test_bad_batch_size_and_missing_split(tmp_path: Path, train: SplitData) -> None:
    with pytest.raises(DataError, match="batch size"):
        BatchSampler(train, 0, 8, seed=0)
    write_dir(tmp_path / "c", make_docs(3))
    opts = PrepareOptions([str(tmp_path / "c")], "byte", val_fraction=0.0)
    data = prepare(opts, tmp_path / "out", progress=False).data
    with pytest.raises(DataError, match="no val split"):
        data.split("val")


def test_uint32_shards_sample_too(tmp_path: Path) -> None:
    """70k distinct characters in code-point order: token id == position, windows count up."""
    text = "".join(chr(0x4E00 + i) for i in range(20000))
    text += "".join(chr(0x20000 + i) for i in range(50000))
    (tmp_path / "wide.txt").write_text(text, encoding="utf-8")
    opts = PrepareOptions([str(tmp_path / "wide.txt")], "char", val_fraction=0.0)
    data = prepare(opts, tmp_path / "out", progress=False).data
    assert data.dtype == np.uint32
    window = BatchSampler(data.split("train"), 256, 10, seed=0).sample(0)
    assert window.dtype == np.uint32
    assert (np.diff(window.astype(np.int64), axis=1) == 1).all()
    assert int(window.max()) >= 1 << 16  # ids beyond uint16 survive
    assert data.tokenizer.decode(window[0]) in text


def test_corpus_pos_locates_every_window_in_the_split(train: SplitData) -> None:
    """Each row's ``corpus_pos`` is where its window starts with the shards laid end to end,
    across shards, and asking for it changes nothing else."""
    plain = BatchSampler(train, batch_size=16, block_size=32, seed=3)
    located = BatchSampler(train, batch_size=16, block_size=32, seed=3, corpus_pos=True)
    corpus = np.concatenate([np.asarray(m) for m in train.maps]).astype(np.int64)
    starts = set()
    for step in range(4):
        x, y, feats = located.batch(step)
        assert same((x, y), plain(step)) and "corpus_pos" not in plain.batch(step)[2]
        pos = feats["corpus_pos"]
        assert pos.shape == (16,) and pos.dtype == torch.int64
        for row, p in zip(x, pos.tolist(), strict=True):
            assert np.array_equal(row.numpy(), corpus[p:p + 32])
        starts |= {int(np.searchsorted(np.cumsum([s.n_tokens for s in train.shards]), p,
                                       side="right")) for p in pos.tolist()}
    assert len(starts) > 1  # windows from several shards


def test_samplers_pickle_for_spawned_workers(train: SplitData) -> None:
    """DataLoader workers started by spawn (macOS, Windows) get the sampler pickled: a curriculum
    or a fixed block size must survive that and give the same batches."""
    for block in (Curriculum([[0, 8], [2, 16]], final=64), 24):
        sampler = BatchSampler(train, 3, block, seed=4)
        copy = pickle.loads(pickle.dumps(sampler))
        assert all(same(sampler(step), copy(step)) for step in range(4))


def test_loader_workers_leave_the_global_rng_alone(train: SplitData) -> None:
    """A DataLoader draws its workers' base seed from torch's global generator unless given its
    own; that draw would shift a model's dropout stream between runs with and without workers."""
    before = torch.get_rng_state()
    batches = batch_loader(BatchSampler(train, 2, 16, seed=0), 0, 3, num_workers=1)
    assert len(list(batches)) == 3
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("workers", [0, 2])
def test_step_batches_follow_the_step(train: SplitData, workers: int) -> None:
    """Batch i of step s is sampler index s * per_step + i however the steps are asked for: in
    order, the same step again (a retry), backwards (a rollback) or ahead (a resume)."""
    sampler = BatchSampler(train, 2, 16, seed=7)
    steps = StepBatches(sampler, per_step=3, end_step=10, num_workers=workers)
    try:
        for step in (0, 1, 1, 2, 0, 1, 7, 9, 4):
            got = steps(step)
            assert len(got) == 3
            for i, (x, y, _) in enumerate(got):
                assert same((x, y), sampler(step * 3 + i))
        assert steps(4) is steps(4)  # a retried step gets the very same batches
    finally:
        steps.close()
    assert multiprocessing.active_children() == []


def test_workers_ignore_ctrl_c(train: SplitData) -> None:
    """Ctrl-C reaches every process of the group: the workers must keep serving batches so the
    main process can finish its step, save and stop them itself. (The first two batches come
    one from each worker, so both have run their init when the signal arrives; before that a
    worker inherits the trainer's own handler, which only sets a flag.)"""
    sampler = BatchSampler(train, 2, 16, seed=3)
    batches = batch_loader(sampler, 0, 8, num_workers=2)
    try:
        assert same(next(batches)[:2], sampler(0)) and same(next(batches)[:2], sampler(1))
        workers = multiprocessing.active_children()
        assert len(workers) == 2
        for worker in workers:
            assert worker.pid is not None
            os.kill(worker.pid, signal.SIGINT)
        rest = list(batches)
    finally:
        batches.close()
    assert [same(b[:2], sampler(step)) for step, b in enumerate(rest, 2)] == [True] * 6
    assert multiprocessing.active_children() == []


def test_a_loader_closed_before_its_first_batch_starts_no_workers(train: SplitData) -> None:
    batches = batch_loader(BatchSampler(train, 2, 16, seed=3), 0, 8, num_workers=2)
    assert multiprocessing.active_children() == []
    batches.close()
    assert multiprocessing.active_children() == []
