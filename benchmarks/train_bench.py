"""Training speed of `gpt` at nanoGPT's CPU Shakespeare config, side by side with nanoGPT; or
of Aura's trainer with DataLoader workers.

    python benchmarks/train_bench.py --nanogpt /path/to/nanoGPT [--iters 300] [--rounds 3]
        [--precisions fp32 bf16 auto] [--compile]
    python benchmarks/train_bench.py --loader [--iters 100] [--rounds 2] [--quick]
    python benchmarks/train_bench.py --demo [--iters 2000]

Aura runs in fp32 (nanoGPT's CPU numerics) and with bf16 autocast (which nanoGPT's train.py never
uses on CPU). Both train the same character-level tokens (prepared once by Aura; the same ids are
written as nanoGPT's train.bin/val.bin) at n_layer=4, n_head=4, n_embd=128, block 64, batch 12,
dropout 0, eval every 250 iterations over 20 batches. Runs alternate (Aura fp32, Aura bf16,
nanoGPT eager, nanoGPT compiled) for ``--rounds`` rounds so drift on a noisy machine hits all of
them; the figure per system is the median milliseconds per training iteration over all its
iterations but the first few, and ``speedup`` compares those. ``speedup_by_round`` compares the
medians of each round alone, and ``speedup_median_of_rounds`` is their median: with many short
rounds (``--iters 150 --rounds 6``) it is the figure least moved by a drifting machine. Prints
JSON. Without ``--nanogpt`` only Aura is measured.
nanoGPT's code is run from the given checkout, never copied here.

``--loader``: ms per step and tokens/s of Aura's trainer with ``data.num_workers`` 0, 1 and 2 at
the ``demo``, ``cpu-small`` and ``hippocampal-cpu`` presets (the last builds prosody and corpus
positions for every batch, the work workers take off the training process), on the same char
tokens, dropout as the preset has it, evaluation only after the last step. Runs alternate in the
same way; the speedup is each worker count's against 0. ``--quick`` shrinks every preset to one
layer and two sequences and runs 3 steps: it checks the script works and measures nothing.

``--demo``: what `make demo` trains (the ``demo`` preset, 2000 steps, on the char tokens of
``builtin:shakespeare``), in fp32 and with bf16 autocast: the final val loss, bits per byte, wall
seconds and tokens/s over the whole run (evaluations and checkpoints included).
"""

from __future__ import annotations

import argparse
import itertools
import json
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from aura.config import AuraConfig, load_config
from aura.data.prepare import PrepareOptions, prepare
from aura.data.shards import PreparedData
from aura.train.trainer import Trainer
from machine import machine

WARMUP = 5
SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12)
LOADER_PRESETS = ("demo", "cpu-small", "hippocampal-cpu")
WORKER_COUNTS = (0, 1, 2)
QUICK_OVERRIDES = ["model.n_layer=1", "train.batch_size=2"]
# nanoGPT runs whose loss went NaN (its --compile=True under ATEN_CPU_CAPABILITY=avx2 does)
NAN_RUNS: set[str] = set()


def step_ms(cfg: AuraConfig, data_dir: Path, out: Path, warmup: int = WARMUP) -> list[float]:
    """Milliseconds of each step of a run of ``cfg`` (logged every step) but the first
    ``warmup``: the tokens of the step over the throughput its row reports."""
    shutil.rmtree(out, ignore_errors=True)
    Trainer(cfg, data_dir, out, progress=False, log=lambda _m: None).run()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    tokens = [r["tokens"] for r in train_rows]
    per_step = [b - a for a, b in itertools.pairwise([0, *tokens])]
    return [n / r["tokens_per_s"] * 1000 for n, r in zip(per_step, train_rows, strict=True)
            ][warmup:]


def run_aura(data_dir: Path, out: Path, iters: int, precision: str,
             compile_: bool = False) -> list[float]:
    s = SHAPE
    cfg = load_config(preset="demo", overrides=[
        f"model.n_layer={s['n_layer']}", f"model.n_head={s['n_head']}",
        f"model.n_embd={s['n_embd']}", f"model.block_size={s['block_size']}",
        f"train.batch_size={s['batch_size']}", "model.dropout=0.0", f"train.max_steps={iters}",
        "train.log_interval=1", "train.eval_interval=250", "train.eval_iters=20",
        f"train.checkpoint_interval={iters}", f"train.precision={precision}",
        f"train.compile={str(compile_).lower()}",
    ])
    return step_ms(cfg, data_dir, out)


