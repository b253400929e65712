"""A run directory's integrity: one writer at a time, checkpoints of one history that a run never
resumes from, mixes with or deletes unless they are its own, files a checkpoint names confined to
it, and a warning whenever a command uses another checkpoint than the one it would have."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import aura
from aura.data.tokenizers import ByteTokenizer
from aura.errors import DataError
from aura.models import build_model
from aura.train import checkpoint as ck
from aura.train.checkpoint import (
    HISTORY_FILE,
    TrainState,
    list_checkpoints,
    lock_run,
    mark_best,
    prune,
    read_best,
    save_checkpoint,
    step_dir,
    verify_checkpoint,
)
from aura.train.trainer import Trainer
from conftest import TINY_TRAIN, CliResult, assert_usage_error, losses, tiny_config

Run = Callable[..., CliResult]
BASE = ("train.max_steps=12", "train.eval_interval=4", "train.checkpoint_interval=4")
SETS = [a for s in (*TINY_TRAIN, *BASE) for a in ("--set", s)]


@pytest.fixture(scope="module")
def reference(train_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 12-step run with checkpoints at 4, 8 and 12, which `--resume` continues."""
    run = tmp_path_factory.mktemp("integrity-ref") / "run"
    Trainer(tiny_config(*BASE, f"data.dir={train_data}"), train_data, run, progress=False,
            log=lambda _m: None).run()
    return run


