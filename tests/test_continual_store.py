"""Sleep consolidation that replays the episodic store (``continual.sleep_source``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from aura.continual.episodes import BothSources, StoreEpisodes
from aura.continual.hook import STATE_JSON
from aura.continual.replay import ReplayBuffer, keyed_generator
from aura.data.sampler import compute_features
from aura.data.shards import PreparedData
from aura.errors import AuraError
from aura.memory.store import EpisodicStore
from aura.train.checkpoint import step_dir
from aura.train.trainer import Trainer
from conftest import assert_usage_error, make_docs, read_metrics, tiny_config, write_dir


@pytest.fixture(scope="module")
def domains(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from aura.data.prepare import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("store_domains")
    out = []
    for i in range(2):
        write_dir(root / f"c{i}", make_docs(4, seed=40 + i, words=(60, 120)))
        prepare(PrepareOptions([str(root / f"c{i}")], "byte", val_fraction=0.2),
                root / f"d{i}", progress=False)
        out.append(root / f"d{i}")
    return out


def test_store_episodes_are_the_training_windows_where_this_runs_memories_formed(
        domains: list[Path]) -> None:
    """Only memories formed after ``since`` with a position inside the split are replayed, each
    as the window whose last input token is the one that formed it, drawn by retention."""
    split = PreparedData.open(domains[0]).split("train")
    tokens = split.tokens().astype(np.int64)
    store = EpisodicStore(4, 4, capacity=16)
    old, new = torch.tensor([5, 6]), torch.tensor([3, 40, 41, len(tokens) + 100])
    store.write(torch.randn(2, 4), torch.randn(2, 4), step=1, source_pos=old)
    store.write(torch.randn(4, 4), torch.randn(4, 4), torch.tensor([1.0, 50.0, 0.0, 1.0]),
                step=2, source_pos=new)
    episodes = StoreEpisodes({"m": store}, split, 9, since={"m": 1})
    assert episodes.refresh() == 3  # the old two and the one past the split's end are not
    _, windows, weights = episodes.sample(400, keyed_generator(0))
    assert torch.equal(weights, torch.ones(400))
    ends = {int(p): torch.from_numpy(tokens[max(int(p) - 7, 0):][:9]) for p in (3, 40, 41)}
    counts = {p: sum(torch.equal(w, t) for w in windows) for p, t in ends.items()}
    assert sum(counts.values()) == 400
    assert counts[40] > counts[3] + counts[41]  # importance 50 dominates the retention
    # window of position 40: tokens 33..41, the token at 40 the last input
    assert torch.equal(ends[40], torch.from_numpy(tokens[33:42]))


def test_both_takes_half_of_each_batch_from_the_store(domains: list[Path]) -> None:
    split = PreparedData.open(domains[0]).split("train")
    store = EpisodicStore(4, 4, capacity=8)
    store.write(torch.randn(1, 4), torch.randn(1, 4), step=1, source_pos=torch.tensor([20]))
    episodes = StoreEpisodes({"m": store}, split, 9, since={"m": 0})
    episodes.refresh()
    buffer = ReplayBuffer(90, 9, "loss")
    buffer.offer(torch.full((3, 9), 7), keyed_generator(1))
    both = BothSources(episodes, buffer)
    idx, windows, _ = both.sample(5, keyed_generator(2))
    stored = torch.from_numpy(split.tokens()[13:22].astype(np.int64))
    assert all(torch.equal(w, stored) for w in windows[:3])
    assert bool((windows[3:] == 7).all()) and idx.numel() == 2
    both.update(idx, torch.tensor([0.0, 0.0, 0.0, 9.0, 9.0]))
    assert float(buffer.priority[idx].min()) >= 9.0


STORE = ("model.name=hippocampal", "model.block_size=16", "continual.sleep_source=store",
         "continual.sleep_interval=2", "continual.sleep_steps=2", "train.eval_interval=2",
         "train.checkpoint_interval=2", "model.memory_writes=8", "model.memory_capacity=64")


def test_a_sleep_phase_replays_the_store_and_skips_memories_of_the_run_it_came_from(
        domains: list[Path], tmp_path: Path) -> None:
    """No replay buffer at all: the sleep rows (their own phase) can only have drawn from the
    store. A run started --init-from another starts its store clock where that run's ended."""
    first = tmp_path / "first"
    Trainer(tiny_config(*STORE, "train.max_steps=2", "continual.sleep_interval=1"), domains[0],
            first, progress=False, log=lambda _m: None).run()
    rows = [r for r in read_metrics(first) if str(r.get("phase", "")).startswith("sleep")]
    assert [(r["step"], r["phase"]) for r in rows] == [(1, "sleep_store"), (2, "sleep_store")]
    assert all(r["sleep_episodes"] > 0 and r["sleep_loss"] > 0 for r in rows)
    info = json.loads((step_dir(first, 2) / STATE_JSON).read_text())
    assert info["store_since"] == {"hippocampus": 0}

    second = tmp_path / "second"
    trainer = Trainer(tiny_config(*STORE, "train.max_steps=1"), domains[1], second,
                      progress=False, log=lambda _m: None, init_from=first)
    carried = trainer.model.memory_stores()["hippocampus"]
    assert len(carried) > 0
    start = carried.step
    trainer.continual.begin_step()
    assert trainer.continual.store_since == {"hippocampus": start}
    assert not trainer.continual.sleep_due(2)  # every memory held is the first run's
    trainer.lock.release()


