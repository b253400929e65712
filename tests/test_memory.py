"""aura.memory: exact cosine search, recall, eviction order, decay, causal reads, persistence,
and a cognitive map that stays the exact kNN graph without ever scoring all pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from aura.errors import DataError
from aura.memory import CognitiveMap, EpisodicStore, ExactIndex, VectorIndex
from aura.memory.store import META_FILE, TENSORS_FILE


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def filled(n: int, capacity: int = 64, dk: int = 8, dv: int = 3, seed: int = 0,
           **kw: object) -> EpisodicStore:
    store = EpisodicStore(dk, dv, capacity, **kw)  # type: ignore[arg-type]
    store.write(randn(n, dk, seed=seed), randn(n, dv, seed=seed + 1))
    return store


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T


def assert_top_k(scores: torch.Tensor, ids: torch.Tensor, ref: torch.Tensor, k: int) -> None:
    """``scores``/``ids`` are a top-k of the (Q, n) reference similarities, ties allowed:
    the scores are the k largest, each id really has its score, and missing entries are -1."""
    kk = min(k, ref.shape[1])
    expected = ref.topk(kk, dim=1).values if kk else ref[:, :0]
    finite = expected > float("-inf")
    assert torch.equal(ids[:, :kk] >= 0, finite)
    torch.testing.assert_close(scores[:, :kk][finite].double(), expected[finite], atol=1e-5,
                               rtol=0)
    picked = ref.gather(1, ids[:, :kk].clamp(min=0))
    torch.testing.assert_close(picked[finite], expected[finite], atol=1e-5, rtol=0)
    assert (ids[:, kk:] == -1).all() and (scores[:, kk:] == float("-inf")).all()
    assert (scores[~(ids >= 0)] == float("-inf")).all()


# --- index -------------------------------------------------------------------------------------

@settings(max_examples=40)
@given(capacity=st.integers(1, 40), dim=st.integers(1, 9), n_queries=st.integers(1, 5),
       k=st.integers(1, 45), seed=st.integers(0, 2**16), data=st.data())
def test_exact_search_equals_brute_force(capacity: int, dim: int, n_queries: int, k: int,
                                         seed: int, data: st.DataObject) -> None:
    index: VectorIndex = ExactIndex(capacity, dim)
    keys = randn(capacity, dim, seed=seed)
    present = torch.tensor(data.draw(st.lists(st.booleans(), min_size=capacity,
                                              max_size=capacity)))
    index.add(torch.arange(capacity), keys)
    index.remove((~present).nonzero().squeeze(1))
    allowed = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n_queries * capacity,
                                              max_size=n_queries * capacity)))
    allowed = allowed.view(n_queries, capacity)
    queries = randn(n_queries, dim, seed=seed + 1)

    ref = cosine(queries, keys).masked_fill(~present, float("-inf"))
    scores, ids = index.search(queries, k)
    assert scores.shape == ids.shape == (n_queries, k)
    assert_top_k(scores, ids, ref, k)
    assert len(index) == int(present.sum())

    scores, ids = index.search(queries, k, allowed)
    assert_top_k(scores, ids, ref.masked_fill(~allowed, float("-inf")), k)


def test_search_counts_scored_rows_and_is_differentiable() -> None:
    index = ExactIndex(16, 4)
    index.add(torch.arange(10), randn(10, 4))
    queries = randn(3, 4, seed=1).requires_grad_()
    scores, _ = index.search(queries, 2)
    assert index.rows_scored == 3
    scores.sum().backward()
    assert queries.grad is not None and queries.grad.abs().sum() > 0


# --- store: recall, eviction, decay --------------------------------------------------------------

def test_top5_recall_of_noisy_queries_on_1000_items() -> None:
    store = EpisodicStore(64, 4, capacity=1024)
    keys = randn(1000, 64)
    ids = store.write(keys, randn(1000, 4, seed=1))
    noise = 0.1 * randn(1000, 64, seed=2)  # ~10% of the key norm
    assert (noise.norm(dim=1) / keys.norm(dim=1)).mean() < 0.15
    got = store.read(keys + noise, 5).ids
    recall = (got == ids[:, None]).any(dim=1).float().mean().item()
    assert recall >= 0.99  # the design target is > 95%
    assert (got[:, 0] == ids).float().mean().item() >= 0.95


def test_read_returns_the_stored_values_best_first() -> None:
    store = filled(20, dv=3)
    keys, values = store.keys[:20].clone(), store.values[:20].clone()
    out = store.read(keys[[4, 7]], 3)
    assert out.values.shape == (2, 3, 3) and out.mask.all()
    assert out.ids[:, 0].tolist() == [4, 7]
    torch.testing.assert_close(out.values[:, 0], values[[4, 7]])
    assert (out.scores[:, :-1] >= out.scores[:, 1:]).all()
    torch.testing.assert_close(out.scores[:, 0], torch.ones(2))


def test_fewer_memories_than_k_are_masked() -> None:
    store = filled(2)
    out = store.read(randn(1, 8, seed=5), 4)
    assert out.mask.tolist() == [[True, True, False, False]]
    assert out.ids[0, 2:].tolist() == [-1, -1]
    assert (out.values[0, 2:] == 0).all() and (out.scores[0, 2:] == float("-inf")).all()
    empty = EpisodicStore(8, 3, 4).read(randn(2, 8), 3)
    assert not empty.mask.any() and (empty.ids == -1).all()


@settings(max_examples=30)
@given(importance=st.lists(st.floats(0.0, 5.0), min_size=8, max_size=8),
       n_new=st.integers(1, 8), reads=st.lists(st.integers(0, 7), max_size=4),
       decays=st.integers(0, 3))
def test_eviction_removes_lowest_retention_first(importance: list[float], n_new: int,
                                                 reads: list[int], decays: int) -> None:
    store = EpisodicStore(8, 2, capacity=8, decay=0.1)
    old = store.write(randn(8, 8), randn(8, 2), torch.tensor(importance), step=1)
    store.decay_step(decays)
    for i in reads:
        store.read(store.keys[i:i + 1], 1, step=6)
    retention = store.retention(step=6)  # as the write below at step 6 will see it
    order = torch.argsort(store.ids)  # slot of each old id
    expected = old[torch.argsort(retention[order], stable=True)[:n_new]]

    new = store.write(randn(n_new, 8, seed=9), randn(n_new, 2), step=6)
    assert len(store) == 8
    kept = set(store.ids.tolist())
    assert set(new.tolist()) <= kept
    assert kept.isdisjoint(expected.tolist())
    survivors = set(old.tolist()) - set(expected.tolist())
    assert survivors <= kept
    lowest_kept = retention[order][torch.isin(old, torch.tensor(sorted(survivors)))]
    if lowest_kept.numel():
        assert retention[order][torch.isin(old, expected)].max() <= lowest_kept.min()


def test_uniform_memories_evict_fifo_and_reads_protect() -> None:
    store = EpisodicStore(4, 1, capacity=4)
    for i in range(6):
        store.write(randn(1, 4, seed=i), torch.zeros(1, 1))
    assert sorted(store.ids.tolist()) == [2, 3, 4, 5]
    store.read(store.keys[store.ids == 2], 1, step=10)  # id 2 read recently: now kept over 3
    store.write(randn(1, 4, seed=99), torch.zeros(1, 1), step=10)
    assert sorted(store.ids.tolist()) == [2, 4, 5, 6]
    assert store.next_id == 7


@given(decay=st.floats(0.0, 0.99), steps=st.lists(st.integers(0, 20), max_size=5))
def test_decay_multiplies_strength(decay: float, steps: list[int]) -> None:
    store = filled(5, decay=decay)
    for n in steps:
        store.decay_step(n)
    expected = torch.tensor((1 - decay) ** sum(steps), dtype=torch.float64)
    torch.testing.assert_close(store.strength[:5].double(), expected.expand(5), rtol=1e-5,
                               atol=1e-30)
    with pytest.raises(ValueError):
        store.decay_step(-1)


def test_read_refreshes_access_and_boosts_importance_once() -> None:
    store = filled(10, read_boost=0.25)
    queries = store.keys[[3, 3, 3]]  # the same memory returned to three queries
    out = store.read(queries, 2, step=7)
    hit = out.ids.unique()
    assert store.step == 7
    assert (store.last_access_step[hit] == 7).all()
    torch.testing.assert_close(store.importance[hit], torch.full((hit.numel(),), 1.25))
    others = ~torch.isin(store.ids, hit) & (store.ids >= 0)
    assert (store.importance[others] == 1.0).all() and (store.last_access_step[others] == 0).all()


def test_an_untouched_read_changes_nothing() -> None:
    store = filled(10, read_boost=0.25)
    before = {name: t.clone() for name, t in store._targets().items()}
    quiet = store.read(store.keys[[3, 5]], 2, step=7, touch=False)
    assert store.step == 0
    for name, t in store._targets().items():
        assert torch.equal(t, before[name]), name
    assert torch.equal(quiet.ids, store.read(store.keys[[3, 5]], 2, step=7).ids)
    assert not torch.equal(store.importance, before["importance"])  # a touching read does


def test_gradients_reach_queries_through_scores_only() -> None:
    store = filled(30)
    queries = randn(4, 8, seed=3).requires_grad_()
    out = store.read(queries, 5)
    assert not out.values.requires_grad and out.scores.requires_grad
    weights = torch.softmax(out.scores.masked_fill(~out.mask, float("-inf")), dim=-1)
    (weights[..., None] * out.values).sum().backward()
    assert queries.grad is not None and torch.isfinite(queries.grad).all()
    assert queries.grad.abs().sum() > 0
    assert not store.keys.requires_grad and not store.values.requires_grad


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_search_gradient_equals_the_dense_top_k(n: int, k: int, seed: int) -> None:
    """Winners picked without autograd (over the occupied prefix) and rescored give the scores,
    ids and gradient a top-k over the whole (Q, capacity) similarity would."""
    index = ExactIndex(48, 8)
    index.add(torch.arange(n), randn(n, 8, seed=seed))
    index.remove(torch.arange(n)[seed % 3::3])  # holes, sometimes the last slot: used shrinks
    limit = torch.arange(5) * 8  # per-query causal masks: the first query sees one key
    allowed = torch.arange(48)[None, :] <= limit[:, None]
    upstream = randn(5, k, seed=seed + 1)

    def run(dense: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        queries = randn(5, 8, seed=seed + 2).requires_grad_()
        if dense:
            sims = index.similarity(queries).masked_fill(~allowed, float("-inf"))
            scores, ids = sims.topk(min(k, 48), dim=-1)
            ids = ids.masked_fill(scores == float("-inf"), -1)
        else:
            scores, ids = index.search(queries, k, allowed)
        torch.where(scores > float("-inf"), scores, 0.0).mul(upstream).sum().backward()
        assert queries.grad is not None
        return scores, ids, queries.grad

    (scores, ids, grad), (ref_scores, ref_ids, ref_grad) = run(False), run(True)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(grad, ref_grad)


def test_weighted_read_by_slots_equals_the_gathered_values() -> None:
    """``Retrieval.slots`` into the store's table is what ``values`` gathers."""
    store = filled(20)
    got = store.read(randn(6, 8, seed=4), 30)  # more than stored: some entries missing
    assert not got.mask.all()
    weights = torch.rand(6, 30) * got.mask
    bag = F.embedding_bag(got.slots, store.values, per_sample_weights=weights, mode="sum")
    torch.testing.assert_close(bag, (weights[..., None] * got.values).sum(1))


