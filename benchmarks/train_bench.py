"""Training speed of `gpt` at nanoGPT's CPU Shakespeare config, side by side with nanoGPT.

    python benchmarks/train_bench.py --nanogpt /path/to/nanoGPT [--iters 300] [--rounds 3]

Aura runs in fp32 (nanoGPT's CPU numerics) and with bf16 autocast (which nanoGPT's train.py never
uses on CPU). Both train the same character-level tokens (prepared once by Aura; the same ids are
written as nanoGPT's train.bin/val.bin) at n_layer=4, n_head=4, n_embd=128, block 64, batch 12,
dropout 0, eval every 250 iterations over 20 batches. Runs alternate (Aura fp32, Aura bf16,
nanoGPT eager, nanoGPT compiled) for ``--rounds`` rounds so drift on a noisy machine hits all of
them; the figure per system is the median milliseconds per training iteration over all its
iterations but the first few. Prints JSON. Without ``--nanogpt`` only Aura is measured.
nanoGPT's code is run from the given checkout, never copied here.
"""

from __future__ import annotations

import argparse
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

from aura.config import load_config
from aura.data.prepare import PrepareOptions, prepare
from aura.data.shards import PreparedData
from aura.train.trainer import Trainer

WARMUP = 5
SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12)


def run_aura(data_dir: Path, out: Path, iters: int, precision: str) -> list[float]:
    s = SHAPE
    cfg = load_config(preset="demo", overrides=[
        f"model.n_layer={s['n_layer']}", f"model.n_head={s['n_head']}",
        f"model.n_embd={s['n_embd']}", f"model.block_size={s['block_size']}",
        f"train.batch_size={s['batch_size']}", "model.dropout=0.0", f"train.max_steps={iters}",
        "train.log_interval=1", "train.eval_interval=250", "train.eval_iters=20",
        f"train.checkpoint_interval={iters}", f"train.precision={precision}",
    ])
    shutil.rmtree(out, ignore_errors=True)
    Trainer(cfg, data_dir, out, progress=False, log=lambda _m: None).run()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = s["batch_size"] * s["block_size"]
    return [tokens / r["tokens_per_s"] * 1000 for r in rows if "loss" in r][WARMUP:]


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
    times = [float(m) for m in re.findall(r"^iter \d+: loss [\d.]+, time ([\d.]+)ms", res.stdout,
                                          re.M)]
    return times[WARMUP:]


def summary(ms: list[float], tokens: int) -> dict[str, float]:
    med = statistics.median(ms)
    return {"ms_per_iter": round(med, 2), "tokens_per_s": round(tokens / med * 1000),
            "iters_timed": len(ms)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout to run side by side")
    ap.add_argument("--source", default="builtin:shakespeare")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    tokens = SHAPE["batch_size"] * SHAPE["block_size"]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        prepare(PrepareOptions([args.source], "char"), tmp / "data", progress=False)
        data = PreparedData.open(tmp / "data")
        dataset = nanogpt_data(data, args.nanogpt) if args.nanogpt else ""
        results: dict[str, list[float]] = {"aura_fp32": [], "aura_bf16": []}
        for _ in range(args.rounds):
            for precision in ("fp32", "bf16"):
                results[f"aura_{precision}"] += run_aura(tmp / "data", tmp / "run", args.iters,
                                                         precision)
            if args.nanogpt:
                for compile_ in (False, True):
                    key = f"nanogpt_{'compile' if compile_ else 'eager'}"
                    results.setdefault(key, []).extend(
                        run_nanogpt(args.nanogpt, dataset, tmp / "ngpt", args.iters, compile_))
    systems = {k: summary(v, tokens) for k, v in results.items()}
    report = {"shape": SHAPE, "iters": args.iters, "rounds": args.rounds, "systems": systems,
              "speedup": {
                  f"{a} vs {b}": round(systems[b]["ms_per_iter"] / systems[a]["ms_per_iter"], 3)
                  for a in ("aura_fp32", "aura_bf16") for b in systems if b.startswith("nanogpt")
              }}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
