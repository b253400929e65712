"""Spiking layers: Aura's LIF vs snnTorch and SpikingJelly, and the SNN FFN vs the dense MLP.

    python benchmarks/snn_bench.py lif [--rounds 5] [--reps 3] [--quick]
    python benchmarks/snn_bench.py ffn [--rounds 5] [--reps 3] [--steps 2000] [--quick]

lif: multi-step forward + backward of a (T, B, N) input through Aura's ``LIF``, snnTorch's
``Leaky`` (stepped in a Python loop, as snnTorch is used) and SpikingJelly's ``LIFNode`` in
multi-step mode ('m'; on CPU it runs its registered PyTorch-op kernel). The neurons are aligned
so the outputs must agree: ``m_t = beta m_{t-1} + x_t`` (SpikingJelly: ``decay_input=False``,
``tau = 1 / (1 - beta)``), threshold 1, soft reset = subtract the threshold (SpikingJelly
``v_reset=None``, snnTorch ``reset_mechanism="subtract"``) or hard reset to 0, the arctan
surrogate with alpha 2 in all three, the reset applied in the same step (snnTorch
``reset_delay=False``; its default delays the subtraction one step, undecayed: another neuron).
Inputs stay below ``(2 - beta)`` thresholds, where snnTorch's same-step reset is exactly Aura's.
Checked outside the timing: spikes, final membrane, and input gradients (the last two over the
neurons whose spike trains agree; the neurons with a flipped spike are counted). Aura and
SpikingJelly (``detach_reset=True``) both detach the reset; snnTorch cannot, so its gradients are
checked against SpikingJelly with ``detach_reset=False`` instead. The loss is ``sum(spikes * w)``.

ffn: (1) forward + backward time of ``SNNFeedForward`` (LIF, 4 steps) vs gpt's GELU ``MLP`` at
the ``cpu-small`` shape and the ``demo`` shape; (2) ``gpt`` with ``model.ffn=mlp`` and ``=snn``
trained for the same steps on char-level ``builtin:shakespeare`` (the ``demo`` preset): exact
val loss over the first ``--eval-tokens`` val tokens, firing rate, and energy per token
(``aura.eval.energy``, one batch of val windows).

Systems alternate within each round (rotating who goes first) so drift on a shared machine hits
all of them; figures are medians over rounds x reps. Prints JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from aura.nn.spiking import LIF
from machine import machine

BETA, THRESHOLD, ALPHA = 0.9, 1.0, 2.0
Run = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# --- lif ---------------------------------------------------------------------------------------


def aura_lif(reset: str) -> Run:
    lif = LIF(beta=BETA, threshold=THRESHOLD, reset=reset, surrogate="atan")
    return lambda x: lif(x)


def snntorch_lif(reset: str) -> Run:
    import snntorch
    from snntorch import surrogate

    leaky = snntorch.Leaky(beta=BETA, threshold=THRESHOLD, spike_grad=surrogate.atan(ALPHA),
                           reset_mechanism="subtract" if reset == "soft" else "zero",
                           reset_delay=False)

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mem, out = torch.zeros_like(x[0]), []
        for x_t in x:
            spikes, mem = leaky(x_t, mem)
            out.append(spikes)
        return torch.stack(out), mem

    return run


def spikingjelly_lif(reset: str, detach_reset: bool = True) -> Run:
    from spikingjelly.activation_based import neuron, surrogate

    node = neuron.LIFNode(tau=1 / (1 - BETA), decay_input=False, v_threshold=THRESHOLD,
                          v_reset=None if reset == "soft" else 0.0,
                          surrogate_function=surrogate.ATan(alpha=ALPHA),
                          detach_reset=detach_reset, step_mode="m")

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        node.reset()
        spikes = node(x)
        return spikes, node.v

    return run


def lif_input(T: int, B: int, N: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs in (-1.05, 1.05), below (2 - beta) thresholds, and the loss weights."""
    g = torch.Generator().manual_seed(seed)
    x = 1.05 * torch.tanh(torch.randn(T, B, N, generator=g) * 0.6 + 0.3)
    return x, torch.randn(T, B, N, generator=g)


