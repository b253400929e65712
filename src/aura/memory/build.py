"""Filling a chunk memory from a prepared corpus (``aura memory build``, and a MiniLM bank before
training starts).

The corpus is cut into non-overlapping windows of the model's context, spread evenly over the
split when the bank cannot hold them all, and run in corpus order, each batch's entries written
before the next batch runs: the bank a window reads holds only windows before it. Every entry's
``source_pos`` is the offset of its chunk's last token in the split, the same positions training
uses, so reads limited to text before each token stay causal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from aura.data.shards import SplitData
from aura.data.tokenizers import Tokenizer
from aura.errors import AuraError, DataError
from aura.memory.store import SNIPPET_TOKENS
from aura.memory.text_encoder import MiniLMEncoder
from aura.memory.writer import MemoryWriter, snippets

# Runs the model over windows (B, window) at corpus offsets (B,), queuing its own chunk
# encodings with its writers.
EncodeWindows = Callable[[torch.Tensor, torch.Tensor], object]


class TextEncoder(Protocol):
    """Texts -> (N, dim) embeddings (MiniLM, an HTTP provider)."""

    def encode(self, texts: list[str]) -> torch.Tensor: ...


def corpus_windows(split: SplitData, window: int, count: int,
                   exclude: tuple[int, int] | None = None) -> list[tuple[int, int, int]]:
    """At most ``count`` non-overlapping windows of ``window`` tokens, evenly spread over the
    split in corpus order, as (shard, offset in shard, offset in the split); none overlaps the
    split offsets ``exclude`` = [start, end) (text held out to tune on)."""
    starts = np.cumsum([0] + [sh.n_tokens for sh in split.shards])
    windows = [(s, off, int(starts[s]) + off) for s, sh in enumerate(split.shards)
               for off in range(0, sh.n_tokens - window + 1, window)]
    if exclude is not None:
        windows = [w for w in windows if w[2] + window <= exclude[0] or w[2] >= exclude[1]]
    if not windows:
        raise DataError(f"{split.name} split: no shard holds block_size = {window} tokens")
    if len(windows) > count:
        picks = np.unique(np.linspace(0, len(windows) - 1, count).round().astype(int))
        windows = [windows[i] for i in picks]
    return windows


@torch.no_grad()
def fill_chunk_memory(writers: list[MemoryWriter], split: SplitData, *, window: int, chunk: int,
                      device: torch.device, encode: EncodeWindows | None,
                      tokenizer: Tokenizer | None = None, max_chunks: int | None = None,
                      batch_size: int = 8, text_encoder: TextEncoder | None = None) -> int:
    """Empty the stores of ``writers`` and refill them from ``split``; returns the entries each
    holds now.

    An entry is one ``chunk``-token piece of a window: ``encode`` (the model itself) queues its
    encodings, or without it ``text_encoder`` (default MiniLM) embeds the chunk's text,
    decoded by ``tokenizer``, into every store. ``max_chunks`` (default and at most: the
    stores' capacity) bounds the entries.
    """
    if (max_chunks is not None and max_chunks < 1) or batch_size < 1:
        raise AuraError(f"max_chunks and batch_size must be >= 1, got {max_chunks}, {batch_size}")
    if encode is None and tokenizer is None:
        raise AuraError("a MiniLM memory bank is built from text: pass the corpus's tokenizer")
    if window < chunk:
        raise AuraError(f"model.block_size {window} is shorter than one memory chunk "
                        f"({chunk} tokens)")
    capacity = min(w.store.capacity for w in writers)
    per_window = window // chunk
    budget = min(max_chunks or capacity, capacity)
    windows = corpus_windows(split, window, max(1, budget // per_window))
    if encode is None and text_encoder is None:
        text_encoder = MiniLMEncoder()
    for writer in writers:
        writer.discard()
        writer.store.clear()
    maps = split.maps
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        ids = np.stack([maps[s][off:off + window] for s, off, _ in batch]).astype(np.int64)
        where = torch.tensor([g for _, _, g in batch], device=device)
        if encode is not None:
            encode(torch.from_numpy(ids).to(device), where)
        else:
            assert text_encoder is not None and tokenizer is not None
            chunks = ids[:, :per_window * chunk].reshape(-1, chunk)
            entries = text_encoder.encode([tokenizer.decode(c.tolist()) for c in chunks])
            ends = where.view(-1, 1) + torch.arange(1, per_window + 1, device=device) * chunk - 1
            source = snippets(torch.from_numpy(ids), SNIPPET_TOKENS)[:, chunk - 1::chunk]
            for writer in writers:
                writer.queue(entries.view(len(batch), per_window, -1).to(device), source_pos=ends,
                             source_tokens=source[:, :per_window].to(device))
        for writer in writers:
            writer.flush()
    return min(len(windows) * per_window, capacity)
