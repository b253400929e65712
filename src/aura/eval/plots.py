"""Training curves from a run's metrics.jsonl, as one PNG a person can glance at.

The figure is drawn on matplotlib's Agg canvas directly (no pyplot), so plotting from a training
process or a headless machine neither needs a display nor changes anyone's backend.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aura.atomic import atomic_open
from aura.errors import DataError
from aura.extras import extra_install, require

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
COMPARE_FILE = "compare.png"

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


def aux_families(rows: list[dict[str, Any]]) -> dict[str, list[tuple[str, str]]]:
    """The model's aux metrics the rows carry (``aux/KEY``), grouped into one panel per family:
    ``{family: [(key, member), ...]}``, a per-layer key (``firing_rate_3``, ``x_active/3``)
    joining its family as member "layer 3" and the family's own key (a mean) as "mean"."""
    keys = sorted({k for r in rows for k in r if k.startswith("aux/")})
    families: dict[str, list[tuple[str, str]]] = {}
    for key in keys:
        name = key[4:]
        match = re.fullmatch(r"(.+?)[_/](\d+)", name)
        family, member = (match.group(1), f"layer {match.group(2)}") if match else (name, "mean")
        families.setdefault(family, []).append((key, member))
    return families


def curves_figure(rows: list[dict[str, Any]], title: str) -> Figure:
    """The figure of ``rows`` (metrics.jsonl's), returned unsaved so what it shows can be read
    back: panel 0 is the loss (lines "train", "train (EMA)", "val"), then one panel per optional
    key the run logged (learning rate, grad norm, tokens/s), each with its y label, then one per
    family of the model's aux metrics (firing rates, place activity, memory gate, sparsity,
    router load, ...: ``aux_families``), a line per layer."""
    return runs_figure([(title, rows)], title)


def runs_figure(runs: list[tuple[str, list[dict[str, Any]]]], title: str) -> Figure:
    """``curves_figure`` of several runs overlaid, one colour per run: each run's train loss
    (its EMA only, when there are several) and val points, its line in every other panel, and
    in an aux panel its family mean (or, without one, each layer)."""
    several = len(runs) > 1
    if not any(_series(rows, "loss")[0] or _series(rows, "val_loss")[0] for _, rows in runs):
        raise DataError("no train or eval rows to plot (empty metrics file?)")
    all_rows = [r for _, rows in runs for r in rows]
    extras = [(key, label, log) for key, label, log in _EXTRA_PANELS
              if _series(all_rows, key)[0]]
    families = aux_families(all_rows)

    require("matplotlib", "aura plot", extra_install("plot"))
    # Imported here: matplotlib is slow to import and only plotting needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    heights = [2] + [1] * (len(extras) + len(families))
    fig = Figure(figsize=(9, 2.2 * sum(heights) + 0.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(heights), 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": heights})[:, 0]
    fig.suptitle(title)
    colours = [f"C{i % 10}" for i in range(len(runs))]

    ax = axes[0]
    for (name, rows), colour in zip(runs, colours, strict=True):
        prefix = f"{name} " if several else ""
        train_steps, train_loss = _series(rows, "loss")
        val_steps, val_loss = _series(rows, "val_loss")
        if train_steps:
            if not several:
                ax.plot(train_steps, train_loss, color="tab:blue", alpha=0.25, lw=0.8,
                        label="train")
            ax.plot(train_steps, ema(train_loss), color="tab:blue" if not several else colour,
                    lw=1.6, label=f"{prefix}train (EMA)")
        if val_steps:
            ax.plot(val_steps, val_loss, "o-" if not several else "o--",
                    color="tab:orange" if not several else colour, ms=4, lw=1,
                    label=f"{prefix}val")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(loc="upper right", fontsize=8 if several else None)
    ax.grid(alpha=0.3)

    for ax, (key, label, log) in zip(axes[1:], extras, strict=False):
        values_seen: list[float] = []
        for (name, rows), colour in zip(runs, colours, strict=True):
            steps, values = _series(rows, key)
            if steps:
                ax.plot(steps, values, color=colour if several else "tab:green", lw=1,
                        label=name if several else None)
                values_seen += values
        if log and any(math.isfinite(v) and v > 0 for v in values_seen):
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)

    for ax, (family, members) in zip(axes[1 + len(extras):], families.items(), strict=True):
        for (name, rows), colour in zip(runs, colours, strict=True):
            shown = members
            if several and any(m == "mean" for _, m in members):
                shown = [(k, m) for k, m in members if m == "mean"]
            for i, (key, member) in enumerate(shown):
                steps, values = _series(rows, key)
                if steps:
                    ax.plot(steps, values, color=colour if several else f"C{i % 10}", lw=1,
                            alpha=1.0 if member == "mean" or several else 0.8,
                            label=f"{name} {member}" if several else member)
        ax.set_ylabel(family)
        ax.grid(alpha=0.3)
        if len(ax.get_lines()) > 1:
            ax.legend(loc="upper right", fontsize=7, ncol=2)
    axes[-1].set_xlabel("step")
    return fig


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Plot ``run_dir/metrics.jsonl`` to ``out`` (default ``run_dir/curves.png``); returns the
    path written. ``out``'s directory must exist: a mistyped path should fail, not leave new
    directories wherever it pointed."""
    return plot_runs([run_dir], out)


def _rows_of(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise DataError(f"{run_dir}: {METRICS_FILE} is missing (has the run logged anything?)")
    return read_metrics(path)


def plot_runs(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """``plot_run`` of one run, or several overlaid (``aura plot RUN1 RUN2 ...``; default
    ``out``: the first run's ``compare.png``), each run named by its directory."""
    dirs = [Path(r) for r in run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise DataError(f"no run directory at {d}")
    default = CURVES_FILE if len(dirs) == 1 else COMPARE_FILE
    out = Path(out) if out is not None else dirs[0] / default
    if out.is_dir():
        raise DataError(f"--out {out} is a directory: give a file name, e.g. {out / default}")
    if not out.parent.is_dir():
        raise DataError(f"--out {out}: no directory {out.parent} (create it first)")
    names = [d.resolve().name for d in dirs]
    if len(set(names)) < len(names):  # two runs/run: tell them apart by their paths
        names = [str(d) for d in dirs]
    runs = [(name, _rows_of(d)) for name, d in zip(names, dirs, strict=True)]
    title = names[0] if len(dirs) == 1 else " vs ".join(names)
    try:
        fig = runs_figure(runs, title)
    except DataError as exc:
        where = dirs[0] / METRICS_FILE if len(dirs) == 1 else "the runs"
        raise DataError(f"{where}: {exc}") from None
    with atomic_open(out) as f:
        fig.savefig(f, format="png")
    return out