def fwd_bwd(run: Run, x: torch.Tensor, w: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xi = x.clone().requires_grad_()
    spikes, mem = run(xi)
    (spikes * w).sum().backward()
    return spikes.detach(), mem.detach(), xi.grad


def check_lif(reset: str, x: torch.Tensor, w: torch.Tensor) -> dict[str, Any]:
    """Agreement with Aura (spikes, final membrane, input gradient), outside the timing."""
    aura = fwd_bwd(aura_lif(reset), x, w)
    sj = fwd_bwd(spikingjelly_lif(reset), x, w)
    snn = fwd_bwd(snntorch_lif(reset), x, w)
    sj_attached = fwd_bwd(spikingjelly_lif(reset, detach_reset=False), x, w)

    def diff(a: torch.Tensor, b: torch.Tensor, flipped: torch.Tensor) -> float:
        """Max |a - b| over neurons whose spike trains agree: a spike flipped by a rounding tie
        at the threshold sends the rest of that neuron's trajectory elsewhere."""
        keep = ~flipped.expand_as(a) if a.dim() > flipped.dim() else ~flipped
        return float((a - b).abs()[keep].max())

    def flips(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a != b).any(0)  # (B, N): some step of the neuron differs

    out = {"firing_rate": round(float(aura[0].mean()), 4)}
    for name, other in (("snntorch", snn), ("spikingjelly", sj)):
        flipped = flips(aura[0], other[0])
        out[name] = {"spikes_mismatch_fraction": float((aura[0] != other[0]).float().mean()),
                     "neurons_with_a_flipped_spike": int(flipped.sum()),
                     "final_mem_max_abs_diff": diff(aura[1], other[1], flipped)}
    flipped = flips(aura[0], sj[0])
    out["spikingjelly"]["grad_max_abs_diff_vs_aura"] = diff(aura[2], sj[2], flipped)
    flipped = flips(snn[0], sj_attached[0])
    out["snntorch"]["grad_max_abs_diff_vs_spikingjelly_attached_reset"] = diff(
        snn[2], sj_attached[2], flipped)
    out["grad_scale"] = float(aura[2].abs().max())
    return out


def timed_rounds(systems: dict[str, Callable[[], object]], rounds: int, reps: int
                 ) -> dict[str, list[float]]:
    """Seconds per call of each system, alternating systems within rounds (first one rotates)."""
    names = list(systems)
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:  # warm-up
        systems[n]()
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            for _ in range(reps):
                t0 = time.perf_counter()
                systems[n]()
                times[n].append(time.perf_counter() - t0)
    return times


def cmd_lif(args: argparse.Namespace) -> dict[str, Any]:
    import snntorch
    import spikingjelly

    shapes = [(8, 16, 256)] if args.quick else [(T, B, N) for T in (16, 32)
                                                for B, N in ((64, 1024), (256, 2048))]
    results = []
    for T, B, N in shapes:
        x, w = lif_input(T, B, N)
        for reset in ("soft", "hard"):
            runs = {"aura": aura_lif(reset), "snntorch": snntorch_lif(reset),
                    "spikingjelly": spikingjelly_lif(reset)}
            times = timed_rounds({k: functools.partial(fwd_bwd, r, x, w) for k, r in runs.items()},
                                 args.rounds, args.reps)
            ms = {k: round(statistics.median(v) * 1000, 2) for k, v in times.items()}
            results.append({
                "T": T, "B": B, "N": N, "reset": reset, "ms_fwd_bwd": ms,
                "aura_speedup": {k: round(ms[k] / ms["aura"], 2) for k in ms if k != "aura"},
                "agreement": check_lif(reset, x, w)})
    return {"torch": torch.__version__, "snntorch": snntorch.__version__,
            "spikingjelly": getattr(spikingjelly, "__version__", _dist_version("spikingjelly")),
            "threads": torch.get_num_threads(), "beta": BETA, "threshold": THRESHOLD,
            "surrogate": f"atan(alpha={ALPHA})", "rounds": args.rounds, "reps": args.reps,
            "results": results}


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


# --- ffn ---------------------------------------------------------------------------------------


def ffn_speed(B: int, T: int, C: int, rounds: int, reps: int) -> dict[str, Any]:
    from aura.nn.mlp import MLP
    from aura.nn.snn_ffn import SNNFeedForward

    torch.manual_seed(0)
    x = torch.randn(B, T, C)
    mlp, snn = MLP(C, 0.0, False), SNNFeedForward(C, 4 * C, steps=4)
    nn_init_firing(snn)

    def step(module: torch.nn.Module) -> None:
        xi = x.clone().requires_grad_()
        module(xi).square().sum().backward()

    times = timed_rounds({"mlp": lambda: step(mlp), "snn": lambda: step(snn)}, rounds, reps)
    ms = {k: round(statistics.median(v) * 1000, 2) for k, v in times.items()}
    snn(x)
    return {"B": B, "T": T, "C": C, "hidden": 4 * C, "steps": 4, "ms_fwd_bwd": ms,
            "snn_over_mlp": round(ms["snn"] / ms["mlp"], 3),
            "snn_firing_rate": round(float(snn.metrics()["firing_rate"]), 4)}


def nn_init_firing(snn: torch.nn.Module) -> None:
    """Scale fc so that neurons fire (at gpt's 0.02 init none crosses the threshold); the fused
    LIF does the same work whatever the rate, but the reported rate should not be 0."""
    torch.nn.init.normal_(snn.fc.weight, std=1.3 / snn.fc.in_features**0.5)


def ffn_quality(args: argparse.Namespace) -> dict[str, Any]:
    from aura.config import load_config
    from aura.data.prepare import PrepareOptions, prepare
    from aura.eval.energy import energy_of_stream
    from aura.eval.perplexity import evaluate_prepared
    from aura.train.trainer import Trainer

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        prepare(PrepareOptions(["builtin:shakespeare"], "char"), tmp / "data", progress=False)
        common = [f"train.max_steps={args.steps}", "train.eval_interval=100000",
                  f"train.checkpoint_interval={args.steps}", "train.precision=fp32"]
        if args.quick:
            common += ["model.n_layer=2", "model.n_embd=64", "model.n_head=2",
                       "train.warmup_steps=5"]
        for ffn in ("mlp", "snn"):
            cfg = load_config(preset="demo", overrides=[*common, f"model.ffn={ffn}"])
            trainer = Trainer(cfg, tmp / "data", tmp / ffn, progress=False, log=lambda _m: None)
            result = trainer.run()
            ev = evaluate_prepared(trainer.model, trainer.data, "val",
                                   max_tokens=args.eval_tokens)
            energy = energy_of_stream(trainer.model, trainer.data.split("val").maps,
                                      batch_size=cfg.train.batch_size).to_dict()
            m = cfg.model
            rates = [float(b.mlp.metrics()["firing_rate"]) for b in trainer.model.blocks
                     if ffn == "snn"]  # of the energy forward: one batch of val windows
            out[ffn] = {
                "params": trainer.model.num_params(), "steps": args.steps,
                "tokens_seen": args.steps * cfg.train.batch_size * m.block_size,
                "train_tokens_per_s": round(result.tokens_per_s),
                "val_loss": round(ev.loss, 4), "val_bits_per_byte": round(ev.bits_per_byte, 4),
                "val_tokens": ev.n_tokens,
                **({"val_firing_rate": round(statistics.mean(rates), 4)} if rates else {}),
                "energy_per_token_nj": round(energy["energy_per_token_nj"], 1),
                "macs_per_token": energy["macs"] // energy["tokens"],
                "acs_per_token": energy["acs"] // energy["tokens"],
                "energy_layers_per_token": {
                    f"{r['name']} {r['kind']}": [r["ops"] // energy["tokens"],
                                                 "AC" if r["spike_input"] else "MAC"]
                    for r in energy["layers"] if r["ops"] or r["spike_input"]}}
        out["config"] = {"preset": "demo", "n_layer": m.n_layer, "n_embd": m.n_embd,
                         "block_size": m.block_size, "batch_size": cfg.train.batch_size}
    return out


def cmd_ffn(args: argparse.Namespace) -> dict[str, Any]:
    shapes = [(4, 32, 64)] if args.quick else [(16, 256, 384), (12, 64, 128)]
    speed = [ffn_speed(B, T, C, args.rounds, args.reps) for B, T, C in shapes]
    return {"threads": torch.get_num_threads(), "speed": speed, "quality": ffn_quality(args)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("lif", "ffn"):
        p = sub.add_parser(name)
        p.add_argument("--rounds", type=int, default=5)
        p.add_argument("--reps", type=int, default=3)
        p.add_argument("--quick", action="store_true", help="a tiny smoke run")
    sub.choices["ffn"].add_argument("--steps", type=int, default=2000)
    sub.choices["ffn"].add_argument("--eval-tokens", type=int, default=200_000)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.reps = 2, 2
        if args.cmd == "ffn":
            args.steps, args.eval_tokens = 20, 5_000
    result = {"lif": cmd_lif, "ffn": cmd_ffn}[args.cmd](args)
    json.dump({"machine": machine(), **result}, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
