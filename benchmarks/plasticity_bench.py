"""Local learning rules: batched vs per-item loops, memory flatness, allocation cost.

    python benchmarks/plasticity_bench.py [--quick]

(a) ``TokenSTDP`` update + modulate on 1M tokens (Zipf ids over a GPT-2-sized vocabulary) vs
    the sequential per-token loop (a dict of floats, ``np.clip`` per token): the results must
    be identical; tokens/s of each. ``update_walk`` names the walk ``TokenSTDP`` took (numba's
    compiled loop with the ``jit`` extra, else the vectorised passes); the vectorised passes,
    what other devices run, are timed too, and both are checked against the loop.
(b) ``OjaLayer`` (batched GHA) vs the textbook per-sample GHA ``step`` at d=64, k=16 on
    data with 16 known components: principal angles of both learned subspaces to the truth and
    to each other; samples/s of each.
(c) Resident memory over 10,000 steps of TokenSTDP + OnlineWhitener + OjaLayer.
(d) The whitener + Oja step with preallocated buffers vs the same math allocating fresh
    tensors: what the preallocation saves.

``--quick`` shrinks every size for a smoke run. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Callable
from unittest import mock

import numpy as np
import torch

import aura.plasticity.stdp as stdp_module
from aura.plasticity import OjaLayer, OnlineWhitener, TokenSTDP
from machine import machine

VOCAB = 50257


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def seed_stdp_loop(token_ids: list[int], spiked: np.ndarray, sal: np.ndarray,
                   weights: dict[int, float], lr_plus: float, lr_minus: float, w_min: float,
                   w_max: float, alpha: float) -> np.ndarray:
    """The per-token rule as a plain loop: the reference the batched rule must equal."""
    for i, tok in enumerate(token_ids):
        prev = weights.get(tok, 0.0)
        delta = lr_plus if spiked[i] else -lr_minus
        new_w = np.clip(prev + delta, w_min, w_max)
        weights[tok] = float(new_w)
    stdp_mod = np.ones_like(sal, dtype=np.float64)
    for i, tok in enumerate(token_ids):
        w_tok = weights.get(tok, 0.0)
        stdp_mod[i] = max(0.0, 1.0 + alpha * w_tok)
    return sal * stdp_mod


def bench_stdp(n_tokens: int, repeats: int) -> dict[str, object]:
    rng = np.random.default_rng(0)
    ids = (rng.zipf(1.2, n_tokens) - 1) % VOCAB
    spiked = rng.random(n_tokens) < 0.3
    sal = rng.random(n_tokens)
    tok, spk, sal_t = torch.from_numpy(ids), torch.from_numpy(spiked), torch.from_numpy(sal)
    ref = TokenSTDP(VOCAB, dtype=torch.float64)
    params = dict(lr_plus=ref.lr_plus, lr_minus=ref.lr_minus, w_min=ref.w_min, w_max=ref.w_max,
                  alpha=ref.alpha)
    weights: dict[int, float] = {}
    t = time.perf_counter()
    loop_out = seed_stdp_loop(ids.tolist(), spiked, sal, weights, **params)
    loop_s = time.perf_counter() - t

    def batched() -> tuple[TokenSTDP, torch.Tensor]:
        stdp = TokenSTDP(VOCAB, dtype=torch.float64)
        stdp.update(tok, spk)
        return stdp, stdp.modulate(sal_t, tok)

    expected = torch.zeros(VOCAB, dtype=torch.float64)
    expected[list(weights)] = torch.tensor(list(weights.values()), dtype=torch.float64)

    def matches_loop(result: tuple[TokenSTDP, torch.Tensor]) -> bool:
        stdp, out = result
        return torch.equal(stdp.weights, expected) and np.array_equal(out.numpy(), loop_out)

    t = time.perf_counter()
    identical = matches_loop(batched())  # the first call includes numba's compile or cache load
    first_call_s = time.perf_counter() - t
    batched_s = best_of(batched, repeats)
    with mock.patch.object(stdp_module, "compiled_walk", lambda: None):
        identical_vectorised = matches_loop(batched())
        vectorised_s = best_of(batched, repeats)
    chunk = 65536

    def chunked() -> None:
        s = TokenSTDP(VOCAB, dtype=torch.float64)
        for i in range(0, n_tokens, chunk):
            s.update(tok[i:i + chunk], spk[i:i + chunk])
            s.modulate(sal_t[i:i + chunk], tok[i:i + chunk])

    chunked_s = best_of(chunked, repeats)
    return {"tokens": n_tokens,
            "update_walk": "compiled" if stdp_module.compiled_walk() else "vectorised",
            "identical": identical, "identical_vectorised": identical_vectorised,
            "max_repeats_of_one_token": int(np.bincount(ids).max()),
            "loop_tokens_per_s": round(n_tokens / loop_s),
            "batched_tokens_per_s": round(n_tokens / batched_s),
            "speedup": round(loop_s / batched_s, 1),
            "first_call_s": round(first_call_s, 3),
            f"batched_in_chunks_of_{chunk}_tokens_per_s": round(n_tokens / chunked_s),
            "speedup_in_chunks": round(loop_s / chunked_s, 1),
            "vectorised_tokens_per_s": round(n_tokens / vectorised_s),
            "vectorised_speedup": round(loop_s / vectorised_s, 1)}


def known_data(dim: int, k: int, seed: int) -> tuple[torch.Tensor, Callable[[int], torch.Tensor]]:
    """Data with ``k`` known directions (std 3 down to 1) plus isotropic noise of std 0.01."""
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(7),
                                        dtype=torch.float64)).Q[:, :k]
    stds = torch.linspace(3.0, 1.0, k, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)

    def sample(n: int) -> torch.Tensor:
        z = torch.randn(n, k, generator=g, dtype=torch.float64) * stds
        x = z @ basis.T + 0.01 * torch.randn(n, dim, generator=g, dtype=torch.float64)
        return x.float()

    return basis.T.float(), sample


def principal_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    qa, qb = torch.linalg.qr(a.double().T).Q, torch.linalg.qr(b.double().T).Q
    return float(torch.arccos(torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)).max())


def seed_oja_loop(w: np.ndarray, xs: np.ndarray, eta: float) -> np.ndarray:
    """The per-sample GHA ``step`` (rows as components, the triangular decorrelation)."""
    for x in xs:
        y = w @ x
        w += eta * (np.outer(y, x) - np.tril(np.outer(y, y)) @ w)
    return w


def bench_oja(loop_samples: int, steps: int, batch: int) -> dict[str, object]:
    """Throughput of the batched layer is its median step time over a converging run."""
    dim, k = 64, 16
    truth, sample = known_data(dim, k, seed=1)
    init = OjaLayer(dim, k, init_components=k).components.numpy().astype(np.float64)
    xs = sample(loop_samples).double().numpy()
    t = time.perf_counter()
    w_loop = seed_oja_loop(init.copy(), xs, eta=0.002)
    loop_s = time.perf_counter() - t
    oja = OjaLayer(dim, k, init_components=k, lr=0.05, grow_threshold=1.0)
    times = []
    for _ in range(steps):
        x = sample(batch)
        t = time.perf_counter()
        oja.step(x)
        times.append(time.perf_counter() - t)
    w_batched = oja.components
    return {"dim": dim, "components": k, "batch": batch, "steps": steps,
            "loop_samples": loop_samples,
            "angle_loop_vs_truth_rad": round(principal_angle(torch.from_numpy(w_loop), truth), 5),
            "angle_batched_vs_truth_rad": round(principal_angle(w_batched, truth), 5),
            "angle_batched_vs_loop_rad": round(
                principal_angle(w_batched, torch.from_numpy(w_loop)), 5),
            "loop_samples_per_s": round(loop_samples / loop_s),
            "batched_samples_per_s": round(batch / statistics.median(times)),
            "speedup": round(batch / statistics.median(times) / (loop_samples / loop_s), 1)}


def bench_memory(steps: int) -> dict[str, object]:
    rng = np.random.default_rng(2)
    dim = 64
    stdp = TokenSTDP(VOCAB)
    whitener = OnlineWhitener(dim, refresh_every=50)
    oja = OjaLayer(dim, 16, lr=0.01, grow_threshold=0.5, patience=50)
    _, sample = known_data(dim, 16, seed=3)
    batches = [sample(256) for _ in range(16)]
    tokens = [torch.from_numpy((rng.zipf(1.2, 4096) - 1) % VOCAB) for _ in range(16)]
    spikes = [torch.from_numpy(rng.random(4096) < 0.3) for _ in range(16)]
    out = torch.empty(256, dim)
    samples = {}
    warm = steps // 10
    for i in range(steps):
        j = i % 16
        stdp.update(tokens[j], spikes[j])
        whitener.update(batches[j])
        oja.step(whitener.transform(batches[j], out=out))
        if i + 1 in (warm, steps):
            samples[i + 1] = rss_mb()
    return {"steps": steps, f"rss_mb_at_{warm}": round(samples[warm], 1),
            f"rss_mb_at_{steps}": round(samples[steps], 1),
            "growth_mb": round(samples[steps] - samples[warm], 1)}


def bench_allocation(steps: int) -> dict[str, object]:
    """Preallocated in-place whitener + Oja step vs the same math on fresh tensors."""
    result: dict[str, object] = {}
    for n, dim, k in ((64, 64, 16), (1024, 256, 64)):
        x = torch.randn(n, dim)
        whitener = OnlineWhitener(dim, refresh_every=10**9)
        oja = OjaLayer(dim, k, init_components=k)
        whitener.update(x)
        out = torch.empty(n, dim)

        def prealloc(whitener=whitener, oja=oja, x=x, out=out) -> None:
            whitener.update(x)
            oja.step(whitener.transform(x, out=out))

        state = [x.mean(0), torch.cov(x.T), oja.components.clone()]
        matrix = whitener.matrix.clone()

        def fresh(x=x, matrix=matrix, state=state) -> None:
            mean, cov, w = state
            bm = x.mean(0)
            c = x - bm
            diff = bm - mean
            cov = 0.99 * cov + 0.01 * (c.T @ c) / len(x) + 0.99 * 0.01 * torch.outer(diff, diff)
            mean = mean + 0.01 * diff
            z = (x - mean) @ matrix.T
            y = z @ w.T
            ycov = y.T @ y / len(z)
            residual = 1 - (2 * ycov.trace() - ((w @ w.T) * ycov).sum()) / (z * z).sum()
            w = w + 0.01 * (y.T @ z / len(z) - torch.tril(ycov) @ w)
            float(residual)
            state[:] = [mean, cov, w]

        fresh()
        prealloc()
        t_pre = best_of(lambda f=prealloc: [f() for _ in range(steps)], 3) / steps
        t_fresh = best_of(lambda f=fresh: [f() for _ in range(steps)], 3) / steps
        result[f"batch{n}_dim{dim}_k{k}"] = {"preallocated_us": round(t_pre * 1e6, 1),
                                             "fresh_tensors_us": round(t_fresh * 1e6, 1)}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    report = {
        "machine": machine(), "quick": q,
        "token_stdp": bench_stdp(20_000 if q else 1 << 20, 2 if q else 5),
        "oja": bench_oja(4_000 if q else 100_000, 300 if q else 1000, 512 if q else 4096),
        "memory": bench_memory(500 if q else 10_000),
        "allocation": bench_allocation(50 if q else 200),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
