"""The hippocampal model: causality through memory, switchable parts, caches, precision, saving."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from aura.config import load_config
from aura.data.prosody import N_FEATURES, Prosody
from aura.data.tokenizers import CharTokenizer
from aura.errors import ConfigError
from aura.infer.generate import generate
from aura.infer.sampling import SamplingConfig
from aura.memory.store import EpisodicStore
from aura.memory.writer import MemoryWriter
from aura.models import build_model
from aura.models.hippocampal import COMPONENTS, HippocampalTransformer
from aura.nn.hippocampus import HippocampalMemory
from aura.nn.prosody_modulation import ProsodyModulation
from aura.train.checkpoint import load_for_inference
from aura.train.trainer import Trainer
from conftest import TINY_TRAIN, assert_causal, losses, read_metrics, tiny_config

TEXT = ("First Citizen: We are accounted poor citizens, the patricians good! What authority "
        "surfeits on would relieve us?\n\nSecond Citizen: Would you proceed especially against "
        "Caius Marcius? He's a very dog to the commonalty. I love him not.\n")
TOK = CharTokenizer.from_texts([TEXT])
PROSODY = Prosody.from_tokenizer(TOK)
SMALL = ("model.name=hippocampal", *TINY_TRAIN, "model.n_place_cells=200",
         "model.memory_capacity=64", "model.memory_dim=16", "model.memory_writes=16",
         "model.grid_modules=2", "model.grid_cells_per_module=4", "model.n_time_cells=8")


def small(*overrides: str, vocab: int = TOK.vocab_size) -> HippocampalTransformer:
    torch.manual_seed(0)
    cfg = load_config(preset="demo", overrides=[*SMALL, f"model.vocab_size={vocab}", *overrides])
    model = build_model(cfg.model)
    assert isinstance(model, HippocampalTransformer)
    return model


def prosody_of(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(PROSODY(x.numpy()))


class WithProsody(torch.nn.Module):
    """The model fed prosody computed from its ids, as the data pipeline does."""

    def __init__(self, model: HippocampalTransformer):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, **kw: object):  # type: ignore[no-untyped-def]
        return self.model(x, prosody=prosody_of(x), **kw)


def ids(n: int = 32, batch: int = 2, seed: int = 0) -> torch.Tensor:
    enc = torch.from_numpy(TOK.encode(TEXT).astype(np.int64))
    starts = torch.randint(0, len(enc) - n, (batch,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([enc[s:s + n] for s in starts.tolist()])


def fill_memory(model: HippocampalTransformer, steps: int = 4) -> None:
    """A few training forwards: each one's memories are committed by the next."""
    model.train()
    for step in range(steps):
        x = ids(seed=step + 10)
        model(x, x, prosody=prosody_of(x))
    model.eval()


def test_memory_is_filled_and_read() -> None:
    model = small()
    fill_memory(model)
    assert model.memory is not None and len(model.memory.store) == 3 * 16
    queued = model.writers["hippocampus"].queued  # the last forward's, for the next one
    assert queued is not None and queued.shape[0] == 16
    out = model(ids(), ids(), prosody=prosody_of(ids()))
    assert out.aux["memory_size"] == 64 and 0 < out.aux["memory_gate"] < 1
    assert 0 < out.aux["memory_match"] <= 1
    importance = model.memory.store.importance.clone()
    model(ids(), ids(), prosody=prosody_of(ids()))
    assert torch.equal(model.memory.store.importance, importance)  # eval reads touch nothing
    assert len(model.memory.store) == 64  # and write nothing


@pytest.mark.parametrize("t", [0, 9, 30])
def test_causal_with_a_populated_memory(t: int) -> None:
    model = small()
    fill_memory(model)
    assert_causal(WithProsody(model), ids(), t, TOK.vocab_size)


def test_training_forward_never_reads_its_own_batch() -> None:
    """Rows x and x-changed-at-t+1 in one training batch: reads happen before any write, so the
    logits up to t agree, and the batch's memories wait for the next forward."""
    model = small("model.dropout=0.0")
    fill_memory(model)
    model.train()
    x = ids(batch=1)
    changed = x.clone()
    changed[0, 20] = (changed[0, 20] + 1) % TOK.vocab_size
    both = torch.cat([x, changed])
    before = len(model.memory.store)
    logits = model(both, both, prosody=prosody_of(both)).logits
    torch.testing.assert_close(logits[0, :20], logits[1, :20])
    # the previous step's 16 memories were committed first; this batch's wait for the next step
    assert len(model.memory.store) == before + 16


def test_place_cells_fire_at_their_target_fraction() -> None:
    model = small("model.n_place_cells=1000")
    model(ids(), prosody=prosody_of(ids()))
    assert model.place is not None
    assert float(model.place.metrics()["place_active"]) == pytest.approx(0.03, abs=1e-3)


