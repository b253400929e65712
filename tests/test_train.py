"""The training loop: exact resume, fault recovery (NaN, OOM, SIGTERM, compile), schedules,
optimizers, curriculum and what a run writes.

Every run is a 2-layer, 32-wide GPT on a ~12k-token char corpus, a few steps long.
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from aura.config import AuraConfig
from aura.errors import AuraError
from aura.models import ModelOutput
from aura.train import trainer as trainer_module
from aura.train.checkpoint import list_checkpoints, step_dir, verify_checkpoint
from aura.train.device import Precision, peak_flops
from aura.train.metrics import MetricsLog, training_flops_per_token
from aura.train.schedule import Plateau, cosine_factor
from aura.train.trainer import MAX_ROLLBACKS, Trainer, TrainResult
from conftest import TINY_TRAIN, losses, read_metrics, requires_extra, tiny_config
from faults import FsFaults

# The shared reference run: dropout 0 so results do not depend on how RNG draws are split.
BASE = ("train.max_steps=12", "train.eval_interval=4", "train.checkpoint_interval=4")
LR = 1e-3  # the demo preset's train.lr

LOGGED_EACH_STEP = {"lr", "mem_mb", "tokens_per_s"}  # the progress bar's fields


def train(cfg: AuraConfig, data: Path, run: Path, *, resume: bool = False,
          setup: Callable[[Trainer], None] | None = None) -> tuple[TrainResult, list[str]]:
    """Run a trainer to the end; ``setup`` may patch it first. Returns the result and log."""
    log: list[str] = []
    trainer = Trainer(cfg, data, run, resume=resume, progress=False, log=log.append)
    if setup is not None:
        setup(trainer)
    return trainer.run(), log


def wrap_forward(trainer: Trainer, hook: Callable[[int, torch.Tensor, dict[str, Any]], None],
                 after: Callable[[int, ModelOutput], ModelOutput] | None = None) -> None:
    """Route the trainer's forward through ``hook(call, x, kwargs)`` (which may raise) and
    ``after(call, out)`` (which may change the output); ``call`` counts from 0."""
    inner = trainer.forward
    calls = iter(range(10**9))

    def forward(x: torch.Tensor, y: torch.Tensor, **kw: Any) -> ModelOutput:
        call = next(calls)
        hook(call, x, kw)
        out = inner(x, y, **kw)
        return after(call, out) if after is not None else out

    trainer.forward = forward


def poison(out: ModelOutput) -> ModelOutput:
    assert out.loss is not None
    out.loss = out.loss * float("nan")
    return out


def inf_gradient(out: ModelOutput) -> ModelOutput:
    """A finite loss whose gradient is infinite: what an fp16 overflow in backward looks like."""
    assert out.loss is not None
    out.loss.register_hook(lambda grad: grad * math.inf)
    return out


def use_precision(name: str, monkeypatch: pytest.MonkeyPatch, init_scale: float = 2.0**16
                  ) -> str:
    """The ``train.precision`` setting for ``name``. "grad_scaler" is fp16's path, a GradScaler,
    over fp32 forwards: CUDA's fp16 is not available here, and the policy under test is the
    trainer's handling of the scaler, not the dtype."""
    if name != "grad_scaler":
        return f"train.precision={name}"
    monkeypatch.setattr(Precision, "new_scaler",
                        lambda _self: torch.amp.GradScaler("cpu", init_scale=init_scale))
    return "train.precision=fp32"


PRECISIONS = ["fp32", "bf16", "grad_scaler"]


