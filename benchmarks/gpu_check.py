"""Do the GPU presets fit and how fast do they run? For each preset, a few training steps on
this machine's GPU: tokens/s, MFU, peak memory against the estimate, and whether it fit.

    python benchmarks/gpu_check.py [--presets l4-24gb a100-40gb a100-80gb] [--steps 10]
    python benchmarks/gpu_check.py --quick     # tiny shapes on the CPU: checks the script

Each preset trains on ``builtin:shakespeare`` with the GPT-2 tokenizer (extra ``gpt2``; bytes
when it is missing, which shrinks the embedding) for ``--warmup`` steps (compilation, the
allocator's first growth), then ``--steps`` timed steps, with no evaluation and no checkpoint
(a 3B model's optimizer state is tens of GB of disk). "fit" means no step ran out of memory
and the micro-batch ran whole (``micro_split`` 1: neither the start's free-memory probe nor an
out-of-memory split had to cut it). A preset bigger than the GPU is reported as not fitting,
not as a crash. Prints JSON with ``benchmarks/machine.py``'s ``machine()``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from aura.config import load_config
from aura.data.prepare import PrepareOptions, prepare
from aura.train.device import device_peak_flops
from aura.train.gpu import estimate_gpu
from aura.train.resources import format_bytes
from aura.train.trainer import Trainer
from machine import machine

PRESETS = ["l4-24gb", "a100-40gb", "a100-80gb"]
QUICK = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
         "train.batch_size=2", "train.grad_accum=2", "train.device=cpu",
         "train.precision=fp32", "train.compile=false"]


def _data(root: Path) -> Path:
    for tokenizer in ("gpt2", "byte"):
        try:
            prepare(PrepareOptions(["builtin:shakespeare"], tokenizer), root / tokenizer,
                    progress=False)
            return root / tokenizer
        except Exception as exc:  # the gpt2 extra missing: bytes still check the fit
            print(f"note: tokenizer {tokenizer} unavailable ({exc}); trying the next")
    raise SystemExit("no tokenizer could prepare builtin:shakespeare")


def _check(preset: str, data: Path, run: Path, steps: int, warmup: int, quick: bool
           ) -> dict[str, Any]:
    cfg = load_config(preset=preset, overrides=[
        "train.eval_interval=1000000", "train.checkpoint_interval=1000000",
        f"train.max_steps={warmup + steps}", "train.memory_check=false",
        *(QUICK if quick else [])])
    out: dict[str, Any] = {"preset": preset}
    try:
        trainer = Trainer(cfg, data, run, progress=False)
    except torch.OutOfMemoryError as exc:
        return {**out, "fit": False, "error": f"out of memory building the model: {exc}"}
    est = estimate_gpu(cfg)
    out.update(params=est.params, vocab_size=est.vocab, estimated_peak=format_bytes(est.peak_bytes),
               micro_split_at_start=trainer.state.micro_split)
    cuda = trainer.device.type == "cuda"
    try:
        done = 0
        while done < warmup + steps:
            if done == warmup:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                started, tokens_at = time.perf_counter(), trainer.state.tokens_seen
            step = trainer.state.step
            if trainer._guarded_step(step) is not None:
                trainer._advance(step)
                done += 1
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    except torch.OutOfMemoryError as exc:
        return {**out, "fit": False, "error": f"out of memory at batch split "
                f"{trainer.state.micro_split}: {exc}"}
    finally:
        trainer.step_batches.close()
        trainer.metrics.close()
        trainer.lock.release()
    tokens_per_s = (trainer.state.tokens_seen - tokens_at) / seconds
    peak = device_peak_flops(trainer.device, trainer.precision.name)
    flops = trainer._flops_per_token() if peak else None
    out.update(
        fit=trainer.state.micro_split == 1, micro_split=trainer.state.micro_split,
        tokens_per_s=tokens_per_s,
        mfu=tokens_per_s * flops / peak if peak and flops else None,
        peak_memory=(format_bytes(torch.cuda.max_memory_allocated(trainer.device)) if cuda
                     else None),
        device=torch.cuda.get_device_name(trainer.device) if cuda else "cpu")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not args.quick and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU (--quick checks the script on the CPU)")
    steps, warmup = (2, 1) if args.quick else (args.steps, args.warmup)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = _data(Path(tmp))
        for preset in args.presets:
            results.append(_check(preset, data, Path(tmp) / f"run-{preset}", steps, warmup,
                                  args.quick))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print(json.dumps({"machine": machine(), "steps": steps, "warmup": warmup,
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