@pytest.mark.parametrize("component", COMPONENTS)
def test_switching_a_component_off_removes_its_parameters(component: str) -> None:
    full, ablated = small(), small(f"model.{component}=false")
    if component == "theta_gamma":  # replaced by gpt's learned positions, not removed
        assert ablated.wpe is not None and full.wpe is None
    else:
        assert ablated.num_params() < full.num_params()
    kinds = {"place_cells": "place", "grid_cells": "grid", "time_cells": "time",
             "prosody": "prosody", "memory": "memory", "theta_gamma": "theta_gamma"}
    assert getattr(ablated, kinds[component]) is None
    assert getattr(full, kinds[component]) is not None
    if component == "memory":
        assert ablated.memory_stores() == {}
    x = ids()
    out = ablated(x, x, prosody=prosody_of(x))
    assert torch.isfinite(out.loss)


def test_without_prosody_and_time_cells_no_features_are_needed() -> None:
    model = small("model.prosody=false", "model.time_cells=false")
    assert model.token_features == ()
    assert torch.isfinite(model(ids(), ids()).loss)
    with pytest.raises(ValueError, match="needs prosody"):
        small()(ids())


def test_real_prosody_reaches_the_attention() -> None:
    """Modulation starts at identity (W = 0), so its first gradient is the prosody itself: real
    prosody gives every head a signal; all-zero prosody gives none."""
    x = ids()
    for prosody, expect_signal in ((prosody_of(x), True), (torch.zeros(2, 32, N_FEATURES), False)):
        model = small("model.memory=false")
        model(x, x, prosody=prosody).loss.backward()
        assert model.prosody is not None
        grads = torch.stack([m.proj.weight.grad.abs().sum() for m in model.prosody])
        assert bool((grads > 0).all()) == expect_signal
    with torch.no_grad():
        for m in model.prosody:
            m.proj.weight.normal_(0, 1.0)
    shifted = prosody_of(x)
    shifted[..., 6] = -shifted[..., 6]  # flip the valence channel only
    assert not torch.allclose(model(x, prosody=prosody_of(x)).logits,
                              model(x, prosody=shifted).logits)


def test_modulation_gains_are_bounded_and_start_at_one() -> None:
    mod = ProsodyModulation(N_FEATURES, 4, max_log_gain=1.0)
    q, k = mod(torch.rand(2, 5, N_FEATURES))
    assert q.shape == k.shape == (2, 4, 5, 1) and torch.equal(q, torch.ones_like(q))
    with torch.no_grad():
        mod.proj.weight.fill_(100.0)
    q, _ = mod(torch.ones(1, 3, N_FEATURES))
    assert float(q.detach().max()) <= np.e + 1e-5


@pytest.mark.parametrize("use_cache", [True, False])
def test_cached_generation_equals_uncached(use_cache: bool) -> None:
    model = small()
    fill_memory(model)
    prompt = ids(n=10, batch=2, seed=3)
    greedy = SamplingConfig(temperature=0.0)
    feats = {"prosody": PROSODY}
    reference = generate(model, prompt, 30, greedy, use_cache=False, features=feats)
    got = generate(model, prompt, 30, greedy, use_cache=use_cache, features=feats)
    assert torch.equal(got, reference) and got.shape == (2, 40)


def test_generate_without_features_says_what_is_missing() -> None:
    with pytest.raises(Exception, match="token features"):
        generate(small(), ids(n=4), 2, SamplingConfig(temperature=0.0))


def test_checkpointing_and_bf16_give_the_same_loss() -> None:
    model = small("model.dropout=0.0")
    fill_memory(model)
    model.train()
    x = ids(seed=5)
    p = prosody_of(x)
    twin = copy.deepcopy(model)
    twin.grad_checkpoint = True
    a, b = model(x, x, prosody=p), twin(x, x, prosody=p)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(a.loss, b.loss)
    for (name, pa), pb in zip(model.named_parameters(), twin.parameters(), strict=True):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5, rtol=1e-3, msg=name)
    half = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = half(x, x, prosody=p)
    assert abs(c.loss.item() - a.loss.item()) < 0.02


def test_entropy_regularisation_lowers_the_loss_by_the_entropy() -> None:
    x = ids()
    plain = small("model.memory=false")
    reg = small("model.memory=false", "model.entropy_reg=0.1")
    a, b = plain(x, x, prosody=prosody_of(x)), reg(x, x, prosody=prosody_of(x))
    torch.testing.assert_close(a.aux["ce"], b.aux["ce"])
    torch.testing.assert_close(b.loss, b.aux["ce"] - 0.1 * b.aux["entropy"])
    p = torch.softmax(b.logits.float(), -1)
    torch.testing.assert_close(b.aux["entropy"], -(p * p.log()).sum(-1).mean())
    p = torch.softmax(a.logits[:, ::16].float(), -1)  # without the loss term: a sampled metric
    torch.testing.assert_close(a.aux["entropy"], -(p * p.log()).sum(-1).mean())


