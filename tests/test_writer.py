"""The memory-writer protocol both memory models use: queue, flush one step late, causal positions,
device moves and checkpoint state; and the one decoder block every decoder is built from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aura.config import load_config
from aura.data.prosody import N_FEATURES
from aura.memory.store import EpisodicStore
from aura.memory.writer import MemoryWriter, token_positions
from aura.models import build_model
from aura.models.decoder import Block, Decoder
from aura.nn.spiking import GIF, LIF


def writer(capacity: int = 8, dim: int = 4, **kw: object) -> MemoryWriter:
    return MemoryWriter(EpisodicStore(dim, dim, capacity, **kw))  # type: ignore[arg-type]


def test_a_queue_is_written_only_by_flush_and_replaces_the_previous_queue() -> None:
    w = writer(decay=0.5)
    w.queue(torch.ones(2, 3, 4))
    w.queue(torch.full((1, 2, 4), 2.0), source_pos=torch.tensor([[7, 9]]))  # replaces
    assert len(w.store) == 0 and w.queued is not None and w.queued.shape == (1, 2, 4)
    assert w.flush() == 2 and w.queued is None and w.flush() == 0
    store = w.store
    live = store.ids >= 0
    assert torch.equal(store.keys[live], torch.full((2, 4), 2.0))
    assert store.values[live].equal(store.keys[live])  # entries as key and value
    assert store.source_pos[live].tolist() == [7, 9] and store.step == 1
    w.queue(torch.ones(1, 4))
    w.flush()
    assert store.step == 2
    assert sorted(store.strength[store.ids >= 0].tolist()) == [0.5, 0.5, 1.0]  # one decay step


def test_non_finite_memories_are_dropped_and_only_the_newest_capacity_kept() -> None:
    w = writer(capacity=3)
    keys = torch.arange(20.0).view(5, 4)
    keys[1, 2] = float("nan")
    values = keys.clone()
    values[3, 0] = float("inf")
    w.queue(keys, values, importance=torch.arange(5.0), source_pos=torch.arange(5) + 100)
    assert w.flush() == 3
    live = w.store.ids >= 0
    assert w.store.source_pos[live].tolist() == [100, 102, 104]
    assert w.store.importance[live].tolist() == [0.0, 2.0, 4.0]
    w2 = writer(capacity=2)
    w2.queue(keys[[0, 2, 4]])
    w2.flush()
    assert torch.equal(w2.store.keys[w2.store.ids >= 0], keys[[2, 4]])


def test_save_applies_the_queue_and_restore_drops_it(tmp_path: Path) -> None:
    w = writer()
    w.queue(torch.randn(3, 4))
    w.save(tmp_path / "m")
    assert w.queued is None and len(EpisodicStore.load(tmp_path / "m")) == 3
    w.queue(torch.randn(2, 4))
    w.restore(tmp_path / "m")
    assert w.queued is None and len(w.store) == 3
    assert w.flush() == 0


def test_token_positions_are_window_offsets_plus_positions() -> None:
    pos = torch.arange(5, 8)
    assert token_positions(None, pos) is None
    got = token_positions(torch.tensor([100, 0]), pos)
    assert got is not None and got.tolist() == [[105, 106, 107], [5, 6, 7]]


SMALL = ["model.vocab_size=40", "model.block_size=16", "model.n_layer=2", "model.n_head=2",
         "model.n_embd=16"]


@pytest.mark.parametrize("name", ["hippocampal", "snn_rag"])
def test_moving_a_model_moves_its_memories(name: str) -> None:
    extra = (["model.n_place_cells=20", "model.memory_capacity=16", "model.memory_dim=8",
              "model.memory_writes=4"] if name == "hippocampal" else
             ["model.memory_capacity=16", "model.memory_chunk=4"])
    model = build_model(load_config(overrides=[f"model.name={name}", *SMALL, *extra]).model)
    (w,) = model.writers.values()
    moved: list[torch.device] = []
    w.to = lambda device: moved.append(torch.device(device))  # type: ignore[method-assign]
    model.to("cpu")
    assert moved == [torch.device("cpu")]


@pytest.mark.parametrize("name", ["gpt", "hippocampal", "snn_rag"])
@pytest.mark.parametrize("neuron", ["lif", "gif"])
def test_every_decoder_is_the_one_block_with_the_configured_feed_forward(name: str,
                                                                         neuron: str) -> None:
    extra = (["model.n_place_cells=20", "model.memory_capacity=16", "model.memory_dim=8",
              "model.memory_writes=4"] if name == "hippocampal" else
             ["model.memory_capacity=16", "model.memory_chunk=4"] if name == "snn_rag" else [])
    cfg = load_config(overrides=[f"model.name={name}", *SMALL, *extra, "model.ffn=snn",
                                 f"model.neuron={neuron}"])
    model = build_model(cfg.model)
    assert isinstance(model, Decoder)
    assert all(type(b) is Block for b in model.blocks)
    expected = GIF if neuron == "gif" else LIF
    assert all(isinstance(b.mlp.neuron, expected) for b in model.blocks)
    x = torch.randint(0, 40, (2, 16))
    feats = {"prosody": torch.zeros(2, 16, N_FEATURES)} if model.token_features else {}
    out = model(x, x, **feats)
    assert out.loss is not None and torch.isfinite(out.loss)
    assert 0 <= float(out.aux["firing_rate"]) <= 4  # GIF spikes are graded (up to max_level)
