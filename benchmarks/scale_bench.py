"""Scale-out costs on CPU (gloo): checkpoint save and resume, consolidated vs sharded, at 1 and
2 ranks; and training throughput of 2 ranks x 1 thread vs 1 rank x 2 threads.

    python benchmarks/scale_bench.py                 # the demo preset, 20 steps per run
    python benchmarks/scale_bench.py --quick         # tiny model, 2 steps: checks the script
    python benchmarks/scale_bench.py --only checkpoint   (or throughput)

checkpoint: for each format (consolidated, sharded) and world size (1, 2; FSDP2 at 2, where
a sharded save matters) ``aura train`` saves at every step of a short run, then a
``--resume`` run loads the newest checkpoint and trains one more step. Each rank times its
``Trainer._checkpoint`` (gather/shard + write + rename, barrier included) and ``Trainer._load``
calls (wrapped here, the trainer is unchanged); reported per rank: the median save and the
load, in seconds, and the checkpoint's bytes on disk (all files, and the weight+optimizer part).

throughput: the demo preset as it is (its precision, dropout) for ``--steps`` steps, once as
one process with 2 intra-op threads, once as ``aura train --nproc 2`` (1 thread per rank); the
tokens/s each ``aura train --json`` reports (its whole loop, evaluation included).

Timings depend on what else the machine runs: run it on an idle machine. Prints one JSON
object with ``machine()``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
TINY = ["--set", "model.n_layer=2", "--set", "model.n_embd=32", "--set", "model.n_head=2",
        "--set", "model.block_size=32", "--set", "train.batch_size=4"]


def worker(spec: dict[str, Any]) -> int:
    """One rank (or the one process): ``aura train`` with its saves and loads timed."""
    from aura.cli import main as aura_main
    from aura.train import trainer as trainer_mod

    times: dict[str, list[float]] = {"save": [], "load": []}

    def timed(name: str, fn: Any) -> Any:
        def run(self: Any, *args: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(self, *args)
            finally:
                times[name].append(time.perf_counter() - start)
        return run

    trainer_mod.Trainer._checkpoint = timed("save", trainer_mod.Trainer._checkpoint)
    trainer_mod.Trainer._load = timed("load", trainer_mod.Trainer._load)
    code = aura_main(["train", *spec["argv"]])
    rank = os.environ.get("RANK", "0")
    Path(spec["report"], f"rank-{rank}.json").write_text(json.dumps({"code": code, **times}))
    return code


def _run(argv: list[str], nproc: int, threads: int, report: Path) -> list[dict[str, Any]]:
    report.mkdir(parents=True)
    spec = json.dumps({"argv": argv, "report": str(report)})
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = ([sys.executable, str(HERE), "--worker", spec] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(nproc), str(HERE), "--worker", spec])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{out.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(report.glob("rank-*.json"))]


def _bytes(ckpt: Path) -> dict[str, int]:
    files = [p for p in ckpt.rglob("*") if p.is_file()]
    state = [p for p in files if p.name in ("model.safetensors", "train_state.safetensors")
             or p.parent.name == "shards"]
    return {"all": sum(p.stat().st_size for p in files),
            "weights_and_optimizer": sum(p.stat().st_size for p in state)}


def checkpoint(root: Path, data: Path, steps: int, quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fmt in ("consolidated", "sharded"):
        for world in (1, 2):
            run = root / f"ckpt-{fmt}-{world}"
            common = ["--data", str(data), "--out", str(run), "--set", "train.device=cpu",
                      "--set", f"train.checkpoint_format={fmt}",
                      "--set", f"train.parallel={'fsdp' if world > 1 else 'ddp'}"]
            first = _run(["--preset", "demo", *common, "--max-steps", str(steps),
                          "--checkpoint-interval", "1", "--keep-checkpoints", "2",
                          "--set", f"train.eval_interval={steps}", "--set", "train.eval_iters=2",
                          *(TINY if quick else [])], world, 2 // world, root / f"r-{run.name}-1")
            ckpts = sorted((run / "checkpoints").glob("step-*"))
            size = _bytes(ckpts[-1])
            again = _run([*common, "--resume", "--max-steps", str(steps + 1)], world,
                         2 // world, root / f"r-{run.name}-2")
            out[f"{fmt}-{world}rank"] = {
                "save_s_median_per_rank": [statistics.median(r["save"]) for r in first],
                "saves": len(first[0]["save"]),
                "load_s_per_rank": [r["load"][0] for r in again],
                "bytes": size,
            }
    return out


def throughput(root: Path, data: Path, steps: int, quick: bool) -> dict[str, Any]:
    common = ["--preset", "demo", "--data", str(data), "--json", "--max-steps", str(steps),
              "--checkpoint-interval", str(steps), "--set", "train.device=cpu",
              *(TINY if quick else [])]
    env = {**os.environ}
    results = {}
    for name, extra, threads in (("1x2threads", [], 2), ("2x1thread", ["--nproc", "2"], 1)):
        env["OMP_NUM_THREADS"] = str(threads)
        cmd = [sys.executable, "-m", "aura", "train", *common, "--out", str(root / name), *extra]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads(out.stdout)["tokens_per_s"]
    return {"tokens_per_s": results, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--only", choices=["checkpoint", "throughput"])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.worker:
        raise SystemExit(worker(json.loads(args.worker)))
    from aura.data.prepare import PrepareOptions, prepare
    from machine import machine

    steps = 2 if args.quick else args.steps
    report: dict[str, Any] = {"machine": machine(), "quick": args.quick}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data"
        prepare(PrepareOptions(["builtin:shakespeare"], "char"), data, progress=False)
        if args.only in (None, "checkpoint"):
            report["checkpoint"] = checkpoint(root, data, min(steps, 3), args.quick)
        if args.only in (None, "throughput"):
            report["throughput"] = throughput(root, data, steps, args.quick)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
