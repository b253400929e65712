"""`natural_brain` (`brain-cpu`) vs a parameter-matched `gpt`: does the brain learn? Prints JSON.

    python benchmarks/brain_bench.py [--threads 1] quality [--steps 1000] [--seeds 0,1,2]
        [--only brain,gpt] [--ablations] [--png curves.png]
    python benchmarks/brain_bench.py merge seed0.json seed1.json ... [--png curves.png]

Char-level builtin Shakespeare (held-out works as val). Each run trains on the same batches
(same seed) for the same tokens; every ``--eval-every`` steps the val loss is recorded (the
curve), and at the end val loss and bits per byte on ``--eval-tokens`` held-out tokens.
``gpt`` keeps brain-cpu's layers and heads with n_embd widened to the closest parameter count.
``--ablations`` adds brain-cpu with each module off in turn, the thalamus in bypass and
``use_spiking`` on. The figures are quality only (loss, bpb); seconds are recorded for the lead
but mean nothing on a shared machine. Also reported: ln(vocab), uniform guessing's loss, and
the val loss at step 100 (seed 000's sanity rule: far below uniform by then).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from aura.config import AuraConfig, load_config
from aura.data.prepare import PrepareOptions, prepare
from aura.eval.perplexity import evaluate_prepared
from aura.models import build_model
from aura.models.natural_brain import SWITCHES
from aura.train.trainer import Trainer
from machine import machine

PRESET = "brain-cpu"
VOCAB = 84  # the char tokenizer of builtin:shakespeare (checked against the prepared data)


def char_data(root: Path) -> Path:
    prepare(PrepareOptions(["builtin:shakespeare"], "char"), root / "chars", progress=False)
    return root / "chars"


def matched_gpt(target: int, overrides: list[str]) -> AuraConfig:
    """gpt with brain-cpu's layers and heads, n_embd widened to the closest parameter count."""
    best = None
    for width in range(128, 257, 4):
        cfg = load_config(preset=PRESET, overrides=[
            "model.name=gpt", f"model.n_embd={width}", f"model.vocab_size={VOCAB}", *overrides])
        n = build_model(cfg.model).num_params()
        if best is None or abs(n - target) < best[0]:
            best = (abs(n - target), cfg)
    assert best is not None
    cfg = best[1]
    cfg.model.vocab_size = None
    return cfg


def runs(args: argparse.Namespace, common: list[str]) -> dict[str, AuraConfig]:
    brain = load_config(preset=PRESET, overrides=common)
    full = build_model(load_config(preset=PRESET, overrides=[
        *common, f"model.vocab_size={VOCAB}"]).model).num_params()
    out = {"brain": brain, "gpt": matched_gpt(full, common)}
    if args.ablations:
        for switch in SWITCHES:
            out[f"no_{switch}"] = load_config(preset=PRESET,
                                              overrides=[*common, f"model.{switch}=false"])
        out["thalamus_bypass"] = load_config(preset=PRESET,
                                             overrides=[*common, "model.thalamus_mode=bypass"])
        out["spiking"] = load_config(preset=PRESET, overrides=[*common, "model.use_spiking=true"])
    return out


def val_curve(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: round(r["val_loss"], 4) for r in rows if "val_loss" in r}


