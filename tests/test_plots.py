"""Training curves: what the figure draws from metrics.jsonl (every step, the EMA, val points,
the optional panels), tolerant of a torn last line and missing keys; one PNG on disk."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from aura.errors import DataError
from aura.eval.plots import curves_figure, ema, plot_run, plot_runs, read_metrics, runs_figure
from conftest import requires_extra

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LOSS, LR, GRAD, TOKS = "loss (nats/token)", "learning rate", "grad norm", "tokens/s"


@pytest.fixture
def plot_extra() -> ModuleType:
    """Drawing needs the plot extra; the tests that only read or reject metrics do not."""
    return requires_extra("matplotlib", "plot")


def loss_at(step: int) -> float:
    return 5.0 * math.exp(-step / 80) + 1.5 + 0.2 * math.sin(step)


def val_at(step: int) -> float:
    return 5.0 * math.exp(-step / 80) + 1.7


def lr_at(step: int) -> float:
    return 1e-3 * min(1.0, (step + 1) / 30)


def toks_at(step: int) -> float:
    return 9000 + 50 * math.sin(step / 7)


def write_metrics(run: Path, lr: bool = True, extra: str = "") -> Path:
    """A 300-step run: train rows every step, an eval row every 50, an unrelated row."""
    run.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = [{"event": "start", "config": {"model": "gpt"}}]
    for step in range(300):
        row: dict[str, Any] = {"step": step, "loss": loss_at(step),
                               "grad_norm": 2.0 / (1 + step / 30), "tokens_per_s": toks_at(step)}
        if lr:
            row["lr"] = lr_at(step)
        rows.append(row)
        if step % 50 == 0:
            rows.append({"step": step, "val_loss": val_at(step)})
    path = run / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra, encoding="utf-8")
    return path


def drawn(path: Path) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """``{panel y label: {line label: (x, y)}}`` of the figure drawn from ``path``'s rows."""
    fig = curves_figure(read_metrics(path), "run")
    return {ax.get_ylabel(): {line.get_label(): (list(map(float, line.get_xdata())),
                                                 list(map(float, line.get_ydata())))
                              for line in ax.get_lines()}
            for ax in fig.axes}


def total_variation(values: list[float]) -> float:
    return sum(abs(b - a) for a, b in itertools.pairwise(values))


@pytest.mark.usefixtures("plot_extra")
def test_plots_a_png_next_to_the_metrics(tmp_path: Path) -> None:
    run = tmp_path / "run-7"
    write_metrics(run)
    out = plot_run(run)
    assert out == run / "curves.png"
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no temp file left


@pytest.mark.usefixtures("plot_extra")
def test_explicit_output_path(tmp_path: Path) -> None:
    write_metrics(tmp_path / "run")
    (tmp_path / "figs").mkdir()
    out = plot_run(tmp_path / "run", tmp_path / "figs" / "a.png")
    assert out == tmp_path / "figs" / "a.png" and out.is_file()
    assert not (tmp_path / "run" / "curves.png").exists()


def test_an_output_path_in_a_missing_directory_creates_nothing(tmp_path: Path) -> None:
    """A mistyped --out fails before drawing rather than making directories where it pointed."""
    write_metrics(tmp_path / "run")
    with pytest.raises(DataError, match="no directory"):
        plot_run(tmp_path / "run", tmp_path / "nonexistent" / "dir" / "a.png")
    assert not (tmp_path / "nonexistent").exists()


@pytest.mark.usefixtures("plot_extra")
def test_loss_panel_draws_every_train_step_its_ema_and_the_val_points(tmp_path: Path) -> None:
    loss = drawn(write_metrics(tmp_path / "run"))[LOSS]
    assert set(loss) == {"train", "train (EMA)", "val"}
    steps, values = loss["train"]
    assert steps == list(range(300))
    assert values == pytest.approx([loss_at(s) for s in range(300)])
    ema_steps, smooth = loss["train (EMA)"]
    assert ema_steps == steps and smooth == pytest.approx(ema(values))
    assert total_variation(smooth) < total_variation(values) / 3  # the wiggle is smoothed out
    assert loss["val"] == (list(range(0, 300, 50)),
                           pytest.approx([val_at(s) for s in range(0, 300, 50)]))


