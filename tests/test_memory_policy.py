"""The write/forget policy: "adaptive" decay (seed 002) against the fixed one, and the eviction
rule they share (aura.memory.store)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aura.config import load_config
from aura.errors import ConfigError
from aura.memory.store import EpisodicStore
from aura.models import build_model
from conftest import TINY_TRAIN


def eye_keys(n: int, dim: int = 8) -> torch.Tensor:
    return torch.eye(dim)[:n]


def test_fixed_decay_fades_every_memory_alike_whatever_its_importance() -> None:
    store = EpisodicStore(8, 1, capacity=4, decay=0.1)
    store.write(eye_keys(2), torch.zeros(2, 1), importance=torch.tensor([0.0, 5.0]))
    store.decay_step(3)
    assert torch.allclose(store.strength[:2], torch.full((2,), 0.9 ** 3))


def test_adaptive_decay_fades_novel_memories_slower_and_reads_reset_it() -> None:
    store = EpisodicStore(8, 1, capacity=4, decay=0.1, decay_mode="adaptive", read_boost=0.0)
    store.write(eye_keys(2), torch.zeros(2, 1), importance=torch.tensor([0.0, 1.0]))
    store.decay_step(4)
    # stability 1 + importance: 1 and 2
    assert torch.allclose(store.strength[:2], torch.tensor([0.9 ** 4, 0.9 ** 2]))
    store.read(eye_keys(1), 1)  # recalls memory 0: strength back to 1, stability 1 -> 2
    assert store.strength[0] == 1.0 and store.stability[0] == 2.0
    store.decay_step(2)
    assert torch.allclose(store.strength[:2], torch.tensor([0.9, 0.9 ** 3]))
    store.read(eye_keys(1), 1, touch=False)  # a pure lookup (evaluation) changes nothing
    assert store.stability[0] == 2.0 and torch.isclose(store.strength[0], torch.tensor(0.9))


def test_adaptive_eviction_takes_the_least_important_unread_memories_first() -> None:
    """Written together, faded alike in time: the two least important go, as the retention
    says; the important ones stay."""
    store = EpisodicStore(8, 1, capacity=4, decay=0.05, decay_mode="adaptive")
    ids = store.write(eye_keys(4), torch.zeros(4, 1),
                      importance=torch.tensor([0.0, 1.0, 0.2, 0.6]), step=1)
    store.decay_step(20)
    lowest = store.ids[store.retention().argsort()[:2]].tolist()
    store.write(eye_keys(2) * -1, torch.zeros(2, 1), step=21)
    kept = set(store.ids[store.ids >= 0].tolist())
    assert sorted(lowest) == [int(ids[0]), int(ids[2])]
    assert int(ids[0]) not in kept and int(ids[2]) not in kept
    assert {int(ids[1]), int(ids[3])} <= kept


@pytest.mark.parametrize("mode, recalled_survives", [("fixed", False), ("adaptive", True)])
def test_a_recalled_memory_outlives_a_more_important_forgotten_one_only_when_adaptive(
        mode: str, recalled_survives: bool) -> None:
    """A (importance 0) is recalled three times, B (importance 0.5) never; long after, one of
    them must go. Fixed decay keeps B (importance lasts); adaptive keeps A, whose recalls
    slowed its forgetting, while B faded at its written rate."""
    store = EpisodicStore(8, 1, capacity=2, decay=0.05, decay_mode=mode)  # type: ignore[arg-type]
    a, b = store.write(eye_keys(2), torch.zeros(2, 1), importance=torch.tensor([0.0, 0.5]),
                       step=1).tolist()
    for step in (2, 3, 4):
        store.read(eye_keys(1), 1, step=step)
    store.decay_step(200)
    store.write(-eye_keys(1), torch.zeros(1, 1), step=204)
    kept = set(store.ids[store.ids >= 0].tolist())
    assert (a in kept) is recalled_survives and (b in kept) is not recalled_survives


def test_save_and_load_keep_the_policy_and_its_state(tmp_path: Path) -> None:
    store = EpisodicStore(8, 1, capacity=4, decay=0.1, decay_mode="adaptive")
    store.write(eye_keys(3), torch.zeros(3, 1), importance=torch.tensor([0.0, 1.0, 0.3]))
    store.read(eye_keys(1), 1)
    store.decay_step(5)
    loaded = EpisodicStore.load(store.save(tmp_path / "s"))
    assert loaded.decay_mode == "adaptive"
    for name in ("stability", "strength", "importance"):
        assert torch.equal(getattr(loaded, name), getattr(store, name)), name
    store.decay_step(7)
    loaded.decay_step(7)
    assert torch.equal(loaded.strength, store.strength)
    fixed = EpisodicStore(8, 1, capacity=4, decay=0.1)
    with pytest.raises(Exception, match="saved with"):
        fixed.restore(tmp_path / "s")  # a store of the other policy is not silently mixed


def test_the_model_switch_builds_the_policy_and_refuses_an_unknown_one() -> None:
    for name in ("hippocampal", "snn_rag", "natural_brain"):
        cfg = load_config(preset="demo", overrides=[
            *TINY_TRAIN, f"model.name={name}", "model.memory_capacity=64", "model.vocab_size=32",
            "model.memory_decay_mode=adaptive"])
        model = build_model(cfg.model)
        assert {s.decay_mode for s in model.memory_stores().values()} == {"adaptive"}, name
        default = load_config(preset="demo", overrides=[*TINY_TRAIN, f"model.name={name}"])
        assert default.model.memory_decay_mode == "fixed"
    with pytest.raises(ConfigError, match="memory_decay_mode"):
        load_config(preset="demo", overrides=["model.name=hippocampal",
                                              "model.memory_decay_mode=sometimes"])
    with pytest.raises(ValueError, match="decay_mode"):
        EpisodicStore(4, 1, decay_mode="sometimes")  # type: ignore[arg-type]