@settings(max_examples=40)
@given(n=st.integers(1, 40), n_queries=st.integers(1, 6), k=st.integers(1, 12),
       per_query=st.booleans(), seed=st.integers(0, 2**16), data=st.data())
def test_max_source_pos_never_returns_the_future(n: int, n_queries: int, k: int,
                                                  per_query: bool, seed: int,
                                                  data: st.DataObject) -> None:
    store = EpisodicStore(6, 2, capacity=48)
    positions = torch.tensor(data.draw(st.lists(st.integers(0, 30), min_size=n, max_size=n)))
    ids = store.write(randn(n, 6, seed=seed), randn(n, 2), source_pos=positions)
    pos_of = dict(zip(ids.tolist(), positions.tolist(), strict=True))
    limits = data.draw(st.lists(st.integers(-1, 31), min_size=n_queries, max_size=n_queries))
    limit = torch.tensor(limits) if per_query else limits[0]
    queries = randn(n_queries, 6, seed=seed + 1)

    out = store.read(queries, k, max_source_pos=limit)
    row_limits = limits if per_query else [limits[0]] * n_queries
    for q, lim in enumerate(row_limits):
        got = [i for i in out.ids[q].tolist() if i >= 0]
        assert all(pos_of[i] <= lim for i in got)
        visible = positions <= lim
        assert len(got) == min(k, int(visible.sum()))  # nothing visible is dropped
        ref = cosine(queries[q:q + 1], randn(n, 6, seed=seed)).masked_fill(~visible,
                                                                            float("-inf"))
        slots = torch.tensor([ids.tolist().index(i) for i in got], dtype=torch.long)
        torch.testing.assert_close(out.scores[q, :len(got)].double(),
                                   ref[0].sort(descending=True).values[:len(got)], atol=1e-5,
                                   rtol=0)
        assert (positions[slots] <= lim).all()


