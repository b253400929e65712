"""Generation speed: tokens/s with the KV cache vs re-running the context each step. Prints JSON.

    python benchmarks/generate_bench.py [--new-tokens 448] [--prompt-tokens 64] [--repeats 3]
                                        [--threads N]

A randomly initialised `gpt` (block 512; 4 layers x 4 heads x 128 by default, vocab 65) decodes
greedily from a random prompt until the context reaches the block size, once with the cache and
once without; both must produce identical ids, so the ratio compares equal work. The context
must fit the block: past it the two paths crop differently (see `aura.infer.generate`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from aura.config import ModelConfig
from aura.infer.generate import generate
from aura.infer.sampling import SamplingConfig
from aura.models import AuraModel, build_model
from machine import machine

GREEDY = SamplingConfig(temperature=0)


def timed(model: AuraModel, prompt: torch.Tensor, n: int, use_cache: bool, repeats: int
          ) -> tuple[float, torch.Tensor]:
    """Median tokens/s over ``repeats`` runs (after a short warm-up), and the generated ids."""
    generate(model, prompt, min(n, 8), GREEDY, use_cache=use_cache)
    rates, ids = [], prompt
    for _ in range(repeats):
        t = time.perf_counter()
        ids = generate(model, prompt, n, GREEDY, use_cache=use_cache)
        rates.append(n * prompt.size(0) / (time.perf_counter() - t))
    return statistics.median(rates), ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=448)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=65)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads; 0 keeps torch's default (small models may prefer 1)")
    args = ap.parse_args()
    if args.prompt_tokens + args.new_tokens > args.block_size:
        ap.error("--prompt-tokens + --new-tokens must fit in --block-size")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = ModelConfig(vocab_size=args.vocab_size, block_size=args.block_size,
                      n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    model = build_model(cfg).eval()
    prompt = torch.randint(0, args.vocab_size, (args.batch, args.prompt_tokens))
    cached, cached_ids = timed(model, prompt, args.new_tokens, True, args.repeats)
    uncached, uncached_ids = timed(model, prompt, args.new_tokens, False, args.repeats)
    assert torch.equal(cached_ids, uncached_ids), "cached and uncached decoding disagree"
    print(json.dumps({
        "machine": machine(),
        "model": {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
                  "block_size": cfg.block_size, "vocab_size": cfg.vocab_size},
        "batch": args.batch, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
        "cached_tokens_per_s": round(cached, 1),
        "uncached_tokens_per_s": round(uncached, 1),
        "speedup": round(cached / uncached, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
