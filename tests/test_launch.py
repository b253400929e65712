"""``aura train --nproc N``: torchrun launched from the CLI, one line for a bad N, the ranks'
exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from aura.errors import ConfigError
from aura.train.launch import check_nproc, exit_code, strip_nproc
from conftest import losses
from test_distributed import train_args


def test_strip_nproc_leaves_everything_else() -> None:
    assert strip_nproc(["train", "--nproc", "2", "--out", "r", "--nproc=3", "--set",
                        "a=--nproc"]) == ["train", "--out", "r", "--set", "a=--nproc"]


def test_the_job_exits_with_the_ranks_code() -> None:
    def fail(code: int) -> SimpleNamespace:
        return SimpleNamespace(exitcode=code)

    assert exit_code({0: fail(2), 1: fail(-15)}) == 2  # a refusal, the other rank stopped
    assert exit_code({1: fail(-9)}) == 137
    assert exit_code({0: fail(1)}) == 1


@pytest.mark.parametrize(("nproc", "device", "message"), [
    (0, "cpu", "at least 1"), (10_000, "cpu", "CPU cores"), (2, "mps", "not MPS"),
    (10_000, "cuda", "one GPU per rank")])
def test_a_bad_nproc_is_refused(nproc: int, device: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_nproc(nproc, device)


def test_nproc_under_torchrun_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="under torchrun"):
        check_nproc(2, "cpu")


def test_bad_nproc_is_one_line_before_any_run(tmp_path: Path, train_data: Path,
                                              run_cli: Any) -> None:
    run = tmp_path / "run"
    got = run_cli("train", *train_args(train_data, run, 3), "--nproc", "0")
    assert got.code == 2 and got.err.strip().splitlines() == [
        "aura: error: --nproc must be at least 1, got 0"]
    assert not run.exists()


def aura(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "aura", *argv], env=env, capture_output=True,
                          text=True, timeout=240)


@pytest.mark.slow
def test_nproc_2_trains_like_torchrun_and_a_refusal_is_one_line(
        tmp_path: Path, train_data: Path, run_cli: Any) -> None:
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 CPU cores")
    single = tmp_path / "single"
    assert run_cli("train", *train_args(train_data, single, 3)).code == 0
    run = tmp_path / "run"
    out = aura("train", "--nproc", "2", *train_args(train_data, run, 3))
    assert out.returncode == 0, out.stderr[-3000:]
    got, want = losses(run), losses(single)
    assert got.keys() == want.keys()
    assert all(abs(got[s] - want[s]) < 2e-5 for s in want)
    bad = aura("train", "--nproc", "2", *train_args(train_data, tmp_path / "bad", 3),
               "--set", "train.batch_size=3")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "aura: error: train.batch_size 3 (the global micro-batch) does not split over 2 "
        "ranks; use a multiple of 2"]