def loader_config(preset: str, workers: int, iters: int, overrides: list[str]) -> AuraConfig:
    return load_config(preset=preset, overrides=[
        f"data.num_workers={workers}", f"train.max_steps={iters}", "train.log_interval=1",
        f"train.eval_interval={iters}", "train.eval_iters=1", f"train.checkpoint_interval={iters}",
        *overrides,
    ])


def loader_bench(data_dir: Path, out: Path, iters: int, rounds: int, warmup: int,
                 overrides: list[str]) -> dict[str, object]:
    """ms per step for every preset and worker count, alternating within each round."""
    ms: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for preset in LOADER_PRESETS:
            for workers in WORKER_COUNTS:
                cfg = loader_config(preset, workers, iters, overrides)
                ms.setdefault((preset, workers), []).extend(
                    step_ms(cfg, data_dir, out, warmup))
    presets: dict[str, object] = {}
    for preset in LOADER_PRESETS:
        cfg = loader_config(preset, 0, iters, overrides)
        t = cfg.train
        tokens = t.batch_size * t.grad_accum * (t.block_size or cfg.model.block_size)
        systems = {f"num_workers={w}": summary(ms[preset, w], tokens) for w in WORKER_COUNTS}
        base = systems["num_workers=0"]["ms_per_iter"]
        presets[preset] = {
            "tokens_per_step": tokens, "systems": systems,
            "speedup_vs_0": {k: round(base / v["ms_per_iter"], 3) for k, v in systems.items()
                             if k != "num_workers=0"},
        }
    return {"mode": "loader", "iters": iters, "rounds": rounds, "warmup": warmup,
            "overrides": overrides, "presets": presets}


def nanogpt_data(data: PreparedData, nanogpt: Path) -> str:
    name = "aura_bench"
    d = nanogpt / "data" / name
    d.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        data.split(split).tokens().astype(np.uint16).tofile(d / f"{split}.bin")
    with open(d / "meta.pkl", "wb") as f:  # nanoGPT reads its vocabulary size from here
        pickle.dump({"vocab_size": data.vocab_size}, f)
    return name


def run_nanogpt(nanogpt: Path, dataset: str, out: Path, iters: int, compile_: bool) -> list[float]:
    s = SHAPE
    cmd = [
        sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu",
        f"--compile={compile_}", "--eval_iters=20", "--eval_interval=250", "--log_interval=1",
        f"--block_size={s['block_size']}", f"--batch_size={s['batch_size']}",
        f"--n_layer={s['n_layer']}", f"--n_head={s['n_head']}", f"--n_embd={s['n_embd']}",
        f"--max_iters={iters}", f"--lr_decay_iters={iters}", "--dropout=0.0",
        f"--dataset={dataset}", f"--out_dir={out}", "--always_save_checkpoint=False",
    ]
    res = subprocess.run(cmd, cwd=nanogpt, capture_output=True, text=True, check=True)
    rows = re.findall(r"^iter \d+: loss (\S+), time ([\d.]+)ms", res.stdout, re.M)
    if any(loss == "nan" for loss, _ in rows):  # timed all the same, and said
        NAN_RUNS.add(f"nanogpt_{'compile' if compile_ else 'eager'}")
    return [float(ms) for _, ms in rows][WARMUP:]


