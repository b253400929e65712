"""Where CPU bf16 autocast pays: fp32 vs bf16 train-step time of `gpt` across widths.

    python benchmarks/precision_bench.py [--widths 64 128 256 384 512 768] [--steps 15] [--rounds 2]
    python benchmarks/precision_bench.py --presets [cpu-small hippocampal-cpu ...] [--steps 20]
        [--set model.n_embd=256 ...]

``train.precision=auto`` picks bf16 on a CPU only where it is native *and* measured faster; this
is the measurement. Each width is a 4-layer model (head size 64, block 128, batch 8, vocab 512)
trained with fused AdamW; fp32 and bf16 steps alternate in one process, ``--rounds`` times, and
the figure is the median step time after warm-up. Prints JSON with the machine it ran on; run it
through ``benchmarks/both_kinds.py`` to measure the emulated kind as well.

``--presets``: the whole trainer step (data, features, model, optimizer) of each named preset on
char Shakespeare, fp32 and bf16 runs alternating ``--rounds`` times: whether the rule ``auto``
follows holds for every model, not only ``gpt``. ``--set`` overrides every preset's config, to
try a model family at the widths where ``auto`` would pick bf16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from aura.config import load_config
from aura.data.prepare import PrepareOptions, prepare
from aura.models import build_model
from machine import machine
from train_bench import step_ms

PRESETS = ("demo", "cpu-small", "hippocampal-cpu", "bdh-cpu", "snn-rag-cpu")


def step_seconds(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                 dtype: torch.dtype | None) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        loss = model(x, x).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def preset_rows(presets: list[str], steps: int, rounds: int, overrides: list[str]
                ) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        prepare(PrepareOptions(["builtin:shakespeare"], "char"), tmp / "data", progress=False)
        rows = []
        for preset in presets:
            times: dict[str, list[float]] = {"fp32": [], "bf16": []}
            for _ in range(rounds):
                for precision in times:
                    cfg = load_config(preset=preset, overrides=[
                        f"train.precision={precision}", f"train.max_steps={steps}",
                        "train.log_interval=1", f"train.eval_interval={steps}",
                        "train.eval_iters=1", f"train.checkpoint_interval={steps}",
                        *overrides])
                    times[precision] += step_ms(cfg, tmp / "data", tmp / "run", warmup=3)
            fp32, bf16 = (statistics.median(times[k]) for k in ("fp32", "bf16"))
            rows.append({"preset": preset, **({"set": overrides} if overrides else {}),
                         "fp32_ms": round(fp32, 2), "bf16_ms": round(bf16, 2),
                         "bf16_speedup": round(fp32 / bf16, 3)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 384, 512, 768])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--presets", nargs="*", help=f"whole trainer steps of presets "
                        f"(default {' '.join(PRESETS)}) instead of widths")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="with --presets: a config override for all")
    args = parser.parse_args()
    if args.presets is not None:
        rows = preset_rows(args.presets or list(PRESETS), args.steps, args.rounds,
                           args.overrides)
        print(json.dumps({"machine": machine(), "mode": "presets", "rows": rows}, indent=1))
        return
    rows = []
    for width in args.widths:
        torch.manual_seed(0)
        cfg = load_config(preset="demo", overrides=[
            f"model.n_embd={width}", f"model.n_head={max(1, width // 64)}", "model.n_layer=4",
            "model.block_size=128", "model.vocab_size=512", "model.dropout=0.0"])
        model = build_model(cfg.model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        x = torch.randint(0, 512, (8, 128))
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(args.rounds):
            for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                for i in range(args.steps + 2):
                    seconds = step_seconds(model, opt, x, dtype)
                    if i >= 2:
                        times[name].append(seconds)
        fp32 = statistics.median(times["fp32"]) * 1000
        bf16 = statistics.median(times["bf16"]) * 1000
        rows.append({"n_embd": width, "fp32_ms": round(fp32, 2), "bf16_ms": round(bf16, 2),
                     "bf16_speedup": round(fp32 / bf16, 3)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress
    print(json.dumps({"machine": machine(), "shape": "4 layers, head 64, B8 x T128, vocab 512",
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
