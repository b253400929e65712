"""`aura ablate`: the full model and the model with each switch off, over several seeds, one run
at a time, resumable; a markdown table and a bar chart of what each part is worth.

Every run is ``OUT/VARIANT/seed-S/`` (a normal run directory) plus ``result.json``, written
atomically once the run is trained and evaluated: a run with a result is never run again, one
without is resumed from its newest checkpoint. Variants of one seed train on the same batches, so
the deltas are paired by seed (mean ± sample std of variant minus full over the seeds).

Training is the caller's (``Runner``): this room knows configs, results and pictures, and the
CLI hands it ``aura.train.ablation.train_and_evaluate``, since evaluators never import the
trainer.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aura.atomic import atomic_open, atomic_write_text
from aura.config import AuraConfig, apply_overrides, config_to_dict
from aura.errors import ConfigError, DataError
from aura.extras import extra_install, require

RESULT = "result.json"
TABLE, SUMMARY, CHART = "ablation.md", "ablation.json", "ablation.png"
FULL = "full"
PLAN_KEYS = {"preset", "config", "set", "data", "switch", "steps", "seeds", "out",
             "eval_tokens"}

# cfg, data dir, run dir -> {"val_loss", "val_bpb", "tokens_per_s", "step"}
Runner = Callable[[AuraConfig, Path, Path], dict[str, float]]


def check_switch(cfg: AuraConfig, switch: str) -> tuple[str, str]:
    """``switch`` as (key, value of the variant): ``KEY`` names a boolean field of ``cfg`` that
    is on in the full model (the variant turns it off); ``KEY=VALUE`` sets any field to another
    value (``model.ffn=mlp``, ``model.memory_layers=[]``), checked like ``--set``."""
    key, sep, value = switch.partition("=")
    section, _, name = key.partition(".")
    part = getattr(cfg, section, None) if section in ("model", "data", "train") else None
    if part is None or not name or not hasattr(part, name):
        raise ConfigError(f"--switch {switch}: no such config key (switches are boolean keys "
                          "such as model.place_cells, or KEY=VALUE; `aura config show "
                          "--explain` lists the keys)")
    current = getattr(part, name)
    if sep:
        changed = apply_overrides(cfg, {key: value})  # a bad value is the config's one line
        if getattr(getattr(changed, section), name) == current:
            raise ConfigError(f"--switch {switch}: the full model already has {key}={value}")
        return key, value
    if not isinstance(current, bool):
        raise ConfigError(f"--switch {switch}: not a boolean switch (it is "
                          f"{type(current).__name__} {current!r}; give KEY=VALUE for another "
                          "value)")
    if not current:
        raise ConfigError(f"--switch {switch}: already false in the full model; nothing to "
                          "ablate")
    return key, "false"


def _dir_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_.=-" else "_" for c in text)


@dataclass
class AblationPlan:
    """The full model's config (steps set), the switches to turn off one at a time, the seeds."""

    full: AuraConfig
    data: Path
    switches: list[str]
    seeds: list[int]
    out: Path
    eval_tokens: int = 20_000

    def __post_init__(self) -> None:
        if not self.switches:
            raise ConfigError("give at least one --switch KEY to turn off")
        if len(set(self.switches)) < len(self.switches):
            raise ConfigError("a --switch is given twice")
        for key in self.switches:
            check_switch(self.full, key)
        if not self.seeds:
            raise ConfigError("--seeds must be >= 1")
        if self.eval_tokens < 2:
            raise ConfigError(f"--eval-tokens must be >= 2, got {self.eval_tokens}")

    def variants(self) -> list[tuple[str, AuraConfig]]:
        """("full", the config), then per switch ("no-NAME", the config with it false, or
        "NAME=VALUE"); NAME is the key without its section unless two switches share it. A
        run's directory is the name with anything but letters, digits and ``_.=-`` as ``_``."""
        parsed = [check_switch(self.full, s) for s in self.switches]
        names = [k.partition(".")[2] for k, _ in parsed]
        out = [(FULL, self.full)]
        for (key, value), switch, name in zip(parsed, self.switches, names, strict=True):
            label = name if names.count(name) == 1 else key
            variant = f"no-{label}" if "=" not in switch else f"{label}={value}"
            out.append((variant, apply_overrides(self.full, {key: value})))
        return out

    def runs(self) -> list[tuple[str, int, AuraConfig, Path]]:
        """Every (variant, seed, config, run dir), seed by seed: a partial ablation already
        has every variant of its first seeds."""
        return [(name, seed, apply_overrides(cfg, {"train.seed": str(seed)}),
                 self.out / _dir_name(name) / f"seed-{seed}")
                for seed in self.seeds for name, cfg in self.variants()]