def cmd_quality(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"uniform_loss": round(math.log(VOCAB), 4), "runs": {}}
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as d:
        data = char_data(Path(d))
        from aura.data.shards import PreparedData

        assert PreparedData.open(data).vocab_size == VOCAB
        for seed in seeds:
            common = [f"train.eval_interval={args.eval_every}", "train.eval_iters=10",
                      f"train.max_steps={args.steps}", f"train.checkpoint_interval={args.steps}",
                      f"train.seed={seed}", *args.set]
            configs = runs(args, common)
            only = args.only.split(",") if args.only else list(configs)
            for name in only:
                cfg = configs[name]
                run_dir = Path(d) / f"{name}-{seed}"
                trainer = Trainer(cfg, data, run_dir, progress=False, log=lambda _m: None)
                t0 = time.perf_counter()
                trainer.run()
                ev = evaluate_prepared(trainer.model, trainer.data, "val",
                                       max_tokens=args.eval_tokens)
                curve = val_curve(run_dir)
                row = {"params": trainer.model.num_params(),
                       "tokens": args.steps * cfg.train.batch_size * cfg.model.block_size,
                       "seconds": round(time.perf_counter() - t0, 1),
                       "val_loss": round(ev.loss, 4),
                       "val_bits_per_byte": round(ev.bits_per_byte, 4),
                       "val_loss_at_100": curve.get(100), "curve": curve}
                out["runs"].setdefault(name, {})[seed] = row
                print(json.dumps({name: {seed: row}}), file=sys.stderr, flush=True)
    out["summary"] = summary(out["runs"])
    if args.png:
        plot(out["runs"], Path(args.png))
    return out


def summary(results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Mean (and std over seeds) val loss and bpb per run, and each run's delta to the brain."""
    out: dict[str, Any] = {}
    for name, by_seed in results.items():
        losses = [r["val_loss"] for r in by_seed.values()]
        bpbs = [r["val_bits_per_byte"] for r in by_seed.values()]
        out[name] = {"seeds": len(losses), "val_loss": round(statistics.mean(losses), 4),
                     "val_loss_std": round(statistics.stdev(losses), 4) if len(losses) > 1
                     else None, "val_bits_per_byte": round(statistics.mean(bpbs), 4)}
    if "brain" in out:
        base = out["brain"]["val_loss"]
        for row in out.values():
            row["delta_vs_brain"] = round(row["val_loss"] - base, 4)
    return out


def plot(results: dict[str, dict[int, dict[str, Any]]], path: Path) -> None:
    """Val loss and bits per byte curves (bpb from the loss: chars are bytes here, except a
    few multi-byte characters Shakespeare does not use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("brain", "gpt"):
        for seed, row in results.get(name, {}).items():
            steps = sorted(row["curve"])
            loss = [row["curve"][s] for s in steps]
            style = "-" if name == "brain" else "--"
            axes[0].plot(steps, loss, style, label=f"{name} seed {seed}")
            axes[1].plot(steps, [v / math.log(2) for v in loss], style, label=f"{name} seed {seed}")
    axes[0].axhline(math.log(VOCAB), color="grey", lw=0.8, label="uniform")
    axes[0].set(xlabel="step", ylabel="val loss (nats)", yscale="log")
    axes[1].set(xlabel="step", ylabel="val bits per char")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cmd_merge(args: argparse.Namespace) -> dict[str, Any]:
    """Several ``quality`` outputs (e.g. one process per seed) as one: runs, summary, PNG."""
    merged: dict[str, dict[int, dict[str, Any]]] = {}
    for path in args.files:
        for name, by_seed in json.loads(Path(path).read_text())["runs"].items():
            merged.setdefault(name, {}).update({int(k): v for k, v in by_seed.items()})
    if args.png:
        plot(merged, Path(args.png))
    return {"uniform_loss": round(math.log(VOCAB), 4), "runs": merged,
            "summary": summary(merged)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--steps", type=int, default=1000)
    q.add_argument("--seeds", default="0")
    q.add_argument("--eval-every", type=int, default=100)
    q.add_argument("--eval-tokens", type=int, default=100_000)
    q.add_argument("--only", default="")
    q.add_argument("--ablations", action="store_true")
    q.add_argument("--set", action="append", default=[], help="an override for every run")
    q.add_argument("--png", default="")
    m = sub.add_parser("merge", help="merge quality outputs (one per seed) into one")
    m.add_argument("files", nargs="+")
    m.add_argument("--png", default="")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"quality": cmd_quality, "merge": cmd_merge}[args.cmd](args)
    print(json.dumps({"machine": machine(), **result}, indent=1))


if __name__ == "__main__":
    main()
