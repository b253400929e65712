"""Training curves: a PNG from metrics.jsonl, tolerant of a torn last line and missing keys."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from aura.errors import DataError
from aura.eval.plots import ema, plot_run, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(run: Path, lr: bool = True, extra: str = "") -> Path:
    """A 300-step run: train rows every step, an eval row every 50, an unrelated row."""
    run.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = [{"event": "start", "config": {"model": "gpt"}}]
    for step in range(300):
        row: dict[str, Any] = {"step": step, "loss": 5.0 * math.exp(-step / 80) + 1.5
                               + 0.2 * math.sin(step), "grad_norm": 2.0 / (1 + step / 30),
                               "tokens_per_s": 9000 + 50 * math.sin(step / 7)}
        if lr:
            row["lr"] = 1e-3 * min(1.0, (step + 1) / 30)
        rows.append(row)
        if step % 50 == 0:
            rows.append({"step": step, "val_loss": 5.0 * math.exp(-step / 80) + 1.7})
    path = run / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra, encoding="utf-8")
    return path


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000


def test_plots_a_png_next_to_the_metrics(tmp_path: Path) -> None:
    run = tmp_path / "run-7"
    write_metrics(run)
    out = plot_run(run)
    assert out == run / "curves.png"
    assert_png(out)
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_explicit_output_path(tmp_path: Path) -> None:
    write_metrics(tmp_path / "run")
    out = plot_run(tmp_path / "run", tmp_path / "figs" / "a.png")
    assert out == tmp_path / "figs" / "a.png"
    assert_png(out)


def test_truncated_last_line_is_tolerated(tmp_path: Path) -> None:
    path = write_metrics(tmp_path / "run", extra='{"step": 300, "loss": 1.')
    rows = read_metrics(path)
    assert len(rows) == 1 + 300 + 6  # start row, train rows, eval rows; torn row dropped
    assert rows[-1]["step"] == 299
    assert_png(plot_run(tmp_path / "run"))


def test_corrupt_middle_line_is_a_data_error(tmp_path: Path) -> None:
    path = write_metrics(tmp_path / "run")
    lines = path.read_text().splitlines()
    lines[5] = lines[5][:10]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 6 is not JSON"):
        plot_run(tmp_path / "run")


def test_rows_without_lr_still_plot(tmp_path: Path) -> None:
    write_metrics(tmp_path / "run", lr=False)
    assert_png(plot_run(tmp_path / "run"))


def test_only_loss_and_step_is_enough(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 4.0 - s / 100} for s in range(200)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert_png(plot_run(run))


@pytest.mark.parametrize("content", [None, "", "\n\n", '{"step": 1, "lo', '{"event": "start"}\n'])
def test_missing_or_empty_metrics_is_a_data_error(tmp_path: Path, content: str | None) -> None:
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    with pytest.raises(DataError) as exc:
        plot_run(run)
    assert "\n" not in str(exc.value)
    assert not (run / "curves.png").exists()


def test_missing_run_dir_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no run directory"):
        plot_run(tmp_path / "nope")


def test_ema_is_unbiased_at_the_start_and_smooths() -> None:
    assert ema([3.0] * 100) == pytest.approx([3.0] * 100)
    noisy = [1.0 + (-1) ** i for i in range(400)]
    smooth = ema(noisy)
    assert smooth[0] == 2.0
    assert max(abs(v - 1.0) for v in smooth[200:]) < 0.1
