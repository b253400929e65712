"""The hippocampal model against `gpt`: quality with ablations, and time overhead. Prints JSON.

    python benchmarks/hippocampal_bench.py [--threads 1] quality [--steps 400] [--only all,gpt,...]
    python benchmarks/hippocampal_bench.py overhead [--size cpu|157m] [--steps 8] [--rounds 3]

quality: char-level builtin Shakespeare, `hippocampal-cpu` with everything on, with each
mechanism off in turn, and `gpt` at about the same parameter count (n_embd widened to match),
all on the same batches for the same tokens; val loss and bits per byte on held-out works, plus
a control where the prosody fed to the model is shuffled across tokens (random prosody
adds nothing; real prosody should). overhead: seconds per training step (forward, backward,
AdamW) and per forward at inference, `hippocampal` vs `gpt` with the same layers and width,
one step of each model in turn, in one process. Memory is on and full in both timings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aura.config import AuraConfig, load_config
from aura.data.prepare import PrepareOptions, prepare
from aura.data.prosody import Prosody
from aura.eval.perplexity import evaluate_prepared
from aura.models import build_model
from aura.models.hippocampal import COMPONENTS
from aura.train.trainer import Trainer
from machine import machine

CPU_COMMON = ["model.dropout=0.0", "train.eval_interval=100000", "train.warmup_steps=100",
              "train.lr=1e-3", "train.batch_size=12"]


def char_data(root: Path) -> Path:
    prepare(PrepareOptions(["builtin:shakespeare"], "char"), root / "chars", progress=False)
    return root / "chars"


def matched_gpt(target: int, vocab: int, overrides: list[str]) -> AuraConfig:
    """gpt with hippocampal-cpu's layers and heads, n_embd widened to the closest params."""
    best = None
    for width in range(128, 257, 8):
        cfg = load_config(preset="hippocampal-cpu", overrides=[
            "model.name=gpt", f"model.n_embd={width}", f"model.vocab_size={vocab}", *overrides])
        n = build_model(cfg.model).num_params()
        if best is None or abs(n - target) < best[0]:
            best = (abs(n - target), cfg)
    assert best is not None
    cfg = best[1]
    cfg.model.vocab_size = None
    return cfg


class ShuffledProsody(Prosody):
    """The control: each row's prosody permuted over positions (same values, wrong tokens)."""

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        out = super().__call__(ids)
        rng = np.random.default_rng(int(ids.sum()) % 2**32)
        return np.stack([row[rng.permutation(len(row))] for row in out])


