"""`aura train`, `aura generate`, `aura eval` and `aura plot` from the command line: output,
exit codes and one-line errors."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aura.cli import main
from aura.train.checkpoint import Checkpointer, list_checkpoints, step_dir, verify_checkpoint
from aura.train.trainer import Trainer
from conftest import TINY_TRAIN, CliResult, assert_usage_error, losses, requires_extra
from faults import FsFaults

Run = Callable[..., CliResult]
SETS = [a for s in (*TINY_TRAIN, "train.eval_interval=100") for a in ("--set", s)]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

SUMMARY_KEYS = {"tokens_per_s", "seconds", "run_dir"}


def train_args(data: Path, out: Path, *extra: str | int | Path) -> list[str | int | Path]:
    return ["train", "--preset", "demo", *SETS, "--data", data, "--out", out, *extra]


@pytest.fixture(scope="module")
def trained(train_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 5-step run made through the CLI, shared by the tests that only read it."""
    run = tmp_path_factory.mktemp("cli-run") / "run"
    argv = train_args(train_data, run, "--max-steps", 5, "--json")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main([str(a) for a in argv]) == 0
    return run


@pytest.fixture
def own_run(trained: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


# --- aura train -----------------------------------------------------------------------------


def test_train_json_prints_one_object(run_cli: Run, train_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = run_cli(*train_args(train_data, run, "--max-steps", 5, "--checkpoint-interval", 2,
                              "--keep-checkpoints", 1, "--json"))
    assert res.code == 0, res.err
    report = json.loads(res.out)  # the whole of stdout is one object
    assert report["run_dir"] == str(run)
    assert (report["step"], report["stopped"]) == (5, "max_steps")
    assert (report["nonfinite_skipped"], report["rollbacks"], report["micro_split"]) == (0, 0, 1)
    assert math.isfinite(report["train_loss"]) and math.isfinite(report["val_loss"])
    assert report["best_val_loss"] == report["val_loss"]
    assert report["precision"] == "fp32"  # what auto resolved to: 32 wide is fp32 on any CPU
    assert set(report) >= SUMMARY_KEYS
    assert "Traceback" not in res.err
    assert sorted(losses(run)) == [1, 2, 3, 4, 5]
    # --checkpoint-interval 2 and --keep-checkpoints 1: steps 2, 4, 5 saved, 5 kept (also best)
    assert list_checkpoints(run) == [step_dir(run, 5)]
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["max_steps"] == 5 and saved["train"]["checkpoint_interval"] == 2
    assert saved["model"]["n_embd"] == 32 and saved["data"]["dir"] == str(train_data)


def test_train_text_output_is_a_summary_line(run_cli: Run, train_data: Path,
                                             tmp_path: Path) -> None:
    res = run_cli(*train_args(train_data, tmp_path / "run", "--max-steps", 2))
    assert res.code == 0, res.err
    lines = res.out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("max_steps at step 2: val loss "), res.out
    assert " tokens/s in fp32, run in " in lines[0]


def test_training_into_an_existing_run_needs_resume(run_cli: Run, train_data: Path,
                                                    own_run: Path) -> None:
    before = (own_run / "metrics.jsonl").read_bytes()
    res = run_cli(*train_args(train_data, own_run, "--max-steps", 8, "--json"))
    assert_usage_error(res, "--resume")
    assert res.out == ""
    assert (own_run / "metrics.jsonl").read_bytes() == before
    assert list_checkpoints(own_run)[-1] == step_dir(own_run, 5)


def test_resume_without_a_preset_uses_the_saved_config(run_cli: Run, own_run: Path) -> None:
    """No --preset and no --data: both come from RUN/config.json; --set still applies."""
    res = run_cli("train", "--out", own_run, "--resume", "--max-steps", 8,
                  "--set", "train.lr=5e-4", "--json")
    assert res.code == 0, res.err
    assert (res.json()["step"], res.json()["stopped"]) == (8, "max_steps")
    assert f"resumed from {step_dir(own_run, 5)} at step 5" in res.err
    saved = json.loads((own_run / "config.json").read_text())
    assert saved["model"]["n_embd"] == 32 and saved["model"]["n_layer"] == 2
    assert saved["train"]["lr"] == 5e-4 and saved["train"]["max_steps"] == 8
    assert sorted(losses(own_run)) == list(range(1, 9))


def test_resume_with_a_different_model_is_a_usage_error(run_cli: Run, train_data: Path,
                                                        own_run: Path) -> None:
    """--preset with --resume rebuilds the config from the preset: a model of another shape
    cannot take the checkpoint's weights, and that is the user's input, not a crash."""
    res = run_cli("train", "--preset", "demo", "--data", train_data, "--out", own_run,
                  "--resume", "--max-steps", 8)
    assert_usage_error(res, "model.n_embd 32 -> 128", "omit --preset")
    assert sorted(losses(own_run)) == [1, 2, 3, 4, 5]


def test_resume_may_change_dropout(run_cli: Run, own_run: Path) -> None:
    res = run_cli("train", "--out", own_run, "--resume", "--max-steps", 6,
                  "--set", "model.dropout=0.2", "--json")
    assert res.code == 0, res.err
    assert res.json()["step"] == 6


def test_resume_of_an_empty_dir_without_a_preset_is_an_error(run_cli: Run,
                                                             tmp_path: Path) -> None:
    assert_usage_error(run_cli("train", "--out", tmp_path / "run", "--resume"), "--preset")


@pytest.mark.parametrize(("override", "needle"), [
    ("model.n_embd=wide", "model.n_embd"),
    ("train.learning_rate=1e-3", "unknown config key 'train.learning_rate'"),
    ("model.n_head=5", "divisible"),
    ("train.lr", "KEY=VALUE"),
    ("model.vocab_size=50", "vocab_size"),
])
def test_bad_set_is_a_usage_error(run_cli: Run, train_data: Path, tmp_path: Path,
                                  override: str, needle: str) -> None:
    res = run_cli(*train_args(train_data, tmp_path / "run", "--set", override, "--max-steps", 2))
    assert_usage_error(res, needle)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_data_dir_is_a_usage_error(run_cli: Run, tmp_path: Path) -> None:
    res = run_cli(*train_args(tmp_path / "nowhere", tmp_path / "run", "--max-steps", 2))
    assert_usage_error(res, "nowhere")


def test_unknown_model_is_a_usage_error(run_cli: Run, train_data: Path, tmp_path: Path) -> None:
    res = run_cli(*train_args(train_data, tmp_path / "run", "--model", "mamba", "--max-steps", 2))
    assert_usage_error(res, "unknown model 'mamba'")


# --- aura train: the file system and signals -----------------------------------------------

REFUSALS = [errno.EACCES, errno.EROFS, errno.ENOSPC]


def test_train_out_that_is_a_file_is_a_usage_error(run_cli: Run, train_data: Path,
                                                   tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x", encoding="utf-8")
    res = run_cli(*train_args(train_data, tmp_path / "file", "--max-steps", 2))
    assert_usage_error(res, str(tmp_path / "file"), "not a directory")
    assert (tmp_path / "file").read_text(encoding="utf-8") == "x"


@pytest.mark.parametrize("err", REFUSALS)
def test_train_out_where_writes_are_refused_fails_at_once(
        run_cli: Run, train_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        err: int) -> None:
    """A permission denied, a read-only file system or a full disk: one line with the path and
    the OS's reason, before the data is read or the model built, and nothing left behind."""
    (tmp_path / "locked").mkdir()
    FsFaults(monkeypatch).deny(tmp_path / "locked", err)
    built = []
    monkeypatch.setattr(Trainer, "__init__", lambda *a, **k: built.append(1))
    res = run_cli(*train_args(train_data, tmp_path / "locked" / "run", "--max-steps", 2))
    assert_usage_error(res, str(tmp_path / "locked" / "run"), os.strerror(err))
    assert built == [] and res.out == ""
    assert list((tmp_path / "locked").iterdir()) == []


@pytest.mark.parametrize("err", REFUSALS)
def test_a_run_dir_that_refuses_writes_mid_run_keeps_the_last_checkpoint(
        run_cli: Run, train_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        err: int) -> None:
    """The run directory turns read-only (or full) after the step-4 checkpoint: the step-8 save
    fails, and the run ends with one clear line naming the intact checkpoint to resume from,
    without a traceback from the main thread or TensorBoard's writer thread."""
    run = tmp_path / "run"
    faults = FsFaults(monkeypatch)
    save = Checkpointer.save

    def save_then_refuse(self: Checkpointer, *args: Any, **kwargs: Any) -> Path:
        path = save(self, *args, **kwargs)
        faults.deny(run, err)
        return path

    monkeypatch.setattr(Checkpointer, "save", save_then_refuse)
    res = run_cli(*train_args(train_data, run, "--max-steps", 8, "--checkpoint-interval", 4))
    assert res.code == 2, res.err
    assert "Traceback" not in res.err and "Exception in thread" not in res.err, res.err
    last = res.err.splitlines()[-1]
    assert last.startswith("aura: error: training stopped at step 8: "), last
    assert f"{step_dir(run, 8)}: {os.strerror(err)}" in last
    assert f"{step_dir(run, 4)}, is intact" in last and "--resume" in last
    assert res.out == ""
    assert list_checkpoints(run) == [step_dir(run, 4)]
    assert not list((run / "checkpoints").glob(".*"))  # no half-written temporary
    verify_checkpoint(step_dir(run, 4), need_train_state=True)
    assert sorted(losses(run)) == list(range(1, 9))  # the metrics were kept to the end


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_run_stopped_by_a_signal_exits_128_plus_its_number(
        run_cli: Run, train_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        sig: signal.Signals, code: int) -> None:
    """Saved, but not finished: scripts tell it from a finished run by the exit code (as a
    shell does for a process the signal killed), and --json still prints the summary."""
    step = Trainer._guarded_step

    def signal_during_step_3(self: Trainer, n: int) -> Any:
        if n == 2:
            os.kill(os.getpid(), sig)
        return step(self, n)

    monkeypatch.setattr(Trainer, "_guarded_step", signal_during_step_3)
    run = tmp_path / "run"
    res = run_cli(*train_args(train_data, run, "--max-steps", 50, "--json"))
    assert res.code == code, res.err
    report = res.json()
    assert (report["stopped"], report["stop_signal"], report["step"]) == (
        "interrupted", sig.name, 3)
    assert list_checkpoints(run) == [step_dir(run, 3)]
    verify_checkpoint(step_dir(run, 3), need_train_state=True)


# --- generate / eval / plot -----------------------------------------------------------------


def test_generate_json(run_cli: Run, trained: Path) -> None:
    argv = ["generate", trained, "--prompt", "The ", "--max-new-tokens", 20, "--seed", 1,
            "--device", "cpu", "--json"]
    res = run_cli(*argv)
    assert res.code == 0, res.err
    report = res.json()
    assert report["prompt"] == "The "
    assert report["checkpoint"] == str(step_dir(trained, 5))
    text = report["text"]
    assert isinstance(text, str) and len(text) == 20  # char tokens, no end-of-text to stop on
    assert run_cli(*argv).json()["text"] == text  # the same seed, the same text


def test_generate_streams_the_prompt_and_text(run_cli: Run, trained: Path) -> None:
    res = run_cli("generate", trained, "--prompt", "The ", "--max-new-tokens", 10,
                  "--seed", 3, "--device", "cpu")
    assert res.code == 0, res.err
    assert res.out.startswith("The ") and len(res.out.rstrip("\n")) >= 4


@pytest.mark.parametrize("extra", [
    ["--max-new-tokens", "99999999999999999999999"],
    ["--max-new-tokens", "-5"],
    ["--stop", ""],
    ["--prompt", "snow \u2603"],  # not in the char vocabulary
])
def test_generate_refuses_bad_input_before_printing_anything(run_cli: Run, trained: Path,
                                                             extra: list[str]) -> None:
    res = run_cli("generate", trained, "--prompt", "The ", "--device", "cpu", *extra)
    assert_usage_error(res)
    assert res.out == ""


def test_eval_text_json(run_cli: Run, trained: Path, tmp_path: Path,
                        corpus_file: Path) -> None:
    res = run_cli("eval", trained, "--text", corpus_file, "--device", "cpu", "--json")
    assert res.code == 0, res.err
    report = res.json()
    assert {"loss", "ppl", "bits_per_byte", "n_tokens", "checkpoint"} <= set(report)
    assert 0 < report["loss"] < math.log(60) + 0.5
    assert report["ppl"] == pytest.approx(math.exp(report["loss"]), rel=1e-6)
    assert report["bits_per_byte"] == pytest.approx(report["loss"] / math.log(2), rel=1e-3)


def test_eval_prepared_split_json(run_cli: Run, trained: Path, train_data: Path) -> None:
    res = run_cli("eval", trained, "--data", train_data, "--split", "val", "--device", "cpu",
                  "--json")
    assert res.code == 0, res.err
    assert math.isfinite(res.json()["loss"]) and res.json()["n_tokens"] > 0


def test_eval_missing_text_file_is_a_usage_error(run_cli: Run, trained: Path,
                                                 tmp_path: Path) -> None:
    res = run_cli("eval", trained, "--text", tmp_path / "missing.txt", "--json")
    assert_usage_error(res, "missing.txt")


def test_plot_writes_a_png(run_cli: Run, trained: Path, tmp_path: Path) -> None:
    requires_extra("matplotlib", "plot")
    out = tmp_path / "curves.png"
    res = run_cli("plot", trained, "--out", out)
    assert res.code == 0, res.err
    assert res.out.strip() == str(out)
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_plot_creates_no_directory_the_user_did_not_make(run_cli: Run, trained: Path,
                                                         tmp_path: Path) -> None:
    res = run_cli("plot", trained, "--out", tmp_path / "nonexistent" / "dir" / "x.png")
    assert_usage_error(res, str(tmp_path / "nonexistent" / "dir"))
    assert not (tmp_path / "nonexistent").exists()
    assert_usage_error(run_cli("plot", trained, "--out", tmp_path), "is a directory")
    assert list(tmp_path.iterdir()) == []


def test_generate_from_a_missing_run_is_a_usage_error(run_cli: Run, tmp_path: Path) -> None:
    assert_usage_error(run_cli("generate", tmp_path / "nope", "--json"), "nope")