def test_source_pos_defaults_to_the_write_step() -> None:
    store = EpisodicStore(4, 1, capacity=8)
    store.write(randn(2, 4), torch.zeros(2, 1), step=3)
    store.write(randn(2, 4, seed=1), torch.zeros(2, 1), step=9)
    out = store.read(randn(1, 4, seed=2), 4, max_source_pos=5)
    assert sorted(i for i in out.ids[0].tolist() if i >= 0) == [0, 1]


def test_bad_inputs_raise() -> None:
    store = EpisodicStore(4, 2, capacity=3)
    with pytest.raises(ValueError, match="keys"):
        store.write(randn(2, 5), randn(2, 2))
    with pytest.raises(ValueError, match="capacity"):
        store.write(randn(4, 4), randn(4, 2))
    with pytest.raises(ValueError, match="importance"):
        store.write(randn(2, 4), randn(2, 2), importance=torch.ones(3))
    with pytest.raises(ValueError, match="max_source_pos"):
        store.read(randn(2, 4), 1, max_source_pos=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="decay"):
        EpisodicStore(4, 2, decay=1.0)


def test_clear_forgets_but_never_reissues_ids() -> None:
    store = filled(5, graph_k=2)
    store.clear()
    assert len(store) == 0 and not store.read(randn(1, 8), 2).mask.any()
    assert store.graph is not None and (store.graph.edges == -1).all()
    assert store.write(randn(1, 8), randn(1, 3)).tolist() == [5]