def test_a_model_without_a_store_says_so_in_one_line(domains: list[Path], tmp_path: Path,
                                                     run_cli: Any) -> None:
    with pytest.raises(AuraError, match="keeps no episodic store"):
        Trainer(tiny_config("continual.sleep_source=store", "continual.sleep_interval=2"),
                domains[0], tmp_path / "r", progress=False, log=lambda _m: None)
    assert_usage_error(run_cli("train", "--preset", "demo", "--data", domains[0], "--out",
                               tmp_path / "c", "--set", "continual.sleep_source=both",
                               "--set", "continual.replay_tokens=100",
                               "--set", "continual.sleep_interval=2"),
                       "keeps no episodic store")


# --- aura learn: salience chooses what the model's store keeps ---------------------------------


@pytest.mark.parametrize("name", ["gpt", "bdh", "hippocampal", "snn_rag", "natural_brain"])
def test_remembering_by_salience_is_a_forward_keyword(name: str) -> None:
    import inspect

    from aura.models import build_model

    model = build_model(tiny_config(f"model.name={name}", "model.vocab_size=256").model)
    params = inspect.signature(model.forward).parameters
    if model.remembers_by_salience:
        assert {"memory_salience", "remember", "corpus_pos"} <= set(params)
    assert model.remembers_by_salience == (name in ("hippocampal", "natural_brain", "snn_rag"))