@pytest.mark.usefixtures("plot_extra")
def test_optional_panels_show_what_the_run_logged(tmp_path: Path) -> None:
    panels = drawn(write_metrics(tmp_path / "run"))
    assert list(panels) == [LOSS, LR, GRAD, TOKS]
    (lr,) = panels[LR].values()
    assert lr == (list(range(300)), pytest.approx([lr_at(s) for s in range(300)]))
    (toks,) = panels[TOKS].values()
    assert toks == (list(range(300)), pytest.approx([toks_at(s) for s in range(300)]))
    fig = curves_figure(read_metrics(tmp_path / "run" / "metrics.jsonl"), "run-7")
    assert [ax.get_yscale() for ax in fig.axes] == ["linear", "linear", "log", "linear"]
    assert fig.get_suptitle() == "run-7"


@pytest.mark.usefixtures("plot_extra")
def test_rows_without_lr_have_no_lr_panel(tmp_path: Path) -> None:
    panels = drawn(write_metrics(tmp_path / "run", lr=False))
    assert list(panels) == [LOSS, GRAD, TOKS]


@pytest.mark.usefixtures("plot_extra")
def test_truncated_last_line_is_dropped_from_the_data(tmp_path: Path) -> None:
    path = write_metrics(tmp_path / "run", extra='{"step": 300, "loss": 1.')
    rows = read_metrics(path)
    assert len(rows) == 1 + 300 + 6  # start row, train rows, eval rows; torn row dropped
    assert rows[-1]["step"] == 299
    steps, values = drawn(path)[LOSS]["train"]
    assert steps[-1] == 299 and len(steps) == 300
    assert values[-1] == pytest.approx(loss_at(299))


@pytest.mark.usefixtures("plot_extra")
def test_only_loss_and_step_is_enough(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 4.0 - s / 100} for s in range(200)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    panels = drawn(run / "metrics.jsonl")
    assert list(panels) == [LOSS]
    assert set(panels[LOSS]) == {"train", "train (EMA)"}
    assert panels[LOSS]["train"] == (list(range(200)),
                                     pytest.approx([4.0 - s / 100 for s in range(200)]))


def test_corrupt_middle_line_is_a_data_error(tmp_path: Path) -> None:
    path = write_metrics(tmp_path / "run")
    lines = path.read_text().splitlines()
    lines[5] = lines[5][:10]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 6 is not JSON"):
        plot_run(tmp_path / "run")


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


# --- the model's aux metrics, and several runs overlaid -----------------------------------------

def write_aux_run(run: Path, gate: float, layers: int = 2) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    rows = [{"step": s, "loss": loss_at(s), "aux/firing_rate": 0.05,
             **{f"aux/firing_rate_{i}": 0.04 + 0.01 * i for i in range(layers)},
             "aux/memory_gate": gate, "aux/x_active/0": 0.1} for s in range(50)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


@pytest.mark.usefixtures("plot_extra")
def test_aux_metrics_get_a_panel_per_family_a_line_per_layer(tmp_path: Path) -> None:
    panels = drawn(write_aux_run(tmp_path / "run", 0.1) / "metrics.jsonl")
    assert list(panels) == [LOSS, "firing_rate", "memory_gate", "x_active"]
    assert set(panels["firing_rate"]) == {"mean", "layer 0", "layer 1"}
    assert panels["firing_rate"]["layer 1"][1] == pytest.approx([0.05] * 50)
    assert set(panels["x_active"]) == {"layer 0"}


@pytest.mark.usefixtures("plot_extra")
def test_several_runs_are_overlaid(tmp_path: Path) -> None:
    a, b = write_aux_run(tmp_path / "a", 0.1), write_aux_run(tmp_path / "b", 0.3, layers=1)
    out = plot_runs([a, b])
    assert out == a / "compare.png" and out.read_bytes().startswith(PNG_SIGNATURE)
    fig = runs_figure([("a", read_metrics(a / "metrics.jsonl")),
                       ("b", read_metrics(b / "metrics.jsonl"))], "a vs b")
    lines = {ax.get_ylabel(): {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines()}
             for ax in fig.axes}
    assert set(lines[LOSS]) == {"a train (EMA)", "b train (EMA)"}
    assert set(lines["firing_rate"]) == {"a mean", "b mean"}  # the family mean per run
    assert lines["memory_gate"]["b mean"] == pytest.approx([0.3] * 50)
    with pytest.raises(DataError, match="no run directory"):
        plot_runs([a, tmp_path / "missing"])
