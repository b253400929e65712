"""GPU presets sized to seed 001's table, `aura config show --estimate`, `--preset auto` on
mocked devices, and Colab's Drive as the home of a relative run."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest
import torch

from aura.config import load_config
from aura.models import build_model
from aura.train import gpu

GiB = 2**30
# preset: (fewest, most parameters in seed 001's table, memory the device reports)
TABLE = {"l4-24gb": (0.5e9, 1e9, 22.0 * GiB), "a100-40gb": (1e9, 3e9, 39.4 * GiB),
         "a100-80gb": (3e9, 7e9, 79.2 * GiB)}


@pytest.mark.parametrize("preset", list(TABLE))
def test_gpu_presets_fit_their_gpu_at_the_size_the_table_gives(preset: str,
                                                               run_cli: Any) -> None:
    res = run_cli("config", "show", "--preset", preset, "--estimate", "--json")
    assert res.code == 0, res.err
    est = res.json()
    cfg = load_config(preset=preset, overrides=[f"model.vocab_size={gpu.ASSUMED_VOCAB}"])
    with torch.device("meta"):  # measured: the model as built, not a formula
        measured = sum(p.numel() for p in build_model(cfg.model).parameters())
    assert est["params"] == measured and est["vocab_assumed"]
    fewest, most, device_bytes = TABLE[preset]
    assert fewest <= measured <= most
    assert 0.5 * device_bytes < est["peak_gpu_bytes"] < 0.9 * device_bytes  # fits, not wasted
    assert cfg.train.batch_size * cfg.train.grad_accum == 128
    assert (cfg.train.precision, cfg.train.grad_checkpoint) == ("bf16", True)


def test_fsdp_estimate_shards_the_state_over_the_gpus() -> None:
    cfg = load_config(preset="l4-24gb")
    one = gpu.estimate_gpu(cfg)
    args = (one.parts, one.vocab, one.vocab_assumed, 4)
    four, ddp = gpu.per_gpu(*args, fsdp=True), gpu.per_gpu(*args, fsdp=False)
    assert four.sharded and not ddp.sharded and not one.sharded
    assert ddp.peak_bytes == one.peak_bytes > four.peak_bytes
    state = 16 * one.params  # fp32 weights, gradients, two AdamW moments
    assert one.peak_bytes - four.peak_bytes == pytest.approx(state * 3 / 4, rel=1e-6)
    text = gpu.describe(four)
    assert f"parameters: {one.params:,}" in text and "per GPU of 4 (FSDP2" in text


def test_estimate_refuses_no_gpus(run_cli: Any) -> None:
    bad = run_cli("config", "show", "--preset", "demo", "--estimate", "--nproc", "0")
    assert bad.code == 2 and "--nproc" in bad.err


@pytest.mark.parametrize(("device", "gib", "preset"), [
    ("cuda", 79.2, "a100-80gb"), ("cuda", 39.4, "a100-40gb"), ("cuda", 22.0, "l4-24gb"),
    ("cuda", 14.6, "gpu-4gb"), ("cuda", 2.0, "demo"), ("mps", 0, "m1-8gb"),
    ("cpu", 0, "cpu-small"),
])
def test_auto_preset_by_device_and_memory(monkeypatch: pytest.MonkeyPatch, device: str,
                                          gib: float, preset: str, run_cli: Any) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda _i: types.SimpleNamespace(total_memory=int(gib * GiB)))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: device == "mps")
    assert gpu.auto_preset() == preset
    res = run_cli("config", "show", "--preset", "auto", "--json")
    assert res.code == 0 and f"chose {preset}" in res.err
    assert res.json() == run_cli("config", "show", "--preset", preset, "--json").json()


def test_colab_puts_a_relative_run_on_the_mounted_drive(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    drive = tmp_path / "MyDrive"
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    monkeypatch.delenv("COLAB_GPU", raising=False)
    assert gpu.colab_run_dir(Path("runs/a"), drive) == Path("runs/a")  # not Colab
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab_20261201")
    assert gpu.colab_run_dir(Path("runs/a"), drive) == Path("runs/a")  # Drive not mounted
    drive.mkdir()
    assert gpu.colab_run_dir(Path("runs/a"), drive) == drive / "aura" / "runs/a"
    assert gpu.colab_run_dir(tmp_path / "x", drive) == tmp_path / "x"  # absolute: as given


# --- resource adaptivity -----------------------------------------------------------------------


def test_initial_split_is_the_fewest_power_of_two_chunks_that_fit() -> None:
    def need(rows: int) -> int:
        return 100 + 10 * rows  # fixed state + activations per row

    assert gpu.initial_split(8, need, free=1000) == 1
    assert gpu.initial_split(8, need, free=150) == 4  # 100 + 20 <= 135 < 100 + 40
    assert gpu.initial_split(8, need, free=50) == 8  # not even one row: the OOM split decides
    assert gpu.initial_split(6, need, free=150) == 2  # 6 rows in chunks of 3: 130 <= 135


def test_probe_split_reads_free_gpu_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from aura.train.resources import MemoryEstimate

    asked: list[int] = []

    def estimate(cfg: Any, precision: str, device_type: str) -> MemoryEstimate:
        asked.append(cfg.train.batch_size)  # activations: 1 GiB per row; state: 8 GiB
        rows = cfg.train.batch_size
        return MemoryEstimate(params=1, param_bytes=0, grad_bytes=4 * GiB,
                              optimizer_bytes=4 * GiB, buffer_bytes=0,
                              activation_bytes=rows * GiB, checkpoint_bytes=0, batch=rows,
                              seq=1, precision=precision)

    free = [40 * GiB]
    monkeypatch.setattr(gpu, "estimate_training_memory", estimate)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _d=None: (free[0], 80 * GiB))
    cfg = load_config(preset="demo", overrides=["train.batch_size=16"])
    cuda = torch.device("cuda", 0)
    assert gpu.probe_split(cfg, cuda, "bf16") == 1  # 8 + 16 <= 36
    free[0] = 20 * GiB
    assert gpu.probe_split(cfg, cuda, "bf16") == 2  # 8 + 8 <= 18 < 8 + 16
    free[0] = 14 * GiB  # 8 rows per rank on 2 ranks
    assert gpu.probe_split(cfg, cuda, "bf16", world=2) == 2  # DDP: 8 + 4 <= 12.6 < 8 + 8
    fsdp = load_config(preset="demo", overrides=["train.batch_size=16", "train.parallel=fsdp"])
    assert gpu.probe_split(fsdp, cuda, "bf16", world=2) == 1  # state sharded: 4 + 8 <= 12.6
    assert asked == [16, 16, 8, 8]


def test_the_trainer_checks_the_cuda_cache_periodically(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, train_data: Path) -> None:
    from aura.train import trainer as trainer_module
    from conftest import tiny_config

    calls: list[str] = []
    monkeypatch.setattr(trainer_module, "maybe_empty_cuda_cache",
                        lambda reason="", **_kw: calls.append(reason) or False)
    cfg = tiny_config("train.max_steps=5", "train.empty_cache_interval=2",
                      "train.checkpoint_interval=5", "train.eval_interval=5")
    trainer_module.Trainer(cfg, train_data, tmp_path / "run", progress=False).run()
    assert calls == ["periodic", "periodic"]  # after steps 2 and 4, not after every step
