"""Data pipeline speed: batch sampling throughput and pretokenisation MB/s. Prints JSON.

    python benchmarks/data_bench.py [--source builtin:shakespeare] [--repeats 5]

Sampling is timed at the batch shapes of the presets (batch x block); the target is at least
50M tokens/s so that sampling never costs more than 1% of a training step. Pretokenisation is a
full `prepare` (scan, tokenizer build, tokenize, write, verify) per tokenizer, plus the cache hit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from aura.data.prepare import PrepareOptions, prepare
from aura.data.sampler import BatchSampler
from aura.data.shards import PreparedData
from machine import machine

SHAPES = [(12, 64), (16, 256), (8, 512), (32, 512), (64, 1024)]


def bench_sampling(data: PreparedData, repeats: int) -> list[dict]:
    split = data.split("train")
    rows = []
    for batch, block in SHAPES:
        sampler = BatchSampler(split, batch, block, seed=0)
        n = max(20, 2_000_000 // (batch * block))
        sampler(0)
        rates = []
        for r in range(repeats):
            t = time.perf_counter()
            for step in range(r * n, (r + 1) * n):
                sampler(step)
            rates.append(n * batch * block / (time.perf_counter() - t))
        rows.append({
            "batch": batch, "block": block,
            "tokens_per_s": round(statistics.median(rates)),
            "us_per_batch": round(batch * block / statistics.median(rates) * 1e6, 2),
        })
    return rows


def bench_prepare(source: str, tmp: Path, repeats: int) -> list[dict]:
    rows = []
    specs = [("byte", "byte"), ("char", "char"), ("bpe-8192 (trains)", "bpe")]
    for label, tok in specs:
        opts = PrepareOptions(sources=[source], tokenizer=tok)
        times, result = [], None
        for _ in range(repeats):
            result = prepare(opts, tmp / tok, force=True, progress=False)
            times.append(result.seconds)
        assert result is not None
        mb = sum(s.n_text_bytes for s in result.data.splits.values()) / 1e6
        cached = prepare(opts, tmp / tok, progress=False)
        rows.append({
            "tokenizer": label, "mb": round(mb, 3),
            "mb_per_s": round(mb / statistics.median(times), 2),
            "cache_hit_s": round(cached.seconds, 3),
        })
    opts = PrepareOptions(sources=[source], tokenizer=str(tmp / "bpe"))
    times = [prepare(opts, tmp / "bpe-reuse", force=True, progress=False).seconds
             for _ in range(repeats)]
    rows.append({"tokenizer": "bpe-8192 (encode only)", "mb": rows[-1]["mb"],
                 "mb_per_s": round(rows[-1]["mb"] / statistics.median(times), 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="builtin:shakespeare")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        prep = bench_prepare(args.source, tmp, max(1, args.repeats // 2))
        sampling = bench_sampling(PreparedData.open(tmp / "byte"), args.repeats)
    print(json.dumps({"machine": machine(), "source": args.source, "sampling": sampling,
                      "prepare": prep}, indent=1))


if __name__ == "__main__":
    main()
