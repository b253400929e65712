"""Which memories a generation read: ``aura generate --show-memory`` and chat's ``/memory``.

While a generation runs, every memory layer of the model (the hippocampus of ``hippocampal`` and
``natural_brain``, ``snn_rag``'s cross-attention banks) is watched through a forward pre-hook;
for the newest token of each forward, the reader of ``aura.models.inspect`` recomputes with the
layer's own weights which memories it read (top-k by cosine, before the cognitive map's
neighbours), their similarity and the token's gate, as a pure lookup that changes nothing in the
store. Forward i produces the logits token i is sampled from, so its reads belong to token i.

Generated tokens are grouped into spans of ``span`` tokens; per span each memory read is listed
once (its best similarity, the mean gate of the tokens that read it, how many did), best first,
with where it was formed (``source_pos``) and its source text, decoded from the token ids the
store keeps with it (``EpisodicStore.source_tokens``; empty for memories written without them).

With a kNN-LM read-out (``aura generate --knn``) its datastore is watched too (``KNNLM.observer``,
also a pure lookup): per span, the neighbours the sampled tokens' distributions were mixed from,
as store ``knn``, each with its best cosine similarity, its mean weight among the neighbours
(the softmax of ``knn_lm``), the token it votes for (``next``), its source context and the
read-out's lambda. Those reads follow the forward whose logits they mix, so they share its step.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from aura.data.tokenizers import Tokenizer
from aura.memory.knn_lm import KNNLM
from aura.memory.store import EpisodicStore, Retrieval
from aura.models.base import AuraModel
from aura.models.inspect import cross_attention_reads, hippocampal_reads
from aura.nn.hippocampus import HippocampalMemory
from aura.nn.memory_attention import MemoryCrossAttention

SNIPPET_CHARS = 60  # a source text longer than this is shown by its end
KNN_STORE = "knn"  # the name a kNN datastore's reads are listed under


@dataclass
class _Read:
    """One memory as read over a span: best similarity, the gates of the tokens reading it."""

    score: float
    gates: list[float] = field(default_factory=list)


class MemoryTrace:
    """Records a model's memory reads during generation (``recording``) and reports them by
    span (``spans``); ``active`` is False for a model without memory layers and no ``knn``
    read-out to watch."""

    def __init__(self, model: AuraModel, tokenizer: Tokenizer, span: int = 16, top: int = 3,
                 knn: KNNLM | None = None):
        if span < 1 or top < 1:
            raise ValueError(f"span and top must be >= 1, got {span}, {top}")
        self.model, self.tokenizer, self.span, self.top = model, tokenizer, span, top
        self.knn = knn
        # each memory layer, by the name of its store (the model's writer it reads)
        self.parts: dict[str, nn.Module] = {
            name: m for m in model.modules() if isinstance(m, HippocampalMemory |
                                                           MemoryCrossAttention)
            for name, writer in model.writers.items() if m.writer is writer}
        self.steps: list[dict[str, dict[str, torch.Tensor]]] = []  # one per forward
        self.tokens: list[int] = []
        self._pending: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def active(self) -> bool:
        return bool(self.parts) or self.knn is not None

    def push(self, token: torch.Tensor) -> None:
        """Take one step's (B,) generated ids (the first row is traced)."""
        self.tokens.append(int(token.reshape(-1)[0]))

    @contextlib.contextmanager
    def recording(self) -> Iterator[MemoryTrace]:
        """Within the block, every forward of the model adds one step of reads."""
        self.steps, self.tokens, self._pending = [], [], {}
        handles = [m.register_forward_pre_hook(self._part_hook(name))
                   for name, m in self.parts.items()]
        handles.append(self.model.register_forward_hook(self._model_hook))
        if self.knn is not None:
            self.knn.observer = self._knn_hook
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            if self.knn is not None:
                self.knn.observer = None

    def _part_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            h = args[0][:1, -1:]
            with torch.no_grad():
                if isinstance(module, HippocampalMemory):
                    access = args[1]
                    pos = None if access.positions is None else access.positions[:1, -1:]
                    reads = hippocampal_reads(module, h, dataclasses.replace(access, positions=pos))
                else:
                    pos = args[1] if len(args) > 1 else None
                    reads = cross_attention_reads(module, h, None if pos is None
                                                  else pos[:1, -1:])
            if reads:
                self._pending[name] = {k: v[0, -1].detach().float().cpu()
                                       for k, v in reads.items()}
        return hook

    def _model_hook(self, _module: nn.Module, _args: Any, _out: Any) -> None:
        self.steps.append(self._pending)
        self._pending = {}

    def _knn_hook(self, got: Retrieval, weights: torch.Tensor) -> None:
        """The datastore's neighbours of the newest forward's last position (first row)."""
        if not self.steps:
            return
        keep = got.mask[0]
        self.steps[-1][KNN_STORE] = {
            "ids": got.ids[0][keep].detach().cpu(),
            "scores": got.scores[0][keep].detach().float().cpu(),
            "weights": weights[0][keep].detach().float().cpu()}

    def _store(self, name: str) -> EpisodicStore:
        part = self.parts[name]
        assert isinstance(part, HippocampalMemory | MemoryCrossAttention)
        return part.writer.store

    def spans(self) -> list[dict[str, Any]]:
        """Per span of generated tokens: its token range, its text and the memories read,
        best similarity first (at most ``top`` per store)."""
        n = len(self.tokens)
        out = []
        for start in range(0, n, self.span):
            end = min(n, start + self.span)
            by_memory: dict[tuple[str, int], _Read] = {}
            for step in self.steps[start:end]:
                for name, r in step.items():
                    gates = (r["weights"].tolist() if name == KNN_STORE
                             else [float(r["gate"])] * r["ids"].numel())
                    for mid, score, gate in zip(r["ids"].long().tolist(), r["scores"].tolist(),
                                                gates, strict=True):
                        if mid < 0:
                            continue
                        read = by_memory.setdefault((name, mid), _Read(score))
                        read.score = max(read.score, score)
                        read.gates.append(gate)
            reads = []
            for name in self.parts:
                mine = sorted(((mid, r) for (n_, mid), r in by_memory.items() if n_ == name),
                              key=lambda item: -item[1].score)[:self.top]
                sources = self._store(name).sources([mid for mid, _ in mine])
                for (mid, r), src in zip(mine, sources, strict=True):
                    reads.append({
                        "store": name, "id": mid, "similarity": round(r.score, 4),
                        "gate": round(sum(r.gates) / len(r.gates), 4), "tokens": len(r.gates),
                        "source_pos": None if src is None else src[0],
                        "source": None if src is None or not src[1]
                        else self.tokenizer.decode(src[1])})
            if self.knn is not None:
                reads.extend(self._knn_reads(by_memory))
            out.append({"start": start, "end": end,
                        "text": self.tokenizer.decode(self.tokens[start:end]), "reads": reads})
        return out


    def _knn_reads(self, by_memory: dict[tuple[str, int], _Read]) -> list[dict[str, Any]]:
        """The span's best kNN neighbours: as the model's memories, with ``weight`` (their
        mean share of the neighbours' distribution) for ``gate``, the token each votes for
        and the read-out's lambda."""
        assert self.knn is not None
        store = self.knn.store
        mine = sorted(((mid, r) for (n_, mid), r in by_memory.items() if n_ == KNN_STORE),
                      key=lambda item: -item[1].score)[:self.top]
        ids = [mid for mid, _ in mine]
        sources = store.sources(ids)
        _, values, found = store.lookup(torch.tensor(ids, dtype=torch.long))
        out = []
        for i, ((mid, r), src) in enumerate(zip(mine, sources, strict=True)):
            nxt = (self.tokenizer.decode([int(values[i, 0].round())]) if bool(found[i])
                   else None)
            out.append({
                "store": KNN_STORE, "id": mid, "similarity": round(r.score, 4),
                "weight": round(sum(r.gates) / len(r.gates), 4), "tokens": len(r.gates),
                "source_pos": None if src is None else src[0],
                "source": None if src is None or not src[1] else self.tokenizer.decode(src[1]),
                "next": nxt, "lambda": self.knn.config.lam})
        return out


