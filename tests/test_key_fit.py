"""`aura memory fit-keys`: the contrastive key fit, re-keying a store, the command."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aura.memory.store import EpisodicStore
from aura.train.checkpoint import load_for_inference
from aura.train.key_fit import KeyFitOptions, alter, fit_key, top5_recall
from aura.train.trainer import Trainer
from conftest import assert_usage_error, tiny_config


@given(st.text(max_size=200), st.integers(0, 2**32 - 1))
def test_typos_change_only_letters_and_keep_the_length(text: str, seed: int) -> None:
    out = alter(random.Random(seed), text, "typos", 0.5)
    assert len(out) == len(text)
    assert all(a == b or (a.isalpha() and b.isalpha()) for a, b in zip(text, out, strict=True))


@given(st.lists(st.text("abc", min_size=1, max_size=5), min_size=1, max_size=30),
       st.integers(0, 2**32 - 1))
def test_dropping_words_keeps_some_of_them_and_nothing_else(words: list[str], seed: int) -> None:
    out = alter(random.Random(seed), " ".join(words), "words", 0.3).split(" ")
    assert 1 <= len(out) <= len(words)
    assert all(w in words for w in out)


def test_rekey_gives_the_keys_and_neighbours_a_store_written_with_them_has() -> None:
    torch.manual_seed(0)
    values = torch.randn(40, 16)
    project = torch.nn.Linear(16, 8, bias=False)
    store = EpisodicStore(8, 16, capacity=64, graph_k=4)
    store.write(torch.randn(40, 8), values)
    fresh = EpisodicStore(8, 16, capacity=64, graph_k=4)
    with torch.no_grad():
        fresh.write(project(values), values)
    assert store.rekey(project) == 40
    torch.testing.assert_close(store.index.keys, fresh.index.keys)
    q = torch.randn(5, 8)
    assert torch.equal(store.read(q, 3, touch=False).ids, fresh.read(q, 3, touch=False).ids)
    ids = torch.arange(40)
    assert torch.equal(store.neighbours(ids, 4), fresh.neighbours(ids, 4))
    with pytest.raises(ValueError, match="keys"):
        store.rekey(lambda v: v)  # 16-d, not 8


def test_fitting_finds_the_directions_altered_passages_share() -> None:
    """Passages are 6 tokens of 32-d states: 4 dims carry the passage, 28 carry noise that the
    alterations redraw; a random key mixes them, the fitted one reads the passage."""
    torch.manual_seed(0)
    n, t, c = 300, 6, 32
    signal = torch.randn(n, 1, 4).expand(n, t, 4)

    def view() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([signal, 3 * torch.randn(n, t, c - 4)], -1), torch.ones(n, t)

    views = {how: view() for how in ("orig", "typos", "words", "shift")}
    start = torch.randn(8, c) * 0.02
    before = top5_recall(start, views)
    weight, losses = fit_key(views, start, KeyFitOptions(steps=150, batch=128))
    after = top5_recall(weight, views)
    assert losses[-1] < losses[0] / 2
    assert max(before.values()) < 0.5 and min(after.values()) > 0.9, (before, after)


def hippocampal_run(root: Path, data: Path, steps: int) -> Path:
    """A tiny hippocampal run whose store holds memories (its own key projection)."""
    run = root / "hippo"
    Trainer(tiny_config("model.name=hippocampal", "model.memory_capacity=64",
                        "model.memory_writes=8", f"train.max_steps={steps}"),
            data, run, progress=False).run()
    return run


def test_fit_keys_rewrites_the_key_and_the_stored_keys(tmp_path: Path, train_data: Path,
                                                       run_cli) -> None:  # type: ignore[no-untyped-def]
    run = hippocampal_run(tmp_path, train_data, steps=3)
    old = load_for_inference(run).model
    res = run_cli("memory", "fit-keys", run, "--data", train_data, "--passages", "20",
                  "--chars", "16", "--steps", "10", "--json")
    assert res.code == 0, res.err
    layer = res.json()["layers"]["hippocampus"]
    assert set(layer["top5_after"]) == {"typos", "words", "shift"}
    new = load_for_inference(run).model  # verifies every sha256, the rewritten weights' too
    assert not torch.equal(new.memory.key.weight, old.memory.key.weight)
    torch.testing.assert_close(new.memory.query.weight, old.memory.query.weight)
    store = new.memory.store
    live = store.ids >= 0
    assert layer["memories_rekeyed"] == int(live.sum()) > 0
    with torch.no_grad():
        expected = torch.nn.functional.normalize(new.memory.key(store.values[live]), dim=-1)
    torch.testing.assert_close(store.index.keys[live], expected, atol=1e-5, rtol=1e-5)


def test_fit_keys_needs_a_memory_with_its_own_key(tmp_path: Path, train_data: Path,
                                                  run_cli) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "gpt"
    Trainer(tiny_config("train.max_steps=1"), train_data, run, progress=False).run()
    assert_usage_error(run_cli("memory", "fit-keys", run, "--data", train_data),
                       "no memory with a key projection")
    assert_usage_error(run_cli("memory", "fit-keys", run, "--data", train_data, "--steps", "0"),
                       "must be >= 1")


def test_fit_keys_refuses_more_passages_than_the_split_holds(tmp_path: Path, train_data: Path,
                                                             run_cli) -> None:  # type: ignore[no-untyped-def]
    run = hippocampal_run(tmp_path, train_data, steps=1)
    before = sorted(p.name for p in run.rglob("*"))
    assert_usage_error(run_cli("memory", "fit-keys", run, "--data", train_data,
                               "--passages", "100000"), "passages of 72, not 100000")
    assert_usage_error(run_cli("memory", "fit-keys", run, "--data", train_data,
                               "--passages", "2", "--chars", "3000"), "the val split holds")
    assert sorted(p.name for p in run.rglob("*")) == before  # nothing written


def test_natural_brain_hippocampus_is_fitted_through_its_own_input() -> None:
    """The brain's hippocampus is found like the hippocampal model's, and each passage's
    states are read at its input, one text at a time (lengths differ: padded, masked)."""
    from aura.data.tokenizers import ByteTokenizer
    from aura.models.base import build_model
    from aura.train.key_fit import key_layers, layer_inputs

    torch.manual_seed(0)
    model = build_model(tiny_config("model.name=natural_brain", "model.vocab_size=256",
                                    "model.memory_capacity=64", "model.memory_writes=8").model)
    layers = key_layers(model.eval())
    assert list(layers) == ["hippocampus"]
    states, mask = layer_inputs(model, ByteTokenizer(), layers["hippocampus"],
                                ["hello there", "abc"])
    assert states.shape == (2, 11, model.config.n_embd) and mask.sum(1).tolist() == [11, 3]
    assert states[1, 3:].abs().sum() == 0 and states[1, :3].abs().sum() > 0
