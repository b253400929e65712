"""Decoding many sequences in one forward: a KV cache whose rows sit at their own positions.

A server's requests arrive at different times with prompts of different lengths, so their
caches hold different numbers of tokens. ``RaggedKVCache`` keeps one row per sequence, each
with its own length; a decode step feeds every row its newest token in one forward, each at
its own position (``positions``: (B, 1)), each seeing only its own tokens (``attn_mask``), and
each row's key and value written at its own end (``append``). Models that read their cache
only through ``KVCache``'s methods declare ``batched_decoding``.

``DecodeBatch`` puts ``generate.Decoder``s together: a sequence is prefilled alone (its prompt
through its own cache, as `aura generate` does), its keys and values are copied into a row, and
from then on every round is one forward for all rows. A sequence whose context fills up is
re-prefilled alone exactly as ``Decoder.advance`` does and its row refreshed, so each sequence
goes through the same steps as alone; batched matmuls may round differently from single-row
ones in the last bit, which the tests find does not change the tokens of the same seed.
"""

from __future__ import annotations

import torch

from aura.infer.generate import Decoder
from aura.models.base import AuraModel
from aura.nn.attention import KVCache


class RaggedKVCache(KVCache):
    """``capacity`` rows of up to ``max_len`` tokens; the first ``rows`` are in use, row b
    holding ``lengths[b]``. Decoding feeds one new token per row (T == 1)."""

    def __init__(self, n_layer: int, capacity: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (capacity, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len, self.capacity = max_len, capacity
        self.lengths = torch.zeros(capacity, dtype=torch.long, device=device)
        self.rows = 0
        self._longest = 0

    @property  # type: ignore[override]
    def pos(self) -> int:
        """The longest row's length: what the decoder checks against ``block_size``."""
        return self._longest

    @pos.setter
    def pos(self, value: int) -> None:  # the model's ``cache.pos += T`` moves every row on
        self.lengths[:self.rows] += value - self._longest
        self._sync()

    def _sync(self) -> None:
        self._longest = int(self.lengths[:self.rows].max()) if self.rows else 0

    def reset(self) -> None:
        self.lengths.zero_()
        self.rows = self._longest = 0

    def positions(self, n: int, device: torch.device) -> torch.Tensor:
        if n != 1:
            raise ValueError(f"a ragged cache decodes one token per row, got {n}")
        return self.lengths[:self.rows, None].to(device)

    def attn_mask(self, n: int, device: torch.device) -> torch.Tensor:
        keys = torch.arange(self._longest + 1, device=device)
        return (keys[None, :] <= self.lengths[:self.rows, None].to(device))[:, None, None, :]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._longest + 1
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens, asked for {end}")
        rows = torch.arange(self.rows, device=k.device)
        at = self.lengths[:self.rows].to(k.device)
        self.k[layer][rows, :, at] = k[:, :, 0]
        self.v[layer][rows, :, at] = v[:, :, 0]
        return self.k[layer][:self.rows, :, :end], self.v[layer][:self.rows, :, :end]

    def put(self, row: int, cache: KVCache) -> None:
        """Row ``row`` becomes the (1-row) ``cache``'s contents."""
        n = cache.pos
        for mine, theirs in ((self.k, cache.k), (self.v, cache.v)):
            for layer, t in enumerate(theirs):
                mine[layer][row, :, :n] = t[0, :, :n]
        self.lengths[row] = n
        self._sync()

    def move(self, src: int, dst: int) -> None:
        """Copy row ``src`` over row ``dst``."""
        n = int(self.lengths[src])
        for tensors in (self.k, self.v):
            for t in tensors:
                t[dst, :, :n] = t[src, :, :n]
        self.lengths[dst] = n

    def grown(self, capacity: int) -> RaggedKVCache:
        """A copy with room for ``capacity`` rows."""
        k0 = self.k[0]
        new = RaggedKVCache(len(self.k), capacity, k0.size(1), self.max_len, k0.size(3),
                            k0.device, k0.dtype)
        for mine, theirs in ((new.k, self.k), (new.v, self.v)):
            for a, b in zip(mine, theirs, strict=True):
                a[:self.capacity] = b
        new.lengths[:self.capacity] = self.lengths
        new.rows = self.rows
        new._sync()
        return new


class DecodeBatch:
    """The sequences decoding together, one row each (see the module docstring)."""

    def __init__(self, model: AuraModel):
        self.model = model
        self.cache: RaggedKVCache | None = None
        self.decoders: list[Decoder] = []

    def _row(self, decoder: Decoder) -> int:
        return next(i for i, d in enumerate(self.decoders) if d is decoder)

    def add(self, decoder: Decoder) -> None:
        """Take a prefilled decoder (one row, its own cache holding its window)."""
        if self.cache is None:
            c = decoder.cache
            assert c is not None and self.model.max_context is not None
            self.cache = RaggedKVCache(len(c.k), 4, c.k[0].size(1), self.model.max_context,
                                       c.k[0].size(3), c.k[0].device, c.k[0].dtype)
        if self.cache.rows == self.cache.capacity:
            self.cache = self.cache.grown(2 * self.cache.capacity)
        row = self.cache.rows
        self.cache.rows += 1
        self.cache.put(row, decoder.cache)
        self.decoders.append(decoder)

    def remove(self, decoder: Decoder) -> None:
        """Drop a finished or cancelled sequence: the last row moves into its place."""
        assert self.cache is not None
        row, last = self._row(decoder), len(self.decoders) - 1
        if row != last:
            self.cache.move(last, row)
            self.decoders[row] = self.decoders[last]
        self.decoders.pop()
        self.cache.rows -= 1
        self.cache._sync()

    def advance(self) -> None:
        """The next logits of every sequence: one forward for all rows (a sequence whose
        context is full is re-prefilled alone first, and its row refreshed)."""
        if not self.decoders:
            return
        assert self.cache is not None
        refilled = []
        for row, d in enumerate(self.decoders):
            if d.needs_refill():
                d.advance()
                self.cache.put(row, d.cache)  # shorter now, so the step below has room
                refilled.append(row)
        if len(refilled) < len(self.decoders):
            ids = torch.stack([d.out[0, d.t - 1:d.t] for d in self.decoders])
            logits = self.model(ids, cache=self.cache, last_only=True).logits[:, -1]
            for row, d in enumerate(self.decoders):
                if row not in refilled:
                    d.logits = logits[row:row + 1]
        for row in refilled:  # their rows took a needless step above: put back whole
            self.cache.put(row, self.decoders[row].cache)
