"""What `aura train --viz-interval` costs. Prints JSON.

    python benchmarks/viz_bench.py [--preset hippocampal-cpu] [--rounds 5] [--threads 1]

For a preset's model (random weights, its vocabulary from --vocab): seconds per training step
(forward, backward, AdamW on one batch of the preset's shape), and per snapshot of the 64-token
probe split into its two parts, reading the model's insides (``brain_state``) and drawing them
(``render``: PNGs, .npz, index.html). A snapshot every N steps costs (snapshot / step) / N of the
run; off, the trainer only tests ``step % N`` (never built), which the step time includes.
Medians over --rounds, after one warm-up round of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aura.config import load_config
from aura.data.prosody import token_features
from aura.data.sampler import compute_features
from aura.data.tokenizers import CharTokenizer
from aura.eval.viz import PROBE_TOKENS, probe_state, render
from aura.models import build_model
from aura.train.optim import build_optimizers
from machine import machine

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "You are all resolved rather to die than to famish?")


def median_seconds(fn: Any, rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="hippocampal-cpu")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = CharTokenizer(TEXT)
    cfg = load_config(preset=args.preset, overrides=[
        f"model.vocab_size={tokenizer.vocab_size}", "train.device=cpu", *args.set])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = build_optimizers(model, cfg.train, torch.device("cpu"))
    t, block = cfg.train, cfg.model.block_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, tokenizer.vocab_size, (t.batch_size, block), generator=gen)
    features = token_features(model.token_features, tokenizer) if model.token_features else {}
    inputs = compute_features(features, x)

    def step() -> None:
        model.train()
        model(x, x, **inputs).loss.backward()
        opt.step()
        opt.zero_grad()

    probe = np.asarray(tokenizer.encode(TEXT)[:min(PROBE_TOKENS, block)])
    state, tokens = probe_state(model, tokenizer, probe)
    with tempfile.TemporaryDirectory() as d:
        step_s = median_seconds(step, args.rounds)
        state_s = median_seconds(lambda: probe_state(model, tokenizer, probe), args.rounds)
        render_s = median_seconds(lambda: render(state, tokens, Path(d), "bench"), args.rounds)
        pictures = sorted(p.name for p in Path(d).glob("*.png"))
    snapshot = state_s + render_s
    print(json.dumps({
        "machine": machine(), "preset": args.preset, "overrides": args.set,
        "rounds": args.rounds, "batch": [t.batch_size, block], "probe_tokens": len(probe),
        "pictures": pictures, "train_step_s": step_s, "brain_state_s": state_s,
        "render_s": render_s, "snapshot_s": snapshot,
        "snapshot_in_train_steps": snapshot / step_s,
        "overhead_at_interval": {str(n): snapshot / (n * step_s) for n in (100, 500, 1000)},
    }, indent=1))


if __name__ == "__main__":
    main()
