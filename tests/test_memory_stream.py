"""``train.memory_stream``: each batch row reads its own stretch of the corpus in consecutive
windows and its tokens read only memories of their own document (aura.data.streams, the
store's ``min_source_pos``, the hippocampus's ``memory_floor``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from aura.data.streams import DocumentStreams
from aura.eval.perplexity import _features
from aura.memory.store import EpisodicStore
from conftest import assert_usage_error, losses
from test_stream import BLOCK, HIPPO, TEXT, TOK, build

EOT = 0


@dataclass
class _Shard:
    n_tokens: int
    source: int = 0


@dataclass
class _Split:
    """A split's interface as the samplers read it, over in-memory token arrays."""

    maps: list[np.ndarray]
    name: str = "train"
    dtype: Any = np.int64
    source_weights: list[float] = field(default_factory=lambda: [1.0])

    @property
    def shards(self) -> list[_Shard]:
        return [_Shard(len(m)) for m in self.maps]


def corpus(n: int, seed: int = 0) -> np.ndarray:
    """Tokens 1..9 with an end-of-text token (0) every 50 or so."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 10, n)
    tokens[rng.choice(n, n // 50, replace=False)] = EOT
    return tokens


def test_each_row_reads_consecutive_windows_of_its_own_lane() -> None:
    split = _Split([corpus(2000), corpus(1500, seed=1)])
    streams = DocumentStreams(split, 4, 16, seed=0, eot_id=EOT)  # type: ignore[arg-type]
    x0, y0, f0 = streams.batch(5)
    x1, _, f1 = streams.batch(6)
    assert torch.equal(x1[:, 0], y0[:, -1])  # the next window starts where this one ended
    assert torch.equal(f1["corpus_pos"], f0["corpus_pos"] + 16)
    lanes = streams.lane_windows(0)
    assert len(set(lanes.tolist())) == 4 and (np.diff(lanes) > 0).all()  # disjoint stretches
    again = DocumentStreams(split, 4, 16, seed=9, eot_id=EOT)  # type: ignore[arg-type]
    assert torch.equal(again.batch(5)[0], x0)  # a pure function of the index
    # a lane wraps around to its own start, never into the next lane
    n = int(streams._edges[1] - streams._edges[0])
    assert streams.lane_windows(n)[0] == lanes[0]
    # two data-parallel halves are the whole batch
    halves = [DocumentStreams(split, 4, 16, seed=0, eot_id=EOT, part=(i, 2))  # type: ignore[arg-type]
              for i in range(2)]
    assert torch.equal(torch.cat([h.batch(5)[0] for h in halves]), x0)


def test_each_token_s_floor_is_its_document_start_within_its_lane() -> None:
    tokens = corpus(3000)
    split = _Split([tokens])
    streams = DocumentStreams(split, 3, 32, seed=0, eot_id=EOT)  # type: ignore[arg-type]
    lane_start = streams._global[streams._edges[:-1]]
    for index in (0, 7, 40):
        x, _, f = streams.batch(index)
        pos = f["corpus_pos"][:, None] + torch.arange(32)
        floor = f["memory_floor"]
        assert floor.shape == x.shape and (floor <= pos).all()
        assert (floor >= torch.as_tensor(lane_start)[:, None]).all()
        for b in range(3):
            for t in range(32):
                p, fl = int(pos[b, t]), int(floor[b, t])
                # no end-of-text between the floor and the token; one just before the floor,
                # unless the floor is the lane's start
                assert not (tokens[fl:p] == EOT).any()
                assert fl == lane_start[b] or tokens[fl - 1] == EOT
    plain = DocumentStreams(split, 3, 32, seed=0)  # type: ignore[arg-type]
    assert (plain.batch(7)[2]["memory_floor"] == torch.as_tensor(lane_start)[:, None]).all()


def test_a_split_with_fewer_windows_than_lanes_is_refused() -> None:
    from aura.errors import DataError

    with pytest.raises(DataError, match=r"fewer than train\.batch_size"):
        DocumentStreams(_Split([corpus(100)]), 8, 16, seed=0)  # type: ignore[arg-type]


def test_the_store_hides_memories_formed_before_a_floor() -> None:
    store = EpisodicStore(4, 1, 16, decay=0.0)
    keys = torch.eye(4).repeat(2, 1)
    store.write(keys, torch.arange(8.0)[:, None], source_pos=torch.arange(8) * 10)
    got = store.read(keys[:2], 8, min_source_pos=torch.tensor([35, 0]), touch=False)
    assert set(got.values[0][got.mask[0], 0].tolist()) == {4.0, 5.0, 6.0, 7.0}
    assert set(got.values[1][got.mask[1], 0].tolist()) == set(range(8))
    both = store.read(keys[:1], 8, min_source_pos=torch.tensor([20]),
                      max_source_pos=torch.tensor([50]), touch=False)
    assert set(both.values[0][both.mask[0], 0].tolist()) == {2.0, 3.0, 4.0, 5.0}
    _, _, found = store.lookup(store.ids[:8].clone(), min_source_pos=torch.full((8,), 40))
    assert found.tolist() == [False] * 4 + [True] * 4


def test_the_hippocampus_reads_nothing_below_each_tokens_floor() -> None:
    model = build(HIPPO)
    x = torch.from_numpy(TOK.encode(TEXT[:2 * BLOCK]).astype(np.int64)).view(2, BLOCK)
    feats = {k: torch.from_numpy(f(x.numpy())) for k, f in _features(model, TOK).items()}
    pos = torch.tensor([1000, 5000])
    model.train()
    model(x, corpus_pos=pos - 900, **feats)  # memories formed at 100..131 and 4100..4131
    model.eval()
    model.flush_memory()
    assert model.memory is not None and len(model.memory.store)
    with torch.no_grad():
        above = model(x, corpus_pos=pos, memory_floor=torch.full((2, BLOCK), 10_000),
                      **feats).logits
        none = model(x, corpus_pos=pos, use_memory=False, **feats).logits
        reading = model(x, corpus_pos=pos, memory_floor=torch.zeros(2, BLOCK, dtype=torch.long),
                        **feats)
    torch.testing.assert_close(above, none)  # all below the floor: as if no memory
    assert not torch.allclose(reading.logits, none, atol=1e-4)


STREAM = ["--preset", "demo", "--set", "train.memory_stream=true",
          "--set", "train.memory_warmup_steps=1", "--set", "train.eval_interval=4",
          "--set", "train.checkpoint_interval=2", "--set", "model.dropout=0.0",
          *[a for o in HIPPO for a in ("--set", o)]]


@pytest.mark.slow
def test_a_memory_stream_run_resumes_exactly(run_cli, tmp_path: Path,  # type: ignore[no-untyped-def]
                                             train_data: Path) -> None:
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run_cli("train", *STREAM, "--data", train_data, "--out", whole,
                   "--max-steps", "4").code == 0
    assert run_cli("train", *STREAM, "--data", train_data, "--out", part,
                   "--max-steps", "2").code == 0
    res = run_cli("train", "--out", part, "--data", train_data, "--resume", "--max-steps", "4")
    assert res.code == 0, res.err
    want, got = losses(whole), losses(part)
    assert got.keys() == want.keys() and len(want) == 4
    for step, value in want.items():
        assert got[step] == pytest.approx(value, abs=1e-6), step


def test_memory_stream_on_a_model_without_document_memory_is_one_line(  # type: ignore[no-untyped-def]
        run_cli, tmp_path: Path, train_data: Path) -> None:
    res = run_cli("train", "--preset", "demo", "--set", "train.memory_stream=true",
                  "--data", train_data, "--out", tmp_path / "run", "--max-steps", "1")
    assert_usage_error(res, "train.memory_stream", "hippocampal")
