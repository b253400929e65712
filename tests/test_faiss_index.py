"""aura.memory.faiss_index: the FAISS backend answers like ExactIndex (exactly in flat mode and
in IVF mode when every cell is probed), keeps its recall when approximate, tracks add / remove /
replace, honours per-query masks, and survives a store's save / load."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from aura.errors import ConfigError
from aura.memory import EpisodicStore, ExactIndex, FaissIndex, faiss_index
from aura.memory import store as store_module
from aura.memory.faiss_index import IVF_MIN_CAPACITY, default_nlist, import_faiss
from conftest import requires_extra
from test_memory import assert_top_k, cosine, randn


@pytest.fixture(scope="module")
def faiss() -> ModuleType:
    return requires_extra("faiss", "memory")


def ivf(capacity: int, dim: int, nlist: int, **kw: object) -> FaissIndex:
    return FaissIndex(capacity, dim, kind="ivf", nlist=nlist, train_size=capacity // 2,
                      **kw)  # type: ignore[arg-type]


def noisy(keys: torch.Tensor, cos: float, seed: int) -> torch.Tensor:
    """Queries whose expected cosine to their (unit) key is ``cos``."""
    sigma = ((1 / cos**2 - 1) / keys.shape[1]) ** 0.5
    return F.normalize(keys, dim=-1) + sigma * randn(*keys.shape, seed=seed)


@settings(max_examples=30)
@given(capacity=st.integers(1, 40), dim=st.integers(1, 9), n_queries=st.integers(1, 5),
       k=st.integers(1, 45), exhaustive_ivf=st.booleans(), per_query=st.booleans(),
       seed=st.integers(0, 2**16), data=st.data())
def test_search_and_masks_match_exact_index(faiss: ModuleType, capacity: int, dim: int,
                                            n_queries: int, k: int, exhaustive_ivf: bool,
                                            per_query: bool, seed: int,
                                            data: st.DataObject) -> None:
    """Flat mode, and IVF probing every cell, are exact: same top-k as ExactIndex, masks too."""
    if exhaustive_ivf:
        nlist = min(capacity, 4)
        index = FaissIndex(capacity, dim, kind="ivf", nlist=nlist, nprobe=nlist,
                           train_size=capacity)
    else:
        index = FaissIndex(capacity, dim, kind="flat")
    exact = ExactIndex(capacity, dim)
    keys = randn(capacity, dim, seed=seed)
    present = torch.tensor(data.draw(st.lists(st.booleans(), min_size=capacity,
                                              max_size=capacity)))
    for idx in (index, exact):
        idx.add(torch.arange(capacity), keys)
        idx.remove((~present).nonzero().squeeze(1))
    assert index.trained == exhaustive_ivf and len(index) == len(exact) == int(present.sum())
    rows = n_queries if per_query else 1
    allowed = torch.tensor(data.draw(st.lists(st.booleans(), min_size=rows * capacity,
                                              max_size=rows * capacity))).view(rows, capacity)
    queries = randn(n_queries, dim, seed=seed + 1)
    ref = cosine(queries, keys).masked_fill(~present, float("-inf"))

    for mask, expected in ((None, ref), (allowed, ref.masked_fill(~allowed, float("-inf")))):
        scores, ids = index.search(queries, k, mask)
        assert scores.shape == ids.shape == (n_queries, k)
        assert_top_k(scores, ids, expected, k)
        exact_scores, _ = exact.search(queries, k, mask)
        torch.testing.assert_close(scores, exact_scores, atol=1e-5, rtol=0)


@settings(max_examples=25)
@given(k=st.integers(1, 12), visible=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_approximate_masks_return_only_visible_keys_and_never_too_few(
        faiss: ModuleType, k: int, visible: float, seed: int) -> None:
    """With one cell probed of 16 the answer is approximate, yet every id returned is visible
    and present, scores are its exact cosines best first, and a row holds min(k, visible)."""
    index = ivf(512, 8, nlist=16, nprobe=1)
    keys = randn(512, 8, seed=seed)
    index.add(torch.arange(512), keys)
    index.remove(torch.arange(0, 512, 7))
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.rand(6, 512, generator=gen) < visible
    queries = randn(6, 8, seed=seed + 1)
    scores, ids = index.search(queries, k, allowed)
    visible_ok = allowed & index.valid
    for q in range(6):
        got = ids[q][ids[q] >= 0]
        assert len(got) == min(k, int(visible_ok[q].sum()))
        assert visible_ok[q, got].all() and len(set(got.tolist())) == len(got)
        true = cosine(queries[q:q + 1], keys[got])[0]
        best_first = scores[q, :len(got)]
        torch.testing.assert_close(best_first.double(), true, atol=1e-5, rtol=0)
        assert (best_first[1:] <= best_first[:-1]).all()


def test_ivf_recall_of_noisy_queries(faiss: ModuleType) -> None:
    """Default nprobe (a sixteenth of the cells): > 95% top-5 recall at cosine 0.8, no fallback."""
    n, dim = 20000, 64
    index = FaissIndex(n, dim, kind="ivf")
    keys = randn(n, dim)
    for chunk in torch.arange(n).split(5000):
        index.add(chunk, keys[chunk])
    assert index.trained and (index.nlist, index.nprobe) == (default_nlist(n), 32)
    src = torch.arange(0, n, 20)
    queries = noisy(keys[src], 0.8, seed=1)
    assert abs(cosine(queries, keys[src]).diagonal().mean().item() - 0.8) < 0.02
    _, ids = index.search(queries, 5)
    recall = (ids == src[:, None]).any(dim=1).float().mean().item()
    assert recall > 0.95
    assert index.rows_scored == 0  # candidates sufficed: no exact scan of the bank


def test_add_remove_and_replace_ids(faiss: ModuleType) -> None:
    for index in (FaissIndex(600, 16, kind="flat"), ivf(600, 16, nlist=8, nprobe=8)):
        keys = randn(600, 16)
        index.add(torch.arange(600), keys)
        assert len(index) == 600 and index.trained == (index.kind == "ivf")
        index.remove(torch.tensor([3, 4, 4, 599]))  # repeats and removed ids are harmless
        index.remove(torch.tensor([599]))
        assert len(index) == 597
        _, ids = index.search(keys[[3, 4, 5]], 3)
        assert not torch.isin(ids, torch.tensor([3, 4, 599])).any()
        assert ids[2, 0] == 5

        new = randn(2, 16, seed=9)
        index.add(torch.tensor([5, 3]), new)  # 5 replaced in place, 3 re-added
        assert len(index) == 598
        scores, ids = index.search(new, 1)
        assert ids[:, 0].tolist() == [5, 3]
        torch.testing.assert_close(scores[:, 0], torch.ones(2))
        _, ids = index.search(keys[[5]], 600)
        assert (ids == 5).sum() == 1  # the old key of 5 is gone, not stored twice
        with pytest.raises(ValueError, match="distinct"):
            index.add(torch.tensor([7, 7]), randn(2, 16))


def test_ivf_trains_at_train_size_and_again_after_a_turnover(faiss: ModuleType) -> None:
    index = ivf(400, 8, nlist=8, retrain_every=300)
    keys = randn(700, 8)
    index.add(torch.arange(199), keys[:199])
    assert not index.trained
    index.add(torch.tensor([199]), keys[199:200])
    assert index.trained and index.adds_since_training == 0
    first = index._index.quantizer.reconstruct_n(0, 8)
    index.add(torch.arange(200, 400), keys[200:400])
    assert index.adds_since_training == 200
    index.add(torch.arange(100), keys[400:500])  # 300 adds since training: cells relearned
    assert index.adds_since_training == 0 and len(index) == 400
    assert not (index._index.quantizer.reconstruct_n(0, 8) == first).all()
    _, ids = index.search(keys[400:500], 1)
    assert (ids[:, 0] == torch.arange(100)).float().mean() > 0.9


def test_scores_carry_gradient_to_queries(faiss: ModuleType) -> None:
    index = ivf(256, 8, nlist=4)
    index.add(torch.arange(256), randn(256, 8))
    queries = randn(3, 8, seed=1).requires_grad_()
    allowed = torch.zeros(3, 256, dtype=torch.bool)
    allowed[0, :2] = allowed[1] = allowed[2, 7] = True  # rows 0 and 2 need the exact fallback
    scores, _ = index.search(queries, 4, allowed)
    assert index.rows_scored == 2
    scores[scores > float("-inf")].sum().backward()
    assert queries.grad is not None and (queries.grad.abs().sum(dim=1) > 0).all()


def test_empty_and_tiny_banks(faiss: ModuleType) -> None:
    index = FaissIndex(8, 4, kind="flat")
    scores, ids = index.search(randn(2, 4), 3)
    assert (ids == -1).all() and (scores == float("-inf")).all()
    index.add(torch.tensor([6]), randn(1, 4))
    _, ids = index.search(randn(2, 4, seed=1), 3)
    assert ids.tolist() == [[6, -1, -1]] * 2
    assert FaissIndex(IVF_MIN_CAPACITY, 4).kind == "ivf" and FaissIndex(64, 4).kind == "flat"
    with pytest.raises(ValueError, match="train_size"):
        FaissIndex(64, 4, kind="ivf", nlist=32, train_size=16)


def test_store_with_faiss_saves_loads_and_moves(faiss: ModuleType, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An IVF-backed store: reads match the exact store's at full recall, the index comes back
    (retrained from the saved keys) after load, restore and a device move."""
    for module in (faiss_index, store_module):  # IVF from 4096 keys: four trainings stay cheap
        monkeypatch.setattr(module, "IVF_MIN_CAPACITY", 4096)
    n, dim = 4096, 16  # full: the default train_size is the capacity here
    store = EpisodicStore(dim, 2, capacity=n, index="faiss")
    exact = EpisodicStore(dim, 2, capacity=n)
    keys, values = randn(n, dim), randn(n, 2, seed=1)
    for s in (store, exact):
        s.write(keys, values, source_pos=torch.arange(n))
    assert isinstance(store.index, FaissIndex) and store.index.trained
    probe = torch.arange(0, n, 97)
    queries, limit = noisy(keys[probe], 0.99, seed=2), probe + 50

    def answers(s: EpisodicStore) -> torch.Tensor:
        return s.read(queries, 3, max_source_pos=limit, step=5).ids

    assert torch.equal(answers(store)[:, 0], answers(exact)[:, 0])
    loaded = EpisodicStore.load(store.save(tmp_path / "mem"))
    assert loaded.config() == store.config() and loaded.config()["index"] == "faiss"
    assert isinstance(loaded.index, FaissIndex) and loaded.index.trained
    assert len(loaded.index) == n
    assert torch.equal(answers(loaded)[:, 0], answers(store)[:, 0])
    holder = EpisodicStore(dim, 2, capacity=n, index="faiss")
    holder.restore(tmp_path / "mem")
    assert torch.equal(answers(holder)[:, 0], answers(store)[:, 0])
    moved = store.to(torch.device("cpu", 0))
    assert isinstance(moved.index, FaissIndex) and len(moved.index) == n
    assert torch.equal(answers(moved)[:, 0], answers(exact)[:, 0])


def test_auto_picks_faiss_only_for_large_cpu_stores(faiss: ModuleType) -> None:
    assert isinstance(EpisodicStore(4, 1, IVF_MIN_CAPACITY, index="auto").index, FaissIndex)
    small = EpisodicStore(4, 1, IVF_MIN_CAPACITY - 1, index="auto").index
    assert type(small) is ExactIndex
    assert isinstance(EpisodicStore(4, 1, 16, index="faiss").index, FaissIndex)
    with pytest.raises(ValueError, match="index"):
        EpisodicStore(4, 1, index="hnsw")  # type: ignore[arg-type]


def test_missing_faiss_is_a_one_line_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    with pytest.raises(ConfigError, match="faiss-cpu") as exc:
        import_faiss()
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError):
        EpisodicStore(4, 1, 16, index="faiss")
    assert type(EpisodicStore(4, 1, IVF_MIN_CAPACITY, index="auto").index) is ExactIndex
