"""What the bio-inspired models cost over `gpt` of the same shape, side by side in one process.

    python benchmarks/overhead_bench.py [--presets hippocampal-cpu,snn-rag-cpu] [--rounds 4]
                                        [--steps 8] [--threads N]

For each preset: its model and a `gpt` with the same layers, heads, width and block (the
preset's config with ``model.name=gpt``), at the preset's batch, on one random batch. The two
train in turn, one step each (forward, backward, AdamW, the step's memories written), so drift
on a shared machine cancels; the figure is each model's median seconds per step and the speed
ratio, gpt's time over the model's (1.0 = as fast as gpt). Stores are filled to capacity first.
Prints JSON with the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np
import torch

from aura.config import load_config
from aura.data.prosody import Prosody
from aura.models import build_model
from machine import machine

VOCAB = 65
WARMUP = 40  # steps before timing: enough to fill every shipped CPU preset's memory


def pair(preset: str, rounds: int, steps: int) -> dict[str, Any]:
    models, opts = {}, {}
    for name, extra in (("model", []), ("gpt", ["model.name=gpt"])):
        cfg = load_config(preset=preset, overrides=[f"model.vocab_size={VOCAB}",
                                                    "model.dropout=0.0", *extra])
        torch.manual_seed(0)
        models[name] = build_model(cfg.model).train()
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)
    batch, block = cfg.train.batch_size, cfg.model.block_size
    x = torch.randint(0, VOCAB, (batch, block), generator=torch.Generator().manual_seed(1))
    prosody = torch.from_numpy(Prosody([chr(32 + i % 95) for i in range(VOCAB)])(np.asarray(x)))

    def step(name: str) -> float:
        model, opt = models[name], opts[name]
        kwargs: dict[str, torch.Tensor] = {}
        if model.token_features:
            kwargs["prosody"] = prosody
        if model.wants_corpus_pos:
            kwargs["corpus_pos"] = torch.arange(batch) * block + 10 * block
        t = time.perf_counter()
        model(x, x, **kwargs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.flush_memory()
        return time.perf_counter() - t

    for name in models:
        for _ in range(WARMUP):
            step(name)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds * steps):
        for name in models:
            times[name].append(step(name))
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"preset": preset, "batch": batch, "block": block,
            "params": {n: m.num_params() for n, m in models.items()},
            "model_s_per_step": round(med["model"], 4), "gpt_s_per_step": round(med["gpt"], 4),
            "speed_vs_gpt": round(med["gpt"] / med["model"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="hippocampal-cpu,snn-rag-cpu")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [pair(p, args.rounds, args.steps) for p in args.presets.split(",")]
    print(json.dumps({"machine": machine(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
