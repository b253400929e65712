"""Data parallelism under torchrun: 2 CPU processes over gloo against one process.

Each job is a real ``torchrun`` in a subprocess running ``tests/dist_worker.py`` (``aura train``
plus an audit of what each rank writes); the single-process runs are ``aura train`` in this
process. Tiny models, a few steps: the cost is the processes' start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import losses

WORKER = Path(__file__).with_name("dist_worker.py")
TINY = ["--set", "model.n_layer=2", "--set", "model.n_head=2", "--set", "model.n_embd=32",
        "--set", "model.block_size=32", "--set", "train.batch_size=4", "--set", "train.device=cpu",
        "--set", "train.precision=fp32", "--set", "train.warmup_steps=2",
        "--set", "train.eval_iters=2", "--set", "train.log_interval=1",
        "--set", "train.eval_interval=3", "--set", "model.dropout=0.0"]
TOL = 2e-5  # float summation order: rows reduced per rank, then across ranks


def train_args(data: Path, run: Path, steps: int, *extra: str) -> list[str]:
    return ["--preset", "demo", "--data", str(data), "--out", str(run),
            "--max-steps", str(steps), "--checkpoint-interval", "3", *TINY, *extra]


def torchrun(tmp_path: Path, argv: list[str], run: Path, **spec: Any
             ) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """A 2-process torchrun of ``aura train ARGV``; its output and each rank's report."""
    report = tmp_path / f"report-{len(list(tmp_path.glob('report-*')))}"
    report.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(WORKER), json.dumps({"argv": argv, "run": str(run), "report": str(report),
                                         **spec})]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    reports = [json.loads(p.read_text()) for p in sorted(report.glob("rank-*.json"))]
    return out, reports


def assert_close(got: dict[int, float], want: dict[int, float], tol: float = TOL) -> None:
    assert got.keys() == want.keys()
    for step, value in want.items():
        assert abs(got[step] - value) <= tol, (step, got[step], value)


def test_ddp_equals_one_process_rank0_alone_writes_and_resumes_on_one(
        tmp_path: Path, train_data: Path, run_cli: Any) -> None:
    single = tmp_path / "single"
    assert run_cli("train", *train_args(train_data, single, 6)).code == 0
    ddp = tmp_path / "ddp"
    out, reports = torchrun(tmp_path, train_args(train_data, ddp, 3), ddp)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["code"] for r in reports] == [0, 0]
    # DDP's reducer holds the gloo group: freed before the group is destroyed, not at exit
    assert [r.get("wrapper_freed") for r in reports] == [True, True]
    assert reports[1]["writes"] == []  # rank 1 never touched the run directory
    assert reports[0]["writes"]  # while rank 0 wrote it (the audit sees writes)
    assert out.stdout.count("max_steps at step 3") == 1  # one report, from rank 0
    want = losses(single)
    assert_close(losses(ddp), {s: v for s, v in want.items() if s <= 3})
    assert_close(losses(ddp, "val_loss"), {3: losses(single, "val_loss")[3]})
    # a 2-rank checkpoint resumes in one process: the same run on from step 3
    assert run_cli("train", "--out", str(ddp), "--data", str(train_data), "--resume",
                   "--max-steps", "6").code == 0
    assert_close(losses(ddp), want)


def test_batch_not_divisible_by_world_is_one_line(tmp_path: Path, train_data: Path) -> None:
    from aura.train import distributed

    group = distributed.Group(rank=0, world=3)
    with pytest.raises(distributed.ConfigError, match="does not split over 3 ranks"):
        distributed.check_batch(group, 4)


@pytest.mark.slow
def test_one_rank_checkpoint_resumes_on_two_with_shared_memories(
        tmp_path: Path, train_data: Path, run_cli: Any) -> None:
    hippo = ["--set", "model.name=hippocampal", "--set", "model.n_place_cells=64",
             "--set", "model.memory_capacity=64", "--set", "model.memory_writes=8",
             "--set", "train.memory_warmup_steps=1"]
    single = tmp_path / "single"
    assert run_cli("train", *train_args(train_data, single, 6, *hippo)).code == 0
    run = tmp_path / "run"
    assert run_cli("train", *train_args(train_data, run, 3, *hippo)).code == 0
    out, reports = torchrun(tmp_path, ["--out", str(run), "--data", str(train_data),
                                       "--resume", "--max-steps", "6"], run)
    assert out.returncode == 0, out.stderr[-3000:]
    assert reports[0]["stores"] == reports[1]["stores"]  # every rank's memories identical
    # equal but for ties in which states are novel enough to remember (float order)
    assert_close(losses(run), losses(single), tol=2e-3)