# --- persistence ---------------------------------------------------------------------------------

def saved(tmp_path: Path) -> tuple[EpisodicStore, Path]:
    store = filled(32, capacity=32, graph_k=3, read_boost=0.1)
    store.write(randn(8, 8, seed=7), randn(8, 3), step=3)  # 8 evicted
    store.decay_step(2)
    store.read(randn(3, 8, seed=4), 2, step=11)
    return store, store.save(tmp_path / "mem")


def test_save_load_round_trip(tmp_path: Path) -> None:
    store, path = saved(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == [META_FILE, TENSORS_FILE]
    loaded = EpisodicStore.load(path)
    assert loaded.config() == store.config()
    assert (loaded.next_id, loaded.step, len(loaded)) == (store.next_id, store.step, len(store))
    for name, tensor in store._tensors().items():
        assert torch.equal(loaded._tensors()[name], tensor), name
    queries = randn(5, 8, seed=8)
    a, b = store.read(queries, 4, max_source_pos=0), loaded.read(queries, 4, max_source_pos=0)
    for x, y in zip((a.values, a.scores, a.ids, a.mask), (b.values, b.scores, b.ids, b.mask),
                    strict=True):
        assert torch.equal(x, y)
    assert loaded.write(randn(1, 8), randn(1, 3)).tolist() == [store.next_id]


def test_restore_refills_the_same_object_and_refuses_another_config(tmp_path: Path) -> None:
    store, path = saved(tmp_path)
    holder = filled(3, capacity=32, graph_k=3, read_boost=0.1, seed=9)
    same = holder
    holder.restore(path)
    assert holder is same and holder.next_id == store.next_id
    for name, tensor in store._tensors().items():
        assert torch.equal(holder._tensors()[name], tensor), name
    with pytest.raises(DataError, match="saved with"):
        filled(3, capacity=16, graph_k=3).restore(path)


def test_to_device_keeps_every_memory_searchable(tmp_path: Path) -> None:
    store, _ = saved(tmp_path)
    queries = randn(4, 8, seed=3)
    before = store.read(queries, 3, step=20)
    edges = store.graph.edges.clone()
    moved = store.to(torch.device("cpu", 0))  # a different device object: the index is rebuilt
    assert moved is store and moved.device == torch.device("cpu", 0)
    after = moved.read(queries, 3, step=20)
    assert torch.equal(before.ids, after.ids) and torch.equal(before.scores, after.scores)
    assert torch.equal(moved.graph.edges, edges)


def test_save_replaces_a_store_but_not_other_directories(tmp_path: Path) -> None:
    store, path = saved(tmp_path)
    store.write(randn(2, 8, seed=6), randn(2, 3))
    store.save(path)
    assert EpisodicStore.load(path).next_id == 42
    assert not list(tmp_path.glob(".mem.*"))  # no temporary directory left behind
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(DataError, match="not a saved memory store"):
        store.save(other)
    assert (other / "notes.txt").read_text() == "keep"


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "no-tensors", "no-json", "bad-json",
                                    "edited-config"])
