"""bf16 weights (``train.weights``) and Adafactor (``train.optimizer=adafactor``): the memory
estimate counts what torch really allocates for them, a tiny model trains with them, and the
``neurogen-4gb`` preset they make possible fits seed 003's 4 GB budget."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from aura.config import AuraConfig, load_config
from aura.models import build_model
from aura.train.checkpoint import load_for_inference
from aura.train.gpu import estimate_gpu
from aura.train.optim import build_optimizers, cast_weights, optimizer_state_bytes
from aura.train.resources import estimate_training_memory, meta_model
from aura.train.trainer import Trainer
from conftest import CliResult, assert_usage_error, read_metrics, tiny_config

Run = Callable[..., CliResult]
GiB = 2**30
BRAIN = ("model.name=natural_brain", "model.vocab_size=50", "model.pfc_dim=64",
         "model.moe_hidden=64", "model.memory_capacity=128", "model.memory_writes=16",
         "model.memory_dim=16", "model.broca_dim=128")


def brain(*sets: str) -> AuraConfig:
    return tiny_config(*BRAIN, *sets)


def test_the_state_rule_by_hand() -> None:
    """AdamW: two moments; Muon: one; Adafactor: a row and a column per matrix (per leading
    index), a full vector for a vector; all at the weights' size (step counters not counted, as
    for AdamW)."""
    assert optimizer_state_bytes((3, 4), "adamw", 4) == 2 * 12 * 4
    assert optimizer_state_bytes((3, 4), "adamw", 2) == 2 * 12 * 2
    assert optimizer_state_bytes((3, 4), "muon", 4, muon=True) == 12 * 4
    assert optimizer_state_bytes((3, 4), "adafactor", 2) == (3 + 4) * 2
    assert optimizer_state_bytes((2, 3, 4), "adafactor", 4) == 2 * (3 + 4) * 4
    assert optimizer_state_bytes((5,), "adafactor", 2) == 5 * 2


def test_the_estimate_by_hand_for_bf16_weights_and_adafactor() -> None:
    """Weights and gradients at 2 bytes (the PFC's at 4), no autocast copies of bf16 weights,
    Adafactor's state from the meta model's shapes."""
    cfg = brain("train.weights=bf16", "train.precision=bf16", "train.optimizer=adafactor")
    model = meta_model(cfg)
    pfc = {id(p) for p in model.pfc.parameters()}
    size = {id(p): 4 if id(p) in pfc else 2 for p in model.parameters()}
    est = estimate_training_memory(cfg, "bf16", "cuda")
    assert est.param_bytes == sum(p.numel() * size[id(p)] for p in model.parameters())
    assert est.grad_bytes == est.param_bytes  # everything trains in phase 3
    factored = 0
    for p in model.parameters():
        if p.dim() >= 2:
            lead = math.prod(p.shape[:-2])
            factored += lead * (p.shape[-2] + p.shape[-1]) * size[id(p)]
        else:
            factored += p.numel() * size[id(p)]
    assert est.optimizer_bytes == factored
    fp32 = estimate_training_memory(brain("train.precision=bf16", "train.optimizer=adafactor"),
                                    "bf16", "cuda")
    copies = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and id(p) not in pfc)
    assert fp32.activation_bytes - est.activation_bytes == 2 * copies  # the copies bf16 saves
    assert fp32.param_bytes == 4 * est.params


@pytest.mark.parametrize(("optimizer", "weights"),
                         [("adafactor", "fp32"), ("adafactor", "bf16"), ("adamw", "bf16")])
def test_the_estimate_is_what_torch_allocates(optimizer: str, weights: str) -> None:
    """Weights, gradients and optimizer state of a real tiny brain after one step, byte for
    byte (step counters aside)."""
    cfg = brain(f"train.weights={weights}", "train.precision=bf16",
                f"train.optimizer={optimizer}")
    model = build_model(cfg.model)
    cast_weights(model, weights)
    opt = build_optimizers(model, cfg.train, torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    est = estimate_training_memory(cfg, "bf16", "cpu")
    assert est.param_bytes == sum(p.nbytes for p in model.parameters())
    assert est.grad_bytes == sum(p.grad.nbytes for p in model.parameters()
                                 if p.grad is not None)
    state = sum(v.nbytes for o in opt.optimizers for s in o.state.values()
                for k, v in s.items() if k != "step")  # moments, not step counters
    assert est.optimizer_bytes == state
    if weights == "bf16":
        assert model.pfc.retain.weight.dtype == torch.float32  # computes in fp32
        assert model.lm_head.weight.dtype == torch.bfloat16


def test_bf16_weights_need_bf16_precision(run_cli: Run) -> None:
    res = run_cli("config", "show", "--preset", "demo", "--set", "train.weights=bf16",
                  "--set", "train.precision=fp32")
    assert_usage_error(res, "train.weights=bf16", "train.precision=bf16")


@pytest.mark.slow
def test_a_tiny_brain_trains_and_resumes_bit_exactly_with_bf16_weights_and_adafactor(
        train_data: Path, tmp_path: Path) -> None:
    common = (*BRAIN, "model.vocab_size=null", "train.weights=bf16", "train.precision=bf16",
              "train.optimizer=adafactor", "train.lr=0.1", "train.grad_accum=2",
              "train.eval_interval=3", "train.checkpoint_interval=3", "train.schedule=constant")

    def run(steps: int, where: Path, resume: bool = False) -> Trainer:
        trainer = Trainer(tiny_config(*common, f"train.max_steps={steps}"), train_data, where,
                          resume=resume, progress=False, log=lambda _m: None)
        trainer.run()
        return trainer

    a = run(6, tmp_path / "a")
    run(3, tmp_path / "b")
    b = run(6, tmp_path / "b", resume=True)
    rows = {d: [r["loss"] for r in read_metrics(tmp_path / d) if "loss" in r] for d in "ab"}
    assert rows["a"] == rows["b"] and len(rows["a"]) == 6
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(),
                                                  strict=True))
    assert b.model.wte.weight.dtype == torch.bfloat16  # the resumed model is bf16 again
    assert rows["a"][-1] < math.log(a.model.config.vocab_size)  # below uniform
    loaded = load_for_inference(tmp_path / "a")  # bf16 tensors into an fp32 model
    assert torch.equal(loaded.model.wte.weight, a.model.wte.weight.float())


def test_neurogen_4gb_fits_4gb_at_the_seeds_numbers() -> None:
    cfg = load_config(preset="neurogen-4gb")
    m, t = cfg.model, cfg.train
    assert (m.n_embd, m.broca_dim, m.vocab_size) == (1024, 8192, 32000)
    assert (t.weights, t.precision, t.optimizer, t.grad_checkpoint) == (
        "bf16", "bf16", "adafactor", True)
    assert t.batch_size * t.grad_accum * m.block_size == 32 * 512  # the effective batch kept
    est = estimate_gpu(cfg)
    p = est.parts
    assert est.peak_bytes == (p.param_bytes + p.grad_bytes + p.optimizer_bytes + p.buffer_bytes
                              + p.activation_bytes + p.overhead_bytes)
    assert 2 * GiB < est.peak_bytes < 3.5 * GiB  # fits a 4 GB card with the seed's margin
    adamw_fp32 = load_config(preset="neurogen-4gb", overrides=[
        "train.weights=fp32", "train.optimizer=adamw"])
    assert estimate_gpu(adamw_fp32).peak_bytes > 6 * GiB  # why the preset needs both
