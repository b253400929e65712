"""What keeping freed memory in the process (aura/allocator.py) saves: steps with glibc's
defaults (``AURA_KEEP_FREED_MEMORY=0``) against Aura's setting, side by side.

    python benchmarks/allocator_bench.py [--workloads cpu-small:bpe lif ...] [--steps 20]
        [--rounds 2] [--quick]

The setting is process-wide, so each run is its own process; the two alternate (which goes
first rotates each round) so drift hits both. A workload is a preset trained on
``builtin:shakespeare`` (``PRESET`` on char tokens, ``PRESET:bpe`` on a 4096-token BPE
vocabulary, whose logits are the large buffers) for ``--steps`` steps after 5 of warm-up, or
``lif``: forward + backward of Aura's LIF layer at T 32 B 256 N 2048 (soft reset). Per run: the
median step in ms, minor page faults per step (a preset's: over its whole run, the model's
building and the one evaluation included; ``lif``'s: over the timed steps), and the process's peak
resident memory; per workload the medians over rounds and ``speedup`` = default / kept. Prints
JSON. ``--quick`` runs two tiny workloads once, to check the script works: it measures nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKLOADS = ("cpu-small:bpe", "cpu-small", "hippocampal-cpu", "bdh-cpu", "brain-cpu", "lif")
BPE_VOCAB = 4096
WARMUP = 5
QUICK_OVERRIDES = ["model.n_layer=1", "train.batch_size=2", "train.block_size=32"]


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peak_rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # KiB on Linux


def child_train(preset: str, data: Path, steps: int, overrides: list[str]) -> dict[str, float]:
    from aura.config import load_config
    from train_bench import step_ms
    total = steps + WARMUP
    cfg = load_config(preset=preset, overrides=[
        f"train.max_steps={total}", "train.log_interval=1", f"train.eval_interval={total}",
        "train.eval_iters=1", f"train.checkpoint_interval={total}", *overrides])
    with tempfile.TemporaryDirectory() as run:
        before = faults()
        ms = step_ms(cfg, data, Path(run) / "run", warmup=WARMUP)
        return {"ms": statistics.median(ms), "faults_per_step": (faults() - before) / total}


def child_lif(steps: int, quick: bool) -> dict[str, float]:
    from snn_bench import aura_lif, fwd_bwd, lif_input  # the LIF benchmark's own call
    x, w = lif_input(*((8, 4, 256) if quick else (32, 256, 2048)))
    run = aura_lif("soft")
    ms, before = [], 0
    for i in range(steps + WARMUP):
        if i == WARMUP:
            before = faults()
        start = time.perf_counter()
        fwd_bwd(run, x, w)
        if i >= WARMUP:
            ms.append((time.perf_counter() - start) * 1000)
    return {"ms": statistics.median(ms), "faults_per_step": (faults() - before) / steps}


def child(args: argparse.Namespace) -> None:
    import machine  # noqa: F401 - keeps freed memory unless AURA_KEEP_FREED_MEMORY=0
    from aura.allocator import keeps_freed_memory
    if args.child == "lif":
        row = child_lif(args.steps, args.quick)
    else:
        preset, _, tokens = args.child.partition(":")
        row = child_train(preset, args.data / (tokens or "char"), args.steps,
                          QUICK_OVERRIDES if args.quick else [])
    print(json.dumps({**row, "peak_rss_mb": peak_rss_mb(), "kept": keeps_freed_memory()}))


def run_child(workload: str, data: Path, steps: int, keep: bool, quick: bool) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", workload, "--data", str(data),
           "--steps", str(steps), *(["--quick"] if quick else [])]
    env = {**os.environ, "AURA_KEEP_FREED_MEMORY": "1" if keep else "0"}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    row = json.loads(out.splitlines()[-1])
    if row.pop("kept") is not keep:
        sys.exit(f"allocator_bench: AURA_KEEP_FREED_MEMORY={int(keep)} did not take in {workload}")
    return row


def prepare_data(data: Path, workloads: list[str]) -> None:
    from aura.data.prepare import PrepareOptions, prepare
    prepare(PrepareOptions(["builtin:shakespeare"], "char"), data / "char", progress=False)
    if any(w.endswith(":bpe") for w in workloads):
        prepare(PrepareOptions(["builtin:shakespeare"], "bpe", vocab_size=BPE_VOCAB),
                data / "bpe", progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.workloads, args.steps, args.rounds = ["demo", "lif"], 2, 1
    for w in args.workloads:
        preset, _, tokens = w.partition(":")
        if tokens not in ("", "bpe") or (w != "lif" and not preset):
            ap.error(f"workload {w!r}: PRESET, PRESET:bpe or lif")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        data = Path(d)
        prepare_data(data, args.workloads)
        for w in args.workloads:
            runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
            for r in range(args.rounds):
                for keep in ((False, True) if r % 2 == 0 else (True, False)):
                    runs[keep].append(run_child(w, data, args.steps, keep, args.quick))
            med = {keep: {k: round(statistics.median(run[k] for run in rs), 2)
                          for k in rs[0]} for keep, rs in runs.items()}
            rows.append({"workload": w, "glibc_default": med[False], "kept": med[True],
                         "speedup": round(med[False]["ms"] / med[True]["ms"], 3)})
    from machine import machine
    print(json.dumps({"machine": machine(), "steps": args.steps, "warmup": WARMUP,
                      "rounds": args.rounds, "bpe_vocab": BPE_VOCAB, "workloads": rows},
                     indent=1))


if __name__ == "__main__":
    main()
