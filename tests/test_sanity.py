"""The sanity monitor: each check fires on its injected fault (frozen LR, exploding gradients, a
dead spiking layer, a constant loss, ...), once, saying what to check; a healthy run is silent;
``--strict-sanity`` stops cleanly with the run saved."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from aura.train.sanity import (
    FLAT_WINDOW,
    LOSS_CHECK_STEP,
    PERSIST,
    SanityMonitor,
    SanityWarning,
)
from aura.train.trainer import Trainer
from conftest import read_metrics, tiny_config

VOCAB = 60


def feed(monitor: SanityMonitor, steps: range, loss=lambda s: 4.0 * math.exp(-s / 30) + 1.0,
         grad=lambda s: 1.0, aux=lambda s: {}, lr=(1e-3, 1e-3)) -> list[SanityWarning]:
    out = []
    for s in steps:
        out += monitor.after_step(s, loss(s), grad(s), [lr[0]], [lr[1]], aux(s))
    return out


def checks(warnings: list[SanityWarning]) -> list[str]:
    return [w.check for w in warnings]


def test_a_healthy_stream_is_silent() -> None:
    m = SanityMonitor(VOCAB, 300)
    aux = {"firing_rate_0": 0.05, "memory_gate": 0.1, "router_top_share": 0.3}
    assert feed(m, range(1, 301), aux=lambda s: aux) == []
    assert m.after_eval(100, 2.0) == [] and m.after_eval(200, 1.9) == []
    assert m.summary() == []


def test_loss_not_falling_and_constant_loss() -> None:
    stuck = feed(SanityMonitor(VOCAB, 200), range(1, 201),
                 loss=lambda s: math.log(VOCAB) + 0.01 * math.sin(s))
    assert checks(stuck) == ["loss_not_falling"]
    assert stuck[0].step == LOSS_CHECK_STEP and "learning rate" in stuck[0].message
    flat = feed(SanityMonitor(VOCAB, 200), range(1, 201), loss=lambda s: 2.0)
    assert checks(flat) == ["loss_constant"] and flat[0].step == FLAT_WINDOW
    assert "LR" in flat[0].message


def test_gradient_norm_out_of_range_persistently() -> None:
    assert feed(SanityMonitor(VOCAB, 200), range(1, 201),
                grad=lambda s: 50.0 if s % PERSIST else 1.0) == []  # bursts are not a warning
    high = feed(SanityMonitor(VOCAB, 200), range(1, 201), grad=lambda s: 1e3)
    assert checks(high) == ["grad_norm_high"] and high[0].step == PERSIST  # once
    low = feed(SanityMonitor(VOCAB, 200), range(1, 201), grad=lambda s: 1e-3)
    assert checks(low) == ["grad_norm_low"]


def test_lr_mismatch_dead_saturated_gate_router_and_val() -> None:
    assert checks(feed(SanityMonitor(VOCAB, 50), range(1, 51), lr=(1e-3, 5e-4))) == [
        "lr_mismatch"]
    aux = {"firing_rate_0": 0.0, "firing_rate_1": 0.05, "firing_rate_2": 1.0,
           "mem_gate": 1e-5, "router_top_share_3": 0.99}
    got = checks(feed(SanityMonitor(VOCAB, 50), range(1, 51), aux=lambda s: aux))
    assert sorted(got) == ["dead_layer_0", "gate_collapsed_mem_gate",
                           "router_collapsed_router_top_share_3", "saturated_layer_2"]
    m = SanityMonitor(VOCAB, 400)
    feed(m, range(1, 101))
    vals = []
    for i, val in enumerate((2.0, 2.1, 2.2, 2.3)):
        feed(m, range(101 + 50 * i, 151 + 50 * i))
        vals += m.after_eval(150 + 50 * i, val)
    assert checks(vals) == ["val_diverging"]


# --- in the trainer ---------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def one_thread():
    """These runs are tiny: one thread computes them without waiting on a second."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trainer(train_data: Path, run: Path, *sets: str) -> tuple[Trainer, list[str]]:
    said: list[str] = []
    cfg = tiny_config("train.eval_interval=1000", "train.checkpoint_interval=1000",
                      "model.n_embd=16", "model.block_size=16", "train.batch_size=2", *sets)
    return Trainer(cfg, train_data, run, progress=False, log=said.append), said