@pytest.fixture
def run(reference: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(reference, copy)
    return copy


def digest(root: Path, leave_out: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file under ``root`` by relative path -> sha256, but those named in ``leave_out``."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in leave_out}


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_meta(ckpt: Path, **fields: Any) -> None:
    """Change meta.json's fields (meta.json is not among the files it hashes)."""
    meta = json.loads((ckpt / "meta.json").read_text())
    meta.update(fields)
    (ckpt / "meta.json").write_text(json.dumps(meta))


def history_of(run: Path) -> str:
    return json.loads((run / HISTORY_FILE).read_text())["history"]


def generate(run_cli: Run, target: Path) -> CliResult:
    res = run_cli("generate", target, "--prompt", "The ", "--max-new-tokens", 1, "--device", "cpu",
                  "--json")
    assert res.code == 0, res.err
    return res


def warnings(res: CliResult) -> list[str]:
    return [line for line in res.err.splitlines() if line.startswith("warning:")]


# --- 1. checkpoints that cannot be resumed are never lost --------------------------------------


def test_resume_with_no_usable_checkpoint_is_refused_and_changes_nothing(
        run_cli: Run, run: Path, train_data: Path) -> None:
    for path in list_checkpoints(run):
        flip(path / "model.safetensors")
    before = digest(run, leave_out=("lock",))
    res = run_cli("train", "--out", run, "--resume")
    assert_usage_error(res, "step-00000004", "step-00000008", "step-00000012",
                       "model.safetensors is missing, truncated or corrupt",
                       "--restart-discarding-checkpoints")
    fresh = run_cli("train", "--preset", "demo", *SETS, "--data", train_data, "--out", run)
    assert_usage_error(fresh, "already holds checkpoints", "--resume",
                       "--restart-discarding-checkpoints")
    assert digest(run, leave_out=("lock",)) == before


def test_restart_discarding_checkpoints_moves_the_old_run_aside(
        run_cli: Run, run: Path, reference: Path) -> None:
    for path in list_checkpoints(run):
        flip(path / "model.safetensors")
    old_history = history_of(run)
    before = digest(run, leave_out=("lock",))
    res = run_cli("train", "--out", run, "--resume", "--restart-discarding-checkpoints", "--json")
    assert res.code == 0, res.err
    (discarded,) = run.glob("discarded-*")
    notes = [line for line in res.err.splitlines() if "moved" in line]
    assert len(notes) == 1 and notes[0].startswith("note: ") and str(discarded) in notes[0]
    assert digest(discarded) == before  # every file of the old run, byte for byte
    assert res.json()["step"] == 12
    assert losses(run) == losses(reference)  # a true fresh start
    assert history_of(run) != old_history
    for path in list_checkpoints(run):
        assert verify_checkpoint(path)["history"] == history_of(run)


def test_prune_deletes_only_checkpoints_of_the_runs_history(tmp_path: Path) -> None:
    """Another history's and an unreadable one's are kept; one from before histories (no id)
    counts as the run's own."""
    cfg = tiny_config("model.vocab_size=256")
    model, tokenizer = build_model(cfg.model), ByteTokenizer()
    for step, history in ((1, "other"), (2, "other"), (3, "ours"), (4, "ours"), (5, "ours"),
                          (6, None), (7, "ours")):
        save_checkpoint(tmp_path, model, tokenizer, cfg, TrainState(step=step), None,
                        history=history)
    (step_dir(tmp_path, 4) / "meta.json").write_text("{torn")
    mark_best(tmp_path, 2, 0.5)  # a best of another history protects nothing of ours
    prune(tmp_path, 1, history="ours")
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step-00000001", "step-00000002", "step-00000004", "step-00000007"]


def test_a_run_from_before_histories_resumes_and_adopts_one(run_cli: Run, run: Path) -> None:
    for path in list_checkpoints(run):
        meta = json.loads((path / "meta.json").read_text())
        del meta["history"]
        (path / "meta.json").write_text(json.dumps(meta))
    (run / HISTORY_FILE).unlink()
    res = run_cli("train", "--out", run, "--resume", "--max-steps", 16, "--keep-checkpoints", 1,
                  "--json")
    assert res.code == 0, res.err
    assert f"resumed from {step_dir(run, 12)} at step 12" in res.err
    assert verify_checkpoint(step_dir(run, 16))["history"] == history_of(run)
    kept = {int(p.name.removeprefix("step-")) for p in list_checkpoints(run)}
    assert kept == {16, read_best(run)["step"]}  # the old ones were pruned as the run's own


def test_a_checkpoint_of_another_history_is_neither_resumed_nor_overwritten(
        run_cli: Run, run: Path) -> None:
    edit_meta(step_dir(run, 12), history="someone-else")
    foreign = digest(step_dir(run, 12))
    res = run_cli("train", "--out", run, "--resume", "--json")
    assert res.code == 0, res.err
    skipped = [w for w in warnings(res) if "falling back" in w]
    assert len(skipped) == 1 and "belongs to history someone-else" in skipped[0]
    assert f"resumed from {step_dir(run, 8)} at step 8" in res.err
    (discarded,) = run.glob("discarded-*")
    assert any(str(discarded) in w and "step-00000012" in w for w in warnings(res))
    assert digest(discarded / "checkpoints" / "step-00000012") == foreign
    assert verify_checkpoint(step_dir(run, 12))["history"] == history_of(run)


# --- 2. one writer at a time -------------------------------------------------------------------


def test_a_second_train_on_a_locked_run_is_refused_and_writes_nothing(
        run_cli: Run, train_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = Trainer(tiny_config(*BASE), train_data, run, progress=False, log=lambda _m: None)
    before = digest(run)
    holder = f"held by pid {os.getpid()} on {socket.gethostname()} since "
    for extra in ((), ("--resume",)):
        res = run_cli("train", "--preset", "demo", *SETS, "--data", train_data, "--out", run,
                      *extra)
        assert_usage_error(res, f"{run} is being written by another process", holder,
                           ": aura train)")
        assert digest(run) == before
    assert first.run().step == 12
    assert sorted(losses(run)) == list(range(1, 13))  # each step once (losses checks)
    assert (run / "lock").read_bytes() == b""


def test_memory_build_on_a_locked_run_is_refused(run_cli: Run, run: Path,
                                                 train_data: Path) -> None:
    before = digest(run, leave_out=("lock",))
    with lock_run(run, "aura train --resume"):
        for target in (run, step_dir(run, 12)):  # a checkpoint is locked by its run
            res = run_cli("memory", "build", target, "--data", train_data)
            assert_usage_error(res, "is being written by another process",
                               f"pid {os.getpid()}", "aura train --resume")
    assert digest(run, leave_out=("lock",)) == before


HOLD = """
import sys, time
from pathlib import Path
from aura.lock import DirectoryLock

lock = DirectoryLock(Path(sys.argv[1]), "aura train", "busy")
print("locked", flush=True)
time.sleep(60)
"""


def test_a_lock_left_by_a_killed_process_blocks_nothing(run_cli: Run, run: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(aura.__file__).parents[1])}
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(run / "lock")],
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None and child.stdout.readline() == "locked\n"
        assert_usage_error(run_cli("train", "--out", run, "--resume"), f"pid {child.pid} ")
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert json.loads((run / "lock").read_text())["pid"] == child.pid  # left behind
    res = run_cli("train", "--out", run, "--resume", "--max-steps", 13, "--json")
    assert res.code == 0, res.err
    assert res.json()["step"] == 13


# --- 5. tampered run directories ---------------------------------------------------------------


def test_unknown_entries_in_checkpoints_are_ignored_with_a_warning(run_cli: Run,
                                                                   run: Path) -> None:
    strays = [run / "checkpoints" / "step-abc", run / "checkpoints" / "step-12"]
    for stray in strays:
        stray.mkdir()
    (run / "checkpoints" / "notes.txt").write_text("mine\n")
    (run / "best.json").unlink()
    assert generate(run_cli, run).json()["checkpoint"] == str(step_dir(run, 12))
    res = run_cli("train", "--out", run, "--resume", "--max-steps", 16, "--keep-checkpoints", 1,
                  "--json")
    assert res.code == 0, res.err
    ignored = [w for w in warnings(res) if "ignoring" in w]
    assert len(ignored) == 3 and all("not a checkpoint" in w for w in ignored), res.err
    assert all(stray.is_dir() for stray in strays) and (run / "checkpoints" / "notes.txt").exists()


def test_a_malformed_best_json_warns_and_falls_back_to_the_newest(run_cli: Run,
                                                                  run: Path) -> None:
    """best.json only points at a checkpoint: the checkpoints are fine, so sampling goes on from
    the newest, and training goes on, said once, not at every save."""
    (run / "best.json").write_text(json.dumps({"step": "8", "val_loss": 1.0}))
    res = generate(run_cli, run)
    assert res.json()["checkpoint"] == str(step_dir(run, 12))
    (line,) = warnings(res)
    assert "best.json is malformed" in line and "newest good checkpoint" in line
    res = run_cli("train", "--out", run, "--resume", "--max-steps", 20,
                  "--set", "train.eval_interval=100", "--json")
    assert res.code == 0, res.err
    (line,) = warnings(res)  # the save at 16 says it; the one at 20 does not repeat it
    assert "best.json is malformed" in line and "no checkpoint is pruned" in line


def test_pruning_waits_while_best_json_is_malformed(run: Path) -> None:
    """Which checkpoint is the best is unknown, so none is deleted (it might be the one)."""
    (run / "best.json").write_text("[]")
    before = list_checkpoints(run)
    said: list[str] = []
    prune(run, 1, history_of(run), said.append)
    assert list_checkpoints(run) == before
    assert len(said) == 1 and "best.json is malformed" in said[0]


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("step", "abc", "'step' is not a non-negative integer"),
    ("step", 8, "meta.json says step 8"),
    ("files", ["model.safetensors"], "'files' is not an object"),
    ("config", "gpt", "'config' is not an object with a model section"),
    ("tokenizer_hash", 5, "'tokenizer_hash' is not a string"),
    ("val_loss", "low", "'val_loss' is not a number"),
    ("history", 7, "'history' is not a string"),
])
def test_a_meta_field_of_the_wrong_type_is_a_corrupt_checkpoint(run: Path, field: str,
                                                                value: Any, needle: str) -> None:
    edit_meta(step_dir(run, 12), **{field: value})
    with pytest.raises(DataError, match=needle):
        verify_checkpoint(step_dir(run, 12))


