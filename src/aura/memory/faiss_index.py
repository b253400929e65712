"""A FAISS-backed ``VectorIndex`` for large banks: FAISS proposes candidates, torch scores them.

Which FAISS index. Measured on 1M random unit keys (d=256), noisy queries at cosine 0.8 to their
source (``benchmarks/retrieval_bench.py``): an inverted file (IVF-Flat, 4096 cells, 256 probed)
puts the source in the top 5 98% of the time at 8-11 ms a query on two busy cores, against
47-266 ms for an exact scan, which reads the whole 1 GB bank per query. On 200k keys HNSW (M=32)
took 75 s to build and 1.1 ms a query for 97% recall where IVF took 6 s to train and 0.4 ms for
99%; and HNSW cannot delete, which a store that evicts on every write needs, while IVF deletes in
O(1) through a hash-table id map. Random keys are IVF's worst case; clustered keys (real
embeddings) do better at the same settings.

Lifecycle. ``kind="flat"`` is exact (``IndexIDMap2(IndexFlatIP)``, a scan of the live keys only).
``kind="ivf"`` starts flat too, because IVF cells are learned: once ``train_size`` keys are live
it runs k-means over them and moves to IVF, and it trains again after every ``retrain_every``
adds (default: the capacity, one turnover of the bank) so keys that drift, as a model's do while
it learns, keep well-placed cells. Training is a pause inside the ``add`` that triggers it:
30-80 s for 131k training keys and 4096 cells (a 1M bank) on two cores.

Scores. Keys also live in the parent ``ExactIndex`` buffer (the keys take twice the memory).
FAISS only proposes candidates; their scores are recomputed in torch, so they are exact cosines
and carry gradient to the queries, as ``ExactIndex``'s do, and the cognitive map, which needs
whole similarity rows, runs on the same buffer.

Masks. ``allowed`` (a per-query visibility mask: the store's causal reads) cannot be pushed into
one FAISS call, so a search over-fetches ``overfetch * k`` candidates and drops the hidden ones;
a row left with fewer than k while more are visible is answered by an exact scan of the whole
bank. When most of the bank is visible (a causal read hides only the newest memories) the
fallback never runs; when a mask hides most of the bank, the rows it hits cost what
``ExactIndex`` costs. The results then match ``ExactIndex``'s exactly in flat mode, and in IVF
mode hold only visible keys, exactly min(k, visible) of them, at IVF's recall.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from aura.errors import ConfigError
from aura.memory.index import ExactIndex

IVF_MIN_CAPACITY = 32768  # below this an exact scan is fast enough and IVF cells too small
_NEG_INF = float("-inf")


def import_faiss() -> ModuleType:
    """FAISS, imported only when a FAISS index is built; a one-line ConfigError if missing."""
    try:
        import faiss
    except ImportError:
        raise ConfigError("the FAISS memory index needs faiss-cpu: pip install "
                          "'aura[memory]' (or faiss-cpu), or use index='exact'") from None
    return faiss


def faiss_available() -> bool:
    try:
        import_faiss()
    except ConfigError:
        return False
    return True


def default_nlist(capacity: int) -> int:
    """IVF cells: about 4 * sqrt(capacity) as a power of two (4096 for 1M keys, 1024 for 32768),
    never more than the capacity."""
    return min(capacity, 2 ** int(math.log2(capacity) / 2 + 2.5))


class FaissIndex(ExactIndex):
    """``VectorIndex`` over ids in ``[0, capacity)`` with FAISS candidate search (see module doc).

    ``kind``: "flat" (exact), "ivf", or "auto" (ivf from ``IVF_MIN_CAPACITY`` up). ``nprobe``
    defaults to a sixteenth of the cells, which measured > 95% top-5 recall at cosine 0.8 from
    200k to 1M keys. FAISS always runs on the CPU; the torch buffer lives on ``device``.
    ``threads``: OpenMP threads for FAISS (None: all cores). One by default: FAISS's and
    torch's thread pools spin against each other, so on two busy cores a small search between
    torch operations took 40-80 ms with two threads and 0.5 ms with one. Large batches and
    k-means training on an idle machine gain from more.
    """

    def __init__(self, capacity: int, dim: int, device: torch.device | str = "cpu", *,
                 kind: Literal["flat", "ivf", "auto"] = "auto", nlist: int | None = None,
                 nprobe: int | None = None, train_size: int | None = None,
                 retrain_every: int | None = None, overfetch: int = 4,
                 threads: int | None = 1):
        super().__init__(capacity, dim, device)
        self._faiss_module = import_faiss()
        if kind == "auto":
            kind = "ivf" if capacity >= IVF_MIN_CAPACITY else "flat"
        if kind not in ("flat", "ivf"):
            raise ValueError(f"kind must be 'flat', 'ivf' or 'auto', got {kind!r}")
        self.kind = kind
        self.nlist = nlist or default_nlist(capacity)
        self.nprobe = nprobe or max(1, self.nlist // 16)
        self.train_size = train_size or min(capacity, 32 * self.nlist)
        self.retrain_every = retrain_every or capacity
        if overfetch < 1:
            raise ValueError(f"overfetch must be >= 1, got {overfetch}")
        if kind == "ivf" and not self.nlist <= self.train_size <= capacity:
            raise ValueError(f"train_size must be in [nlist={self.nlist}, capacity={capacity}], "
                             f"got {self.train_size}")
        self.overfetch, self.threads = overfetch, threads
        self.trained = False  # True once the IVF cells are learned
        self.adds_since_training = 0
        self._index = self._flat()

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def _flat(self) -> Any:
        faiss = self._faiss_module
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def add(self, ids: torch.Tensor, keys: torch.Tensor) -> None:
        if ids.unique().numel() != ids.numel():
            raise ValueError("ids must be distinct within one add")  # FAISS would keep both
        self.remove(ids)  # replacing an id: FAISS would otherwise keep both vectors
        super().add(ids, keys)
        self.adds_since_training += ids.numel()
        if self.kind == "ivf" and len(self) + ids.numel() >= self.train_size and (
                not self.trained or self.adds_since_training >= self.retrain_every):
            self.train()  # indexes every live key, these included
        else:
            with self._omp_threads():
                self._index.add_with_ids(_numpy(self.keys[ids]), _numpy(ids, np.int64))

    def remove(self, ids: torch.Tensor) -> None:
        present = ids[self.valid[ids]]
        if present.numel():
            with self._omp_threads():
                self._index.remove_ids(_numpy(present, np.int64))
        super().remove(ids)

    def train(self) -> None:
        """Learn IVF cells by spherical k-means on (a sample of) the live keys and re-index."""
        faiss = self._faiss_module
        live = self.valid.nonzero().squeeze(1)
        if live.numel() < self.nlist:
            raise ValueError(f"training {self.nlist} cells needs as many keys, have "
                             f"{live.numel()}")
        gen = torch.Generator().manual_seed(0)
        sample = live[torch.randperm(live.numel(), generator=gen)[:self.train_size].to(live)]
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, self.nlist,
                                 faiss.METRIC_INNER_PRODUCT)
        ivf.cp.spherical = True
        ivf.cp.min_points_per_centroid = 1  # train_size is chosen here, not by FAISS's rule
        with self._omp_threads():
            ivf.train(_numpy(self.keys[sample]))
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # O(1) remove_ids
            ivf.add_with_ids(_numpy(self.keys[live]), _numpy(live, np.int64))
        self._index, self.trained, self.adds_since_training = ivf, True, 0

    def search(self, queries: torch.Tensor, k: int, allowed: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        n_queries = queries.shape[0]
        fetch = min(self.overfetch * k, len(self))
        if fetch == 0:
            return (torch.full((n_queries, k), _NEG_INF, device=self.keys.device),
                    torch.full((n_queries, k), -1, dtype=torch.long, device=self.keys.device))
        q = F.normalize(queries.to(self.keys.dtype), dim=-1)
        if self.trained:
            self._index.nprobe = self.nprobe
        with self._omp_threads():
            _, found = self._index.search(_numpy(q), fetch)
        cand = torch.from_numpy(found).to(self.keys.device)
        ok = cand >= 0
        safe = cand.clamp(min=0)
        if allowed is not None:
            ok &= allowed.expand(n_queries, self.capacity).gather(1, safe)
        scores = torch.einsum("qd,qcd->qc", q, self.keys[safe]).masked_fill(~ok, _NEG_INF)
        top, pos = scores.topk(min(k, fetch), dim=-1)
        ids = cand.gather(1, pos).masked_fill(top == _NEG_INF, -1)
        if top.shape[1] < k:
            top = F.pad(top, (0, k - top.shape[1]), value=_NEG_INF)
            ids = F.pad(ids, (0, k - ids.shape[1]), value=-1)
        return self._exact_where_short(queries, k, allowed, top, ids)

    @contextlib.contextmanager
    def _omp_threads(self) -> Iterator[None]:
        """Run FAISS on ``threads`` OpenMP threads, restoring the process setting after (torch
        reads the same setting)."""
        if self.threads is None:
            yield
            return
        faiss = self._faiss_module
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(self.threads)
        try:
            yield
        finally:
            faiss.omp_set_num_threads(before)

    def _exact_where_short(self, queries: torch.Tensor, k: int, allowed: torch.Tensor | None,
                           scores: torch.Tensor, ids: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows with fewer than k results while more keys are visible, searched exactly."""
        got = (ids >= 0).sum(dim=1)
        maybe = (got < k).nonzero().squeeze(1)
        if maybe.numel() == 0:
            return scores, ids
        visible = self.valid if allowed is None else (
            allowed.expand(queries.shape[0], self.capacity)[maybe] & self.valid)
        n_visible = visible.sum(dim=-1).expand(maybe.numel())
        rows = maybe[got[maybe] < n_visible.clamp(max=k)]
        if rows.numel() == 0:
            return scores, ids
        row_allowed = None if allowed is None else (
            allowed.expand(queries.shape[0], self.capacity)[rows])
        exact_scores, exact_ids = ExactIndex.search(self, queries[rows], k, row_allowed)
        return scores.index_put((rows,), exact_scores), ids.index_put((rows,), exact_ids)


def _numpy(t: torch.Tensor, dtype: type = np.float32) -> np.ndarray:
    """A contiguous CPU array, as FAISS's SWIG bindings require."""
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=dtype)
