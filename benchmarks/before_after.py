"""An earlier commit against this checkout, side by side in ONE process: training steps, cached and
uncached generation, the LIF forward + backward, the hippocampal and SNN-RAG models' step and
inference.

    python benchmarks/before_after.py --before 6e19dca
        [--what train,generate,lif,hippocampal,snn_rag] [--rounds 8]

Separate processes of the same code vary by 30% and more on a shared 2-core machine (heap layout,
CPU frequency, a neighbour's load), which hides a 10% change. So the earlier commit's ``aura``
package is exported with ``git archive`` into a temporary directory as ``aura_before`` (its own
imports rewritten) and both versions run in this process, alternating round by round and
starting with a different one each round; the figure is each side's median, and ``speedup`` is
after over before (above 1: faster now). Weights are seeded alike and checked equal where the two
versions build the same model. Prints JSON.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import io
import json
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from machine import machine

REPO = Path(__file__).resolve().parent.parent
IMPORT = re.compile(r"^(\s*)(from|import) aura\b", re.M)


def export_before(commit: str, into: Path) -> str:
    """``src/aura`` at ``commit`` as the package ``aura_before`` under ``into``; its full sha."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", commit],
                         capture_output=True, text=True, check=True).stdout.strip()
    tar = subprocess.run(["git", "-C", str(REPO), "archive", sha, "src/aura"],
                         capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(into, filter="data")
    package = into / "aura_before"
    (into / "src" / "aura").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(IMPORT.sub(r"\1\2 aura_before", path.read_text()))
    return sha


def versions(before: Path) -> dict[str, Callable[[str], ModuleType]]:
    sys.path.insert(0, str(before))
    return {"before": lambda name: importlib.import_module(f"aura_before.{name}"),
            "after": lambda name: importlib.import_module(f"aura.{name}")}


def alternate(runs: dict[str, Callable[[], float]], rounds: int, higher_is_faster: bool = True
              ) -> dict[str, Any]:
    """Each run once per round, the order flipped every round; medians and the speedup of
    "after" over "before" (above 1: faster now)."""
    got: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            got[name].append(runs[name]())
    med = {name: statistics.median(v) for name, v in got.items()}
    return {"median": {k: round(v, 2) for k, v in med.items()},
            "range": {k: [round(min(v), 2), round(max(v), 2)] for k, v in got.items()},
            "speedup": round((med["after"] / med["before"]) if higher_is_faster
                             else (med["before"] / med["after"]), 3)}


def gpt(mod: Callable[[str], ModuleType], **shape: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return mod("models").build_model(mod("config").ModelConfig(**shape))


def bench_generate(mods: dict[str, Callable[[str], ModuleType]], rounds: int) -> dict[str, Any]:
    """Tokens/s of greedy decoding, 448 new tokens after 64, gpt 4 x 128, block 512, vocab 65."""
    shape = {"vocab_size": 65, "block_size": 512, "n_layer": 4, "n_head": 4, "n_embd": 128}
    models = {v: gpt(mods[v], **shape).eval() for v in mods}
    before, after = (list(m.state_dict().values()) for m in models.values())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    prompt = torch.randint(0, 65, (1, 64), generator=torch.Generator().manual_seed(1))
    out = {}
    for cached in (True, False):
        def run(v: str, cached: bool = cached) -> float:
            sampling = mods[v]("infer.sampling").SamplingConfig(temperature=0)
            t = time.perf_counter()
            mods[v]("infer.generate").generate(models[v], prompt, 448, sampling,
                                               use_cache=cached)
            return 448 / (time.perf_counter() - t)
        for v in mods:
            run(v)  # warm-up
        out["cached_tokens_per_s" if cached else "uncached_tokens_per_s"] = alternate(
            {v: (lambda v=v: run(v)) for v in mods}, rounds)
    return out


def bench_train(mods: dict[str, Callable[[str], ModuleType]], rounds: int) -> dict[str, Any]:
    """Milliseconds per training step of each version's Trainer at nanoGPT's CPU Shakespeare
    shape (gpt 4 x 128, block 64, batch 12, fp32 and bf16 autocast), 60 steps a run, on the
    same char tokens; the median of each run's steps after the first five."""
    new = mods["after"]
    out = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        prep = new("data.prepare")
        prep.prepare(prep.PrepareOptions(["builtin:shakespeare"], "char"), tmp / "data",
                     progress=False)
        for precision in ("fp32", "bf16"):
            def run(v: str, precision: str = precision) -> float:
                cfg = mods[v]("config").load_config(preset="demo", overrides=[
                    "train.max_steps=60", "train.log_interval=1", "train.eval_interval=1000",
                    "train.checkpoint_interval=1000", f"train.precision={precision}"])
                run_dir = tmp / f"run-{v}"
                shutil.rmtree(run_dir, ignore_errors=True)
                mods[v]("train.trainer").Trainer(cfg, tmp / "data", run_dir, progress=False,
                                                 log=lambda _m: None).run()
                rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text()
                        .splitlines()]
                ms = [12 * 64 / r["tokens_per_s"] * 1000 for r in rows if "loss" in r][5:]
                return statistics.median(ms)
            out[f"ms_per_step_{precision}"] = alternate(
                {v: (lambda v=v: run(v)) for v in mods}, rounds, higher_is_faster=False)
    return out


def lif_step(lif: torch.nn.Module, x: torch.Tensor, w: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    xi = x.clone().requires_grad_()
    spikes, _ = lif(xi)
    (spikes * w).sum().backward()
    assert xi.grad is not None
    return spikes.detach(), xi.grad


def lif_ms(lif: torch.nn.Module, x: torch.Tensor, w: torch.Tensor) -> float:
    """Milliseconds per forward + backward, over 3 calls."""
    t = time.perf_counter()
    for _ in range(3):
        lif_step(lif, x, w)
    return (time.perf_counter() - t) / 3 * 1000


def bench_lif(mods: dict[str, Callable[[str], ModuleType]], rounds: int) -> dict[str, Any]:
    """Milliseconds of the LIF forward + backward (loss sum(spikes * w), arctan surrogate) at
    snn_bench's shapes; outputs and gradients checked equal between the versions first."""
    out = {}
    for T, B, N in ((16, 64, 1024), (16, 256, 2048), (32, 64, 1024), (32, 256, 2048)):
        g = torch.Generator().manual_seed(0)
        x = 1.05 * torch.tanh(torch.randn(T, B, N, generator=g) * 0.6 + 0.3)
        w = torch.randn(T, B, N, generator=g)
        for reset in ("soft", "hard"):
            lifs = {v: mods[v]("nn.spiking").LIF(beta=0.9, threshold=1.0, reset=reset,
                                                  surrogate="atan") for v in mods}

            (s0, g0), (s1, g1) = (lif_step(lifs[v], x, w) for v in ("before", "after"))
            assert torch.equal(s0, s1) and torch.equal(g0, g1)
            out[f"T{T} {B}x{N} {reset}"] = alternate(
                {v: functools.partial(lif_ms, lifs[v], x, w) for v in mods}, rounds,
                higher_is_faster=False)
    return out


def bench_memory_model(preset: str, mods: dict[str, Callable[[str], ModuleType]], rounds: int
                       ) -> dict[str, Any]:
    """Seconds per training step (forward, backward, AdamW, the step's memories written) and
    per inference forward of ``preset``'s model (batch 12 x 128, memory full, prosody and
    corpus positions passed as the trainer does, where the model takes them)."""
    models, opts = {}, {}
    for v in mods:
        cfg = mods[v]("config").load_config(preset=preset, overrides=["model.vocab_size=65"])
        torch.manual_seed(0)
        models[v] = mods[v]("models").build_model(cfg.model)
        opts[v] = torch.optim.AdamW(models[v].parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 65, (12, 128), generator=g)
    prosody = torch.rand(12, 128, 8, generator=g)
    where = torch.arange(12) * 128

    def kwargs(v: str) -> dict[str, torch.Tensor]:
        m = models[v]
        return ({"prosody": prosody} if m.token_features else {}) | (
            {"corpus_pos": where} if m.wants_corpus_pos else {})

    def train(v: str) -> float:
        m = models[v].train()
        t = time.perf_counter()
        m(x, x, **kwargs(v)).loss.backward()
        opts[v].step()
        opts[v].zero_grad(set_to_none=True)
        m.memory_stores()  # the step's memories are written before the next forward
        return time.perf_counter() - t

    def infer(v: str) -> float:
        m = models[v].eval()
        with torch.inference_mode():
            t = time.perf_counter()
            m(x, **kwargs(v))
            return time.perf_counter() - t

    for v in mods:  # fill the stores (hippocampal: 1024 memories, 32 a step)
        for _ in range(40):
            train(v)
    per = max(rounds, 8)
    return {"preset": preset,
            "train_s": alternate({v: functools.partial(train, v) for v in mods}, per,
                                 higher_is_faster=False),
            "infer_s": alternate({v: functools.partial(infer, v) for v in mods}, per,
                                 higher_is_faster=False)}

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="the earlier commit")
    ap.add_argument("--what", default="train,generate,lif")
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    benches = {"train": bench_train, "generate": bench_generate, "lif": bench_lif,
               "hippocampal": functools.partial(bench_memory_model, "hippocampal-cpu"),
               "snn_rag": functools.partial(bench_memory_model, "snn-rag-cpu")}
    wanted = args.what.split(",")
    if not set(wanted) <= set(benches):
        ap.error(f"--what takes {', '.join(benches)}")
    with tempfile.TemporaryDirectory() as d:
        sha = export_before(args.before, Path(d))
        mods = versions(Path(d))
        report = {name: benches[name](mods, args.rounds) for name in wanted}
    print(json.dumps({"machine": machine(), "before": sha, "rounds": args.rounds, **report},
                     indent=1))


if __name__ == "__main__":
    main()