@pytest.mark.slow
def test_fsdp_equals_one_process_with_half_the_parameters_per_rank(
        tmp_path: Path, train_data: Path, run_cli: Any) -> None:
    single = tmp_path / "single"
    assert run_cli("train", *train_args(train_data, single, 6)).code == 0
    run = tmp_path / "fsdp"
    out, reports = torchrun(tmp_path, train_args(train_data, run, 3,
                                                 "--set", "train.parallel=fsdp"), run)
    assert out.returncode == 0, out.stderr[-3000:]
    assert reports[1]["writes"] == []
    from aura.config import load_config
    from aura.models import build_model

    cfg = load_config(preset="demo", overrides=[o for o in TINY if o != "--set"]
                      + ["model.vocab_size=60"])
    total = build_model(cfg.model).num_params()
    for r in reports:  # each rank holds half of every sharded tensor (dim 0, padded)
        assert 0.45 * total <= r["param_numel"] <= 0.55 * total, (r["param_numel"], total)
    want = losses(single)
    assert_close(losses(run), {s: v for s, v in want.items() if s <= 3})
    # its consolidated checkpoint is a single-process one: resumes in one process
    assert run_cli("train", "--out", str(run), "--data", str(train_data), "--resume",
                   "--max-steps", "6").code == 0
    assert_close(losses(run), want)


@pytest.mark.slow
def test_a_killed_rank_stops_the_job_in_one_line_and_the_checkpoint_resumes(
        tmp_path: Path, train_data: Path, run_cli: Any) -> None:
    single = tmp_path / "single"
    assert run_cli("train", *train_args(train_data, single, 6)).code == 0
    run = tmp_path / "run"
    out, _ = torchrun(tmp_path, train_args(train_data, run, 6), run, kill_rank=1,
                      kill_after_step=5)
    assert out.returncode != 0
    assert "lost the other ranks of the job at step" in out.stderr, out.stderr[-3000:]
    assert "step-00000003" in out.stderr and "continue with --resume" in out.stderr
    assert run_cli("train", "--out", str(run), "--data", str(train_data), "--resume").code == 0
    assert_close(losses(run), losses(single))


def test_export_writes_a_verified_weights_only_checkpoint(
        tmp_path: Path, train_data: Path, run_cli: Any) -> None:
    from aura.train.checkpoint import load_for_inference, verify_checkpoint

    run = tmp_path / "run"
    assert run_cli("train", *train_args(train_data, run, 3)).code == 0
    out = tmp_path / "exported"
    assert run_cli("export", str(run), "--out", str(out)).code == 0
    assert sorted(verify_checkpoint(out)["files"]) == ["model.safetensors", "tokenizer.aura.json"]
    loaded = load_for_inference(out)
    trained = load_for_inference(run)
    for (name, a), b in zip(loaded.model.state_dict().items(),
                            trained.model.state_dict().values(), strict=True):
        assert a.equal(b), name
    again = run_cli("export", str(run), "--out", str(out))
    assert again.code == 2 and "already exists" in again.err


@pytest.mark.slow
def test_two_rank_resume_is_bit_exact(tmp_path: Path, train_data: Path) -> None:
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert torchrun(tmp_path, train_args(train_data, whole, 6), whole)[0].returncode == 0
    assert torchrun(tmp_path, train_args(train_data, halves, 3), halves)[0].returncode == 0
    out, _ = torchrun(tmp_path, ["--out", str(halves), "--data", str(train_data), "--resume",
                                 "--max-steps", "6"], halves)
    assert out.returncode == 0, out.stderr[-3000:]
    assert losses(halves) == losses(whole)

    def digests(run: Path) -> dict[str, str]:
        meta = json.loads((run / "checkpoints/step-00000006/meta.json").read_text())
        return meta["files"]

    assert digests(halves) == digests(whole)  # weights, optimizer state and RNG, bit for bit


@pytest.mark.slow
def test_a_run_rank0_refuses_stops_every_rank_with_one_line(tmp_path: Path, train_data: Path,
                                                            run_cli: Any) -> None:
    run = tmp_path / "run"
    assert run_cli("train", *train_args(train_data, run, 3)).code == 0
    out, reports = torchrun(tmp_path, train_args(train_data, run, 3), run)  # no --resume
    assert out.returncode != 0
    assert [r["code"] for r in reports] == [2, 2]
    errors = [line for line in out.stderr.splitlines() if line.startswith("aura: error")]
    assert len(errors) == 1 and "already holds checkpoints" in errors[0], out.stderr[-2000:]
    assert reports[1]["writes"] == []


@pytest.mark.parametrize("together", [True, False])
def test_a_finished_job_meets_before_it_tears_its_group_down(monkeypatch, together: bool) -> None:
    """A normal end waits at a barrier before destroying the group (else a rank could cut
    connections another still uses); an error path never waits on ranks that may be gone."""
    from aura.train import distributed

    calls: list[str] = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group",
                        lambda: calls.append("destroy"))
    group = distributed.Group(rank=0, world=2, owns_group=True)
    group.close(together=together)
    group.close(together=together)  # once destroyed, nothing more
    assert calls == (["barrier", "destroy"] if together else ["destroy"])