def summary(ms: list[float], tokens: int) -> dict[str, float]:
    med = statistics.median(ms)
    return {"ms_per_iter": round(med, 2), "tokens_per_s": round(tokens / med * 1000),
            "iters_timed": len(ms)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout to run side by side")
    ap.add_argument("--loader", action="store_true",
                    help="measure data.num_workers 0, 1, 2 at the demo, cpu-small and "
                         "hippocampal-cpu presets instead")
    ap.add_argument("--demo", action="store_true",
                    help="train the demo preset in fp32 and bf16: val loss and wall time")
    ap.add_argument("--quick", action="store_true",
                    help="with --loader: a few steps of shrunken models, to check the script")
    ap.add_argument("--source", default="builtin:shakespeare")
    ap.add_argument("--iters", type=int, help="steps per run (default 300; 100 with --loader)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"],
                    choices=["fp32", "bf16", "auto"],
                    help="Aura's rows (auto: what train.precision=auto picks on this CPU); "
                         "drop bf16 where it is emulated, 13x slower")
    ap.add_argument("--compile", action="store_true",
                    help="also train Aura with train.compile=true (rows aura_<precision>_compiled)")
    args = ap.parse_args()
    if args.quick and not args.loader:
        ap.error("--quick goes with --loader")
    if (args.loader or args.demo) and args.nanogpt:
        ap.error("--loader and --demo measure Aura alone; drop --nanogpt")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        prepare(PrepareOptions([args.source], "char"), tmp / "data", progress=False)
        if args.demo:
            report = demo_bench(tmp / "data", tmp / "run", args.iters or 2000)
        elif args.loader:
            if args.quick:
                report = loader_bench(tmp / "data", tmp / "run", iters=3, rounds=1, warmup=1,
                                      overrides=QUICK_OVERRIDES)
            else:
                report = loader_bench(tmp / "data", tmp / "run", args.iters or 100, args.rounds,
                                      WARMUP, [])
        else:
            report = nanogpt_bench(tmp, args.nanogpt, args.iters or 300, args.rounds,
                                   args.precisions, args.compile)
    print(json.dumps({"machine": machine(), **report}, indent=1))


def demo_bench(data_dir: Path, out: Path, iters: int) -> dict[str, object]:
    """The ``demo`` preset as `make demo` trains it, once per precision."""
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(preset="demo", overrides=[f"train.max_steps={iters}",
                                                    f"train.precision={precision}"])
        shutil.rmtree(out, ignore_errors=True)
        result = Trainer(cfg, data_dir, out, progress=False, log=lambda _m: None).run()
        assert result.val_loss is not None
        bpb = result.val_loss / np.log(2) / PreparedData.open(data_dir).split("val").bytes_per_token
        runs[precision] = {"val_loss": round(result.val_loss, 4), "val_bpb": round(float(bpb), 4),
                           "seconds": round(result.seconds, 1),
                           "tokens_per_s": round(result.tokens_per_s)}
    return {"preset": "demo", "steps": iters, "runs": runs}


def nanogpt_bench(tmp: Path, nanogpt: Path | None, iters: int, rounds: int,
                  precisions: list[str], compiled: bool) -> dict[str, object]:
    """Every system once per round, in turn. Besides each system's median over all rounds,
    the speedups are also taken round by round (the medians of one round against each
    other), because this VM's speed drifts by a third within minutes: a pair measured a few
    seconds apart says more than two pools of rounds."""
    tokens = SHAPE["batch_size"] * SHAPE["block_size"]
    data = PreparedData.open(tmp / "data")
    dataset = nanogpt_data(data, nanogpt) if nanogpt else ""
    variants = [(p, c) for p in precisions for c in ((False, True) if compiled else (False,))]
    per_round: list[dict[str, list[float]]] = []
    for _ in range(rounds):
        this_round: dict[str, list[float]] = {}
        for precision, compile_ in variants:
            this_round[f"aura_{precision}{'_compiled' if compile_ else ''}"] = run_aura(
                tmp / "data", tmp / "run", iters, precision, compile_)
        if nanogpt:
            for compile_ in (False, True):
                this_round[f"nanogpt_{'compile' if compile_ else 'eager'}"] = run_nanogpt(
                    nanogpt, dataset, tmp / "ngpt", iters, compile_)
        per_round.append(this_round)
    systems = {k: summary([ms for r in per_round for ms in r[k]], tokens) for k in per_round[0]}
    pairs = [(a, b) for a in systems if a.startswith("aura")
             for b in systems if b.startswith("nanogpt")]
    by_round = {f"{a} vs {b}": [round(statistics.median(r[b]) / statistics.median(r[a]), 3)
                                for r in per_round] for a, b in pairs}
    return {"shape": SHAPE, "iters": iters, "rounds": rounds, "systems": systems,
            "nan_loss": sorted(NAN_RUNS),
            "speedup": {
                f"{a} vs {b}": round(systems[b]["ms_per_iter"] / systems[a]["ms_per_iter"], 3)
                for a, b in pairs},
            "speedup_by_round": by_round,
            "speedup_median_of_rounds": {k: round(statistics.median(v), 3)
                                         for k, v in by_round.items()}}


if __name__ == "__main__":
    main()
