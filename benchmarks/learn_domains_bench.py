"""Forgetting of the continuous-learning service (`aura learn --train-steps`) on the four domains
of `continual_bench.py`, with and without its protection (replay, replay + EWC).

A demo model is first trained on the first domain with `continual.ewc=true` (so its checkpoint
carries the Fisher `--ewc-lambda` needs). Each variant then runs `aura learn --once` four times
on one watched directory, each time after adding the next domain's training text as files
(Shakespeare, Python stdlib, C headers, licence texts), so every file is learned exactly once,
in domain order. After each domain the state is exported (`aura learn-export`) and every
domain's held-out split is scored. Prints one JSON document: the machine, the settings, per
variant the loss matrix (rows: after each domain; the base model's losses as ``initial``) and
Avalanche's metrics adapted to loss (`aura.continual.metrics`: forgetting = final minus
just-learned loss, BWT = -forgetting), and the first domain's loss after the last.

    python benchmarks/learn_domains_bench.py --out /tmp/learn-bench          # the figures
    python benchmarks/learn_domains_bench.py --out /tmp/learn-bench --quick  # a smoke run

``--set model.name=hippocampal`` trains a base model with an episodic store instead, so the
service's salience also chooses what that store keeps (``remembers_by_salience``); each row
then also reports the memories the exported model holds and has ever written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from aura.config import load_config
from aura.continual.metrics import cl_metrics
from aura.data.shards import PreparedData
from aura.eval.perplexity import evaluate_prepared
from aura.learn import LearnOptions, LearnService
from aura.learn.export import export_state
from aura.train.checkpoint import list_checkpoints, load_for_inference
from aura.train.trainer import Trainer
from continual_bench import prepare_domains
from machine import machine


def write_files(data: PreparedData, out: Path, file_bytes: int, max_files: int) -> int:
    """The train split's text (byte-level) cut into ``max_files`` files of ``file_bytes``;
    returns the bytes written."""
    tokens = data.split("train").tokens()[: file_bytes * max_files]
    out.mkdir(parents=True, exist_ok=True)
    text = data.tokenizer.decode(tokens.tolist())
    raw = text.encode("utf-8", "replace")
    for i in range(0, len(raw), file_bytes):
        (out / f"part{i // file_bytes:04d}.txt").write_bytes(raw[i:i + file_bytes])
    return len(raw)


def scored(run: Path, datas: list[PreparedData], eval_tokens: int
           ) -> tuple[list[float], list[int]]:
    """Every domain's val loss under the run's model, and the memories its stores hold and
    have ever been written (ids are never reused)."""
    model = load_for_inference(run, log=lambda _m: None).model
    stores = model.memory_stores().values()
    held = [sum(len(s) for s in stores), sum(s.next_id for s in stores)]
    return [evaluate_prepared(model, d, "val", max_tokens=eval_tokens).loss
            for d in datas], held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--base-steps", type=int, default=300, help="demo steps on domain 1")
    ap.add_argument("--files", type=int, default=24, help="files per domain")
    ap.add_argument("--file-bytes", type=int, default=4096)
    ap.add_argument("--train-steps", type=int, default=8, help="learn's steps per file")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--replay-tokens", type=int, default=65536)
    ap.add_argument("--ewc-lambda", type=float, default=100.0)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--max-bytes", type=int, default=400_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny settings: checks the script")
    ap.add_argument("--set", action="append", default=[], help="extra KEY=VALUE for the base "
                    "model's config (e.g. model.name=hippocampal)")
    ap.add_argument("--variants", default="naive,replay,replay+ewc")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.base_steps, args.files, args.train_steps, args.eval_tokens = 20, 2, 2, 1024
    domains = prepare_domains(args.out, args.max_bytes)
    datas = [PreparedData.open(d.data) for d in domains]

    base = args.out / "base"
    if not list_checkpoints(base):
        cfg = load_config(preset="demo", overrides=[
            "train.device=cpu", "train.precision=fp32", f"train.max_steps={args.base_steps}",
            f"train.eval_interval={args.base_steps}", "train.eval_iters=4",
            f"train.checkpoint_interval={args.base_steps}",
            f"train.warmup_steps={max(1, args.base_steps // 20)}", "train.memory_check=false",
            "continual.ewc=true", *args.set])
        cfg.data.dir = domains[0].data
        Trainer(cfg, domains[0].data, base, progress=False, log=lambda _m: None).run()
    initial = scored(base, datas, args.eval_tokens)[0]

    files = args.out / "files"
    for d, data in zip(domains, datas, strict=True):
        if not (files / d.name).is_dir():
            write_files(data, files / d.name, args.file_bytes, args.files)

    variants = {"naive": (0, 0.0), "replay": (args.replay_tokens, 0.0),
                "replay+ewc": (args.replay_tokens, args.ewc_lambda)}
    results: dict[str, Any] = {}
    for label in args.variants.split(","):
        replay, lam = variants[label]
        root = args.out / "variants" / label
        shutil.rmtree(root, ignore_errors=True)
        watch, state = root / "watch", root / "state"
        matrix, memories = [], []
        for i, d in enumerate(domains):
            shutil.copytree(files / d.name, watch / f"{i}-{d.name}")
            LearnService(LearnOptions(watch, state=state, model=base, once=True, progress=False,
                                      train_steps=args.train_steps, lr=args.lr,
                                      replay_tokens=replay, ewc_lambda=lam),
                         log=lambda _m: None).run()
            export_state(state, root / f"after-{i}", log=lambda _m: None)
            row, held = scored(root / f"after-{i}", datas, args.eval_tokens)
            matrix.append(row)
            memories.append(held)
        metrics = cl_metrics(matrix, initial)
        results[label] = {"replay_tokens": replay, "ewc_lambda": lam, "matrix": matrix,
                          "metrics": metrics, "memories": memories,
                          "first_domain_after_first": matrix[0][0],
                          "first_domain_after_last": matrix[-1][0]}
        print(json.dumps({"variant": label, "forgetting": metrics["forgetting"],
                          "bwt": metrics["bwt"], "acc": metrics["acc"],
                          "first_domain_after_last": matrix[-1][0]}), file=sys.stderr,
              flush=True)
    print(json.dumps({"machine": machine(), "domains": [d.name for d in domains],
                      "model": "demo (4 x 128, block 64), byte-level", "set": args.set,
                      "settings": {k: (str(v) if isinstance(v, Path) else v)
                                   for k, v in vars(args).items()},
                      "initial": initial, "results": results}, indent=1))


if __name__ == "__main__":
    main()