@pytest.fixture(scope="module")
def baseline(train_data: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[TrainResult, Path]:
    run = tmp_path_factory.mktemp("baseline") / "run"
    result, _ = train(tiny_config(*BASE), train_data, run)
    return result, run


# --- exact resume ---------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resumed_run_is_bit_identical(optimizer: str, train_data: Path, tmp_path: Path) -> None:
    """Stop after k steps, resume to N: every train and val loss equals the uninterrupted run's,
    with dropout on so the restored RNG state matters. (The schedule is constant because a
    cosine one depends on max_steps, which differs between the two halves.)"""
    common = ("model.dropout=0.1", "train.schedule=constant", "train.eval_interval=3",
              "train.checkpoint_interval=3", f"train.optimizer={optimizer}")
    full, _ = train(tiny_config(*common, "train.max_steps=12"), train_data, tmp_path / "a")
    first, _ = train(tiny_config(*common, "train.max_steps=6"), train_data, tmp_path / "b")
    assert first.step == 6
    resumed, log = train(tiny_config(*common, "train.max_steps=12"), train_data, tmp_path / "b",
                         resume=True)
    assert any("resumed from" in m and "step 6" in m for m in log), log
    assert full.step == resumed.step == 12
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert a == b
    va, vb = losses(tmp_path / "a", "val_loss"), losses(tmp_path / "b", "val_loss")
    assert sorted(va) == [3, 6, 9, 12]
    assert va == vb
    assert resumed.val_loss == full.val_loss


def test_sigterm_mid_run_then_resume_is_bit_identical(train_data: Path, tmp_path: Path) -> None:
    """A real SIGTERM during step 5 of a cosine run: the step finishes, a checkpoint is saved,
    and resuming with the same config reproduces the uninterrupted losses exactly."""
    cfg = ("model.dropout=0.1", "train.max_steps=10", "train.eval_interval=2",
           "train.checkpoint_interval=100")
    full, _ = train(tiny_config(*cfg), train_data, tmp_path / "a")

    def kill_during_step_5(trainer: Trainer) -> None:
        def hook(call: int, _x: torch.Tensor, _kw: dict[str, Any]) -> None:
            if call == 4:
                os.kill(os.getpid(), signal.SIGTERM)
        wrap_forward(trainer, hook)

    before = signal.getsignal(signal.SIGTERM)
    stopped, log = train(tiny_config(*cfg), train_data, tmp_path / "b", setup=kill_during_step_5)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is restored
    assert (stopped.stopped, stopped.step) == ("interrupted", 5)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-00000005"]
    assert any("SIGTERM" in m for m in log)
    resumed, _ = train(tiny_config(*cfg), train_data, tmp_path / "b", resume=True)
    assert (resumed.stopped, resumed.step) == ("max_steps", 10)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a", "val_loss") == losses(tmp_path / "b", "val_loss")
    assert resumed.val_loss == full.val_loss


# --- non-finite losses ----------------------------------------------------------------------


def test_nonfinite_steps_are_skipped_and_counted(train_data: Path, tmp_path: Path,
                                                 baseline: tuple[TrainResult, Path]) -> None:
    """Two NaN losses in a row (fewer than max_nonfinite=3): both steps are skipped, never
    applied, and the run goes on to the end."""
    def setup(trainer: Trainer) -> None:
        wrap_forward(trainer, lambda *_: None,
                     lambda call, out: poison(out) if call in (5, 6) else out)

    result, log = train(tiny_config(*BASE), train_data, tmp_path / "run", setup=setup)
    assert (result.step, result.stopped) == (12, "max_steps")
    assert (result.nonfinite_skipped, result.rollbacks) == (2, 0)
    assert sum("non-finite" in m for m in log) == 2
    got, ref = losses(tmp_path / "run"), losses(baseline[1])
    assert sorted(got) == [1, 2, 3, 4, 5, 8, 9, 10, 11, 12]  # steps 6 and 7 left no row
    assert all(math.isfinite(v) for v in got.values())
    # Until the poisoned step, nothing differs from the reference run.
    assert {s: got[s] for s in range(1, 6)} == {s: ref[s] for s in range(1, 6)}
    # Nothing of a skipped step reaches the weights: the next step's loss stays finite and the
    # run's final val loss is a number.
    assert result.val_loss is not None and math.isfinite(result.val_loss)


def test_a_batch_that_always_gives_nan_is_skipped_not_retried_forever(
        train_data: Path, tmp_path: Path) -> None:
    """A deterministic bad batch: re-running it on the same weights fails the same way, so the
    run must move past it instead of looping through rollbacks with an ever smaller lr."""
    seen: list[int] = []

    def setup(trainer: Trainer) -> None:
        bad = trainer.train_batches(6)[0]
        last_bad = trainer.train_batches(11)[0]

        def after(_call: int, out: ModelOutput) -> ModelOutput:
            return poison(out) if seen and seen[-1] in (6, 11) else out

        def hook(_call: int, x: torch.Tensor, _kw: dict[str, Any]) -> None:
            step = 6 if torch.equal(x, bad) else 11 if torch.equal(x, last_bad) else -1
            seen.append(step)
            if seen.count(6) > 20:
                raise RuntimeError("the bad batch was retried over and over")

        wrap_forward(trainer, hook, after)

    result, _ = train(tiny_config(*BASE), train_data, tmp_path / "run", setup=setup)
    assert (result.step, result.stopped) == (12, "max_steps")
    assert (result.nonfinite_skipped, result.rollbacks) == (2, 0)
    assert seen.count(6) == seen.count(11) == 1
    steps = losses(tmp_path / "run")
    assert 7 not in steps and 12 not in steps  # the skipped steps have no train row
    # Even with the last step skipped, the run ends on a checkpoint at max_steps.
    assert list_checkpoints(tmp_path / "run")[-1] == step_dir(tmp_path / "run", 12)


def test_repeated_nonfinite_rolls_back_with_half_the_lr(
        train_data: Path, tmp_path: Path, baseline: tuple[TrainResult, Path]) -> None:
    """max_nonfinite (3) NaN steps in a row: back to the step-4 checkpoint with the lr halved,
    and the run still finishes; each step is logged once."""
    trainers: list[Trainer] = []

    def setup(trainer: Trainer) -> None:
        trainers.append(trainer)
        wrap_forward(trainer, lambda *_: None,
                     lambda call, out: poison(out) if call in (6, 7, 8) else out)

    result, log = train(tiny_config(*BASE), train_data, tmp_path / "run", setup=setup)
    assert (result.step, result.stopped) == (12, "max_steps")
    assert (result.nonfinite_skipped, result.rollbacks) == (3, 1)
    assert trainers[0].state.fault_lr_scale == 0.5
    assert any("rolled back to step 4" in m for m in log), log
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    ref = {r["step"]: r for r in read_metrics(baseline[1]) if "loss" in r}
    for r in rows:
        scale = 1.0 if r["step"] <= 4 else 0.5
        assert r["lr"] == pytest.approx(ref[r["step"]]["lr"] * scale, rel=1e-12)
        if r["step"] <= 5:  # the step-5 loss is computed on the restored step-4 weights
            assert r["loss"] == ref[r["step"]]["loss"]
    saved = json.loads((step_dir(tmp_path / "run", 12) / "train_state.json").read_text())
    assert saved["train_state"]["fault_lr_scale"] == 0.5
    # TensorBoard forgets the rolled-back steps too
    requires_extra("tensorboard", "tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    tb_lr = events.Scalars("lr")
    assert [e.step for e in tb_lr] == list(range(1, 13))
    assert [e.value for e in tb_lr] == pytest.approx([r["lr"] for r in rows], rel=1e-6)
    assert saved["train_state"]["rollbacks"] == 1


@pytest.mark.parametrize("precision", PRECISIONS)
def test_divergence_that_survives_every_rollback_ends_the_run(
        precision: str, train_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainers: list[Trainer] = []

    def setup(trainer: Trainer) -> None:  # every step after the step-4 checkpoint is NaN
        trainers.append(trainer)
        wrap_forward(trainer, lambda *_: None,
                     lambda call, out: poison(out) if call >= 4 else out)

    with pytest.raises(AuraError, match="keeps diverging"):
        train(tiny_config(*BASE, use_precision(precision, monkeypatch)), train_data,
              tmp_path / "run", setup=setup)
    assert trainers[0].state.rollbacks == MAX_ROLLBACKS
    assert trainers[0].state.fault_lr_scale == 0.5**MAX_ROLLBACKS
    saved = json.loads((step_dir(tmp_path / "run", 4) / "train_state.json").read_text())
    assert saved["train_state"]["step"] == 4  # the last good state is still on disk


@pytest.mark.parametrize("fault", [poison, inf_gradient], ids=["nan_loss", "inf_gradient"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_skips_and_counts_nonfinite_steps(
        precision: str, fault: Callable[[ModelOutput], ModelOutput], train_data: Path,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two non-finite steps (fewer than max_nonfinite=3) are counted and skipped, batch and row
    included, whatever the precision. The GradScaler runs at scale 1, where an overflow cannot
    be blamed on the scale (above it an overflow is calibration: see the next tests)."""
    def setup(trainer: Trainer) -> None:
        wrap_forward(trainer, lambda *_: None,
                     lambda call, out: fault(out) if call in (5, 6) else out)

    setting = use_precision(precision, monkeypatch, init_scale=1.0)
    result, log = train(tiny_config(*BASE, setting), train_data, tmp_path / "run", setup=setup)
    assert (result.step, result.stopped) == (12, "max_steps")
    assert (result.nonfinite_skipped, result.rollbacks) == (2, 0)
    assert sum("non-finite" in m for m in log) == 2
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 8, 9, 10, 11, 12]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_rolls_back_with_half_the_lr(
        precision: str, train_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """max_nonfinite NaN losses in a row roll back to the step-4 checkpoint with the lr halved
    whatever the precision; a GradScaler's scale comes back with the weights (each NaN step had
    backed it off, to 2**13)."""
    trainers: list[Trainer] = []

    def setup(trainer: Trainer) -> None:
        trainers.append(trainer)
        wrap_forward(trainer, lambda *_: None,
                     lambda call, out: poison(out) if call in (6, 7, 8) else out)

    setting = use_precision(precision, monkeypatch)
    result, log = train(tiny_config(*BASE, setting), train_data, tmp_path / "run", setup=setup)
    assert (result.step, result.stopped) == (12, "max_steps")
    assert (result.nonfinite_skipped, result.rollbacks) == (3, 1)
    assert any("rolled back to step 4" in m for m in log), log
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for r in rows:
        fault_scale = 1.0 if r["step"] <= 4 else 0.5
        expected = LR * cosine_factor(r["step"] - 1, 2, 12, 0.1) * fault_scale
        assert r["lr"] == pytest.approx(expected, rel=1e-12)
    scaler = trainers[0].scaler
    if precision == "grad_scaler":
        assert scaler is not None and scaler.get_scale() == 2.0**16
    else:
        assert scaler is None


def test_loss_scale_calibration_cannot_trip_a_rollback(
        train_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        baseline: tuple[TrainResult, Path]) -> None:
    """A GradScaler starts at 2**16 and backs off at each overflow until the gradients fit.
    Here gradients overflow while the scale is above 2**10: six overflows in a row, twice
    max_nonfinite. Each runs the same step again at the lower scale, so nothing is skipped or
    rolled back, and (scaling by powers of two being exact in fp32) the losses are the fp32
    run's bit for bit. The calibrated scale is saved with each checkpoint."""
    trainers: list[Trainer] = []
    calls: list[int] = []

    def setup(trainer: Trainer) -> None:
        trainers.append(trainer)

        def after(call: int, out: ModelOutput) -> ModelOutput:
            calls.append(call)
            assert trainer.scaler is not None
            return inf_gradient(out) if trainer.scaler.get_scale() > 2**10 else out

        wrap_forward(trainer, lambda *_: None, after)

    setting = use_precision("grad_scaler", monkeypatch)
    result, log = train(tiny_config(*BASE, setting), train_data, tmp_path / "run", setup=setup)
    assert (result.step, result.nonfinite_skipped, result.rollbacks) == (12, 0, 0)
    assert not any("non-finite" in m for m in log)
    assert len(calls) == 12 + 6  # six retries of the first step
    scaler = trainers[0].scaler
    assert scaler is not None and scaler.get_scale() == 2.0**10
    assert losses(tmp_path / "run") == losses(baseline[1])
    saved = json.loads((step_dir(tmp_path / "run", 12) / "train_state.json").read_text())
    assert saved["train_state"]["grad_scaler"]["scale"] == 2.0**10


def test_an_overflow_at_every_scale_is_a_fault(train_data: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradients that overflow however low the scale goes are not calibration: once the scale
    is down to 1 they count like any non-finite step, and the run rolls back and finally
    stops as it would in fp32."""
    trainers: list[Trainer] = []

    def setup(trainer: Trainer) -> None:
        trainers.append(trainer)
        wrap_forward(trainer, lambda *_: None,
                     lambda call, out: inf_gradient(out) if call >= 4 else out)

    setting = use_precision("grad_scaler", monkeypatch)
    with pytest.raises(AuraError, match="keeps diverging"):
        train(tiny_config(*BASE, setting), train_data, tmp_path / "run", setup=setup)
    assert trainers[0].state.rollbacks == MAX_ROLLBACKS
    assert trainers[0].state.nonfinite_skipped == 3 * (MAX_ROLLBACKS + 1)


def test_nonfinite_before_any_checkpoint_is_an_error(train_data: Path, tmp_path: Path) -> None:
    calls: list[int] = []

    def setup(trainer: Trainer) -> None:
        def hook(call: int, _x: torch.Tensor, _kw: dict[str, Any]) -> None:
            calls.append(call)
            assert call < 50, "never gave up"
        wrap_forward(trainer, hook, lambda _call, out: poison(out))

    with pytest.raises(AuraError, match="diverged"):
        train(tiny_config(*BASE), train_data, tmp_path / "run", setup=setup)
    assert len(calls) == 3  # max_nonfinite
    assert list_checkpoints(tmp_path / "run") == []


# --- what a log row holds: MFU ----------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [32, 8])
def test_flops_per_token_of_a_gpt_match_the_hand_formula(seq_len: int) -> None:
    """6 FLOPs per forward multiply-add: per layer 12 C^2 for the qkv, output and MLP
    projections plus C (T + 1) for the causal attention's scores and values (T (T + 1) / 2
    query-key pairs per sequence), then C V for the head."""
    cfg = tiny_config("model.vocab_size=60")
    n_layer, c, vocab = cfg.model.n_layer, cfg.model.n_embd, 60
    idx = torch.randint(0, vocab, (1, seq_len))
    macs = n_layer * (12 * c * c + c * (seq_len + 1)) + c * vocab
    assert training_flops_per_token(cfg.model, idx, {}) == 6 * macs


def test_mfu_is_logged_when_the_device_peak_is_known(
        train_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        baseline: tuple[TrainResult, Path]) -> None:
    """With a known peak each train row carries tokens/s x FLOPs per token / peak; counting the
    FLOPs leaves the run itself unchanged. On a CPU there is no peak and no ``mfu`` key."""
    peaks: list[tuple[torch.device, str]] = []

    def fake_peak(device: torch.device, precision: str) -> float:
        peaks.append((device, precision))
        return 1e9

    monkeypatch.setattr(trainer_module, "device_peak_flops", fake_peak)
    trainers: list[Trainer] = []
    train(tiny_config(*BASE), train_data, tmp_path / "run", setup=trainers.append)
    assert peaks == [(torch.device("cpu"), "fp32")]
    c, t, vocab = 32, 32, trainers[0].data.vocab_size
    per_token = 6 * (2 * (12 * c * c + c * (t + 1)) + c * vocab)
    assert trainers[0].flops_per_token == per_token
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(rows) == 12
    for r in rows:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * per_token / 1e9, rel=1e-12)
    assert losses(tmp_path / "run") == losses(baseline[1])
    assert not any("mfu" in r for r in read_metrics(baseline[1]))


@pytest.mark.parametrize(("name", "precision", "peak"), [
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100-PCIE-40GB", "fp32", 19.5e12),
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
    ("NVIDIA H100 PCIe", "fp16", 756e12),
    ("NVIDIA L4", "bf16", 121e12),
    ("Tesla T4", "fp16", 65e12),
    ("Tesla V100-SXM2-16GB", "fp16", 125e12),
    ("Tesla V100-PCIE-32GB", "fp16", 112e12),
    ("Tesla T4", "bf16", None),  # no bf16 units
    ("NVIDIA L40S", "bf16", None),  # not an L4
    ("NVIDIA H100 NVL", "bf16", None),  # an H100 of a peak not in the table
    ("NVIDIA GeForce RTX 4090", "bf16", None),
])
def test_peak_flops_by_device_name_and_precision(name: str, precision: str,
                                                 peak: float | None) -> None:
    assert peak_flops(name, precision) == peak


# --- data loader workers ------------------------------------------------------------------

# A small hippocampal model: its batches carry prosody and corpus_pos, built in the workers.
HIPPOCAMPAL = ("model.name=hippocampal", "model.n_place_cells=200", "model.memory_capacity=64",
               "model.memory_dim=16", "model.memory_writes=16", "model.grid_modules=2",
               "model.grid_cells_per_module=4", "model.n_time_cells=8")
WORKERS = "data.num_workers=2"


def count_workers(trainer: Trainer, seen: list[int]) -> None:
    """Record how many worker processes are alive at each forward."""
    wrap_forward(trainer, lambda *_: seen.append(len(multiprocessing.active_children())))


@pytest.mark.parametrize("model", [(), HIPPOCAMPAL], ids=["gpt", "hippocampal"])
def test_worker_processes_train_bit_identically(model: tuple[str, ...], train_data: Path,
                                                tmp_path: Path) -> None:
    """With data.num_workers=2 the batches are built in worker processes, and the losses equal
    the in-process run's bit for bit, with dropout and gradient accumulation on."""
    common = (*model, "model.dropout=0.1", "train.grad_accum=2", "train.max_steps=6",
              "train.eval_interval=3", "train.checkpoint_interval=3")
    train(tiny_config(*common), train_data, tmp_path / "a")
    workers: list[int] = []
    train(tiny_config(*common, WORKERS), train_data, tmp_path / "b",
          setup=lambda trainer: count_workers(trainer, workers))
    assert workers == [2] * 12
    assert sorted(losses(tmp_path / "a")) == list(range(1, 7))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a", "val_loss") == losses(tmp_path / "b", "val_loss")
    assert multiprocessing.active_children() == []


def test_a_rollback_restarts_the_workers_at_the_rolled_back_step(train_data: Path,
                                                                  tmp_path: Path) -> None:
    def setup(trainer: Trainer) -> None:
        wrap_forward(trainer, lambda *_: None,
                     lambda call, out: poison(out) if call in (6, 7, 8) else out)

    runs = {}
    for name, extra in (("in_process", ()), ("workers", (WORKERS,))):
        runs[name], _ = train(tiny_config(*BASE, *extra), train_data, tmp_path / name,
                              setup=setup)
    assert runs["workers"].rollbacks == runs["in_process"].rollbacks == 1
    assert losses(tmp_path / "workers") == losses(tmp_path / "in_process")
    assert sorted(losses(tmp_path / "workers")) == list(range(1, 13))
    assert multiprocessing.active_children() == []


def test_a_resumed_run_with_workers_is_bit_identical(train_data: Path, tmp_path: Path) -> None:
    common = ("model.dropout=0.1", "train.schedule=constant", "train.eval_interval=3",
              "train.checkpoint_interval=3")
    train(tiny_config(*common, "train.max_steps=12"), train_data, tmp_path / "a")
    train(tiny_config(*common, WORKERS, "train.max_steps=6"), train_data, tmp_path / "b")
    train(tiny_config(*common, WORKERS, "train.max_steps=12"), train_data, tmp_path / "b",
          resume=True)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a", "val_loss") == losses(tmp_path / "b", "val_loss")
    assert multiprocessing.active_children() == []


def test_workers_stop_on_ctrl_c_and_on_errors(train_data: Path, tmp_path: Path) -> None:
    """Ctrl-C signals the whole process group: the step finishes, a checkpoint is saved and the
    workers are stopped. An error stops them too."""
    def ctrl_c_during_step_3(trainer: Trainer) -> None:
        def hook(call: int, _x: torch.Tensor, _kw: dict[str, Any]) -> None:
            if call == 2:
                for worker in multiprocessing.active_children():
                    assert worker.pid is not None
                    os.kill(worker.pid, signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
        wrap_forward(trainer, hook)

    stopped, log = train(tiny_config(*BASE, WORKERS), train_data, tmp_path / "run",
                         setup=ctrl_c_during_step_3)
    assert (stopped.stopped, stopped.step) == ("interrupted", 3)
    assert any("SIGINT" in m for m in log)
    assert multiprocessing.active_children() == []

    def fail_at_step_2(trainer: Trainer) -> None:
        def hook(call: int, _x: torch.Tensor, _kw: dict[str, Any]) -> None:
            if call == 2:
                raise RuntimeError("a real bug")
        wrap_forward(trainer, hook)

    with pytest.raises(RuntimeError, match="a real bug"):
        train(tiny_config(*BASE, WORKERS), train_data, tmp_path / "failed", setup=fail_at_step_2)
    assert multiprocessing.active_children() == []


# --- out of memory --------------------------------------------------------------------------


def test_oom_splits_the_micro_batch_and_keeps_the_losses(
        train_data: Path, tmp_path: Path, baseline: tuple[TrainResult, Path]) -> None:
    """A forward over more than half the batch runs out of memory: the run halves the chunks
    and finishes with the same data and effective batch, hence the same losses."""
    shapes: list[int] = []

    def setup(trainer: Trainer) -> None:
        def hook(_call: int, x: torch.Tensor, _kw: dict[str, Any]) -> None:
            shapes.append(x.size(0))
            if x.size(0) > trainer.cfg.train.batch_size // 2:
                raise torch.OutOfMemoryError("injected: CUDA out of memory")
        wrap_forward(trainer, hook)

    result, log = train(tiny_config(*BASE), train_data, tmp_path / "run", setup=setup)
    assert (result.step, result.micro_split) == (12, 2)
    assert shapes == [4] + [2] * 24
    assert sum("out of memory" in m for m in log) == 1
    got, ref = losses(tmp_path / "run"), losses(baseline[1])
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-5)
    got_val, ref_val = losses(tmp_path / "run", "val_loss"), losses(baseline[1], "val_loss")
    assert sorted(got_val) == sorted(ref_val)
    for step in ref_val:
        assert got_val[step] == pytest.approx(ref_val[step], abs=1e-5)
    saved = json.loads((step_dir(tmp_path / "run", 12) / "train_state.json").read_text())
    assert saved["train_state"]["micro_split"] == 2  # a resumed run keeps the smaller chunks


def test_oom_at_one_row_per_chunk_is_raised(train_data: Path, tmp_path: Path) -> None:
    sizes: list[int] = []

    def setup(trainer: Trainer) -> None:
        def hook(_call: int, x: torch.Tensor, _kw: dict[str, Any]) -> None:
            sizes.append(x.size(0))
            raise torch.OutOfMemoryError("injected")
        wrap_forward(trainer, hook)

    with pytest.raises(torch.OutOfMemoryError):
        train(tiny_config(*BASE), train_data, tmp_path / "run", setup=setup)
    assert sizes == [4, 2, 1]


# --- torch.compile guard --------------------------------------------------------------------


def test_compiled_model_failing_at_run_time_falls_back_to_eager(
        train_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        baseline: tuple[TrainResult, Path]) -> None:
    compiled: list[torch.nn.Module] = []

    def fake_compile(model: torch.nn.Module, *_a: Any, **_kw: Any) -> Callable[..., Any]:
        compiled.append(model)

        def broken(*_args: Any, **_kwargs: Any) -> Any:
            raise RuntimeError("inductor: no C++ compiler")
        return broken

    monkeypatch.setattr(torch, "compile", fake_compile)
    result, log = train(tiny_config(*BASE, "train.compile=true"), train_data, tmp_path / "run")
    assert len(compiled) == 1
    assert result.step == 12
    assert any("falling back to eager" in m and "no C++ compiler" in m for m in log), log
    assert losses(tmp_path / "run") == losses(baseline[1])


def test_compile_failing_at_compile_time_trains_eagerly(
        train_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        baseline: tuple[TrainResult, Path]) -> None:
    def fake_compile(*_a: Any, **_kw: Any) -> Any:
        raise RuntimeError("dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", fake_compile)
    result, log = train(tiny_config(*BASE, "train.compile=true"), train_data, tmp_path / "run")
    assert result.step == 12
    assert any("training eagerly" in m for m in log), log
    assert losses(tmp_path / "run") == losses(baseline[1])


def test_errors_of_an_eager_model_are_not_swallowed(train_data: Path, tmp_path: Path) -> None:
    def setup(trainer: Trainer) -> None:
        def hook(call: int, _x: torch.Tensor, _kw: dict[str, Any]) -> None:
            if call == 2:
                raise RuntimeError("a real bug")
        wrap_forward(trainer, hook)

    with pytest.raises(RuntimeError, match="a real bug"):
        train(tiny_config(*BASE), train_data, tmp_path / "run", setup=setup)


# --- schedules ------------------------------------------------------------------------------


@given(warmup=st.integers(0, 50), extra=st.integers(1, 500),
       min_ratio=st.floats(0.0, 1.0, allow_nan=False))
def test_cosine_factor_warms_up_then_decays_to_the_floor(warmup: int, extra: int,
                                                         min_ratio: float) -> None:
    max_steps = warmup + extra
    for step in range(warmup):
        assert cosine_factor(step, warmup, max_steps, min_ratio) == pytest.approx(
            (step + 1) / warmup)
    after = [cosine_factor(s, warmup, max_steps, min_ratio) for s in range(warmup, max_steps + 5)]
    assert after[0] == pytest.approx(1.0)
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(after))
    assert all(min_ratio - 1e-12 <= f <= 1.0 + 1e-12 for f in after)
    assert cosine_factor(max_steps, warmup, max_steps, min_ratio) == pytest.approx(min_ratio)
    assert cosine_factor(max_steps + 100, warmup, max_steps, min_ratio) == pytest.approx(
        min_ratio)


def test_plateau_halves_after_patience_flat_evals_and_early_stops() -> None:
    p = Plateau(patience=2, early_stop_patience=4)
    assert not p.observe(3.0)
    assert (p.observe(3.0), p.scale) == (False, 1.0)
    assert (p.observe(3.5), p.scale) == (False, 0.5)
    assert not p.observe(2.0)  # an improvement resets both counters
    assert (p.observe(2.0), p.observe(2.0), p.scale) == (False, False, 0.25)
    assert (p.observe(2.0), p.observe(2.0), p.scale) == (False, True, 0.125)
    assert Plateau(**p.state()) == p  # what a checkpoint stores is enough to rebuild it
    off = Plateau(patience=1, early_stop_patience=0)
    assert not any(off.observe(1.0) for _ in range(20))  # 0 = early stopping off
    assert off.scale == off.min_scale


def test_plateau_schedule_and_early_stop_in_a_run(train_data: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A constant val loss: the lr halves after plateau_patience=2 flat evaluations and the run
    stops early after early_stop_patience=3, with a checkpoint at the stopping step."""
    monkeypatch.setattr(Trainer, "evaluate", lambda self: 2.5)
    cfg = tiny_config("train.max_steps=50", "train.schedule=plateau", "train.warmup_steps=0",
                      "train.eval_interval=1", "train.plateau_patience=2",
                      "train.early_stop_patience=3", "train.checkpoint_interval=100")
    result, log = train(cfg, train_data, tmp_path / "run")
    # evals: step 1 best, 2 and 3 flat (halve after 3), 4 flat -> 3 since the best: stop
    assert (result.stopped, result.step) == ("early_stop", 4)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert lrs == [LR, LR, LR, LR / 2]
    assert list_checkpoints(tmp_path / "run") == [step_dir(tmp_path / "run", 4)]
    assert any("early stop" in m for m in log)


def test_lr_follows_warmup_and_cosine(baseline: tuple[TrainResult, Path]) -> None:
    rows = [r for r in read_metrics(baseline[1]) if "loss" in r]
    for r in rows:
        expected = LR * cosine_factor(r["step"] - 1, 2, 12, 0.1)
        assert r["lr"] == pytest.approx(expected, rel=1e-12)


# --- loss, optimizer, curriculum, per-step flags --------------------------------------------


def test_label_smoothing_reaches_the_loss(train_data: Path, tmp_path: Path,
                                          baseline: tuple[TrainResult, Path]) -> None:
    kwargs: list[dict[str, Any]] = []

    def setup(trainer: Trainer) -> None:
        x, y = trainer.train_batches(0)
        logits = trainer.model(x, y).logits
        expected.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                        label_smoothing=0.1).item())
        wrap_forward(trainer, lambda _c, _x, kw: kwargs.append(kw))

    expected: list[float] = []
    train(tiny_config("train.max_steps=1", "train.label_smoothing=0.1"), train_data,
          tmp_path / "run", setup=setup)
    assert kwargs[0]["label_smoothing"] == 0.1
    smoothed = losses(tmp_path / "run")[1]
    assert smoothed == pytest.approx(expected[0], abs=1e-5)
    assert abs(smoothed - losses(baseline[1])[1]) > 1e-4  # the same weights and batch


def test_muon_trains(train_data: Path, tmp_path: Path) -> None:
    trainers: list[Trainer] = []
    cfg = tiny_config("train.optimizer=muon", "train.max_steps=30", "train.lr=3e-3",
                      "train.eval_interval=30", "train.checkpoint_interval=30")
    result, _ = train(cfg, train_data, tmp_path / "run", setup=trainers.append)
    assert [type(o).__name__ for o in trainers[0].opt.optimizers] == ["Muon", "AdamW"]
    muon_params = {id(p) for g in trainers[0].opt.optimizers[0].param_groups for p in g["params"]}
    assert id(trainers[0].model.blocks[0].attn.qkv.weight) in muon_params
    assert id(trainers[0].model.wte.weight) not in muon_params
    got = list(losses(tmp_path / "run").values())
    assert result.step == 30 and all(math.isfinite(v) for v in got)
    assert sum(got[-5:]) / 5 < sum(got[:5]) / 5 - 0.3
    verify_checkpoint(step_dir(tmp_path / "run", 30), need_train_state=True)


@pytest.mark.parametrize(("settings", "expected"), [
    (("data.curriculum=[[0,8],[5,16]]",), [8] * 5 + [16] * 3),
    # before the first stage: train.block_size (which defaults to model.block_size)
    (("data.curriculum=[[3,8]]", "train.block_size=16"), [16] * 3 + [8] * 5),
])
def test_curriculum_sets_the_block_size_by_step(train_data: Path, tmp_path: Path,
                                                settings: tuple[str, ...],
                                                expected: list[int]) -> None:
    widths: list[int] = []

    def setup(trainer: Trainer) -> None:
        wrap_forward(trainer, lambda _c, x, _kw: widths.append(x.size(1)))

    cfg = tiny_config(*settings, "train.max_steps=8", "train.eval_interval=100",
                      "train.checkpoint_interval=100")
    train(cfg, train_data, tmp_path / "run", setup=setup)
    assert widths == expected
    tokens = [r["tokens"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    per_step = [b - a for a, b in itertools.pairwise([0, *tokens])]
    assert per_step == [4 * w for w in expected]


@pytest.mark.parametrize(("model", "expected"), [
    (("model.name=snn_rag", "model.memory_capacity=64", "model.memory_chunk=8"),
     [False, False, False, True, True]),
    (("model.name=gpt",), [None] * 5),  # no memory switch declared: none passed
])
def test_memory_is_off_during_memory_warmup(train_data: Path, tmp_path: Path,
                                            model: tuple[str, ...],
                                            expected: list[bool | None]) -> None:
    flags: list[bool | None] = []

    def setup(trainer: Trainer) -> None:
        wrap_forward(trainer, lambda _c, _x, kw: flags.append(kw.get("use_memory")))

    cfg = tiny_config(*model, "train.memory_warmup_steps=3", "train.max_steps=5",
                      "train.eval_interval=100", "train.checkpoint_interval=100")
    train(cfg, train_data, tmp_path / "run", setup=setup)
    assert flags == expected


def test_grad_checkpointing_trains_the_same(train_data: Path, tmp_path: Path,
                                            baseline: tuple[TrainResult, Path]) -> None:
    trainers: list[Trainer] = []
    cfg = tiny_config(*BASE, "train.grad_checkpoint=true")
    train(cfg, train_data, tmp_path / "run", setup=trainers.append)
    assert trainers[0].model.grad_checkpoint
    got, ref = losses(tmp_path / "run"), losses(baseline[1])
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-5)


def test_every_step_trains_in_train_mode_and_clips_every_trained_parameter(
        train_data: Path, tmp_path: Path) -> None:
    """A step sets train mode only when something left the model in eval (here the forward
    of every step leaves it so), and clips over what the optimizer steps: every parameter
    that wants a gradient."""
    modes: list[bool] = []

    def setup(trainer: Trainer) -> None:
        wanted = [p for p in trainer.model.parameters() if p.requires_grad]
        assert {id(p) for p in trainer.opt.params} == {id(p) for p in wanted}

        def leave_in_eval(_call: int, _x: torch.Tensor, _kw: dict[str, Any]) -> None:
            modes.append(trainer.model.training)
            trainer.model.eval()

        wrap_forward(trainer, leave_in_eval)

    train(tiny_config(*BASE), train_data, tmp_path / "run", setup=setup)
    assert len(modes) == 12 and all(modes)


def test_rows_evaluations_and_checkpoints_keep_their_own_cadence(train_data: Path,
                                                                  tmp_path: Path) -> None:
    """Train rows after the first step, every log_interval and the last; evaluations and
    checkpoints at multiples of their intervals and the last step."""
    cfg = tiny_config("train.max_steps=13", "train.log_interval=5", "train.eval_interval=4",
                      "train.checkpoint_interval=6", "train.keep_checkpoints=10")
    train(cfg, train_data, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 5, 10, 13]
    assert [r["tokens"] for r in train_rows] == [s * 4 * 32 for s in (1, 5, 10, 13)]
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8, 12, 13]
    assert list_checkpoints(tmp_path / "run") == [step_dir(tmp_path / "run", s)
                                                  for s in (6, 12, 13)]


# --- what a run writes ----------------------------------------------------------------------


def test_metrics_rows_and_tensorboard(baseline: tuple[TrainResult, Path]) -> None:
    result, run = baseline
    rows = read_metrics(run)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    for r in train_rows:
        assert math.isfinite(r["loss"]) and r["ppl"] == pytest.approx(math.exp(r["loss"]))
        assert r["grad_norm"] > 0 and set(r) >= LOGGED_EACH_STEP
        assert r["tokens"] == r["step"] * 4 * 32
    val_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val_rows] == [4, 8, 12]
    assert all("loss" not in r for r in val_rows)
    assert val_rows[-1]["val_loss"] == result.val_loss
    assert result.best_val_loss == min(r["val_loss"] for r in val_rows)
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    requires_extra("tensorboard", "tensorboard")
    assert list((run / "tb").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tb_loss = {e.step: e.value for e in events.Scalars("loss")}
    assert tb_loss == pytest.approx({r["step"]: r["loss"] for r in train_rows})
    assert [e.step for e in events.Scalars("val_loss")] == [4, 8, 12]
    assert json.loads((run / "config.json").read_text())["model"]["n_embd"] == 32


def test_a_metrics_file_deleted_mid_run_is_recreated_and_said_once(train_data: Path,
                                                                   tmp_path: Path) -> None:
    """Deleted twice: the rows after each deletion reach a file at the path, not an unlinked
    inode; the warning comes once."""
    run = tmp_path / "run"

    def delete_before_steps_4_and_7(trainer: Trainer) -> None:
        def hook(call: int, _x: torch.Tensor, _kw: dict[str, Any]) -> None:
            if call in (3, 6):
                (run / "metrics.jsonl").unlink()
        wrap_forward(trainer, hook)

    _, log = train(tiny_config(*BASE), train_data, run, setup=delete_before_steps_4_and_7)
    assert sorted(losses(run)) == list(range(7, 13))
    assert sorted(losses(run, "val_loss")) == [8, 12]
    said = [m for m in log if "metrics.jsonl" in m]
    assert len(said) == 1 and "deleted or replaced" in said[0] and "step 4" in said[0], said


class _FullDisk:
    """An open metrics file on a disk that has just filled up: every write fails."""

    def __init__(self, file: Any):
        self.file = file

    def fileno(self) -> int:
        return self.file.fileno()

    def write(self, _text: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.file.close()


def test_a_metrics_write_the_disk_refuses_ends_the_run_naming_the_file(
        train_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"

    def fill_the_disk_during_step_6(trainer: Trainer) -> None:
        def hook(call: int, _x: torch.Tensor, _kw: dict[str, Any]) -> None:
            if call == 5:
                trainer.metrics._file = _FullDisk(trainer.metrics._file)
        wrap_forward(trainer, hook)

    with pytest.raises(AuraError) as caught:
        train(tiny_config(*BASE), train_data, run, setup=fill_the_disk_during_step_6)
    assert str(caught.value) == (
        f"training stopped at step 6: {run / 'metrics.jsonl'}: {os.strerror(errno.ENOSPC)}; "
        f"the newest checkpoint, {step_dir(run, 4)}, is intact: continue with --resume")
    verify_checkpoint(step_dir(run, 4), need_train_state=True)
    assert sorted(losses(run)) == [1, 2, 3, 4, 5]


def test_tensorboard_that_cannot_write_is_switched_off_quietly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorBoard's writer thread fails (a read-only tb/): one warning, no thread traceback,
    and metrics.jsonl keeps every row."""
    requires_extra("tensorboard", "tensorboard")
    reported: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", reported.append)
    faults = FsFaults(monkeypatch)
    log: list[str] = []
    before = set(threading.enumerate())
    metrics = MetricsLog(tmp_path, log=log.append)
    writers = set(threading.enumerate()) - before
    assert writers  # TensorBoard's writer thread, whose errors are under test
    metrics.write({"step": 1, "loss": 2.0})
    faults.deny(tmp_path / "tb", errno.EROFS)
    for step in range(2, 30):
        metrics.write({"step": step, "loss": 1.0})
    metrics.close()
    for thread in writers:  # the thread reports its copy of the error as it ends
        thread.join(timeout=10)
    assert reported == []  # the thread's copy of the error was not printed
    assert len(log) == 1 and "TensorBoard stopped writing" in log[0], log
    assert os.strerror(errno.EROFS) in log[0]
    assert sorted(losses(tmp_path)) == list(range(1, 30))


def test_existing_run_without_resume_is_refused(baseline: tuple[TrainResult, Path],
                                                train_data: Path) -> None:
    before = (baseline[1] / "metrics.jsonl").read_bytes()
    with pytest.raises(AuraError, match="--resume"):
        Trainer(tiny_config(*BASE), train_data, baseline[1], progress=False)
    assert (baseline[1] / "metrics.jsonl").read_bytes() == before


def test_bf16_autocast_trains_on_cpu(train_data: Path, tmp_path: Path,
                                    baseline: tuple[TrainResult, Path]) -> None:
    result, _ = train(tiny_config(*BASE, "train.precision=bf16"), train_data, tmp_path / "run")
    got, ref = losses(tmp_path / "run"), losses(baseline[1])
    assert result.step == 12 and sorted(got) == sorted(ref)
    for step in ref:  # bf16 matmuls, fp32 loss: close to the fp32 run, not equal
        assert got[step] == pytest.approx(ref[step], abs=0.05)
    assert got != ref


@pytest.mark.parametrize(("setting", "needle"), [
    ("train.precision=fp16", "fp16 needs a GPU"),
    ("train.device=cuda:7" if not torch.cuda.is_available() else "train.device=nope", "device"),
])
def test_impossible_device_settings_are_config_errors(train_data: Path, tmp_path: Path,
                                                      setting: str, needle: str) -> None:
    with pytest.raises(AuraError, match=needle):
        Trainer(tiny_config(setting), train_data, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_vocab_size_mismatch_is_an_error(train_data: Path, tmp_path: Path) -> None:
    with pytest.raises(AuraError, match="vocab_size"):
        Trainer(tiny_config("model.vocab_size=50"), train_data, tmp_path / "run", progress=False)


# --- SIGTERM to the CLI ---------------------------------------------------------------------


def _wait_for_rows(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text(encoding="utf-8").strip():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no metrics row in time")


def test_sigterm_saves_a_checkpoint_and_resume_continues(
        train_data: Path, tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    run = tmp_path / "run"
    sets = [a for s in TINY_TRAIN for a in ("--set", s)]
    argv = [sys.executable, "-m", "aura", "train", "--preset", "demo", *sets,
            "--set", "train.checkpoint_interval=100000", "--data", str(train_data),
            "--out", str(run), "--max-steps", "100000", "--json"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_rows(run / "metrics.jsonl", proc, timeout=60)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err  # saved, but not finished
    assert "Traceback" not in err
    report = json.loads(out)
    step = report["step"]
    assert report["stopped"] == "interrupted" and 1 <= step < 100000
    assert [p.name for p in list_checkpoints(run)] == [f"step-{step:08d}"]
    verify_checkpoint(step_dir(run, step), need_train_state=True)
    assert max(losses(run)) == step

    res = run_cli("train", "--data", train_data, "--out", run, "--resume",
                  "--max-steps", step + 3, "--json")
    assert res.code == 0, res.err
    assert (res.json()["step"], res.json()["stopped"]) == (step + 3, "max_steps")
    assert any(f"resumed from {step_dir(run, step)} at step {step}" in line
               for line in res.err.splitlines()), res.err
    assert sorted(losses(run)) == list(range(1, step + 4))
