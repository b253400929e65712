"""Training curves from a run's metrics.jsonl, as one PNG a person can glance at.

The figure is drawn on matplotlib's Agg canvas directly (no pyplot), so plotting from a training
process or a headless machine neither needs a display nor changes anyone's backend.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aura.atomic import atomic_open
from aura.errors import DataError
from aura.extras import extra_install, require

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"

# Optional panels: (metrics key, axis label, log scale).
_EXTRA_PANELS = (
    ("lr", "learning rate", False),
    ("grad_norm", "grad norm", True),
    ("tokens_per_s", "tokens/s", False),
)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The JSON rows of ``path``; a torn last line (a crash or a live run mid-write) is dropped,
    a malformed line anywhere else is a corrupt file."""
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    lines = [line for line in lines if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise DataError(f"{path}: line {i + 1} is not JSON (corrupt metrics file)") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {i + 1} is not a JSON object")
        rows.append(row)
    return rows


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that carry both ``step`` and ``key`` as numbers."""
    pairs = [(r["step"], r[key]) for r in rows if _number(r.get("step")) and _number(r.get(key))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def ema(values: list[float]) -> list[float]:
    """Bias-corrected exponential moving average whose span grows with the run (1/20th of the
    points, at most 100), so short and long runs both get a readable trend line."""
    beta = 1.0 - 1.0 / min(100, max(1, len(values) // 20))
    out, acc = [], 0.0
    for t, v in enumerate(values, 1):
        acc = beta * acc + (1.0 - beta) * v
        out.append(acc / (1.0 - beta**t))
    return out


def curves_figure(rows: list[dict[str, Any]], title: str) -> Figure:
    """The figure of ``rows`` (metrics.jsonl's), returned unsaved so what it shows can be read
    back: panel 0 is the loss (lines "train", "train (EMA)", "val"), then one panel per optional
    key the run logged (learning rate, grad norm, tokens/s), each with its y label."""
    train_steps, train_loss = _series(rows, "loss")
    val_steps, val_loss = _series(rows, "val_loss")
    if not train_steps and not val_steps:
        raise DataError("no train or eval rows to plot (empty metrics file?)")
    extras = [(key, label, log, *_series(rows, key)) for key, label, log in _EXTRA_PANELS]
    extras = [e for e in extras if e[3]]

    require("matplotlib", "aura plot", extra_install("plot"))
    # Imported here: matplotlib is slow to import and only plotting needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    heights = [2] + [1] * len(extras)
    fig = Figure(figsize=(9, 2.2 * sum(heights) + 0.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(heights), 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": heights})[:, 0]
    fig.suptitle(title)

    ax = axes[0]
    if train_steps:
        ax.plot(train_steps, train_loss, color="tab:blue", alpha=0.25, lw=0.8, label="train")
        ax.plot(train_steps, ema(train_loss), color="tab:blue", lw=1.6, label="train (EMA)")
    if val_steps:
        ax.plot(val_steps, val_loss, "o-", color="tab:orange", ms=4, lw=1, label="val")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)

    for ax, (_, label, log, steps, values) in zip(axes[1:], extras, strict=True):
        ax.plot(steps, values, color="tab:green", lw=1)
        if log and any(math.isfinite(v) and v > 0 for v in values):
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    return fig


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Plot ``run_dir/metrics.jsonl`` to ``out`` (default ``run_dir/curves.png``); returns the
    path written. ``out``'s directory must exist: a mistyped path should fail, not leave new
    directories wherever it pointed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"no run directory at {run_dir}")
    out = Path(out) if out is not None else run_dir / CURVES_FILE
    if out.is_dir():
        raise DataError(f"--out {out} is a directory: give a file name, e.g. {out / CURVES_FILE}")
    if not out.parent.is_dir():
        raise DataError(f"--out {out}: no directory {out.parent} (create it first)")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise DataError(f"{run_dir}: {METRICS_FILE} is missing (has the run logged anything?)")
    try:
        fig = curves_figure(read_metrics(path), run_dir.resolve().name)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    with atomic_open(out) as f:
        fig.savefig(f, format="png")
    return out
