"""Data parallelism on CPU: 2-process gloo DDP (torchrun, 1 thread each) against 1 process
(2 threads) at the same global batch and seed, for gpt, bdh and hippocampal.

    python benchmarks/ddp_check.py [--steps 50] [--models gpt bdh hippocampal] [--parallel ddp]
    python benchmarks/ddp_check.py --quick        # 3 steps of tiny models: checks the script

Each model trains at its CPU preset (``demo``, ``bdh-cpu``, ``hippocampal-cpu``; fp32; dropout
0, as each rank draws its own dropout masks) on ``builtin:shakespeare`` (chars, bytes for bdh), with
a loss row every step and one evaluation at the end; hippocampal reads and writes its memory
from step 10. Prints JSON: per model the largest absolute difference of the per-step training
loss and of the final val loss between the two runs, both curves, and the tokens/s each run's
``aura train --json`` reported (throughput as is: it depends on what else the machine runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from aura.data.prepare import PrepareOptions, prepare
from machine import machine

PRESETS = {"gpt": ("demo", "char"), "bdh": ("bdh-cpu", "byte"),
           "hippocampal": ("hippocampal-cpu", "char")}
TINY = ["--set", "model.n_layer=2", "--set", "model.n_embd=32", "--set", "model.n_head=2",
        "--set", "model.block_size=32", "--set", "train.batch_size=4"]


def _train(argv: list[str], nproc: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if nproc == 1:
        cmd = [sys.executable, "-m", "aura", "train", *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--standalone", "-m", "aura", "train", *argv]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def _curve(run: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--models", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps = 3 if args.quick else args.steps
    report: dict = {"machine": machine(), "steps": steps, "parallel": args.parallel,
                    "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in args.models:
            preset, tokenizer = PRESETS[name]
            data = root / f"data-{tokenizer}"
            if not data.exists():
                prepare(PrepareOptions(["builtin:shakespeare"], tokenizer), data, progress=False)
            common = ["--preset", preset, "--data", str(data), "--json", "--max-steps",
                      str(steps), "--checkpoint-interval", str(steps),
                      "--set", "model.dropout=0.0", "--set", "train.log_interval=1",
                      "--set", f"train.eval_interval={steps}", "--set", "train.device=cpu",
                      "--set", "train.precision=fp32",
                      "--set", f"train.parallel={args.parallel}",
                      *(["--set", "train.memory_warmup_steps=10"] if name == "hippocampal"
                        else []), *(TINY if args.quick else [])]
            one = _train([*common, "--out", str(root / f"{name}-1")], 1, 2)
            two = _train([*common, "--out", str(root / f"{name}-2")], 2, 1)
            a, b = _curve(root / f"{name}-1", "loss"), _curve(root / f"{name}-2", "loss")
            assert a.keys() == b.keys(), (a.keys(), b.keys())
            report["models"][name] = {
                "preset": preset,
                "max_abs_loss_diff": max(abs(a[s] - b[s]) for s in a),
                "val_loss": [one["val_loss"], two["val_loss"]],
                "loss_1proc": [a[s] for s in sorted(a)],
                "loss_2proc": [b[s] for s in sorted(b)],
                "tokens_per_s": {"1x2threads": one["tokens_per_s"],
                                 "2x1thread": two["tokens_per_s"]},
            }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