def plan_options_from_yaml(path: Path) -> dict[str, Any]:
    """A YAML plan: the keys of the command's flags (``preset``, ``config``, ``set``, ``data``,
    ``switch``, ``steps``, ``seeds``, ``out``, ``eval_tokens``)."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a YAML plan ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a plan is a mapping of {sorted(PLAN_KEYS)}")
    unknown = sorted(set(map(str, raw)) - PLAN_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown plan keys {unknown}; known: {sorted(PLAN_KEYS)}")
    return raw


@dataclass
class VariantSummary:
    name: str
    seeds: list[int]
    val_loss: list[float]
    val_bpb: list[float]
    tokens_per_s: list[float]
    delta_loss: list[float] = field(default_factory=list)  # paired with full, seed by seed
    delta_bpb: list[float] = field(default_factory=list)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _pm(values: Sequence[float], digits: int = 4, sign: bool = False) -> str:
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "-"
    return f"{mean:{'+' if sign else ''}.{digits}f} ± {std:.{digits}f}"


def run_ablation(plan: AblationPlan, runner: Runner, log: Callable[[str], None] = print
                 ) -> list[VariantSummary]:
    """Train and evaluate every run not finished yet, then write the table, JSON and chart."""
    plan.out.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, int], dict[str, float]] = {}
    runs = plan.runs()
    for i, (name, seed, cfg, run_dir) in enumerate(runs, 1):
        wanted = json.loads(json.dumps(config_to_dict(cfg)))  # as result.json holds it
        done = run_dir / RESULT
        if done.is_file():
            saved = json.loads(done.read_text(encoding="utf-8"))
            if saved.get("config") != wanted:
                raise ConfigError(f"{run_dir} was run with another config; give another --out "
                                  "or delete it")
            log(f"[{i}/{len(runs)}] {name} seed {seed}: done before, val loss "
                f"{saved['val_loss']:.4f}")
            results[name, seed] = saved
            continue
        log(f"[{i}/{len(runs)}] {name} seed {seed}: training in {run_dir}")
        got = runner(cfg, plan.data, run_dir)
        record = {**got, "config": wanted}
        atomic_write_text(done, json.dumps(record, indent=1))
        results[name, seed] = record
        log(f"[{i}/{len(runs)}] {name} seed {seed}: val loss {got['val_loss']:.4f}, "
            f"{got['val_bpb']:.4f} bits/byte")
    summaries = summarize(plan, results)
    write_report(plan, summaries)
    return summaries


def summarize(plan: AblationPlan, results: dict[tuple[str, int], dict[str, float]]
              ) -> list[VariantSummary]:
    out = []
    for name, _ in plan.variants():
        seeds = [s for s in plan.seeds if (name, s) in results]
        rows = [results[name, s] for s in seeds]
        v = VariantSummary(name, seeds, [r["val_loss"] for r in rows],
                           [r["val_bpb"] for r in rows], [r["tokens_per_s"] for r in rows])
        if name != FULL:
            paired = [s for s in seeds if (FULL, s) in results]
            v.delta_loss = [results[name, s]["val_loss"] - results[FULL, s]["val_loss"]
                            for s in paired]
            v.delta_bpb = [results[name, s]["val_bpb"] - results[FULL, s]["val_bpb"]
                           for s in paired]
        out.append(v)
    return out


def markdown_table(summaries: list[VariantSummary]) -> str:
    """Mean ± sample std over the seeds; deltas are variant minus full, paired by seed
    (positive: the model is worse without the part)."""
    lines = ["| variant | seeds | val loss | Δ val loss | val bits/byte | Δ bits/byte | tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for v in summaries:
        toks = statistics.fmean(v.tokens_per_s) if v.tokens_per_s else math.nan
        lines.append(
            f"| {v.name} | {len(v.seeds)} | {_pm(v.val_loss)} | "
            f"{_pm(v.delta_loss, sign=True) if v.name != FULL else '-'} | {_pm(v.val_bpb)} | "
            f"{_pm(v.delta_bpb, sign=True) if v.name != FULL else '-'} | {toks:,.0f} |")
    return "\n".join(lines) + "\n"


def write_report(plan: AblationPlan, summaries: list[VariantSummary]) -> None:
    """``ablation.md`` (the table and how it was made), ``ablation.json``, ``ablation.png``."""
    steps = plan.full.train.max_steps
    head = (f"Ablation of {plan.full.model.name}: {steps} steps, seeds "
            f"{', '.join(map(str, plan.seeds))}, val on the first {plan.eval_tokens:,} tokens of "
            f"{plan.data}.\n\n")
    atomic_write_text(plan.out / TABLE, head + markdown_table(summaries))
    atomic_write_text(plan.out / SUMMARY, json.dumps(
        {"model": plan.full.model.name, "steps": steps, "seeds": plan.seeds,
         "switches": plan.switches, "eval_tokens": plan.eval_tokens,
         "variants": [vars(v) for v in summaries]}, indent=1))
    chart(summaries, plan.out / CHART, f"{plan.full.model.name}, {steps} steps, "
          f"{len(plan.seeds)} seed(s)")


def chart(summaries: list[VariantSummary], path: Path, title: str) -> None:
    """Bars of Δ val loss and Δ bits/byte per switch turned off, error bars the std."""
    require("matplotlib", "aura ablate's chart", extra_install("plot"))
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    parts = [v for v in summaries if v.name != FULL]
    fig = Figure(figsize=(max(7.0, 1.2 * len(parts) + 2), 6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, sharex=True)
    x = range(len(parts))
    for ax, attr, label in ((axes[0], "delta_loss", "Δ val loss (nats)"),
                            (axes[1], "delta_bpb", "Δ bits/byte")):
        stats = [_mean_std(getattr(v, attr)) for v in parts]
        ax.bar(x, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4,
               color=["tab:red" if m > 0 else "tab:green" for m, _ in stats])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(list(x), [v.name for v in parts], rotation=30, ha="right")
    fig.suptitle(f"{title}\nvariant minus full (higher: the full model is better)")
    with atomic_open(path) as f:
        fig.savefig(f, format="png")
