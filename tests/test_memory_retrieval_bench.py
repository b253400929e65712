"""The in-model retrieval measurement of benchmarks/memory_quality_bench.py (``retrieval``)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

from aura.eval.perplexity import _features
from aura.memory.store import EpisodicStore
from test_stream import HIPPO, SNN_RAG, TEXT, TOK, build

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import memory_quality_bench as bench


def test_alterations_change_what_they_say_and_nothing_else() -> None:
    rng = random.Random(0)
    text = TEXT[:200]
    typos = bench.alter(rng, text, "typos", 0.2)
    changed = sum(a != b for a, b in zip(text, typos, strict=True))
    letters = sum(c.isalpha() for c in text)
    assert len(typos) == len(text) and 0.1 * letters < changed < 0.3 * letters
    assert all(a == b for a, b in zip(text, typos, strict=True) if not a.isalpha())
    words = bench.alter(rng, text, "words", 0.2)
    assert set(words.split(" ")) <= set(text.split(" ")) and words != text
    assert len(words.split(" ")) < len(text.split(" "))


@pytest.mark.parametrize("overrides", [HIPPO, SNN_RAG], ids=["hippocampal", "snn_rag"])
def test_each_passage_retrieves_its_own_memory_from_its_own_text(
        overrides: tuple[str, ...]) -> None:
    """Unaltered queries are the keys themselves: top-1 for every passage, both poolings; the
    states are those of the memory layer (hippocampus input, or the bank's normalised state)."""
    model = build(overrides)
    states = bench.LayerStates(model)
    assert len(states.layers) == 1
    passages = [TEXT[i:i + 24] for i in range(0, 240, 24)]
    got = bench.layer_states(states, TOK, _features(model, TOK), passages)
    (name, hs), = got.items()
    assert len(hs) == len(passages) and hs[0].shape[:2] == (1, 24)
    for pool in ("mean", "last"):
        with torch.inference_mode():
            keys = torch.cat([states.keys_and_queries(name, h, pool)[0] for h in hs])
        store = EpisodicStore(keys.size(1), 1, capacity=len(passages))
        ids = store.write(keys, torch.zeros(len(passages), 1))
        assert torch.equal(store.read(keys, 5, touch=False).ids[:, 0], ids)
