"""Episodic-store retrieval: top-5 recall of stored items under noisy queries, query latency,
and write throughput, for the exact torch index and the FAISS index, at 10k and 1M memories.

    python benchmarks/retrieval_bench.py [--sizes 10000 1000000] [--dim 256] [--quick]

Keys are N random unit vectors in R^dim (256 by default, between MiniLM's 384 and a small
model's width); random keys are the hard case for an inverted file, whose cells then follow no
structure. A query is a stored key plus Gaussian noise of per-coordinate std
sqrt((1/c^2 - 1) / dim), so its expected cosine to the key is c; recall@5 is the fraction of
queries whose source memory is among the 5 returned (the design target is > 95%, against 75-85%
for the naive memory it replaces),
at c = 0.9, 0.8 (the headline) and 0.7. Each bank is an ``EpisodicStore`` filled in writes of
1024: fill throughput includes FAISS's k-means training; evicting writes go into the full
store. Latency is the median per query of index searches (batches of 64, and single queries)
and of ``store.read`` (which adds the per-read bookkeeping), plus a causal read that hides
about a tenth of the bank per query. FAISS runs on ``--faiss-threads`` OpenMP threads
(``FaissIndex``'s default of 1 explains why). Prints JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from aura.memory import EpisodicStore
from aura.memory.faiss_index import FaissIndex
from machine import machine

NOISE_COSINES = (0.9, 0.8, 0.7)
WRITE_BATCH = 1024


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def noisy(keys: torch.Tensor, cos: float, gen: torch.Generator) -> torch.Tensor:
    sigma = ((1 / cos**2 - 1) / keys.shape[1]) ** 0.5
    return keys + sigma * torch.randn(keys.shape, generator=gen)


def fill(store: EpisodicStore, keys: torch.Tensor, dim_value: int) -> dict[str, float]:
    """Write every key in batches; throughput, and the slowest write (FAISS training)."""
    values = torch.zeros(WRITE_BATCH, dim_value)
    slowest, t0 = 0.0, time.perf_counter()
    for start in range(0, keys.shape[0], WRITE_BATCH):
        chunk = keys[start:start + WRITE_BATCH]
        t = time.perf_counter()
        store.write(chunk, values[:chunk.shape[0]], source_pos=torch.arange(
            start, start + chunk.shape[0]))
        slowest = max(slowest, time.perf_counter() - t)
    total = time.perf_counter() - t0
    return {"fill_items_per_s": round(keys.shape[0] / total), "fill_s": round(total, 2),
            "slowest_write_s": round(slowest, 2)}


def recall_at_5(search: Callable[[torch.Tensor], torch.Tensor], keys: torch.Tensor,
                src: torch.Tensor, cos: float, seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    queries = noisy(keys[src], cos, gen)
    measured = F.cosine_similarity(queries, keys[src]).mean().item()
    hits = torch.cat([(search(q) == s[:, None]).any(dim=1)
                      for q, s in zip(queries.split(256), src.split(256), strict=True)])
    return {"recall_at_5": round(hits.float().mean().item(), 4),
            "mean_cosine": round(measured, 3)}


def bench_bank(kind: str, keys: torch.Tensor, args: argparse.Namespace) -> dict[str, object]:
    n, dim = keys.shape
    store = EpisodicStore(dim, args.dim_value, capacity=n, index=kind)  # type: ignore[arg-type]
    out: dict[str, object] = {"index": type(store.index).__name__}
    if isinstance(store.index, FaissIndex):
        store.index.threads = args.faiss_threads or None
        out.update(faiss_kind=store.index.kind, nlist=store.index.nlist,
                   nprobe=store.index.nprobe)
    out.update(fill(store, keys, args.dim_value))
    index = store.index
    gen = torch.Generator().manual_seed(1)
    src = torch.randperm(n, generator=gen)[:args.queries]

    def top5(q: torch.Tensor) -> torch.Tensor:
        return index.search(q, 5)[1]

    out["recall"] = {str(c): recall_at_5(top5, keys, src, c, seed=i)
                     for i, c in enumerate(NOISE_COSINES)}
    batch = noisy(keys[src[:64]], 0.8, gen)
    single = batch[:1]
    repeats = args.repeats
    out["search_ms_per_query_batch64"] = round(median_ms(lambda: index.search(batch, 5),
                                                         repeats) / 64, 4)
    out["search_ms_single"] = round(median_ms(lambda: index.search(single, 5), 5 * repeats), 4)
    out["read_ms_per_query_batch64"] = round(median_ms(lambda: store.read(batch, 5),
                                                       repeats) / 64, 4)
    out["read_ms_single"] = round(median_ms(lambda: store.read(single, 5), 5 * repeats), 4)
    limits = torch.randint(int(0.8 * n), n, (64,), generator=gen)  # ~10% of the bank hidden
    index.rows_scored = 0
    out["causal_read_ms_per_query_batch64"] = round(median_ms(
        lambda: store.read(batch, 5, max_source_pos=limits), repeats) / 64, 4)
    if isinstance(index, FaissIndex):
        out["causal_rows_scanned_exactly"] = index.rows_scored
    if isinstance(index, FaissIndex) and index.trained:
        out["nprobe_sweep_at_cos_0.8"] = nprobe_sweep(index, keys, src, batch, repeats)
    writes = max(2, args.repeats // 2)
    new = F.normalize(torch.randn(WRITE_BATCH, dim, generator=gen), dim=-1)
    values = torch.zeros(WRITE_BATCH, args.dim_value)
    out["evicting_write_items_per_s"] = round(
        WRITE_BATCH / (median_ms(lambda: store.write(new, values), writes) / 1000))
    return out


def nprobe_sweep(index: FaissIndex, keys: torch.Tensor, src: torch.Tensor, batch: torch.Tensor,
                 repeats: int) -> list[dict[str, float]]:
    default, rows = index.nprobe, []
    for nprobe in sorted({default // 4, default // 2, default, default * 2} - {0}):
        index.nprobe = nprobe
        rec = recall_at_5(lambda q: index.search(q, 5)[1], keys, src, 0.8, seed=1)
        rows.append({"nprobe": nprobe, **rec, "search_ms_per_query_batch64": round(
            median_ms(lambda: index.search(batch, 5), repeats) / 64, 4)})
    index.nprobe = default
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--dim-value", type=int, default=64)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--faiss-threads", type=int, default=1, help="0: all cores")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run: 2k and 40k keys, d=64")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.dim, args.queries, args.repeats = [2000, 40_000], 64, 200, 3
    import faiss

    results = {}
    for n in args.sizes:
        gen = torch.Generator().manual_seed(0)
        keys = F.normalize(torch.randn(n, args.dim, generator=gen), dim=-1)
        results[str(n)] = {}
        for kind in ("exact", "faiss"):
            results[str(n)][kind] = bench_bank(kind, keys, args)
            gc.collect()
    print(json.dumps({
        "machine": machine(),
        "setup": {"dim": args.dim, "dim_value": args.dim_value, "queries": args.queries,
                  "noise_cosines": NOISE_COSINES, "write_batch": WRITE_BATCH,
                  "torch_threads": torch.get_num_threads(), "faiss_threads": args.faiss_threads,
                  "faiss": faiss.__version__, "torch": torch.__version__},
        "results": results}, indent=1))


if __name__ == "__main__":
    main()