@pytest.mark.parametrize("override, match", [
    ("model.memory_layer=5", "memory_layer"),
    ("model.memory_capacity=32", "exceeds"),
    ("model.place_active_fraction=0", "place_active_fraction"),
    ("model.memory_decay=1.0", "memory_decay"),
    ("model.mlp_multiplier=4", "unknown config key"),
])
def test_bad_hippocampal_config_is_one_line(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        tiny_config(*SMALL[:1], override)


def test_memory_module_rejects_more_writes_than_room() -> None:
    writer = MemoryWriter(EpisodicStore(8, 16, capacity=8))
    with pytest.raises(ValueError, match="exceeds capacity"):
        HippocampalMemory(16, writer, writes_per_step=9)
    with pytest.raises(ValueError, match="16-d states"):
        HippocampalMemory(16, MemoryWriter(EpisodicStore(8, 12, capacity=8)))


def test_trains_and_round_trips_its_memory_through_a_checkpoint(
        train_data: Path, tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    cfg = tiny_config(*SMALL[:1], *SMALL[len(TINY_TRAIN) + 1:], "train.max_steps=6",
                      "train.eval_interval=3", "train.checkpoint_interval=3",
                      "train.memory_warmup_steps=2")
    Trainer(cfg, train_data, tmp_path / "run", progress=False).run()
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert rows[-1]["step"] == 6
    assert "aux/place_active" in rows[-1] and "aux/memory_size" in rows[-1]
    assert "aux/memory_size" not in rows[0]  # memory off during its warmup
    loaded = load_for_inference(tmp_path / "run")
    model = loaded.model
    assert isinstance(model, HippocampalTransformer) and model.memory is not None
    assert len(model.memory.store) > 0
    ckpt = loaded.path
    assert (ckpt / "memory" / "hippocampus" / "memory.json").is_file()
    evaluated = run_cli("eval", tmp_path / "run", "--data", train_data, "--json")
    assert evaluated.code == 0 and "place_active" in evaluated.out
    generated = run_cli("generate", tmp_path / "run", "--prompt", "Document", "--max-new-tokens",
                        "12", "--seed", "1")
    assert generated.code == 0 and len(generated.out) > 0


def test_resumed_run_continues_with_the_same_memories(train_data: Path, tmp_path: Path) -> None:
    """Stop at step 4, resume to 8: losses equal the uninterrupted run's, because the checkpoint
    holds every memory (including the last step's queued ones) and the store's clock."""
    common = (*SMALL[:1], *SMALL[len(TINY_TRAIN) + 1:], "train.schedule=constant",
              "train.eval_interval=4", "train.checkpoint_interval=4")
    Trainer(tiny_config(*common, "train.max_steps=8"), train_data, tmp_path / "a",
            progress=False).run()
    Trainer(tiny_config(*common, "train.max_steps=4"), train_data, tmp_path / "b",
            progress=False).run()
    Trainer(tiny_config(*common, "train.max_steps=8"), train_data, tmp_path / "b", resume=True,
            progress=False, log=lambda _m: None).run()
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == list(range(1, 9)) and a == b
    assert losses(tmp_path / "a", "aux/memory_match") == losses(tmp_path / "b", "aux/memory_match")


@pytest.mark.parametrize("graph_k", [0, 4])
def test_corpus_positions_hide_memories_formed_after_each_token(graph_k: int) -> None:
    """With ``corpus_pos`` token t never reads a memory formed after its position, directly or
    through the cognitive map: changing those memories' values leaves its logits alone, while
    changing the earlier ones does not."""
    model = small(f"model.memory_graph_k={graph_k}")
    store = model.memory.store
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(40, store.dim_key, generator=g)
    values = torch.randn(40, store.dim_value, generator=g)
    store.write(keys, values, source_pos=torch.arange(40) * 2 + 90)  # 90 .. 168
    model.eval()
    x, where, t = ids(), torch.tensor([100, 100]), 12
    base = model(x, prosody=prosody_of(x), corpus_pos=where).logits[:, t]
    for later in (True, False):
        other = copy.deepcopy(model)
        s = other.memory.store
        rows = (s.source_pos > 100 + t) if later else (s.source_pos <= 100 + t) & (s.ids >= 0)
        s.values[rows] = torch.randn(int(rows.sum()), s.dim_value, generator=g) * 5
        got = other(x, prosody=prosody_of(x), corpus_pos=where).logits[:, t]
        if later:
            torch.testing.assert_close(got, base)
        else:
            assert not torch.allclose(got, base, atol=1e-5)


def test_spiking_feed_forwards_drop_in_and_report_their_firing_rates() -> None:
    model = small("model.ffn=snn").train()
    x = ids()
    out = model(x, x, prosody=prosody_of(x))
    out.loss.backward()
    rates = [out.aux[f"firing_rate_{i}"] for i in range(len(model.blocks))]
    assert all(0 <= float(r) <= 1 for r in rates) and "firing_rate" in out.aux
    assert model.blocks[0].mlp.fc.weight.grad.abs().sum() > 0