def cmd_quality(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        data = char_data(Path(d))
        common = [*CPU_COMMON, f"train.max_steps={args.steps}",
                  f"train.checkpoint_interval={args.steps}"]
        vocab = 65 if args.vocab is None else args.vocab
        runs: dict[str, AuraConfig] = {
            "all": load_config(preset="hippocampal-cpu", overrides=common)}
        for comp in COMPONENTS:
            runs[f"no_{comp}"] = load_config(preset="hippocampal-cpu",
                                             overrides=[*common, f"model.{comp}=false"])
        runs["shuffled_prosody"] = runs["all"]
        full = build_model(load_config(preset="hippocampal-cpu", overrides=[
            f"model.vocab_size={vocab}"]).model).num_params()
        runs["gpt"] = matched_gpt(full, vocab, common)
        only = args.only.split(",") if args.only else list(runs)
        for name in only:
            cfg = runs[name]
            trainer = Trainer(cfg, data, Path(d) / name, progress=False, log=lambda _m: None)
            if name == "shuffled_prosody":
                shuffled = ShuffledProsody.from_tokenizer(trainer.data.tokenizer)
                trainer.train_batches.features = {"prosody": shuffled}
            t0 = time.perf_counter()
            result = trainer.run()
            ev = evaluate_prepared(trainer.model, trainer.data, "val",
                                   max_tokens=args.eval_tokens)
            out[name] = {"params": trainer.model.num_params(),
                         "tokens": args.steps * cfg.train.batch_size * cfg.model.block_size,
                         "seconds": round(time.perf_counter() - t0, 1),
                         "train_tokens_per_s": round(result.tokens_per_s),
                         "val_loss": round(ev.loss, 4),
                         "val_bits_per_byte": round(ev.bits_per_byte, 4),
                         **{k: round(v, 4) for k, v in ev.metrics.items()}}
            print(json.dumps({name: out[name]}), file=sys.stderr, flush=True)
    return out


def sizes(size: str) -> tuple[list[str], int, int, int]:
    """(overrides, vocab, batch, block) of a timing size."""
    if size == "cpu":
        return [], 65, 12, 128
    return (["model.n_layer=12", "model.n_head=12", "model.n_embd=768", "model.block_size=512",
             "model.n_place_cells=2000", "model.memory_capacity=4096", "model.memory_dim=64",
             "model.memory_writes=64"], 32000, 1, 512)


def cmd_overhead(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    overrides, vocab, batch, block = sizes(args.size)
    names = ["gpt", "hippocampal", *[f"no_{c}" for c in COMPONENTS]] if args.ablations \
        else ["gpt", "hippocampal"]
    models, opts = {}, {}
    for name in names:
        extra = ["model.name=gpt"] if name == "gpt" else (
            [f"model.{name[3:]}=false"] if name.startswith("no_") else [])
        cfg = load_config(preset="hippocampal-cpu", overrides=[
            *overrides, f"model.vocab_size={vocab}", "model.dropout=0.0", *extra])
        models[name] = build_model(cfg.model)
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (batch, block), generator=g)
    text_ids = np.asarray(x)
    prosody = Prosody([chr(32 + i % 95) for i in range(vocab)])  # stands in for a vocabulary
    feats = torch.from_numpy(prosody(text_ids))
    train_t: dict[str, list[float]] = {n: [] for n in names}
    infer_t: dict[str, list[float]] = {n: [] for n in names}

    def kwargs(name: str) -> dict[str, Any]:
        """What the trainer passes: prosody, and with a memory the windows' corpus offsets."""
        model = models[name]
        out: dict[str, Any] = {"prosody": feats} if model.token_features else {}
        if model.wants_corpus_pos:
            out["corpus_pos"] = torch.arange(batch) * block + 10 * block
        return out

    for name in names:  # warm up, and fill every memory to capacity
        model = models[name]
        model.train()
        for _ in range(3 if args.size == "157m" else 40):
            model(x, x, **kwargs(name)).loss.backward()
            opts[name].zero_grad(set_to_none=True)
    for _ in range(args.rounds * args.steps):  # one step of each model in turn: drift cancels
        for name in names:
            model, opt = models[name], opts[name]
            model.train()
            t = time.perf_counter()
            model(x, x, **kwargs(name)).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.flush_memory()  # the step's memories are written before the next forward
            train_t[name].append(time.perf_counter() - t)
            model.eval()
            with torch.inference_mode():
                t = time.perf_counter()
                model(x, **kwargs(name))
                infer_t[name].append(time.perf_counter() - t)
    med = {n: (statistics.median(train_t[n]), statistics.median(infer_t[n])) for n in names}
    base_train, base_infer = med["gpt"]
    return {"size": args.size, "batch": batch, "block": block,
            **{n: {"params": models[n].num_params(), "train_s": round(med[n][0], 4),
                   "infer_s": round(med[n][1], 4),
                   "train_overhead": round(med[n][0] / base_train - 1, 3),
                   "infer_overhead": round(med[n][1] / base_infer - 1, 3)} for n in names}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--steps", type=int, default=400)
    q.add_argument("--eval-tokens", type=int, default=200_000)
    q.add_argument("--only", default="")
    q.add_argument("--vocab", type=int, default=None)
    o = sub.add_parser("overhead")
    o.add_argument("--size", choices=["cpu", "157m"], default="cpu")
    o.add_argument("--steps", type=int, default=8)
    o.add_argument("--rounds", type=int, default=3)
    o.add_argument("--ablations", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"quality": cmd_quality, "overhead": cmd_overhead}[args.cmd](args)
    print(json.dumps({"machine": machine(), **result}, indent=1))


if __name__ == "__main__":
    main()
