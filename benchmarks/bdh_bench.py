"""BDH side by side with the reference (pathwaycom/bdh), and against `gpt`. Prints JSON.

    python benchmarks/bdh_bench.py train --reference /path/to/bdh [--steps 6] [--rounds 2]
        [--precisions fp32 bf16] [--compile] [--logged]
    python benchmarks/bdh_bench.py generate --reference /path/to/bdh [--new-tokens 1000]
    python benchmarks/bdh_bench.py memory [--batch 8] [--block 512]
    python benchmarks/bdh_bench.py quality [--steps 600]
    python benchmarks/bdh_bench.py sparse [--steps 300] [--every 50] [--quick]

train: optimizer steps/s of the reference model (its own code, eager fp32) and of Aura's `bdh` in
fp32 and bf16 autocast, with ``--compile`` also both under torch.compile (the reference's train.py
compiles its model on every device), from the same initial weights on the same
byte batches of Shakespeare, one step of each system in turn, at the reference config (batch
2 x block 64) and at `bdh-cpu`; the mean training losses show both learn the same. Aura steps as
the trainer steps 9 times in 10, without counting its sparsity metrics; ``--logged`` adds a row
that counts them, as a logged step does.
generate: tokens/s for N new tokens after a 64-token prompt, the reference's re-run-the-prefix
`generate` vs the recurrent state, at the bdh-cpu size (the reference config would take hours).
memory: peak RSS of one training step with and without per-layer gradient checkpointing, each
in its own process. quality: `bdh-cpu` vs a `gpt` of about the same parameter count after
equal tokens: val loss and bits per byte.
sparse: whether BDH's sparse activations could pay in its products. How many of `bdh-cpu`'s
activations are non-zero as it trains (fp32, AdamW, its own x_active / y_active metrics), and
the decoder's products (4 heads of (B*T, N) x (N, D): forward, the weight's gradient, the
activation's gradient) dense against torch's CSR products at those densities and below, on
random patterns; and the conversion to CSR a dense activation would need first. ``--quick``
runs 2 steps and one timing: it checks the script.
The reference's code is imported from the given checkout, never copied here.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aura.config import load_config
from aura.data.prepare import PrepareOptions, prepare
from aura.data.sampler import BatchSampler
from aura.data.shards import PreparedData
from aura.models import build_model
from aura.models.bdh import BDH
from machine import machine


def load_reference(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("bdh_reference", path / "bdh.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def configs(name: str) -> tuple[dict[str, int], Any]:
    """(batch/block, Aura config) for 'ref' (the reference's defaults) or 'cpu' (bdh-cpu)."""
    if name == "ref":
        cfg = load_config(preset="bdh-ref", overrides=["model.vocab_size=256"])
        return {"batch": 2, "block": 64}, cfg
    cfg = load_config(preset="bdh-cpu", overrides=["model.vocab_size=256"])
    return {"batch": cfg.train.batch_size, "block": cfg.model.block_size}, cfg


def copy_into_reference(ours: BDH, ref: torch.nn.Module) -> None:
    """The same weights in the reference's layouts (its encoder is heads x D x N)."""
    nh, n = ours.config.n_head, ours.n
    with torch.no_grad():
        ref.encoder.copy_(ours.encoder[0].view(-1, nh, n).transpose(0, 1))
        ref.encoder_v.copy_(ours.encoder_v[0])
        ref.decoder.copy_(ours.decoder[0])
        ref.embed.weight.copy_(ours.embed.weight)
        ref.lm_head.copy_(ours.lm_head)


def twin(model: torch.nn.Module, make: Any) -> torch.nn.Module:
    """A second model from ``make()`` with ``model``'s weights: one system per row."""
    copy = make()
    copy.load_state_dict(model.state_dict())
    return copy


def unlogged(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` stepping as the trainer steps it when no log row reads the step's sparsity
    metrics (9 steps in 10 at the default log_interval): the reference computes none."""
    model.report_metrics = False
    return model


def byte_data(tmp: Path) -> PreparedData:
    prepare(PrepareOptions(["builtin:shakespeare"], "byte"), tmp / "bytes", progress=False)
    return PreparedData.open(tmp / "bytes")


def interleaved_steps(systems: dict[str, tuple[torch.nn.Module, Any, Any]], batches: list[Any]
                      ) -> dict[str, tuple[list[float], list[float]]]:
    """One optimizer step of each system in turn per batch, so a slow spell of a shared
    machine lands on all of them; times of all but the first step, and every loss."""
    opts = {name: torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
            for name, (model, _, _) in systems.items()}
    out: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in systems}
    for i, (x, y) in enumerate(batches):
        for name, (model, loss_of, ctx) in systems.items():
            t = time.perf_counter()
            with ctx():
                loss = loss_of(model, x, y)
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if i:
                out[name][0].append(time.perf_counter() - t)
            out[name][1].append(loss.item())
    return out


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    ref_mod = load_reference(args.reference)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        data = byte_data(Path(d))
        for size in ("ref", "cpu"):
            shape, cfg = configs(size)
            sampler = BatchSampler(data.split("train"), shape["batch"], shape["block"], seed=0)
            batches = [sampler(i) for i in range(args.steps)]
            runs: dict[str, dict[str, list[float]]] = {}
            for _ in range(args.rounds):
                torch.manual_seed(0)
                ours = unlogged(build_model(cfg.model))
                assert isinstance(ours, BDH)
                rc = ref_mod.BDHConfig(n_layer=cfg.model.n_layer, n_embd=cfg.model.n_embd,
                                       dropout=cfg.model.dropout, n_head=cfg.model.n_head,
                                       mlp_internal_dim_multiplier=cfg.model.mlp_multiplier,
                                       vocab_size=256)
                ref = ref_mod.BDH(rc)
                copy_into_reference(ours, ref)
                ours_bf16 = unlogged(twin(ours, functools.partial(build_model, cfg.model)))
                systems = {
                    "reference_fp32": (ref, lambda m, x, y: m(x, y)[1], contextlib.nullcontext),
                    "aura_fp32": (ours, lambda m, x, y: m(x, y).loss, contextlib.nullcontext),
                    "aura_bf16": (ours_bf16, lambda m, x, y: m(x, y).loss,
                                  lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
                }
                systems = {k: v for k, v in systems.items()
                           if k == "reference_fp32" or k.removeprefix("aura_") in args.precisions}
                if args.logged:  # what a step the trainer logs costs: the sparsity counted
                    logged = twin(ours, functools.partial(build_model, cfg.model))
                    systems["aura_fp32_logged"] = (logged, systems["aura_fp32"][1],
                                                   contextlib.nullcontext)
                if args.compile:  # as the reference's train.py runs it, on every device
                    ref_c = torch.compile(twin(ref, functools.partial(ref_mod.BDH, rc)))
                    ours_c = torch.compile(unlogged(twin(ours, functools.partial(build_model,
                                                                           cfg.model))))
                    systems |= {
                        "reference_compiled": (ref_c, systems["reference_fp32"][1],
                                               contextlib.nullcontext),
                        "aura_compiled": (ours_c, systems["aura_fp32"][1],
                                          contextlib.nullcontext)}
                torch.manual_seed(1)
                for name, (times, losses) in interleaved_steps(systems, batches).items():
                    runs.setdefault(name, {"times": [], "losses": []})
                    runs[name]["times"] += times
                    runs[name]["losses"] = losses
            tokens = shape["batch"] * shape["block"]
            median = {name: statistics.median(r["times"]) for name, r in runs.items()}
            res = {
                name: {"s_per_step": round(median[name], 4),
                       "tokens_per_s": round(tokens / median[name], 1),
                       "mean_loss": round(float(np.mean(r["losses"])), 4)}
                for name, r in runs.items()
            }
            for name in (n for n in res if n.startswith("aura_")):
                base = "reference_compiled" if name == "aura_compiled" else "reference_fp32"
                # from the unrounded medians: a figure near 1.5x must not be decided by rounding
                res[name]["speedup"] = round(median[base] / median[name], 3)
            m = cfg.model
            out[size] = {**shape, "neurons_per_head": m.mlp_multiplier * m.n_embd // m.n_head,
                         **res}
    return out


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    from aura.infer.generate import generate
    from aura.infer.sampling import SamplingConfig

    ref_mod = load_reference(args.reference)
    _, cfg = configs("cpu")
    torch.manual_seed(0)
    ours = build_model(cfg.model).eval()
    assert isinstance(ours, BDH)
    rc = ref_mod.BDHConfig(n_layer=cfg.model.n_layer, n_embd=cfg.model.n_embd, n_head=4,
                           mlp_internal_dim_multiplier=cfg.model.mlp_multiplier, vocab_size=256)
    ref = ref_mod.BDH(rc).eval()
    copy_into_reference(ours, ref)
    prompt = torch.randint(0, 256, (1, 64))
    t = time.perf_counter()
    ours_ids = generate(ours, prompt, args.new_tokens, SamplingConfig(temperature=0.0))
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ref_ids = ref.generate(prompt, args.new_tokens, top_k=1)  # top_k=1: greedy
    t_ref = time.perf_counter() - t
    same = int((ours_ids == ref_ids).all())
    return {"model": "bdh-cpu", "prompt_tokens": 64, "new_tokens": args.new_tokens,
            "recurrent_tokens_per_s": round(args.new_tokens / t_ours, 1),
            "reference_tokens_per_s": round(args.new_tokens / t_ref, 2),
            "speedup": round(t_ref / t_ours, 1), "identical_greedy_ids": bool(same)}


def one_memory(args: argparse.Namespace, checkpointing: bool) -> dict[str, float]:
    _, cfg = configs("cpu")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.grad_checkpoint = checkpointing
    x = torch.randint(0, 256, (args.batch, args.block))
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    t = time.perf_counter()
    model(x, x).loss.backward()
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"activation_mb": round(peak - base, 1), "step_s": round(seconds, 2)}


def cmd_memory(args: argparse.Namespace) -> dict[str, Any]:
    res = {}
    for mode in ("plain", "checkpointed"):
        cmd = [sys.executable, __file__, "memory-one", "--mode", mode,
               "--batch", str(args.batch), "--block", str(args.block)]
        res[mode] = json.loads(subprocess.run(cmd, capture_output=True, text=True,
                                              check=True).stdout)
    return {"model": "bdh-cpu", "batch": args.batch, "block": args.block, **res,
            "activation_saving": round(1 - res["checkpointed"]["activation_mb"]
                                       / res["plain"]["activation_mb"], 3)}


def cmd_quality(args: argparse.Namespace) -> dict[str, Any]:
    from aura.eval.perplexity import evaluate_prepared
    from aura.train.trainer import Trainer

    out = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        byte_data(tmp)
        common = [f"train.max_steps={args.steps}", "train.batch_size=8", "model.block_size=128",
                  "train.eval_interval=100000", f"train.checkpoint_interval={args.steps}",
                  "train.warmup_steps=100", "train.lr=1e-3", "model.dropout=0.1"]
        runs = {
            "bdh-cpu": load_config(preset="bdh-cpu", overrides=common),
            "gpt": load_config(preset="demo", overrides=[*common, "model.n_layer=4",
                                                         "model.n_head=4", "model.n_embd=128"]),
        }
        for name, cfg in runs.items():
            trainer = Trainer(cfg, tmp / "bytes", tmp / name, progress=False,
                              log=lambda _m: None)
            result = trainer.run()
            ev = evaluate_prepared(trainer.model, trainer.data, "val", block_size=128,
                                   max_tokens=args.eval_tokens)
            out[name] = {"params": trainer.model.num_params(),
                         "tokens_seen": args.steps * 8 * 128,
                         "train_tokens_per_s": round(result.tokens_per_s),
                         "val_loss": round(ev.loss, 4), "val_bits_per_byte": round(
                             ev.bits_per_byte, 4),
                         **{k: round(v, 4) for k, v in ev.metrics.items() if "/" not in k}}
    return out


def cmd_sparse(args: argparse.Namespace) -> dict[str, Any]:
    warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
    _, cfg = configs("cpu")
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    density = []
    with tempfile.TemporaryDirectory() as d:
        data = byte_data(Path(d))
        sampler = BatchSampler(data.split("train"), cfg.train.batch_size, cfg.model.block_size,
                               seed=0)
        for step in range(args.steps + 1):
            out = model(*sampler(step))
            if step % args.every == 0 or step == args.steps:
                density.append({"step": step, "loss": round(out.loss.item(), 4),
                                "x_nonzero": round(out.aux["x_active"].item(), 4),
                                "gated_nonzero": round(out.aux["y_active"].item(), 4)})
                print(json.dumps(density[-1]), file=sys.stderr, flush=True)  # progress
            if step < args.steps:
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
    heads, n, dim = cfg.model.n_head, model.n, cfg.model.n_embd
    rows = cfg.train.batch_size * cfg.model.block_size
    decoder = torch.randn(heads, n, dim)
    calls, reps = (1, 1) if args.quick else (20, 5)

    def best_us(fn: Any) -> float:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t) / calls)
        return round(min(times) * 1e6, 1)

    grad = torch.randn(heads, rows, dim)  # the decoder's output gradient

    def timings(share: float) -> dict[str, float]:
        """The decoder's three products, dense and with the activation as CSR: forward
        (act @ W), the weight's gradient (act^T @ grad) and the activation's gradient, needed
        only where the activation is non-zero (grad @ W^T sampled there)."""
        act = torch.rand(heads, rows, n)
        act = torch.where(act < share, act, 0.0)
        csr = [act[h].to_sparse_csr() for h in range(heads)]
        return {
            "nonzero": share,
            "forward_dense_us": best_us(lambda: torch.bmm(act, decoder)),
            "forward_csr_us": best_us(lambda: [csr[h] @ decoder[h] for h in range(heads)]),
            "weight_grad_dense_us": best_us(lambda: torch.bmm(act.mT, grad)),
            "weight_grad_csr_us": best_us(lambda: [csr[h].mT @ grad[h] for h in range(heads)]),
            "input_grad_dense_us": best_us(lambda: torch.bmm(grad, decoder.mT)),
            "input_grad_sampled_us": best_us(lambda: [
                torch.sparse.sampled_addmm(csr[h], grad[h], decoder[h].mT, beta=0.0)
                for h in range(heads)]),
            "to_csr_us": best_us(lambda: [act[h].to_sparse_csr() for h in range(heads)])}

    shares = {density[0]["gated_nonzero"], density[-1]["gated_nonzero"], 0.1, 0.05, 0.02}
    products = [timings(share) for share in sorted(shares, reverse=True)]
    return {"model": "bdh-cpu", "steps": args.steps, "density": density,
            "decoder_product": {"heads": heads, "rows": rows, "n": n, "d": dim,
                                "by_density": products}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--reference", type=Path, required=True)
    t.add_argument("--steps", type=int, default=6)
    t.add_argument("--rounds", type=int, default=2)
    t.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="Aura's rows; drop bf16 where it is emulated (AVX2), 13x slower")
    t.add_argument("--compile", action="store_true",
                   help="also both systems under torch.compile, fp32 (Aura's against the "
                        "reference's compiled row); compiling takes a minute or two per model")
    t.add_argument("--logged", action="store_true",
                   help="also Aura fp32 stepping as on a logged step, its sparsity metrics "
                        "counted (row aura_fp32_logged)")
    g = sub.add_parser("generate")
    g.add_argument("--reference", type=Path, required=True)
    g.add_argument("--new-tokens", type=int, default=1000)
    for name in ("memory", "memory-one"):
        m = sub.add_parser(name)
        m.add_argument("--batch", type=int, default=8)
        m.add_argument("--block", type=int, default=512)
        m.add_argument("--mode", choices=["plain", "checkpointed"])
    q = sub.add_parser("quality")
    q.add_argument("--steps", type=int, default=600)
    q.add_argument("--eval-tokens", type=int, default=200_000)
    s = sub.add_parser("sparse")
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--every", type=int, default=50, help="record the densities every N steps")
    s.add_argument("--quick", action="store_true", help="2 steps, one timing: checks the script")
    args = ap.parse_args()
    if args.cmd == "sparse" and args.quick:
        args.steps, args.every = 2, 1
    if args.cmd == "memory-one":
        print(json.dumps(one_memory(args, args.mode == "checkpointed")))
        return
    result = {"train": cmd_train, "generate": cmd_generate, "memory": cmd_memory,
              "quality": cmd_quality, "sparse": cmd_sparse}[args.cmd](args)
    print(json.dumps({"machine": machine(), **result}, indent=1))


if __name__ == "__main__":
    main()
