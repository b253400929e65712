"""Document streams for training a model's own memory (``train.memory_stream``).

Memorizing Transformers (Wu et al., ICLR 2022) train a memory on consecutive segments of one
document, the memory carried from segment to segment and reset at the document's end, so what
is stored is earlier text of the same document: the one place a memory can add what the
attention window cannot see. Random windows (``BatchSampler``) fill it with unrelated text, and
the read gate learns to stay shut.

Here the train split's windows of ``block + 1`` tokens (stepping by ``block``, as a stream is
read: targets never overlap) are laid out in corpus order and cut into ``batch_size`` equal
stretches, one per batch row (a *lane*). At sampler index ``i`` row ``b`` reads window
``i mod len(stretch b)`` of its stretch, so consecutive indices are consecutive windows, and a
batch is still a pure function of its index (a resumed run reads exactly what the uninterrupted
one would; the memories themselves are in the checkpoint).

Each token also gets a ``memory_floor``: the corpus position of the start of its document
within its lane, i.e. the latest of its lane's start and its document's start (after an
end-of-text token, or a shard's first token). A memory-reading model hides memories formed
before it; memories formed after the token are already hidden (``corpus_pos``). So a row reads
only its own lane's current document: the memory is "reset" at a document boundary, the old
document's memories fading out of the store unread. A tokenizer without an end-of-text token
(char) cannot mark documents inside a shard: the lane is then the document.
"""

from __future__ import annotations

import numpy as np
import torch

from aura.data.sampler import Batch, BatchSampler, TokenFeatures, compute_features
from aura.data.shards import SplitData
from aura.errors import DataError


class DocumentStreams(BatchSampler):
    """Row ``b`` of batch ``i``: window ``i mod n_b`` of lane ``b``; ``batch`` adds
    ``corpus_pos`` (B,) and ``memory_floor`` (B, T)."""

    def __init__(self, split: SplitData, batch_size: int, block_size: int, seed: int,
                 rank: int = 0, features: TokenFeatures | None = None,
                 part: tuple[int, int] = (0, 1), eot_id: int | None = None):
        super().__init__(split, batch_size, block_size, seed, rank, features, corpus_pos=True,
                         part=part)
        block = block_size
        shard_of, offsets = [], []
        for k, shard in enumerate(split.shards):
            starts = np.arange(0, max(shard.n_tokens - block, 0), block, dtype=np.int64)
            shard_of.append(np.full(starts.size, k, dtype=np.int64))
            offsets.append(starts)
        self._shard = np.concatenate(shard_of) if shard_of else np.zeros(0, np.int64)
        self._offset = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
        n = self._shard.size
        if n < batch_size:
            raise DataError(f"train.memory_stream: the {split.name} split has {n} windows of "
                            f"{block + 1} tokens, fewer than train.batch_size {batch_size} "
                            "lanes")
        self._edges = (np.arange(batch_size + 1, dtype=np.int64) * n) // batch_size
        self._global = self._shard_starts[self._shard] + self._offset
        starts = [self._shard_starts]
        if eot_id is not None:
            for k, tokens in enumerate(split.maps):
                starts.append(self._shard_starts[k] + np.flatnonzero(
                    np.asarray(tokens) == eot_id).astype(np.int64) + 1)
        self._doc_starts = np.unique(np.concatenate(starts))

    def lane_windows(self, index: int) -> np.ndarray:
        """This rank's rows' window numbers (in corpus order) at sampler index ``index``."""
        lo, hi = self._edges[:-1][self._rows], self._edges[1:][self._rows]
        return lo + index % (hi - lo)

    def _windows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        w = self.lane_windows(step)
        block = self.block_size(step)
        span = np.arange(block + 1, dtype=np.int64)
        out = np.empty((w.size, block + 1), dtype=self.split.dtype)
        for row, (k, off) in enumerate(zip(self._shard[w], self._offset[w], strict=True)):
            out[row] = self.split.maps[k][off + span]
        return out, self._global[w]

    def floor(self, step: int, offsets: np.ndarray, length: int) -> np.ndarray:
        """(rows, length) lowest corpus position each token may read a memory from."""
        lane = self._global[self._edges[:-1][self._rows]]
        pos = offsets[:, None] + np.arange(length, dtype=np.int64)
        doc = self._doc_starts[np.searchsorted(self._doc_starts, pos, side="right") - 1]
        return np.maximum(doc, lane[:, None])

    def batch(self, step: int) -> Batch:
        window, offsets = self._windows(step)
        x, y = self._split(window)
        feats = compute_features(self.features, x)
        feats["corpus_pos"] = torch.from_numpy(offsets.astype(np.int64))
        feats["memory_floor"] = torch.from_numpy(self.floor(step, offsets, x.size(1)))
        return x, y, feats

