"""`snn_rag` against `gpt` of about the same parameter count on Shakespeare characters. Prints JSON.

    python benchmarks/snn_rag_bench.py [--steps 1000] [--eval-tokens 200000] [--quick]

Both train on the engine (`Trainer`) at the `snn-rag-cpu` recipe (batch 8 x block 128, lr 1e-3,
cosine, fp32) for the same steps, so they see the same tokens. The `gpt` control has the same
depth, heads and block, and the width whose parameter count is closest to `snn_rag`'s. Reported
per model: parameters, val loss and bits per byte over the first ``--eval-tokens`` of the val split
(documents never written to the bank), the last train loss (a train/val gap much larger than gpt's
would mean retrieval copies overlapping training text), training and cached-generation tokens/s,
and the estimated energy per token of one forward over a 4 x 128 val batch
(`aura.eval.energy`: 45 nm MAC 4.6 pJ, AC 0.9 pJ). For `snn_rag` also: the same val loss with an
empty bank (what retrieval buys), the retrieval aux metrics, and the bank rebuilt from the train
split by `model.build_memory` (what `aura memory build` does) before a third val pass. `snn_rag_mlp`
is the same model with dense GELU feed-forwards: retrieval without the spikes; `snn_rag_minilm`
the same with bank entries that are all-MiniLM-L6-v2 embeddings of the chunks' text (built from
the train split before the first step; its 384-d entries add the wider retrieval and kv
projections' parameters).
``--quick`` is a smoke run (a few steps, small eval) to check the script, not a measurement.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from aura.config import AuraConfig, load_config
from aura.data.prepare import PrepareOptions, prepare
from aura.data.shards import PreparedData
from aura.eval.energy import count_energy
from aura.eval.perplexity import evaluate_prepared
from aura.infer.generate import generate
from aura.infer.sampling import SamplingConfig
from aura.models import build_model
from aura.models.base import AuraModel
from aura.train.trainer import Trainer
from machine import machine


def recipe(args: argparse.Namespace) -> list[str]:
    return [f"train.max_steps={args.steps}", f"train.eval_interval={args.steps}",
            f"train.checkpoint_interval={args.steps}", "train.eval_iters=2",
            f"train.warmup_steps={min(100, args.steps // 10)}", "train.precision=fp32",
            "train.device=cpu", "train.log_interval=10"]


def matched_gpt(rag: AuraConfig, vocab: int, args: argparse.Namespace) -> AuraConfig:
    """A gpt with snn_rag's depth, heads and block, at the width closest in parameters."""
    target = build_model(dataclasses.replace(rag.model, vocab_size=vocab)).num_params()
    m = rag.model
    best = None
    for width in range(m.n_head, 4 * m.n_embd, m.n_head):
        cfg = load_config(preset="demo", overrides=[
            *recipe(args), f"model.n_layer={m.n_layer}", f"model.n_head={m.n_head}",
            f"model.n_embd={width}", f"model.block_size={m.block_size}",
            f"train.batch_size={rag.train.batch_size}", f"train.lr={rag.train.lr}"])
        n = build_model(dataclasses.replace(cfg.model, vocab_size=vocab)).num_params()
        if best is None or abs(n - target) < best[0]:
            best = (abs(n - target), cfg)
    assert best is not None
    return best[1]


def generation_speed(model: AuraModel, prompt: torch.Tensor, new_tokens: int) -> float:
    sampling = SamplingConfig(temperature=0.8, top_k=40, repetition_penalty=1.1, seed=0)
    t0 = time.perf_counter()
    out = generate(model, prompt, new_tokens, sampling)
    return (out.size(1) - prompt.size(1)) / (time.perf_counter() - t0)


def evaluate(model: AuraModel, data: PreparedData, args: argparse.Namespace) -> dict[str, float]:
    ev = evaluate_prepared(model, data, "val", max_tokens=args.eval_tokens)
    out = {"val_loss": round(ev.loss, 4), "val_bits_per_byte": round(ev.bits_per_byte, 4)}
    return out | {k: round(v, 4) for k, v in ev.metrics.items() if k.startswith("mem_")}