def test_a_corrupt_meta_is_skipped_by_generate_and_resume(run_cli: Run, run: Path) -> None:
    edit_meta(step_dir(run, 12), step="abc")
    (run / "best.json").unlink()
    res = generate(run_cli, run)
    assert res.json()["checkpoint"] == str(step_dir(run, 8))
    res = run_cli("train", "--out", run, "--resume", "--json")
    assert res.code == 0, res.err
    assert f"resumed from {step_dir(run, 8)} at step 8" in res.err
    assert "Traceback" not in res.err


# --- 6. a checkpoint's files lie inside it -----------------------------------------------------


def _outside_name(ckpt: Path, tmp_path: Path, how: str) -> tuple[str, Path]:
    """A file outside ``ckpt`` with the bytes of its tokenizer, and the name meta.json gives it."""
    outside = tmp_path / "outside.json"
    shutil.copy(ckpt / "tokenizer.aura.json", outside)
    if how == "absolute":
        return str(outside), outside
    if how == "dotdot":
        return os.path.relpath(outside, ckpt), outside
    (ckpt / "linked").symlink_to(tmp_path)  # a directory link leading out
    return "linked/outside.json", outside


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_a_checkpoint_naming_a_file_outside_itself_is_corrupt_and_never_reads_it(
        run_cli: Run, run: Path, tmp_path: Path, how: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = step_dir(run, 12)
    name, outside = _outside_name(ckpt, tmp_path, how)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][name] = ck.file_sha256(outside)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    hashed: list[Path] = []
    real_sha256 = ck.file_sha256
    monkeypatch.setattr(ck, "file_sha256", lambda p: hashed.append(Path(p)) or real_sha256(p))
    with pytest.raises(DataError, match="outside its directory"):
        verify_checkpoint(ckpt)
    assert hashed == []  # refused before anything was read
    assert_usage_error(run_cli("generate", ckpt, "--json"), "outside its directory")


# --- 14. using another checkpoint than the newest or the best is said --------------------------


def test_generate_and_resume_name_the_checkpoint_skipped_and_the_one_used(
        run_cli: Run, run: Path) -> None:
    mark_best(run, 4, 0.1)
    flip(step_dir(run, 4) / "model.safetensors")
    res = generate(run_cli, run)
    assert res.json()["checkpoint"] == str(step_dir(run, 12))
    (line,) = warnings(res)
    assert str(step_dir(run, 4)) in line and line.endswith(f"falling back to {step_dir(run, 12)}")

    flip(step_dir(run, 12) / "model.safetensors")
    res = generate(run_cli, run)
    assert res.json()["checkpoint"] == str(step_dir(run, 8))
    lines = warnings(res)
    assert len(lines) == 2 and all(w.endswith(f"falling back to {step_dir(run, 8)}")
                                   for w in lines)
    assert str(step_dir(run, 4)) in lines[0] and str(step_dir(run, 12)) in lines[1]

    res = run_cli("train", "--out", run, "--resume", "--json")
    assert res.code == 0, res.err
    (line,) = [w for w in warnings(res) if "falling back" in w]
    assert str(step_dir(run, 12)) in line and line.endswith(f"falling back to {step_dir(run, 8)}")