@pytest.mark.parametrize("name", ["hippocampal", "natural_brain"])
def test_learn_writes_the_most_salient_tokens_through_the_models_own_key_projection(
        name: str) -> None:
    """Each window's two most salient tokens become memories: valued by the model's own memory
    layer state at that token, keyed by its own key projection of it, importance the salience,
    at the service-wide position; a later forward reads them. natural_brain's hippocampus sits
    behind the thalamus, so its state is the region's (normed, place- and time-coded) input."""
    from aura.data.tokenizers import ByteTokenizer
    from aura.learn.learner import LearnerConfig, PlasticLearner
    from aura.models import build_model

    slow = ["model.liquid_moe=false"] if name == "natural_brain" else []  # its experts' scatter
    cfg = tiny_config(f"model.name={name}", "model.vocab_size=256", "model.block_size=16",
                      "model.memory_capacity=256", *slow)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    memory = model.memory if name == "hippocampal" else model.hippocampus
    learner = PlasticLearner(ByteTokenizer(), model, cfg=LearnerConfig(memories_per_window=2))
    assert learner.notes == []
    seen: list[torch.Tensor] = []
    real = learner._memorize_through_model
    learner._memorize_through_model = lambda ids, sal: (seen.append(sal), real(ids, sal))[1]
    text = "The cat sat on the mat. A zebra! Quietly the xylophone played jazz for us all."
    first = learner.apply("hello there, warm up the counts", "k0")
    ids = learner.encode(text)
    stats = learner.apply(text, "k1")
    n0 = int(first["tokens"])
    assert stats["memories"] == 2 * ((ids.numel() + 15) // 16)
    store = model.memory_stores()["hippocampus"]
    sal = seen[-1]
    want = set()
    for off in range(0, ids.numel(), 16):
        want |= {n0 + off + int(i) for i in torch.topk(sal[off:off + 16], 2).indices}
    new = (store.ids >= 0) & (store.source_pos >= n0)
    assert set(store.source_pos[new].tolist()) == want
    states: list[torch.Tensor] = []
    hook = memory.register_forward_hook(lambda _m, a, _o: states.append(a[0][0]))
    with torch.no_grad():
        for off in range(0, ids.numel(), 16):
            x = ids[off:off + 16][None]
            out = model(x, **compute_features(learner.features, x))
    hook.remove()
    assert any(float(v) == len(store) for k, v in out.aux.items() if "memory_size" in k)
    for slot in new.nonzero().squeeze(1).tolist():
        p = int(store.source_pos[slot]) - n0
        state = states[p // 16][p % 16]
        torch.testing.assert_close(store.values[slot], state, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(store.keys[slot],
                                   memory.key(state),
                                   rtol=1e-4, atol=1e-5)
        assert float(store.importance[slot]) == pytest.approx(float(sal[p]), rel=1e-5)


def test_learns_gradient_steps_write_no_memories_of_their_own() -> None:
    """With --train-steps, a model told what to remember keeps only what salience chose: its
    training forwards (random windows at no service position) write nothing."""
    from aura.data.tokenizers import ByteTokenizer
    from aura.learn.learner import LearnerConfig, PlasticLearner
    from aura.models import build_model

    cfg = tiny_config("model.name=hippocampal", "model.vocab_size=256", "model.block_size=16",
                      "model.memory_capacity=256")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    learner = PlasticLearner(ByteTokenizer(), model,
                             cfg=LearnerConfig(memories_per_window=2, train_steps=2))
    text = "The cat sat on the mat. A zebra! Quietly the xylophone played jazz."
    stats = learner.apply(text, "k")
    n = learner.encode(text).numel()
    assert "train_loss" in stats
    assert stats["memories"] == 2 * -(-n // 16)
    store = model.memory_stores()["hippocampus"]
    assert store.next_id == 2 * -(-n // 16)
    assert int(store.source_pos[store.ids >= 0].max()) < n


def test_a_chunk_bank_keeps_the_chunks_holding_a_salient_token() -> None:
    """Given salience, snn_rag's memory layer queues only the chunks with a token of positive
    salience, each with its largest salience as importance."""
    from aura.memory.writer import MemoryWriter
    from aura.nn.memory_attention import MemoryCrossAttention

    writer = MemoryWriter(EpisodicStore(8, 8, 16, 0.0))
    layer = MemoryCrossAttention(8, 2, writer, top_k=2, chunk=4)
    h = torch.randn(1, 12, 8)
    salience = torch.zeros(1, 12)
    salience[0, 1], salience[0, 2], salience[0, 11] = 0.5, 2.0, 0.25
    layer.remember(h, torch.arange(12)[None] + 100, salience=salience)
    assert writer.flush() == 2
    store = writer.store
    live = store.ids >= 0
    assert sorted(store.source_pos[live].tolist()) == [103, 111]
    assert sorted(store.importance[live].tolist()) == [0.25, 2.0]
    torch.testing.assert_close(store.keys[live][store.source_pos[live] == 103][0],
                               h[0, :4].mean(0))


def test_learn_gives_snn_rag_every_chunk_with_its_salience_as_importance() -> None:
    """snn_rag keeps every chunk of what it learns (a retrieval corpus), importance the most
    salient token's salience in it, at service positions; a later forward reads them."""
    from aura.data.tokenizers import ByteTokenizer
    from aura.learn.learner import LearnerConfig, PlasticLearner
    from aura.models import build_model

    cfg = tiny_config("model.name=snn_rag", "model.vocab_size=256", "model.block_size=16",
                      "model.memory_capacity=256", "model.memory_chunk=4")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    learner = PlasticLearner(ByteTokenizer(), model, cfg=LearnerConfig(memories_per_window=2))
    assert learner.salience_writer and learner.notes == []
    seen: list[torch.Tensor] = []
    real = learner._memorize_through_model
    learner._memorize_through_model = lambda ids, sal: (seen.append(sal), real(ids, sal))[1]
    n0 = int(learner.apply("hello there, warm up the counts", "k0")["tokens"])
    ids = learner.encode("The cat sat on the mat. A zebra! Quietly the xylophone played jazz.")
    stats = learner.apply("The cat sat on the mat. A zebra! Quietly the xylophone played jazz.",
                          "k1")
    assert stats["memories"] == ids.numel() // 16 * 4 + ids.numel() % 16 // 4
    (store,) = model.memory_stores().values()
    new = (store.ids >= 0) & (store.source_pos >= n0)
    sal = seen[-1]
    for slot in new.nonzero().squeeze(1).tolist():
        end = int(store.source_pos[slot]) - n0
        assert end % 4 == 3
        assert float(store.importance[slot]) == pytest.approx(
            float(sal[end - 3:end + 1].max()), rel=1e-5)
    with torch.no_grad():
        out = model(ids[:16][None], corpus_pos=torch.tensor([n0 + 16]))
    assert float(out.aux["mem_hit_rate"]) > 0


def test_resume_right_after_a_store_sleep_is_bit_identical(domains: list[Path],
                                                           tmp_path: Path) -> None:
    """Stopped after the step-2 checkpoint (right after a store sleep phase) and resumed, a run
    ends exactly where the uninterrupted one did: episodes are drawn by keyed generators from
    the restored store, from the clock the checkpoint recorded."""
    import shutil

    from aura.train.checkpoint import list_checkpoints
    from conftest import losses

    cfg = (*STORE, "train.max_steps=4", "model.dropout=0.1")
    full = tmp_path / "full"
    Trainer(tiny_config(*cfg), domains[0], full, progress=False, log=lambda _m: None).run()
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for ckpt in list_checkpoints(part):
        if ckpt.name != "step-00000002":
            shutil.rmtree(ckpt)
    (part / "best.json").unlink(missing_ok=True)
    Trainer(tiny_config(*cfg), domains[0], part, progress=False, log=lambda _m: None,
            resume=True).run()
    assert losses(full) == losses(part)
    sleeps = [r for r in read_metrics(part) if r.get("phase") == "sleep_store"]
    assert [r["step"] for r in sleeps][-1] == 4
    a, b = step_dir(full, 4), step_dir(part, 4)
    for name in ("model.safetensors", STATE_JSON):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_the_memory_check_counts_the_fisher_the_buffer_and_a_sleep_teacher() -> None:
    from aura.train.resources import estimate_training_memory

    base = ("model.vocab_size=256", "model.block_size=16")
    plain = estimate_training_memory(tiny_config(*base))
    full = estimate_training_memory(tiny_config(
        *base, "continual.ewc=true", "continual.replay_tokens=1700",
        "continual.sleep_interval=5", "continual.sleep_distill=1"))
    weights = plain.param_bytes
    assert plain.continual_bytes == 0
    assert full.continual_bytes == 3 * plain.grad_bytes + 100 * 17 * 8 + 100 * 8 + weights \
        + plain.buffer_bytes
    assert full.total - plain.total == full.continual_bytes


@pytest.mark.parametrize("name", ["hippocampal", "natural_brain"])
def test_a_sleep_phase_forms_no_memories(name: str, domains: list[Path], tmp_path: Path) -> None:
    """Replayed windows have no corpus position: nothing a sleep forward queues is written,
    whether the model can be told not to remember (hippocampal) or not (natural_brain)."""
    trainer = Trainer(tiny_config(*STORE, f"model.name={name}", "train.max_steps=2"),
                      domains[0], tmp_path / "r", progress=False, log=lambda _m: None)
    trainer.continual.begin_step()
    trainer._step(0)
    trainer.continual.commit()
    store = trainer.model.memory_stores()["hippocampus"]
    written = store.next_id
    assert written > 0
    row = trainer.continual.sleep(1, 1e-3, None, {})
    assert row["phase"] == "sleep_store" and row["sleep_loss"] > 0
    assert trainer.model.memory_stores()["hippocampus"].next_id == written
    trainer.lock.release()
