"""`snn_rag` and its memory layer: causality with a populated bank and pending writes, the gate,
gradients, cached generation, checkpointed banks, `aura memory build`, training on the engine."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from aura.config import load_config
from aura.errors import ConfigError
from aura.infer.generate import generate
from aura.infer.sampling import SamplingConfig
from aura.memory.store import EpisodicStore
from aura.models import build_model, model_names
from aura.models.snn_rag import SNNRAG, SNNRAGConfig
from aura.nn.memory_attention import MemoryCrossAttention
from aura.train.checkpoint import load_for_inference
from aura.train.trainer import Trainer
from conftest import (
    assert_causal,
    assert_usage_error,
    losses,
    read_metrics,
    requires_extra,
    tiny_config,
)

V, BLOCK, C, CHUNK = 40, 32, 32, 8
SMALL = ["model.name=snn_rag", f"model.vocab_size={V}", "model.n_layer=2", "model.n_head=2",
         f"model.n_embd={C}", f"model.block_size={BLOCK}", "model.memory_layers=[1]",
         "model.memory_capacity=64", f"model.memory_chunk={CHUNK}", "model.memory_top_k=3"]
TRAIN = ["model.name=snn_rag", "model.memory_layers=[1]", "model.memory_capacity=64",
         f"model.memory_chunk={CHUNK}", "train.checkpoint_interval=1000",
         "train.eval_interval=1000"]


def small(*extra: str) -> SNNRAG:
    torch.manual_seed(0)
    model = build_model(load_config(overrides=[*SMALL, *extra]).model)
    assert isinstance(model, SNNRAG)
    return model


def tokens(batch: int, length: int = BLOCK, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def populated(*extra: str, batches: int = 3) -> SNNRAG:
    """A model whose bank holds the chunks of a few training forwards (then in eval mode)."""
    model = small(*extra).train()
    for i in range(batches):
        model(tokens(4, seed=100 + i))
    model.flush_memory()
    assert len(bank(model)) == 4 * (BLOCK // CHUNK) * batches
    return model.eval()


def bank(model: SNNRAG) -> EpisodicStore:
    (store,) = model.memory_stores().values()
    return store


def memory_layer(model: SNNRAG) -> MemoryCrossAttention:
    (layer,) = (b.memory for b in model.blocks if b.memory is not None)
    return layer


# --- config ---------------------------------------------------------------------------------


def test_registered_with_its_own_config_and_presets() -> None:
    assert "snn_rag" in model_names()
    cfg = load_config(overrides=["model.name=snn_rag"]).model
    assert isinstance(cfg, SNNRAGConfig) and cfg.ffn == "snn"
    with pytest.raises(ConfigError, match="memory_layers"):
        load_config(overrides=[*SMALL, "model.memory_layers=[2]"])
    with pytest.raises(ConfigError, match="memory_chunk"):
        load_config(overrides=[*SMALL, "model.memory_chunk=0"])
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.memory_top_k'"):
        load_config(overrides=["model.memory_top_k=2"])  # a gpt has no memory
    cpu = load_config(preset="snn-rag-cpu", overrides=["model.vocab_size=84"])
    model = build_model(cpu.model)
    assert isinstance(model, SNNRAG) and model.memory_layers == [2]
    big = load_config(preset="snn-rag").model
    assert (big.n_layer, big.n_head, big.n_embd, big.block_size) == (12, 16, 768, 512)
    assert small("model.memory_layers=[-1, 1, 0]").memory_layers == [0, 1]


# --- the memory layer -----------------------------------------------------------------------


def test_gate_starts_nearly_closed_and_scales_each_token() -> None:
    model = populated()
    layer = memory_layer(model)
    h = torch.randn(2, 5, C)
    out = layer(h)
    assert out.shape == h.shape
    assert layer.metrics()["gate"].item() == pytest.approx(1 / (1 + math.exp(3)), rel=1e-4)
    with torch.no_grad():
        layer.gate.weight.normal_(0, 1.0)
        gate_a = torch.sigmoid(layer.gate(h))  # (2, 5, 1): differs per token
        out_a = layer(h)
        layer.gate.bias += 1.0
        gate_b = torch.sigmoid(layer.gate(h))
        out_b = layer(h)
    assert gate_a.shape == (2, 5, 1) and gate_a.std() > 0.05
    ratio = out_b / out_a  # the same read-out, rescaled per token, alike on every channel
    torch.testing.assert_close(ratio, (gate_b / gate_a).expand_as(ratio), rtol=1e-4, atol=1e-4)


def test_empty_bank_reads_exactly_nothing() -> None:
    layer = memory_layer(small())
    h = torch.randn(2, 6, C, requires_grad=True)
    out = layer(h)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()
    assert layer.metrics()["hit_rate"].item() == 0.0


def test_gradients_reach_the_query_projection_not_the_bank() -> None:
    model = populated()
    layer = memory_layer(model)
    store = bank(model)
    before = store.values.clone()
    layer(torch.randn(2, 6, C)).pow(2).sum().backward()
    for p in (layer.retrieve.weight, layer.q.weight, layer.kv.weight, layer.score_weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert not store.values.requires_grad and torch.equal(store.values, before)


def test_a_faiss_bank_reads_what_the_exact_one_reads() -> None:
    requires_extra("faiss", "memory")
    exact, faiss = populated(), populated("model.memory_index=faiss")
    assert type(bank(faiss).index).__name__ == "FaissIndex"
    x = tokens(2, seed=12)
    torch.testing.assert_close(faiss(x).logits, exact(x).logits)
    memory_layer(faiss)(torch.randn(2, 6, C)).pow(2).sum().backward()
    assert memory_layer(faiss).retrieve.weight.grad.abs().sum() > 0  # FAISS scores are rescored


def test_flush_drops_non_finite_encodings() -> None:
    layer = memory_layer(small())
    h = torch.randn(2, 2 * CHUNK, C)
    h[0, 0, 0] = float("nan")  # poisons the first chunk of row 0 only
    layer.remember(h)
    assert layer.writer.flush() == 3
    store = layer.writer.store
    assert len(store) == 3 and torch.isfinite(store.values).all()
    assert layer.writer.flush() == 0  # nothing queued twice


def test_energy_counts_every_product_of_the_read() -> None:
    """aura.eval.energy sees the exact search, the projections and the attention over top-k."""
    from aura.eval.energy import count_energy

    model = populated()
    B, k = 2, 3
    valid = model.blocks[1].memory.writer.store.index.valid
    used = int(valid.nonzero()[-1]) + 1  # the search scores the bank's occupied prefix only
    assert used < valid.numel()  # (so this counts what a search of a filling bank costs)
    report = count_energy(model, tokens(B))
    ops = {(r.name, r.kind): r.ops for r in report.layers if ".memory" in r.name}
    n = B * BLOCK
    assert ops[("blocks.1.memory.retrieve", "linear")] == n * C * C
    assert ops[("blocks.1.memory.kv", "linear")] == n * k * C * 2 * C
    assert ops[("blocks.1.memory", "matmul")] == n * used * C + 2 * n * k * C  # search; attention
    assert all(not r.spike_input for r in report.layers if ".memory" in r.name)


# --- causality ------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0, CHUNK - 1, CHUNK, BLOCK - 2])
def test_causal_with_a_populated_bank(t: int) -> None:
    a, b = assert_causal(populated(), tokens(2), t, V)
    assert not torch.allclose(a[:, t + 1], b[:, t + 1], atol=1e-4)


@pytest.mark.parametrize("t", [CHUNK - 2, CHUNK + 3])
def test_training_forward_never_reads_its_own_chunks(t: int) -> None:
    """In training mode a batch queues its chunks and reads only earlier batches' entries, so
    changing token t+1 leaves logits <= t alone even though both versions get written."""
    model = populated().train()
    x = tokens(2, seed=7)
    changed = x.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % V
    one, two = copy.deepcopy(model), copy.deepcopy(model)
    a, b = one(x).logits, two(changed).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-6, rtol=1e-5)
    queued_a, queued_b = memory_layer(one).writer.queued, memory_layer(two).writer.queued
    assert queued_a is not None and queued_b is not None
    chunk = (t + 1) // CHUNK  # the queued entries differ from the chunk holding t+1 on
    assert torch.equal(queued_a[:, :chunk], queued_b[:, :chunk])
    assert not torch.allclose(queued_a[:, chunk], queued_b[:, chunk])


@pytest.mark.parametrize("t", [0, 5, BLOCK - 1])
def test_corpus_positions_hide_entries_from_later_text(t: int) -> None:
    """With ``corpus_pos`` token t reads only entries whose source_pos <= corpus_pos + t: its
    logits equal those of a bank holding just those entries, and differ from reading them all."""
    model = small().eval()
    g = torch.Generator().manual_seed(4)
    keys = torch.randn(48, C, generator=g)
    source = torch.arange(48) * 4 + 60  # 60 .. 248: before, inside and after the window
    bank(model).write(keys, keys, source_pos=source)
    x, where = tokens(1, seed=12), torch.tensor([100])
    got = model(x, corpus_pos=where).logits[:, t]
    visible = source <= 100 + t
    only = small().eval()
    only.load_state_dict(model.state_dict())
    bank(only).write(keys[visible], keys[visible], source_pos=source[visible])
    torch.testing.assert_close(got, only(x).logits[:, t])
    assert not torch.allclose(got, model(x).logits[:, t], atol=1e-6)  # the filter mattered


def test_a_batch_reads_its_chunks_only_from_the_next_forward_on() -> None:
    fresh = small().train()  # empty bank
    x = tokens(2, seed=9)
    first = copy.deepcopy(fresh)(x).logits
    torch.testing.assert_close(first, copy.deepcopy(fresh)(x, use_memory=False).logits)
    store = memory_layer(fresh).writer.store
    fresh(x)
    assert len(store) == 0  # queued, not written
    second = fresh(x).logits  # writes the first call's chunks, then reads them
    assert len(store) == 2 * (BLOCK // CHUNK)
    assert not torch.allclose(first, second, atol=1e-6)


def test_grad_checkpointing_queues_once_and_gives_the_same_gradients() -> None:
    x, y = tokens(2, seed=5), tokens(2, seed=6)
    grads = []
    for flag in (False, True):
        model = populated().train()
        model.grad_checkpoint = flag
        model(x, y).loss.backward()
        queued = memory_layer(model).writer.queued
        assert queued is not None and queued.shape == (2, BLOCK // CHUNK, C)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert model.flush_memory() is None and len(bank(model)) == 4 * 4 * 3 + 2 * 4
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


# --- use_memory -----------------------------------------------------------------------------


def test_use_memory_false_removes_the_retrieval() -> None:
    model = populated()
    with torch.no_grad():
        memory_layer(model).gate.bias.fill_(2.0)  # an open gate, so reading matters
    x = tokens(2, seed=3)
    read, skipped = model(x).logits, model(x, use_memory=False).logits
    assert not torch.allclose(read, skipped, atol=1e-4)
    assert "mem_gate" in model(x).aux and "mem_gate" not in model(x, use_memory=False).aux
    bank(model).clear()
    torch.testing.assert_close(model(x).logits, skipped)  # an empty bank reads nothing either


# --- generation -----------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 3, 3], [12]])
def test_cached_decoding_matches_the_full_forward(chunks: list[int]) -> None:
    model = populated()
    x = tokens(2, sum(chunks))
    full = model(x).logits
    cache = model.new_cache(batch_size=2, max_len=BLOCK)
    pieces, start = [], 0
    for n in chunks:
        pieces.append(model(x[:, start:start + n], cache=cache).logits)
        start += n
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_generation_with_and_without_cache_agree_and_never_write() -> None:
    model = populated()
    before = len(bank(model))
    prompt = tokens(2, 5, seed=4)
    sampling = SamplingConfig(temperature=0.9, top_k=10, top_p=0.9, repetition_penalty=1.3,
                              seed=7)
    cached = generate(model, prompt, BLOCK - 5, sampling)
    uncached = generate(model, prompt, BLOCK - 5, sampling, use_cache=False)
    assert torch.equal(cached, uncached)
    assert len(bank(model)) == before


# --- checkpoints and the engine -------------------------------------------------------------


def test_trains_on_the_engine_and_the_checkpoint_restores_the_bank(train_data: Path,
                                                                   tmp_path: Path) -> None:
    cfg = tiny_config(*TRAIN, "train.max_steps=25", "train.lr=3e-3")
    trainer = Trainer(cfg, train_data, tmp_path / "run", progress=False)
    trainer.run()
    curve = losses(tmp_path / "run")
    assert curve[25] < curve[1] - 0.5
    row = next(r for r in read_metrics(tmp_path / "run") if r["step"] == 25 and "loss" in r)
    assert row["aux/mem_fill"] == 1.0 and 0 < row["aux/mem_gate"] < 1
    assert all(0 <= row[f"aux/firing_rate_{i}"] <= 1 for i in range(2))  # logged per layer
    trained = trainer.model
    assert isinstance(trained, SNNRAG)
    pos = bank(trained).source_pos[bank(trained).ids >= 0]  # the trainer passed corpus_pos
    assert pos.min() >= CHUNK - 1 and pos.max() > 1000  # train-split offsets, not steps
    loaded = load_for_inference(tmp_path / "run")
    assert isinstance(loaded.model, SNNRAG)
    ours, theirs = bank(trained), bank(loaded.model)
    assert len(theirs) == 64
    for name in ("ids", "keys", "values", "importance", "strength", "source_pos"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    x = tokens(2, seed=11) % trained.config.vocab_size
    trained.eval()
    torch.testing.assert_close(loaded.model(x).logits, trained(x).logits)


def test_memory_build_refills_the_checkpoint(train_data: Path, tmp_path: Path,
                                             run_cli) -> None:
    run = tmp_path / "run"
    Trainer(tiny_config(*TRAIN, "train.max_steps=2"), train_data, run, progress=False).run()
    res = run_cli("memory", "build", run, "--data", train_data, "--max-chunks", "20", "--json")
    assert res.code == 0, res.err
    assert res.json()["entries"] == 20 and res.json()["banks"] == ["layer1"]
    store = bank(load_for_inference(run).model)  # verifies every sha256, the new bank's too
    assert len(store) == 20
    pos = store.source_pos[store.ids >= 0]
    assert torch.all(pos % CHUNK == CHUNK - 1)  # each chunk's last token's corpus offset
    windows = (pos // BLOCK).unique()
    assert len(windows) == 5 and windows.max() > 10  # spread over the split, not its start


def test_memory_build_needs_a_model_with_a_bank(train_data: Path, tmp_path: Path,
                                                run_cli) -> None:
    run = tmp_path / "gpt"
    Trainer(tiny_config("train.max_steps=1"), train_data, run, progress=False).run()
    res = run_cli("memory", "build", run, "--data", train_data)
    assert_usage_error(res, "no memory to build")


def test_resumed_run_is_bit_identical_bank_included(train_data: Path, tmp_path: Path) -> None:
    """The checkpoint holds the bank with the last batch's queued chunks applied, and
    evaluation reads leave the bank untouched (the first half ends with an extra evaluation),
    so resuming reads exactly the bank the uninterrupted run reads."""
    common = (*TRAIN, "train.schedule=constant", "train.eval_interval=3",
              "train.checkpoint_interval=3")
    Trainer(tiny_config(*common, "train.max_steps=8"), train_data, tmp_path / "a",
            progress=False).run()
    Trainer(tiny_config(*common, "train.max_steps=4"), train_data, tmp_path / "b",
            progress=False).run()
    Trainer(tiny_config(*common, "train.max_steps=8"), train_data, tmp_path / "b",
            resume=True, progress=False).run()
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 9)) and a == b
    va, vb = losses(tmp_path / "a", "val_loss"), losses(tmp_path / "b", "val_loss")
    assert sorted(va) == [3, 6, 8] and va == {s: vb[s] for s in va}  # b also evaluated step 4