def sanity_rows(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if r.get("event") == "sanity"]


def test_a_healthy_run_is_silent(train_data: Path, tmp_path: Path) -> None:
    t, said = trainer(train_data, tmp_path / "run", f"train.max_steps={LOSS_CHECK_STEP + 2}",
                      "model.n_layer=1", "train.log_interval=10")
    result = t.run()
    assert result.sanity_warnings == [] and sanity_rows(tmp_path / "run") == []
    assert not any("sanity" in line for line in said)


def test_frozen_lr_stops_a_strict_run_cleanly(train_data: Path, tmp_path: Path) -> None:
    t, said = trainer(train_data, tmp_path / "run", "train.max_steps=20",
                      "train.strict_sanity=true")
    t.opt.set_lr_factor = lambda factor: None  # the schedule never reaches the optimizer
    result = t.run()
    assert result.stopped == "sanity" and result.step == 1
    assert "lr_mismatch" in sanity_rows(tmp_path / "run")[0]["check"]
    assert any(line.startswith("sanity: step 1: the optimizer's learning rate")
               for line in said)
    assert (tmp_path / "run" / "checkpoints" / "step-00000001").is_dir()  # saved


def test_a_models_own_lr_scale_is_no_mismatch(train_data: Path, tmp_path: Path) -> None:
    """A hormone scaling the LR (``AuraModel.lr_scale``) is part of what the step applies."""
    t, _ = trainer(train_data, tmp_path / "run", "train.max_steps=3", "model.n_layer=1",
                   "train.strict_sanity=true")
    t.model.lr_scale = lambda: 0.5  # type: ignore[method-assign]
    result = t.run()
    assert result.stopped != "sanity" and sanity_rows(tmp_path / "run") == []
    assert t.opt.param_groups[0]["lr"] < 0.6 * t.opt.param_groups[0]["base_lr"]


def test_exploding_gradients_and_a_dead_spiking_layer(train_data: Path, tmp_path: Path) -> None:
    t, said = trainer(train_data, tmp_path / "run", f"train.max_steps={PERSIST}",
                      "model.ffn=snn")
    t.model.wte.weight.register_hook(lambda g: g * 1e4)
    t.model.blocks[1].mlp.fc.register_forward_hook(lambda m, i, out: out * 0)
    result = t.run()
    assert sorted(r["check"] for r in sanity_rows(tmp_path / "run")) == [
        "dead_layer_1", "grad_norm_high"]
    assert len(result.sanity_warnings) == 2
    assert any("2 warning(s) in this run" in line for line in said)


def test_strict_sanity_in_the_cli_is_one_line(train_data: Path, tmp_path: Path, run_cli,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def always(self, step, *args):  # a fault at the first step, whatever it is
        return self._warn(step, "injected", "injected fault; check the test")

    monkeypatch.setattr(SanityMonitor, "after_step", always)
    run = tmp_path / "run"
    sets = [a for s in ("train.device=cpu", "model.n_layer=1", "model.n_embd=32",
                        "model.block_size=32", "train.batch_size=2") for a in ("--set", s)]
    res = run_cli("train", "--preset", "demo", *sets, "--data", train_data, "--out", run,
                  "--max-steps", 5, "--strict-sanity", "--json")
    assert res.code == 2 and "Traceback" not in res.err
    last = res.err.splitlines()[-1]  # the run's own notes come before it
    assert last.startswith("aura: error: stopped by --strict-sanity: sanity: step 1: injected")
    assert "--resume" in last
    assert (run / "checkpoints" / "step-00000001").is_dir()