def run_one(name: str, cfg: AuraConfig, data_dir: Path, tmp: Path,
            args: argparse.Namespace) -> dict[str, Any]:
    trainer = Trainer(cfg, data_dir, tmp / name, progress=False, log=lambda _m: None)
    result = trainer.run()
    model, data = trainer.model, trainer.data
    model.eval()
    val = data.split("val").tokens()
    batch = torch.from_numpy(val[:4 * cfg.model.block_size].astype("int64")).view(4, -1)
    energy = count_energy(model, batch).to_dict()
    report: dict[str, Any] = {
        "params": model.num_params(), "n_embd": cfg.model.n_embd,
        "tokens_seen": result.step * cfg.train.batch_size * cfg.model.block_size,
        "train_loss_last": round(result.train_loss, 4) if result.train_loss else None,
        **evaluate(model, data, args),
        "train_tokens_per_s": round(result.tokens_per_s),
        "generate_tokens_per_s": round(generation_speed(model, batch[:1, :16], args.new_tokens)),
        "energy_per_token_nj": round(energy["energy_per_token_nj"], 2),
        "energy_per_token_nj_all_dense": round(energy["dense_energy_per_token_nj"], 2),
        "macs_per_token": energy["macs"] // energy["tokens"],
        "acs_per_token": energy["acs"] // energy["tokens"],
    }
    if model.writers:
        empty = copy.deepcopy(model)
        for store in empty.memory_stores().values():
            store.clear()
        report["val_loss_empty_bank"] = evaluate(empty, data, args)["val_loss"]
        memory_ops = sum(r["ops"] for r in energy["layers"] if ".memory" in r["name"])
        report["memory_macs_per_token"] = memory_ops // energy["tokens"]
        t0 = time.perf_counter()
        model.build_memory(data.split("train"), data.tokenizer, args.bank_chunks, batch_size=16)
        report["bank_build_s"] = round(time.perf_counter() - t0, 1)
        report["val_loss_built_bank"] = evaluate(model, data, args)["val_loss"]
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-tokens", type=int, default=200_000)
    ap.add_argument("--new-tokens", type=int, default=500)
    ap.add_argument("--data", type=Path, help="prepared char Shakespeare (default: prepared here)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 10 steps, 4k eval tokens")
    args = ap.parse_args()
    args.bank_chunks = None  # the bank's capacity
    if args.quick:
        args.steps, args.eval_tokens, args.new_tokens, args.bank_chunks = 10, 4096, 32, 128
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data_dir = args.data
        if data_dir is None:
            data_dir = tmp / "chars"
            prepare(PrepareOptions(["builtin:shakespeare"], "char"), data_dir, progress=False)
        vocab = PreparedData.open(data_dir, verify="size").vocab_size
        rag = load_config(preset="snn-rag-cpu", overrides=recipe(args))
        gpt = matched_gpt(rag, vocab, args)
        out = {"steps": args.steps, "batch": rag.train.batch_size,
               "block": rag.model.block_size, "eval_tokens": args.eval_tokens,
               "quick": args.quick}
        rag_mlp = load_config(preset="snn-rag-cpu", overrides=[*recipe(args), "model.ffn=mlp"])
        rag_minilm = load_config(preset="snn-rag-cpu",
                                 overrides=[*recipe(args), "model.memory_encoder=minilm"])
        for name, cfg in (("snn_rag", rag), ("snn_rag_mlp", rag_mlp),
                          ("snn_rag_minilm", rag_minilm), ("gpt", gpt)):
            out[name] = run_one(name, cfg, data_dir, tmp, args)
    print(json.dumps({"machine": machine(), **out}, indent=1))


if __name__ == "__main__":
    main()