def format_spans(spans: list[dict[str, Any]]) -> list[str]:
    """The lines ``--show-memory`` and ``/memory`` print for ``MemoryTrace.spans``."""
    if not spans:
        return ["memory reads: none (nothing generated)"]
    lines = ["memory reads per span (similarity, mean gate of the tokens reading it, tokens, "
             "where formed, source text):"]
    for s in spans:
        lines.append(f"[{s['start']}:{s['end']}] {s['text']!r}")
        if not s["reads"]:
            lines.append("    (no memory read)")
        for r in s["reads"]:
            src = r["source"]
            if src is None:
                src_text = "(no source text kept)"
            else:
                src_text = repr(src if len(src) <= SNIPPET_CHARS else "..." + src[-SNIPPET_CHARS:])
            where = "?" if r["source_pos"] is None else r["source_pos"]
            if r["store"] == KNN_STORE:
                lines.append(f"    knn #{r['id']}  sim {r['similarity']:+.3f}  weight "
                             f"{r['weight']:.3f}  x{r['tokens']}  @{where}  {src_text} -> "
                             f"{r['next']!r}  (lambda {r['lambda']:g})")
                continue
            lines.append(f"    {r['store']} #{r['id']}  sim {r['similarity']:+.3f}  "
                         f"gate {r['gate']:.3f}  x{r['tokens']}  @{where}  {src_text}")
    return lines
