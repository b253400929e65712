"""The episodic store: fixed-capacity key/value memories with decay, eviction and causal reads.

Every memory carries an importance (set by the writer, nudged up by each read that returns it),
a strength that ``decay_step`` fades, the steps it was created and last read at, and a
``source_pos``: where it was formed (a token position, a document index, a time). Reads can hide
memories formed after a limit, per query, which is how a language model keeps retrieval causal.
A memory may also keep ``source_tokens``: the ids of the (up to ``SNIPPET_TOKENS``) tokens it was
formed from, ending at its own token, so a reader can show *what* was recalled
(``aura generate --show-memory``) with the tokenizer, without the corpus at hand.

When the store is full, writing evicts the memories with the lowest retention

    retention = strength * (importance + 1 / (1 + step - last_access_step))

(``step`` is the newest step seen): a faded memory goes first, importance is what lasts, and a
recent read adds up to 1. Ties go oldest first, so with uniform importance and no reads the store
is a FIFO.

How strength fades is ``decay_mode``. "fixed" (the default): every memory loses the same
fraction ``decay`` per step. "adaptive" (seed 002's adaptive memory decay; forgetting as in the
spacing effect): each memory has a ``stability``, 1 + its importance when written, and per step
keeps ``(1 - decay) ** (1 / stability)`` of its strength; every read that returns it (a training
read: ``touch``) restores its strength to 1 and adds 1 to its stability. So, with the same
eviction rule, a memory that was novel when formed fades more slowly than a routine one, one
that keeps being recalled fades ever more slowly, and one never recalled fades at its written
rate and goes first.

Ids count up from 0 and are never reused, so an id held across evictions never names a
different memory.

Persistence is ``DIR/memory.safetensors`` (every tensor) and ``DIR/memory.json`` (config,
counters, the tensor file's sha256), built under a temporary name and renamed into place; loading
verifies the checksum and never unpickles.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from aura.atomic import atomic_dir
from aura.data.shards import file_sha256
from aura.errors import DataError
from aura.memory.cognitive_map import CognitiveMap
from aura.memory.faiss_index import IVF_MIN_CAPACITY, FaissIndex, faiss_available
from aura.memory.index import ExactIndex

FORMAT = 1
TENSORS_FILE, META_FILE = "memory.safetensors", "memory.json"
SNIPPET_TOKENS = 16  # token ids kept per memory, ending at the one it was formed at; -1 pads
_SLOT_TENSORS = ("ids", "keys", "values", "importance", "strength", "created_step",
                 "last_access_step", "source_pos", "source_tokens", "stability")
# Slot tensors a store saved before they existed may lack: loaded as their fill value.
_OPTIONAL_TENSORS = {"source_tokens": -1, "stability": 1}
DecayMode = Literal["fixed", "adaptive"]
DECAY_MODES: tuple[str, ...] = ("fixed", "adaptive")


@dataclass(frozen=True)
class Retrieval:
    """The k best memories per query, best first; ``mask`` is False where there were fewer.

    ``scores`` (cosine) carry gradient to the queries, so weighting ``values`` by a softmax of
    them trains whatever produced the queries. ``values`` and ``ids`` are constants: the store
    holds detached tensors. Missing entries have value 0, score -inf and id -1. ``slots`` are
    the rows of the store's ``values`` (0 where missing), for a reader that sums the values
    with weights (``F.embedding_bag``) instead of gathering (Q, k, dim_value) first.
    """

    scores: torch.Tensor  # (Q, k)
    ids: torch.Tensor  # (Q, k)
    mask: torch.Tensor  # (Q, k) bool
    slots: torch.Tensor  # (Q, k)
    table: torch.Tensor  # (capacity, dim_value), the store's values

    @cached_property
    def values(self) -> torch.Tensor:
        """(Q, k, dim_value), gathered on first use: before the store is written again."""
        return self.table[self.slots].masked_fill(~self.mask[..., None], 0.0)


class EpisodicStore:
    """``capacity`` memories of (key, value) in preallocated slots, searched by cosine on keys.

    ``read_boost`` is added to the importance of each memory a read returns (once per read),
    so memories that keep being useful outlive equally important ones that are not.
    With ``graph_k > 0`` the store keeps a ``CognitiveMap`` over its keys, updated on every write.
    ``index`` picks the search: "exact" (torch, ``ExactIndex``), "faiss" (``FaissIndex``: exact
    below ``IVF_MIN_CAPACITY``, IVF above), or "auto": FAISS for CPU stores of at least
    ``IVF_MIN_CAPACITY`` when faiss is installed, where an exact scan gets slow.
    ``decay_mode`` is how strength fades (module docstring).
    ``device`` defaults to torch's default device, so a model built under
    ``with torch.device("meta")`` (to count its memory before allocating it) allocates no store.
    """

    def __init__(self, dim_key: int, dim_value: int, capacity: int = 4096, decay: float = 0.03,
                 device: torch.device | str | None = None, *, read_boost: float = 0.05,
                 graph_k: int = 0, index: Literal["exact", "faiss", "auto"] = "exact",
                 decay_mode: DecayMode = "fixed"):
        if dim_value < 1:
            raise ValueError(f"dim_value must be positive, got {dim_value}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if graph_k < 0:
            raise ValueError(f"graph_k must be >= 0, got {graph_k}")
        if index not in ("exact", "faiss", "auto"):
            raise ValueError(f"index must be 'exact', 'faiss' or 'auto', got {index!r}")
        if decay_mode not in DECAY_MODES:
            raise ValueError(f"decay_mode must be 'fixed' or 'adaptive', got {decay_mode!r}")
        self.decay_mode = decay_mode
        self.dim_key, self.dim_value, self.capacity = dim_key, dim_value, capacity
        self.decay, self.read_boost, self.graph_k = decay, read_boost, graph_k
        self.device = torch.get_default_device() if device is None else torch.device(device)
        self.index_kind = index
        self.index = self._new_index(self.device)
        self.graph = CognitiveMap(self.index, graph_k) if graph_k > 0 else None

        def slots(*shape: int, dtype: torch.dtype = torch.float32, fill: float = 0) -> torch.Tensor:
            return torch.full((capacity, *shape), fill, dtype=dtype, device=self.device)

        self.ids = slots(dtype=torch.long, fill=-1)  # -1: empty slot
        self.keys = slots(dim_key)
        self.values = slots(dim_value)
        self.importance = slots()
        self.strength = slots()
        self.created_step = slots(dtype=torch.long)
        self.last_access_step = slots(dtype=torch.long)
        self.source_pos = slots(dtype=torch.long)
        self.source_tokens = slots(SNIPPET_TOKENS, dtype=torch.int32, fill=-1)
        self.stability = slots(fill=1.0)  # "adaptive" decay only; see the module docstring
        self.next_id = 0
        self.step = 0

    def nbytes(self) -> int:
        """Bytes of the tensors the store holds (memories, index, map): what it adds to a
        model's memory besides the weights."""
        tensors = [*self._targets().values(), self.index.keys, self.index.valid]
        return sum(t.nbytes for t in tensors)

    def _new_index(self, device: torch.device) -> ExactIndex:
        """An empty index of the kind ``index`` names (see the class docstring)."""
        kind = self.index_kind
        if kind == "auto":
            big = self.capacity >= IVF_MIN_CAPACITY and device.type == "cpu"
            kind = "faiss" if big and faiss_available() else "exact"
        if kind == "faiss":
            return FaissIndex(self.capacity, self.dim_key, device)
        return ExactIndex(self.capacity, self.dim_key, device)

    def __len__(self) -> int:
        return int((self.ids >= 0).sum())

    def clear(self) -> None:
        """Forget every memory; ids keep counting so old ones are never reissued."""
        self.ids.fill_(-1)
        self.index.remove(torch.arange(self.capacity, device=self.device))
        if self.graph is not None:
            self.graph.clear()

    def retention(self, step: int | None = None) -> torch.Tensor:
        """Each slot's eviction score (see the module docstring) as of ``step`` (default: the
        newest step seen), -inf for empty slots."""
        now = self.step if step is None else max(self.step, step)
        recency = 1.0 / (1.0 + (now - self.last_access_step).clamp(min=0))
        score = self.strength * (self.importance + recency)
        return score.masked_fill(self.ids < 0, float("-inf"))

    @torch.no_grad()
    def write(self, keys: torch.Tensor, values: torch.Tensor,
              importance: torch.Tensor | None = None, step: int = 0,
              source_pos: torch.Tensor | None = None,
              source_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Store N memories and return their ids (N,), evicting the lowest retention if full.

        ``importance`` defaults to 1 and ``source_pos`` to ``step``; ``source_tokens`` (N, W)
        are the token ids each was formed from (-1 pads; the last ``SNIPPET_TOKENS`` kept),
        none by default.
        """
        n = keys.shape[0]
        if keys.shape != (n, self.dim_key) or values.shape != (n, self.dim_value):
            raise ValueError(f"expected keys (N, {self.dim_key}) and values (N, "
                             f"{self.dim_value}), got {tuple(keys.shape)}, {tuple(values.shape)}")
        if n > self.capacity:
            raise ValueError(f"cannot write {n} memories into a store of capacity {self.capacity}")
        for name, t in (("importance", importance), ("source_pos", source_pos)):
            if t is not None and t.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
        if source_tokens is not None and (source_tokens.ndim != 2 or source_tokens.size(0) != n):
            raise ValueError(f"source_tokens must have shape ({n}, W), got "
                             f"{tuple(source_tokens.shape)}")
        self.step = max(self.step, step)
        slots = self._claim(n)
        ids = torch.arange(self.next_id, self.next_id + n, device=self.device)
        self.next_id += n
        self.ids[slots] = ids
        self.keys[slots] = keys.to(self.keys)
        self.values[slots] = values.to(self.values)
        self.importance[slots] = 1.0 if importance is None else importance.to(self.importance)
        self.strength[slots] = 1.0
        self.stability[slots] = 1.0 + self.importance[slots].clamp(min=0.0)
        self.created_step[slots] = step
        self.last_access_step[slots] = step
        self.source_pos[slots] = step if source_pos is None else source_pos.to(self.source_pos)
        self.source_tokens[slots] = -1
        if source_tokens is not None:
            tail = source_tokens[:, -SNIPPET_TOKENS:].to(self.source_tokens)
            self.source_tokens[slots, SNIPPET_TOKENS - tail.size(1):] = tail
        self.index.add(slots, keys)
        if self.graph is not None:
            self.graph.update(slots)
        return ids

    @torch.no_grad()
    def rekey(self, project: Callable[[torch.Tensor], torch.Tensor]) -> int:
        """Key every memory again as ``project(value)``, for stores whose keys are a projection
        of their values (the hippocampus's) after that projection changed (``aura memory
        fit-keys``); the cognitive map is rebuilt over the new keys. Returns how many."""
        live = (self.ids >= 0).nonzero().squeeze(1)
        if live.numel() == 0:
            return 0
        keys = project(self.values[live]).float()
        if keys.shape != (live.numel(), self.dim_key):
            raise ValueError(f"project must map values to (N, {self.dim_key}) keys, got "
                             f"{tuple(keys.shape)}")
        self.keys[live] = keys
        self.index.add(live, keys)  # replaces each slot's key (FAISS: removed, then added)
        if self.graph is not None:
            self.graph.clear()
            self.graph.update(live)
        return int(live.numel())

    def _claim(self, n: int) -> torch.Tensor:
        """``n`` slots: empty ones first, then the lowest-retention memories, evicted."""
        free = (self.ids < 0).nonzero().squeeze(1)
        if free.numel() >= n:
            return free[:n]
        live = (self.ids >= 0).nonzero().squeeze(1)
        oldest_first = live[torch.argsort(self.ids[live])]
        order = torch.argsort(self.retention()[oldest_first], stable=True)
        victims = oldest_first[order[:n - free.numel()]]
        self.ids[victims] = -1
        self.index.remove(victims)
        if self.graph is not None:
            self.graph.remove(victims)
        return torch.cat([free, victims])

    def decay_step(self, n: int = 1) -> None:
        """n steps of forgetting at once: every memory's strength times ``(1 - decay) ** n``, or
        with "adaptive" decay ``(1 - decay) ** (n / stability)``."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if self.decay_mode == "adaptive":
            self.strength.mul_(torch.pow(1.0 - self.decay, n / self.stability))
        else:
            self.strength.mul_((1.0 - self.decay) ** n)

    def read(self, queries: torch.Tensor, k: int, *,
             max_source_pos: torch.Tensor | int | None = None, step: int | None = None,
             touch: bool = True, min_source_pos: torch.Tensor | None = None) -> Retrieval:
        """The ``k`` memories most cosine-similar to each query (Q, dim_key).

        ``max_source_pos`` (an int, or a (Q,) tensor for one limit per query) hides memories with
        a larger ``source_pos``, ``min_source_pos`` ((Q,)) those with a smaller one (a document
        read as a stream sees only memories of itself: ``train.memory_stream``). Each memory
        returned gets ``last_access_step = step`` (default: the newest step seen) and
        ``read_boost`` more importance (with "adaptive" decay also its strength restored and
        its stability raised), unless ``touch`` is False: a pure lookup (evaluation), which
        leaves what eviction will do unchanged.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if queries.ndim != 2 or queries.shape[1] != self.dim_key:
            raise ValueError(f"expected queries (Q, {self.dim_key}), got {tuple(queries.shape)}")
        allowed = None
        if max_source_pos is not None:
            limit = torch.as_tensor(max_source_pos, device=self.device)
            if limit.numel() != 1 and limit.shape != (queries.shape[0],):
                raise ValueError(f"max_source_pos must be an int or shape ({queries.shape[0]},), "
                                 f"got {tuple(limit.shape)}")
            allowed = self.source_pos[None, :] <= limit.reshape(-1, 1)
        if min_source_pos is not None:
            floor = min_source_pos.to(self.device).reshape(-1, 1)
            if floor.size(0) != queries.shape[0]:
                raise ValueError(f"min_source_pos must have shape ({queries.shape[0]},), got "
                                 f"{tuple(min_source_pos.shape)}")
            above = self.source_pos[None, :] >= floor
            allowed = above if allowed is None else allowed & above
        scores, slots = self.index.search(queries, k, allowed)
        mask = slots >= 0
        safe = slots.clamp(min=0)
        ids = self.ids[safe].masked_fill(~mask, -1)
        got = Retrieval(scores, ids, mask, safe, self.values)
        if not touch:
            return got
        now = self.step if step is None else step
        self.step = max(self.step, now)
        hit = safe[mask].unique()
        self.last_access_step[hit] = now
        self.importance[hit] += self.read_boost
        if self.decay_mode == "adaptive":
            self.strength[hit] = 1.0
            self.stability[hit] += 1.0
        return got

    def locate(self, ids: torch.Tensor, max_source_pos: torch.Tensor | None = None,
               min_source_pos: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots (...) of memory ``ids`` of any shape, and a found mask (...): False where an id
        is -1, no longer stored, or (given ``max_source_pos`` / ``min_source_pos`` of ids'
        shape) formed after / before that limit; the slot is then 0."""
        ids = ids.to(self.device)
        sorted_ids, order = torch.sort(self.ids)
        pos = torch.searchsorted(sorted_ids, ids.reshape(-1)).clamp(max=self.capacity - 1)
        found = ((sorted_ids[pos] == ids.reshape(-1)) & (ids.reshape(-1) >= 0))
        slots = order[pos]
        if max_source_pos is not None:
            found &= self.source_pos[slots] <= max_source_pos.to(self.device).reshape(-1)
        if min_source_pos is not None:
            found &= self.source_pos[slots] >= min_source_pos.to(self.device).reshape(-1)
        return slots.masked_fill(~found, 0).reshape(ids.shape), found.reshape(ids.shape)

    def lookup(self, ids: torch.Tensor, max_source_pos: torch.Tensor | None = None,
               min_source_pos: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unit keys (..., dim_key), values (..., dim_value) and a found mask (...) of memory
        ``ids`` of any shape; zeros where not found (see ``locate``)."""
        slots, found = self.locate(ids, max_source_pos, min_source_pos)
        keys = F.normalize(self.keys[slots], dim=-1).masked_fill(~found[..., None], 0.0)
        values = self.values[slots].masked_fill(~found[..., None], 0.0)
        return keys, values, found

    def sources(self, ids: list[int]) -> list[tuple[int, list[int]] | None]:
        """Where each memory of ``ids`` was formed: its ``source_pos`` and the token ids it
        kept (possibly none); None for an id no longer stored."""
        out: list[tuple[int, list[int]] | None] = []
        for i in ids:
            slot = (self.ids == i).nonzero()
            if i < 0 or slot.numel() == 0:
                out.append(None)
                continue
            s = int(slot[0, 0])
            tokens = self.source_tokens[s]
            out.append((int(self.source_pos[s]), tokens[tokens >= 0].tolist()))
        return out

    def neighbours(self, ids: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Ids of each memory's ``k`` nearest memories from the cognitive map, -1 where none
        (including for ids no longer stored)."""
        if self.graph is None:
            raise ValueError("this store keeps no cognitive map (graph_k=0)")
        ids = ids.to(self.device)
        sorted_ids, order = torch.sort(self.ids)
        pos = torch.searchsorted(sorted_ids, ids).clamp(max=self.capacity - 1)
        found = (sorted_ids[pos] == ids) & (ids >= 0)
        nbrs = self.graph.neighbours(order[pos], k).masked_fill(~found[:, None], -1)
        return self.ids[nbrs.clamp(min=0)].masked_fill(nbrs < 0, -1)

    # --- persistence ---------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return {"dim_key": self.dim_key, "dim_value": self.dim_value, "capacity": self.capacity,
                "decay": self.decay, "read_boost": self.read_boost, "graph_k": self.graph_k,
                "index": self.index_kind, "decay_mode": self.decay_mode}

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().cpu().contiguous() for name, t in self._targets().items()}

    def save(self, path: Path) -> Path:
        """Write the store into directory ``path`` atomically, replacing a store saved there."""
        path = Path(path)
        ours = (path / META_FILE).is_file() or (path.is_dir() and not any(path.iterdir()))
        if path.exists() and not ours:
            raise DataError(f"{path} exists and is not a saved memory store; not replacing it")
        with atomic_dir(path) as tmp:
            save_file(self._tensors(), str(tmp / TENSORS_FILE))
            meta = {"format": FORMAT, "config": self.config(), "next_id": self.next_id,
                    "step": self.step, "size": len(self),
                    "sha256": file_sha256(tmp / TENSORS_FILE)}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu") -> EpisodicStore:
        """A store saved by ``save``; DataError if a file is missing, truncated or corrupt."""
        meta = _read_meta(Path(path))
        store = cls(**meta["config"], device=device)
        store._fill(Path(path), meta)
        return store

    def restore(self, path: Path) -> None:
        """Replace this store's memories with those saved at ``path`` (same configuration), in
        place, so modules holding this store keep holding it."""
        meta = _read_meta(Path(path))
        if meta["config"] != self.config():
            raise DataError(f"memory store {path}: saved with {meta['config']}, "
                            f"expected {self.config()}")
        self.clear()
        self._fill(Path(path), meta)

    def _fill(self, path: Path, meta: dict[str, Any]) -> None:
        tensor_file = path / TENSORS_FILE
        if not tensor_file.is_file() or file_sha256(tensor_file) != meta["sha256"]:
            raise DataError(f"memory store {path}: {TENSORS_FILE} is missing, truncated or corrupt")
        try:
            tensors = load_file(str(tensor_file), device=str(self.device))
            for name, fill in _OPTIONAL_TENSORS.items():
                if name not in tensors:
                    tensors[name] = torch.full_like(getattr(self, name), fill)
            for name, target in self._targets().items():
                if tensors[name].shape != target.shape:
                    raise ValueError(name)
                target.copy_(tensors[name])
        except (SafetensorError, KeyError, TypeError, ValueError, RuntimeError):
            raise DataError(f"memory store {path}: {TENSORS_FILE} does not match "
                            f"{META_FILE}") from None
        self.next_id, self.step = meta["next_id"], meta["step"]
        live = (self.ids >= 0).nonzero().squeeze(1)
        self.index.add(live, self.keys[live])

    def _targets(self) -> dict[str, torch.Tensor]:
        """Every tensor that persists, by its name in the saved file."""
        out = {name: getattr(self, name) for name in _SLOT_TENSORS}
        if self.graph is not None:
            out["graph.edges"] = self.graph.edges
            out["graph.edge_scores"] = self.graph.edge_scores
        return out

    def to(self, device: torch.device | str) -> EpisodicStore:
        """Move every memory (and the index and map over them) to ``device``; returns self."""
        device = torch.device(device)
        if device == self.device:
            return self
        saved = {name: t.to(device) for name, t in self._targets().items()}
        self.device = device
        self.index = self._new_index(device)
        self.graph = CognitiveMap(self.index, self.graph_k) if self.graph_k > 0 else None
        for name in _SLOT_TENSORS:
            setattr(self, name, saved[name])
        if self.graph is not None:
            self.graph.edges.copy_(saved["graph.edges"])
            self.graph.edge_scores.copy_(saved["graph.edge_scores"])
        live = (self.ids >= 0).nonzero().squeeze(1)
        self.index.add(live, self.keys[live])
        return self


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        meta = {"format": meta.get("format"), "config": {"index": "exact", "decay_mode": "fixed",
                                                     **meta["config"]},
                "sha256": meta["sha256"], "next_id": int(meta["next_id"]),
                "step": int(meta["step"])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise DataError(f"memory store {path}: missing or corrupt {META_FILE}") from None
    if meta["format"] != FORMAT:
        raise DataError(f"memory store {path}: unknown format {meta['format']!r}")
    return meta
