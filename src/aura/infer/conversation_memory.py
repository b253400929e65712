"""Episodic memory of conversations for `aura chat` and `aura serve` (``--memory-dir DIR``).

Each finished exchange (the user's message and the reply) is written into the model's episodic
stores through its ``MemoryWriter``s, the protocol training and `aura learn` use:

- a model that writes its own memories (``writes_own_memory``: snn_rag with its own encoder) is
  run over the exchange with ``remember=True`` at service-wide positions that start after the
  newest entry of its bank, so its reads (which hide memories formed later than a token) see
  the whole conversation history and the trained bank;
- otherwise each store as wide as the model's hidden states (``hidden_size``) gets the mean
  final hidden state of every ``chunk`` tokens of the exchange, as `aura learn` writes them;
- a model without a memory (gpt, bdh) is said once and nothing is written.

The text of each exchange is kept beside the stores, by memory id, so what a reply retrieved
can be shown (the retrieval panel, `/memory`): a retrieval is the ``top_k`` entries whose keys
are nearest (cosine) to the encoding of the prompt, computed as a write would compute it.

Persistence: ``DIR/state`` holds every store and ``texts.json``; it is built whole under a
temporary name and swapped in (``atomic_dir``), on a timer and at shutdown, so a kill -9 loses
at most the exchanges since the last save and never leaves a torn state. A restart restores it
into the model's stores; without one, the stores start as the checkpoint left them.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aura.atomic import atomic_dir
from aura.data.prosody import token_features
from aura.data.sampler import compute_features
from aura.data.tokenizers import Tokenizer
from aura.errors import DataError
from aura.models.base import AuraModel

STATE_DIR, TEXTS_FILE, STORES_DIR = "state", "texts.json", "memory"


class ConversationMemory:
    """The episodic memory a conversation writes and reads; ``save`` persists it to ``root``."""

    def __init__(self, model: AuraModel, tokenizer: Tokenizer, root: Path | None,
                 chunk: int = 16, top_k: int = 4):
        self.model, self.tokenizer, self.root = model, tokenizer, root
        self.chunk, self.top_k = chunk, top_k
        self.features = token_features(model.token_features, tokenizer)
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.texts: dict[int, str] = {}  # memory id -> the exchange it came from
        self.last_retrieved: list[dict[str, Any]] = []
        self.position = 0  # tokens remembered, service-wide
        self.dirty = False
        self.lock = threading.Lock()  # save (timer thread) vs write (worker thread)
        self.stores = model.memory_stores()
        self.own_writer = model.writes_own_memory
        self.writable = [n for n, s in self.stores.items()
                         if self.own_writer or (s.dim_key, s.dim_value) == (model.hidden_size,) * 2]
        self.origin = self._bank_end() if self.own_writer else 0
        if root is not None and (root / STATE_DIR).is_dir():
            self._restore(root / STATE_DIR)

    @property
    def available(self) -> bool:
        return bool(self.writable)

    def describe(self) -> str:
        if not self.stores:
            return f"model {self.model.config.name!r} has no episodic memory"
        if not self.writable:
            return f"model {self.model.config.name!r}: no store a conversation can write"
        sizes = ", ".join(f"{n}: {len(self.stores[n])}/{self.stores[n].capacity}"
                          for n in self.writable)
        return f"memories ({sizes}), {len(self.texts)} from conversations"

    def _bank_end(self) -> int:
        ends = [int(s.source_pos[s.ids >= 0].max()) + 1 for s in self.stores.values() if len(s)]
        return max(ends, default=0)

    def _ids(self, text: str) -> torch.Tensor:
        ids = np.asarray(self.tokenizer.encode(text), dtype=np.int64)
        limit = self.model.max_context
        if limit is not None:
            ids = ids[-limit:]
        return torch.as_tensor(ids, device=self.device)[None]

    def _encode(self, ids: torch.Tensor, remember: bool) -> tuple[dict[str, torch.Tensor],
                                                                  torch.Tensor | None]:
        """Queued keys per own-written store (what a write would add), and the hidden states."""
        kw = compute_features(self.features, ids)
        if self.own_writer:
            kw |= {"remember": True,
                   "corpus_pos": torch.tensor([self.origin + self.position], device=self.device)}
        self.model.flush_memory()
        out = self.model(ids, **kw)
        queued = {n: self.model.writers[n].queued for n in self.writable} if self.own_writer else {}
        if not remember:
            for writer in self.model.writers.values():
                writer.discard()
        return {n: q for n, q in queued.items() if q is not None}, out.hidden

    def _chunk_means(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden[0].float()
        return torch.stack([c.mean(0) for c in h.split(self.chunk)])

    @torch.inference_mode()
    def remember(self, text: str) -> int:
        """Write one exchange; returns how many memories it formed."""
        if not self.available or not text.strip():
            return 0
        ids = self._ids(text)
        with self.lock:
            before = {n: self.stores[n].next_id for n in self.writable}
            _, hidden = self._encode(ids, remember=True)
            if self.own_writer:
                self.model.flush_memory()
            elif hidden is not None:
                keys = self._chunk_means(hidden)
                pos = self.origin + self.position + torch.arange(keys.size(0)) * self.chunk
                for n in self.writable:
                    store = self.stores[n]
                    store.decay_step()
                    store.write(keys, keys, step=store.step + 1, source_pos=pos)
            self.position += ids.size(1)
            formed = 0
            for n in self.writable:
                for i in range(before[n], self.stores[n].next_id):
                    self.texts[i] = text
                formed += self.stores[n].next_id - before[n]
            self.dirty = True
        return formed

    @torch.inference_mode()
    def recall(self, text: str) -> list[dict[str, Any]]:
        """The memories nearest the encoding of ``text`` (each store's best ``top_k``), with the
        text they came from where a conversation wrote them; also kept as ``last_retrieved``."""
        found: list[dict[str, Any]] = []
        if self.available and text.strip():
            queued, hidden = self._encode(self._ids(text), remember=False)
            for n in self.writable:
                store = self.stores[n]
                if self.own_writer:
                    if n not in queued:
                        continue
                    query = queued[n].reshape(-1, store.dim_key).float().mean(0, keepdim=True)
                elif hidden is not None:
                    query = hidden[0].float().mean(0, keepdim=True)
                else:
                    continue
                if len(store) == 0:
                    continue
                hit = store.read(query, min(self.top_k, store.capacity), touch=False)
                for score, mid, ok in zip(hit.scores[0].tolist(), hit.ids[0].tolist(),
                                          hit.mask[0].tolist(), strict=True):
                    if ok:
                        found.append({"store": n, "id": mid, "score": round(score, 4),
                                      "text": self.texts.get(mid)})
        self.last_retrieved = found
        return found

    def save(self) -> bool:
        """Persist stores and texts atomically into ``root/state``; False when nothing changed."""
        if self.root is None:
            return False
        with self.lock:
            if not self.dirty:
                return False
            with atomic_dir(self.root / STATE_DIR) as tmp:
                for name, writer in self.model.writers.items():
                    writer.save(tmp / STORES_DIR / name)
                doc = {"position": self.position, "origin": self.origin,
                       "texts": {str(k): v for k, v in self.texts.items()}}
                (tmp / TEXTS_FILE).write_text(json.dumps(doc), encoding="utf-8")
            self.dirty = False
        return True

    def _restore(self, state: Path) -> None:
        try:
            doc = json.loads((state / TEXTS_FILE).read_text(encoding="utf-8"))
            texts = {int(k): str(v) for k, v in doc["texts"].items()}
            position, origin = int(doc["position"]), int(doc["origin"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise DataError(f"conversation memory {state}: missing or corrupt "
                            f"{TEXTS_FILE}") from None
        for name, writer in self.model.writers.items():
            saved = state / STORES_DIR / name
            if not saved.is_dir():
                raise DataError(f"conversation memory {state}: no store {name!r} (saved by "
                                "another model?)")
            writer.restore(saved)
        self.stores = self.model.memory_stores()
        self.texts, self.position, self.origin = texts, position, origin

