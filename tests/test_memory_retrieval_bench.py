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


@pytest.mark.parametrize("tied", [False, True])
def test_a_tied_key_makes_a_state_find_its_own_memory_by_its_read_query(tied: bool) -> None:
    """Memories are written without gradient, so an untied key stays a random projection the
    query never learns to meet; tied, the key is the query and a state's read finds it."""
    from aura.memory.writer import MemoryAccess, MemoryWriter
    from aura.nn.hippocampus import HippocampalMemory

    torch.manual_seed(0)
    writer = MemoryWriter(EpisodicStore(16, 32, capacity=64))
    memory = HippocampalMemory(32, writer, top_k=4, writes_per_step=8, tied_key=tied)
    assert (memory.key is None) is tied
    assert ("key.weight" in dict(memory.named_parameters())) is not tied
    h = torch.randn(1, 8, 32)
    memory(h, MemoryAccess(read=True, write=True))
    writer.flush()
    with torch.no_grad():
        best = writer.store.read(memory.query(h)[0], 1, touch=False).scores[:, 0]
    if tied:
        assert torch.allclose(best, torch.ones(8), atol=1e-5)
    else:
        assert float(best.max()) < 0.9


def test_a_tied_key_hippocampal_model_trains_saves_and_loads(tmp_path: Path) -> None:
    from aura.config import load_config
    from aura.train.checkpoint import TrainState, load_for_inference, save_checkpoint
    from test_stream import populate

    overrides = (*HIPPO, "model.memory_tied_key=true")
    model = build(overrides)
    assert model.memory is not None and model.memory.key is None  # type: ignore[attr-defined]
    populate(model)
    cfg = load_config(preset="demo", overrides=[*overrides, f"model.vocab_size={TOK.vocab_size}"])
    save_checkpoint(tmp_path / "run", model, TOK, cfg, TrainState(step=1), None)
    loaded = load_for_inference(tmp_path / "run").model
    assert torch.equal(loaded.memory_stores()["hippocampus"].keys,
                       model.memory_stores()["hippocampus"].keys)


def test_stream_conditions_read_the_corpus_datastore_and_the_document() -> None:
    """``corpus`` reads the corpus datastore only and never adds to it; ``corpus+doc`` mixes it
    with the document's own, which learns as the stream is read."""
    from aura.eval.stream import evaluate_stream
    from aura.memory.knn_lm import KNNLM, KNNConfig, KNNMixture, new_datastore

    model = build(SNN_RAG)
    corpus = new_datastore(model.hidden_size, 64)
    torch.manual_seed(0)
    corpus.write(torch.randn(64, model.hidden_size), torch.randint(0, TOK.vocab_size, (64, 1))
                 .float())
    knn = KNNConfig(0.2, 0.05, 4, 12, 1.0)
    only = bench.stream_readout(model, "corpus", knn, 512, corpus)
    assert isinstance(only, KNNLM) and only.store is corpus and only.config.plain
    both = bench.stream_readout(model, "corpus+doc", knn, 512, corpus)
    assert isinstance(both, KNNMixture) and [p.config.lam for p in both.parts] == [0.2, 0.2]
    text = TEXT[:120]
    plain = evaluate_stream(model, TOK, text, memory="off")
    read = evaluate_stream(model, TOK, text, memory="off", readout=both)
    assert len(corpus) == 64 and len(both.parts[1].store) == len(text) - 1
    assert read.loss != pytest.approx(plain.loss, rel=1e-4)
    with pytest.raises(SystemExit, match="--corpus-knn"):
        bench.stream_readout(model, "corpus", knn, 512, None)