def test_damaged_store_raises_one_line_data_error(tmp_path: Path, damage: str) -> None:
    _, path = saved(tmp_path)
    tensors, meta = path / TENSORS_FILE, path / META_FILE
    if damage == "flip":
        _flip_byte(tensors)
    elif damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:-100])
    elif damage == "no-tensors":
        tensors.unlink()
    elif damage == "no-json":
        meta.unlink()
    elif damage == "bad-json":
        meta.write_text(meta.read_text()[:20])
    else:  # the checksum holds but the config no longer matches the tensors
        info = json.loads(meta.read_text())
        info["config"]["capacity"] = 16
        meta.write_text(json.dumps(info))
    with pytest.raises(DataError) as exc:
        EpisodicStore.load(path)
    assert "\n" not in str(exc.value) and str(path) in str(exc.value)


# --- cognitive map -------------------------------------------------------------------------------

def assert_exact_knn(graph: CognitiveMap, store: EpisodicStore) -> None:
    """Every stored memory's edges are its k nearest other memories (ties allowed)."""
    live = (store.ids >= 0).nonzero().squeeze(1)
    ref = torch.full((store.capacity, store.capacity), float("-inf"), dtype=torch.float64)
    ref[live[:, None], live[None, :]] = cosine(store.keys[live], store.keys[live])
    ref.fill_diagonal_(float("-inf"))
    assert_top_k(graph.edge_scores[live], graph.edges[live], ref[live], graph.k)
    dead = store.ids < 0
    assert (graph.edges[dead] == -1).all()
    assert not dead[graph.edges.clamp(min=0)][graph.edges >= 0].any()  # no edge to a removed id


@settings(max_examples=25)
@given(batches=st.lists(st.integers(1, 12), min_size=1, max_size=6), k=st.integers(1, 5),
       capacity=st.integers(6, 30), seed=st.integers(0, 2**16))
def test_incremental_graph_equals_brute_force_knn(batches: list[int], k: int, capacity: int,
                                                  seed: int) -> None:
    store = EpisodicStore(5, 1, capacity=capacity, graph_k=k)
    assert store.graph is not None
    for i, b in enumerate(batches):
        b = min(b, capacity)
        importance = torch.rand(b, generator=torch.Generator().manual_seed(seed + i))
        store.write(randn(b, 5, seed=seed + i), torch.zeros(b, 1), importance)  # may evict
        assert_exact_knn(store.graph, store)


def test_graph_update_scores_one_row_per_new_key() -> None:
    store = EpisodicStore(16, 1, capacity=512, graph_k=6)
    store.write(randn(300, 16), torch.zeros(300, 1))
    store.index.rows_scored = 0
    store.write(randn(7, 16, seed=1), torch.zeros(7, 1))
    assert store.index.rows_scored == 7  # not 307 x 307: no all-pairs rebuild

    full = EpisodicStore(16, 1, capacity=64, graph_k=6)
    full.write(randn(64, 16, seed=2), torch.zeros(64, 1))
    assert full.graph is not None
    victims = torch.argsort(full.retention(), stable=True)[:5]  # FIFO here: slots 0-4
    pointing = torch.isin(full.graph.edges, victims).any(dim=1)
    pointing[victims] = False
    full.index.rows_scored = 0
    full.write(randn(5, 16, seed=3), torch.zeros(5, 1))
    # the 5 new keys, plus one re-search per surviving node that lost an edge to an evicted one
    assert full.index.rows_scored == 5 + int(pointing.sum()) < 64
    assert_exact_knn(full.graph, full)


def test_store_neighbours_speak_in_memory_ids() -> None:
    store = EpisodicStore(3, 1, capacity=4, graph_k=2)
    keys = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0], [0, 0, 1.0]])
    store.write(keys, torch.zeros(4, 1))
    assert store.neighbours(torch.tensor([0]), 1).tolist() == [[1]]
    store.write(torch.tensor([[1.0, 0.05, 0]]), torch.zeros(1, 1))  # evicts id 0, FIFO
    assert store.neighbours(torch.tensor([0, 1]), 1).tolist() == [[-1], [4]]
    assert store.neighbours(torch.tensor([4])).tolist() == [[1, 2]]
    with pytest.raises(ValueError):
        store.neighbours(torch.tensor([1]), 3)
    with pytest.raises(ValueError, match="graph_k"):
        EpisodicStore(3, 1).neighbours(torch.tensor([0]))
