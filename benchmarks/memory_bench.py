"""Peak memory and step time of an 8-layer `gpt` with and without gradient checkpointing.

    python benchmarks/memory_bench.py [--n-embd 256] [--block 256] [--batch 16] [--steps 5]

Each mode runs in its own process; activation memory is the peak resident set during training
steps minus the resident set just before the first step (model, optimizer state and data already
allocated). On CUDA the same script reports torch's own peak allocation. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from aura.config import ModelConfig, TrainConfig
from aura.models import build_model
from aura.train.optim import build_optimizers
from machine import machine


def peak_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one_mode(args: argparse.Namespace, checkpointing: bool) -> dict[str, float]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=args.vocab, block_size=args.block, n_layer=8, n_head=8,
                      n_embd=args.n_embd)
    model = build_model(cfg).to(device)
    model.grad_checkpoint = checkpointing
    opt = build_optimizers(model, TrainConfig(), torch.device(device))
    x = torch.randint(0, args.vocab, (args.batch, args.block), device=device)
    for p in model.parameters():  # materialise gradients and optimizer state before measuring
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad()
    base = current_mb()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        model(x, x).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return {"activation_mb": round(peak_mb() - base, 1),
            "ms_per_step": round(statistics.median(times[1:]) * 1000, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--mode", choices=["plain", "checkpointed"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(one_mode(args, args.mode == "checkpointed")))
        return
    results = {}
    for mode in ("plain", "checkpointed"):
        cmd = [sys.executable, __file__, "--mode", mode, "--n-embd", str(args.n_embd),
               "--block", str(args.block), "--batch", str(args.batch),
               "--vocab", str(args.vocab), "--steps", str(args.steps)]
        results[mode] = json.loads(subprocess.run(cmd, capture_output=True, text=True,
                                                  check=True).stdout)
    plain, ckpt = results["plain"], results["checkpointed"]
    print(json.dumps({
        "machine": machine(),
        "model": {"n_layer": 8, "n_head": 8, "n_embd": args.n_embd, "block": args.block,
                  "batch": args.batch},
        **results,
        "activation_saving": round(1 - ckpt["activation_mb"] / plain["activation_mb"], 3),
        "time_cost": round(ckpt["ms_per_step"] / plain["ms_per_step"] - 1, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
