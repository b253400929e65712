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
