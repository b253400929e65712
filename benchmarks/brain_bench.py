"""`natural_brain` (`brain-cpu`) vs a parameter-matched `gpt`: does the brain learn? Prints JSON.

    python benchmarks/brain_bench.py [--threads 1] quality [--steps 1000] [--seeds 0,1,2]
        [--only brain,gpt] [--ablations] [--png curves.png]
    python benchmarks/brain_bench.py merge seed0.json seed1.json ... [--png curves.png]
    python benchmarks/brain_bench.py [--threads 1] migrate [--narrow 64] [--wide 128]
        [--before 300] [--after 300] [--seed 0]
    python benchmarks/brain_bench.py [--threads 1] speed [--steps 30] [--new-tokens 200]

Char-level builtin Shakespeare (held-out works as val). Each run trains on the same batches
(same seed) for the same tokens; every ``--eval-every`` steps the val loss is recorded (the
curve), and at the end val loss and bits per byte on ``--eval-tokens`` held-out tokens.
``gpt`` keeps brain-cpu's layers and heads with n_embd widened to the closest parameter count.
``--ablations`` adds brain-cpu with each module off in turn (STDP with Wernicke, the place
and time cells with the hippocampus), the thalamus in bypass, ``use_spiking`` on, and token STDP
and the place/time cells off (which ablates them only when ``--brain-set`` turns them on, as the
full brain of the three-seed ablation does). The figures are quality only (loss, bpb); seconds
are recorded for the lead but mean nothing on a shared machine. Also reported: ln(vocab),
uniform guessing's loss, and the val loss at step 100 (seed 000's sanity rule: far below
uniform by then).

migrate (seed 003 §5, 512 -> 1024 at full size): brain-cpu at width ``--narrow`` trains
``--before`` steps, ``aura convert`` (``aura.train.convert.convert``) widens it to ``--wide``
(heads added so the head size stays ``--head-dim`` and every head keeps its weights), and
``--init-from`` continues it ``--after`` steps; against the wide model from scratch for
``--after`` steps (the issue's comparison) and for ``--before + --after`` (equal total steps).
Val loss of each, the converted model's at step 0, and the convert table's counts.

speed: training tokens/s (median over the logged steps after the first two) and peak RSS of
brain-cpu and of its parameter-matched gpt, each in its own process so one's peak is not the
other's, plus cached generation tokens/s and the memory estimate (aura.train.resources).
Timing figures need an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
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
# what goes when a module goes: token STDP lives in Wernicke's attention, the place and time
# cells code the hippocampus's input
PARTS_OF = {"wernicke": ["model.use_stdp=false"],
            "hippocampus": ["model.place_cells=false", "model.time_cells=false"]}
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
    gpt_common = common
    common = [*common, *args.brain_set]  # brain-only switches (e.g. model.use_stdp=true)
    brain = load_config(preset=PRESET, overrides=common)
    full = build_model(load_config(preset=PRESET, overrides=[
        *common, f"model.vocab_size={VOCAB}"]).model).num_params()
    out = {"brain": brain, "gpt": matched_gpt(full, gpt_common)}
    if args.ablations:
        for switch in SWITCHES:
            out[f"no_{switch}"] = load_config(preset=PRESET, overrides=[
                *common, f"model.{switch}=false", *PARTS_OF.get(switch, [])])
        out["thalamus_bypass"] = load_config(preset=PRESET,
                                             overrides=[*common, "model.thalamus_mode=bypass"])
        out["spiking"] = load_config(preset=PRESET, overrides=[*common, "model.use_spiking=true"])
        # off by default in brain-cpu: these two ablate something only when --brain-set turns
        # them on (the full brain of the three-seed ablation)
        out["no_stdp"] = load_config(preset=PRESET, overrides=[*common, "model.use_stdp=false"])
        out["no_place_time"] = load_config(preset=PRESET, overrides=[
            *common, "model.place_cells=false", "model.time_cells=false"])
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
    """Mean (and std over seeds) val loss and bpb per run, and each run's delta to the brain
    (with the std over seeds of the per-seed deltas)."""
    out: dict[str, Any] = {}
    for name, by_seed in results.items():
        losses = [r["val_loss"] for r in by_seed.values()]
        bpbs = [r["val_bits_per_byte"] for r in by_seed.values()]
        out[name] = {"seeds": len(losses), "val_loss": round(statistics.mean(losses), 4),
                     "val_loss_std": round(statistics.stdev(losses), 4) if len(losses) > 1
                     else None, "val_bits_per_byte": round(statistics.mean(bpbs), 4)}
    if "brain" in out:
        base = out["brain"]["val_loss"]
        for name, row in out.items():
            row["delta_vs_brain"] = round(row["val_loss"] - base, 4)
            paired = [r["val_loss"] - results["brain"][seed]["val_loss"]
                      for seed, r in results[name].items() if seed in results["brain"]]
            if len(paired) > 1:  # per seed, against the brain on the same batches
                row["delta_paired_std"] = round(statistics.stdev(paired), 4)
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


def _train(cfg: AuraConfig, data: Path, run_dir: Path, eval_tokens: int,
           init_from: Path | None = None) -> dict[str, Any]:
    trainer = Trainer(cfg, data, run_dir, progress=False, log=lambda _m: None,
                      init_from=init_from)
    trainer.run()
    ev = evaluate_prepared(trainer.model, trainer.data, "val", max_tokens=eval_tokens)
    return {"params": trainer.model.num_params(), "steps": cfg.train.max_steps,
            "val_loss": round(ev.loss, 4), "val_bits_per_byte": round(ev.bits_per_byte, 4),
            "curve": val_curve(run_dir)}


def cmd_migrate(args: argparse.Namespace) -> dict[str, Any]:
    """Narrow -> convert -> continue, against the wide model from scratch (module docstring)."""
    from aura.data.shards import PreparedData
    from aura.train.checkpoint import load_for_inference
    from aura.train.convert import convert

    for width in (args.narrow, args.wide):
        if width % args.head_dim:
            raise SystemExit(f"widths must be multiples of --head-dim {args.head_dim}")
    if args.wide <= args.narrow:
        raise SystemExit("--wide must be larger than --narrow")

    def shape(width: int) -> list[str]:
        return [f"model.n_embd={width}", f"model.n_head={width // args.head_dim}"]

    def config(width: int, steps: int) -> AuraConfig:
        return load_config(preset=PRESET, overrides=[
            *shape(width), f"train.max_steps={steps}", f"train.checkpoint_interval={steps}",
            f"train.eval_interval={args.eval_every}", "train.eval_iters=10",
            f"train.seed={args.seed}", *args.set])

    out: dict[str, Any] = {"uniform_loss": round(math.log(VOCAB), 4), "narrow": args.narrow,
                           "wide": args.wide, "head_dim": args.head_dim, "seed": args.seed,
                           "before": args.before, "after": args.after, "runs": {}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data = char_data(tmp)
        assert PreparedData.open(data).vocab_size == VOCAB
        runs = out["runs"]
        runs["narrow"] = _train(config(args.narrow, args.before), data, tmp / "narrow",
                                args.eval_tokens)
        moved, _path = convert(tmp / "narrow", shape(args.wide), tmp / "converted")
        out["convert"] = {a: sum(m.action == a for m in moved)
                          for a in ("copied", "padded", "reset", "new", "dropped")}
        loaded = load_for_inference(tmp / "converted")
        ev = evaluate_prepared(loaded.model, PreparedData.open(data), "val",
                               max_tokens=args.eval_tokens)
        runs["converted_step0"] = {"params": loaded.model.num_params(),
                                   "val_loss": round(ev.loss, 4),
                                   "val_bits_per_byte": round(ev.bits_per_byte, 4)}
        runs["converted_continued"] = _train(config(args.wide, args.after), data,
                                             tmp / "continued", args.eval_tokens,
                                             init_from=tmp / "converted")
        runs["scratch_same_steps"] = _train(config(args.wide, args.after), data,
                                            tmp / "scratch", args.eval_tokens)
        runs["scratch_equal_total"] = _train(config(args.wide, args.before + args.after),
                                             data, tmp / "scratch-total", args.eval_tokens)
    return out


def _speed_configs(steps: int) -> dict[str, AuraConfig]:
    common = [f"train.max_steps={steps}", f"train.checkpoint_interval={steps}",
              f"train.eval_interval={10 * steps}", "train.log_interval=1"]
    full = build_model(load_config(preset=PRESET, overrides=[
        *common, f"model.vocab_size={VOCAB}"]).model).num_params()
    return {"brain": load_config(preset=PRESET, overrides=common),
            "gpt": matched_gpt(full, common)}


def cmd_speed_one(args: argparse.Namespace) -> dict[str, Any]:
    """One model's training and generation speed and this process's peak RSS."""
    from aura.infer.generate import generate
    from aura.infer.sampling import SamplingConfig
    from aura.train.resources import estimate_training_memory

    cfg = _speed_configs(args.steps)[args.name]
    with tempfile.TemporaryDirectory() as d:
        data = char_data(Path(d))
        with open("/proc/self/statm") as f:  # before the model: the interpreter, torch, data
            base = int(f.read().split()[1]) * resource.getpagesize() / 2**20
        trainer = Trainer(cfg, data, Path(d) / "run", progress=False, log=lambda _m: None)
        trainer.run()
        rows = [json.loads(line) for line in
                (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
        speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 2]
        model = trainer.model
        from aura.data.prosody import token_features

        features = token_features(model.token_features, trainer.data.tokenizer)
        prompt = torch.zeros(1, 16, dtype=torch.long)
        t0 = time.perf_counter()
        generate(model, prompt, args.new_tokens, SamplingConfig(temperature=1.0, seed=0),
                 features=features)
        gen_s = time.perf_counter() - t0
    est = estimate_training_memory(cfg, "fp32", "cpu")
    return {"params": model.num_params(), "batch": cfg.train.batch_size,
            "block": cfg.model.block_size,
            "train_tokens_per_s": round(statistics.median(speeds), 1) if speeds else None,
            "generate_tokens_per_s": round(args.new_tokens / gen_s, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_before_model_mb": round(base, 1),
            "estimate_mb": round(est.total / 2**20, 1)}


def cmd_speed(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("brain", "gpt"):
        cmd = [sys.executable, __file__, "speed-one", name, "--steps", str(args.steps),
               "--new-tokens", str(args.new_tokens)]
        if args.threads:
            cmd[2:2] = ["--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[name] = json.loads(done.stdout)["result"]
    b, g = out["brain"], out["gpt"]
    if b["train_tokens_per_s"] and g["train_tokens_per_s"]:
        out["brain_vs_gpt_train_speed"] = round(b["train_tokens_per_s"]
                                                / g["train_tokens_per_s"], 3)
    out["brain_vs_gpt_peak_rss_above_base"] = round(
        (b["peak_rss_mb"] - b["rss_before_model_mb"])
        / (g["peak_rss_mb"] - g["rss_before_model_mb"]), 3)
    return out


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
    q.add_argument("--brain-set", action="append", default=[],
                   help="an override for the brain's runs only (gpt has no such key)")
    q.add_argument("--png", default="")
    m = sub.add_parser("merge", help="merge quality outputs (one per seed) into one")
    m.add_argument("files", nargs="+")
    m.add_argument("--png", default="")
    g = sub.add_parser("migrate", help="narrow -> aura convert -> continue vs wide from scratch")
    g.add_argument("--narrow", type=int, default=64)
    g.add_argument("--wide", type=int, default=128)
    g.add_argument("--head-dim", type=int, default=32)
    g.add_argument("--before", type=int, default=300, help="steps of the narrow model")
    g.add_argument("--after", type=int, default=300, help="steps after the conversion")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eval-every", type=int, default=100)
    g.add_argument("--eval-tokens", type=int, default=50_000)
    g.add_argument("--set", action="append", default=[], help="an override for every run")
    s = sub.add_parser("speed", help="tokens/s and peak memory, brain vs matched gpt")
    s.add_argument("--steps", type=int, default=30)
    s.add_argument("--new-tokens", type=int, default=200)
    one = sub.add_parser("speed-one")  # one model in this process (speed runs it)
    one.add_argument("name", choices=["brain", "gpt"])
    one.add_argument("--steps", type=int, default=30)
    one.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    commands = {"quality": cmd_quality, "merge": cmd_merge, "migrate": cmd_migrate,
                "speed": cmd_speed, "speed-one": cmd_speed_one}
    result = commands[args.cmd](args)
    if args.cmd == "speed-one":
        print(json.dumps({"result": result}))
        return
    print(json.dumps({"machine": machine(), **result}, indent=1))


if __name__ == "__main__":
    main()
