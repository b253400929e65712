"""Decoding many sequences in one forward, with O(1) tensor work per round however many there are.

A server's requests arrive at different times with prompts of different lengths, so their
caches hold different numbers of tokens. ``RaggedKVCache`` keeps one row per sequence in one
dense (capacity, heads, max_len, head_dim) tensor per layer, each row with its own length; a
decode step feeds every row its newest token in one forward, each at its own position
(``positions``: (B, 1)), each seeing only its own tokens (a padding mask), and each row's key
and value written at its own end. The mask and write indices are built once per forward (in
``positions``, which the model calls first), not once per layer. Models that read their cache
only through ``KVCache``'s methods declare ``batched_decoding``.

``DecodeBatch`` is the decoding loop of ``generate`` for many sequences at once: a sequence is
prefilled alone (its prompt through its own cache, as `aura generate` does) and copied into a
row; from then on each round is one batched sampling call (``row_sampling.sample_rows``, every
row's settings and seed as tensors) and one forward for all rows. Sequences whose context is
full are re-prefilled together (their windows are all half a context long), exactly as
``generate.Decoder.advance`` does for each. The host keeps each sequence's ids as a list; the
only per-sequence work in a round is appending an int to it (and, for a model that reads
per-token features such as prosody, advancing the row's feature state: ``ProsodyStream`` gives
each row's newest token the features ``generate`` computes over the row's whole window, and
per-row cache state such as the time cells' last boundary rides in the ragged cache beside the
keys, ``KVCache.row_state``). Batched matmuls may round
differently from single-row ones in the last bit, which the tests find does not change the
tokens of the same seed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from aura.data.prosody import Prosody
from aura.data.prosody_stream import ProsodyStream
from aura.data.sampler import TokenFeatures, compute_features
from aura.infer.generate import modulated
from aura.infer.row_sampling import RowSettings, _Uses, sample_rows
from aura.infer.sampling import SamplingConfig
from aura.models.base import AuraModel
from aura.nn.attention import KVCache


class RaggedKVCache(KVCache):
    """``capacity`` rows of up to ``max_len`` tokens; the first ``rows`` are in use, row b
    holding ``lengths[b]``. Decoding feeds one new token per row (T == 1).

    ``row_state`` (name -> a (1, ...) example) are the per-row tensors the model's own cache
    carries (``KVCache.row_state``, e.g. the time cells' last boundary): kept for ``capacity``
    rows, and read or assigned by the model as the attribute of that name, the rows in use."""

    def __init__(self, n_layer: int, capacity: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype,
                 row_state: dict[str, torch.Tensor] | None = None):
        self._state = {name: torch.zeros((capacity, *t.shape[1:]), dtype=t.dtype, device=device)
                       for name, t in (row_state or {}).items()}
        self.row_state = tuple(self._state)
        shape = (capacity, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len, self.capacity = max_len, capacity
        self.lengths = torch.zeros(capacity, dtype=torch.long, device=device)
        self.sizes = [0] * capacity  # ``lengths`` on the host, so nothing waits on the device
        self.rows = 0
        self._step: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None

    def __new__(cls, *args: object, row_state: dict[str, torch.Tensor] | None = None,
                **kwargs: object) -> RaggedKVCache:
        """With ``row_state``, an instance of a subclass with one property per name."""
        if cls is RaggedKVCache and row_state:
            cls = _with_row_state(tuple(row_state))
        return super().__new__(cls)

    @property  # type: ignore[override]
    def pos(self) -> int:
        """The longest row's length: what the decoder checks against ``block_size`` (during a
        forward, known from ``positions``: every layer asks)."""
        if self._step is not None:
            return self._step[3] - 1
        return max(self.sizes[:self.rows], default=0)

    @pos.setter
    def pos(self, value: int) -> None:  # the model's ``cache.pos += T`` moves every row on
        delta = value - self.pos
        self.lengths[:self.rows] += delta
        self.sizes[:self.rows] = [n + delta for n in self.sizes[:self.rows]]
        self._step = None

    def set_length(self, row: int, n: int) -> None:
        self.lengths[row] = n
        self.sizes[row] = n
        self._step = None

    def reset(self) -> None:
        for t in self._state.values():
            t.zero_()
        self.lengths.zero_()
        self.sizes = [0] * self.capacity
        self.rows = 0
        self._step = None

    def positions(self, n: int, device: torch.device) -> torch.Tensor:
        """(rows, 1) positions; also builds this forward's mask and write indices."""
        if n != 1:
            raise ValueError(f"a ragged cache decodes one token per row, got {n}")
        at = self.lengths[:self.rows].to(device)
        end = self.pos + 1
        keys = torch.arange(end, device=device)
        mask = (keys[None, :] <= at[:, None])[:, None, None, :]
        self._step = (torch.arange(self.rows, device=device), at, mask, end)
        return at[:, None]

    def attn_mask(self, n: int, device: torch.device) -> torch.Tensor:
        assert self._step is not None, "positions() starts each forward"
        return self._step[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._step is not None, "positions() starts each forward"
        rows, at, _, end = self._step
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens, asked for {end}")
        self.k[layer][rows, :, at] = k[:, :, 0]
        self.v[layer][rows, :, at] = v[:, :, 0]
        return self.k[layer][:self.rows, :, :end], self.v[layer][:self.rows, :, :end]

    def put(self, rows: list[int], cache: KVCache, lengths: list[int] | None = None) -> None:
        """Rows ``rows`` become the rows of ``cache`` (in order), holding ``lengths`` tokens
        each (default: ``cache.pos``; what lies past a row's length is masked)."""
        lengths = lengths or [cache.pos] * len(rows)
        n = max(lengths)
        index = torch.tensor(rows, device=self.lengths.device)
        for mine, theirs in ((self.k, cache.k), (self.v, cache.v)):
            for a, b in zip(mine, theirs, strict=True):
                a[index, :, :n] = b[:len(rows), :, :n]
        for name, t in self._state.items():
            t[index] = getattr(cache, name)[:len(rows)]
        self.lengths[index] = torch.tensor(lengths, device=self.lengths.device)
        for r, length in zip(rows, lengths, strict=True):
            self.sizes[r] = length
        self._step = None

    def move(self, src: int, dst: int) -> None:
        """Copy row ``src`` over row ``dst``."""
        n = self.sizes[src]
        for tensors in (self.k, self.v):
            for t in tensors:
                t[dst, :, :n] = t[src, :, :n]
        for t in self._state.values():
            t[dst] = t[src]
        self.set_length(dst, n)

    def grown(self, capacity: int) -> RaggedKVCache:
        """A copy with room for ``capacity`` rows."""
        k0 = self.k[0]
        new = RaggedKVCache(len(self.k), capacity, k0.size(1), self.max_len, k0.size(3),
                            k0.device, k0.dtype, row_state=self._state)
        for mine, theirs in ((new.k, self.k), (new.v, self.v),
                             (list(new._state.values()), list(self._state.values()))):
            for a, b in zip(mine, theirs, strict=True):
                a[:self.capacity] = b
        new.lengths[:self.capacity] = self.lengths
        new.sizes[:self.capacity] = self.sizes
        new.rows = self.rows
        return new


def streamable(features: TokenFeatures) -> bool:
    """Whether every per-token feature a model reads can be computed a token at a time for
    each row (``aura.data.prosody_stream``), as ``DecodeBatch`` needs."""
    return all(isinstance(f, Prosody) for f in features.values())


@functools.cache
def _with_row_state(names: tuple[str, ...]) -> type[RaggedKVCache]:
    """RaggedKVCache with a property per name reading and assigning the rows in use of that
    per-row tensor, as the model reads and assigns the attribute of its own cache."""

    def row_property(name: str) -> property:
        def get(self: RaggedKVCache) -> torch.Tensor:
            return self._state[name][:self.rows]

        def put(self: RaggedKVCache, value: torch.Tensor) -> None:
            self._state[name][:self.rows] = value

        return property(get, put)

    return type(f"RaggedKVCache[{', '.join(names)}]", (RaggedKVCache,),
                {name: row_property(name) for name in names})


@dataclass(eq=False)
class Row:
    """One sequence's host-side state: its ids (prompt then generated), the next position
    ``t``, where the output ends (``total``) and the first token its cache holds (``start``)."""

    ids: list[int]
    total: int
    cfg: SamplingConfig
    start: int = 0
    last: int = -1  # the id sampled by the latest ``step``
    row: int = field(default=-1, repr=False)

    @property
    def t(self) -> int:
        return len(self.ids)

    @property
    def over(self) -> bool:
        return self.t >= self.total


class DecodeBatch:
    """The sequences decoding together, one row each (see the module docstring)."""

    def __init__(self, model: AuraModel, memory: dict[str, bool] | None = None,
                 features: TokenFeatures | None = None):
        """``features``: the per-token features the model reads (``token_features``); each row's
        come from its own ``ProsodyStream``, as ``generate`` computes them over the
        row's window."""
        # None for a recurrent model: its rows never fill, so none is ever re-prefilled
        self.model, self.max_ctx = model, model.max_context
        self.padded_prefill = getattr(model.new_cache(1, 1), "padded_prefill", True)
        self.memory = memory or {}  # the forward keywords of the inference memory mode
        self.features = features or {}
        if not streamable(self.features):
            raise ValueError(f"token features {sorted(self.features)} cannot be computed a token "
                             "at a time")
        self.streams = {name: ProsodyStream(f)  # type: ignore[arg-type]
                        for name, f in self.features.items()}
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.cache: RaggedKVCache | None = None
        self.seqs: list[Row] = []
        self.logits: torch.Tensor | None = None  # (capacity, V): each row's next-token logits
        self.settings: RowSettings | None = None
        self.seen: torch.Tensor | None = None  # (capacity, V): the repetition penalty's context
        self.counters = torch.zeros(0, dtype=torch.long, device=self.device)
        self.uses = _Uses.of([])

    def _prefill(self, windows: torch.Tensor, length: int,
                 feats: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, KVCache]:
        """Logits after each window and its cache; the features over the windows unless given."""
        cache = self.model.new_cache(windows.size(0), length)
        if feats is None:
            feats = compute_features(self.features, windows)
        logits = self.model(windows, cache=cache, last_only=True, **self.memory,
                            **feats).logits[:, -1]
        return logits, cache

    def _ragged(self, capacity: int) -> RaggedKVCache:
        """An empty ragged cache shaped like the model's own, with its per-row state (a cache
        that makes its own batched form, such as a recurrent state, makes it)."""
        c = self.model.new_cache(1, 1)
        if hasattr(c, "ragged"):
            return c.ragged(capacity)  # type: ignore[no-any-return]
        assert self.max_ctx is not None
        return RaggedKVCache(len(c.k), capacity, c.k[0].size(1), self.max_ctx, c.k[0].size(3),
                             self.device, c.k[0].dtype,
                             row_state={n: getattr(c, n) for n in c.row_state})

    def _grow(self, capacity: int, vocab: int) -> None:
        if self.cache is not None and self.cache.capacity >= capacity:
            return
        capacity = max(capacity, 2 * (self.cache.capacity if self.cache is not None else 2))
        self.cache = self._ragged(capacity) if self.cache is None else self.cache.grown(capacity)
        for stream in self.streams.values():
            stream.grow(capacity)
        n = len(self.seqs)

        def widen(t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype
                  ) -> torch.Tensor:
            new = torch.zeros(shape, dtype=dtype, device=self.device)
            if t is not None and n:
                new[:n] = t[:n]
            return new

        self.logits = widen(self.logits, (capacity, vocab), torch.float32)
        self.seen = widen(self.seen, (capacity, vocab), torch.bool)
        self.counters = widen(self.counters, (capacity,), torch.long)
        fields = (self.settings.fields() if self.settings is not None
                  else RowSettings.of([], vocab, self.device).fields())
        self.settings = RowSettings(*(widen(f, (capacity,), f.dtype) for f in fields))

    def add(self, ids: list[int], max_new_tokens: int, cfg: SamplingConfig) -> Row:
        """Prefill a new sequence alone and give it a row."""
        return self.add_many([(ids, max_new_tokens, cfg)])[0]

    def add_many(self, requests: list[tuple[list[int], int, SamplingConfig]]) -> list[Row]:
        """Give each (prompt ids, max new tokens, settings) a row. One request is prefilled
        alone, as `aura generate` prefills it. Several arriving together are prefilled in two
        forwards whatever their number: all but each prompt's last token, right-padded (a
        causal model's real tokens never see the padding after them; a row's length masks it
        later), then every last token in one decode step over a ragged cache, whose logits are
        each row's first."""
        if len(requests) > 1 and not self.padded_prefill:
            return [s for r in requests for s in self.add_many([r])]
        # the model's own sampling factors (its state is read-only while generating), per row
        # as ``generate`` applies them to each sequence
        seqs = [Row(list(ids), len(ids) + m, modulated(self.model, cfg)[0])
                for ids, m, cfg in requests]
        for s in seqs:
            s.start = 0 if self.max_ctx is None else max(0, s.t - self.max_ctx)
        windows = [s.ids[s.start:] for s in seqs]
        if len(seqs) == 1:
            window = torch.tensor(windows, dtype=torch.long, device=self.device)
            length = seqs[0].total - seqs[0].start
            logits, cache = self._prefill(window, length if self.max_ctx is None
                                          else min(length, self.max_ctx))
        else:
            cache = self._ragged(len(seqs))
            cache.rows = len(seqs)
            longest = max(len(w) for w in windows) - 1
            # each window's features, computed whole (right-padded: causal, so the padding
            # changes no real token's); the padding's are zeroed, so it marks no boundary
            ends = torch.tensor([len(w) - 1 for w in windows], device=self.device)
            whole = compute_features(self.features, torch.tensor(
                [w + [0] * (longest + 1 - len(w)) for w in windows], device=self.device)
            ) if self.features else {}
            if longest > 0:
                padded = torch.tensor([w[:-1] + [0] * (longest + 1 - len(w)) for w in windows],
                                      dtype=torch.long, device=self.device)
                real = torch.arange(longest, device=self.device)[None, :] < ends[:, None]
                feats = {n: f[:, :longest] * real[..., None] for n, f in whole.items()}
                cache.put(list(range(len(seqs))), self._prefill(padded, longest, feats)[1],
                          [len(w) - 1 for w in windows])
            last = torch.tensor([[w[-1]] for w in windows], dtype=torch.long,
                                device=self.device)
            rows = torch.arange(len(seqs), device=self.device)
            feats = {n: f[rows, ends][:, None] for n, f in whole.items()}
            logits = self.model(last, cache=cache, last_only=True, **self.memory,
                                **feats).logits[:, -1]
        vocab = logits.size(-1)
        self._grow(len(self.seqs) + len(seqs), vocab)
        assert (self.cache is not None and self.logits is not None and self.seen is not None
                and self.settings is not None)
        first = len(self.seqs)
        rows = list(range(first, first + len(seqs)))
        for row, s in zip(rows, seqs, strict=True):
            s.row = row
        self.cache.rows += len(seqs)
        self.cache.put(rows, cache, [len(w) for w in windows])
        self.logits[first:first + len(seqs)] = logits
        for mine, theirs in zip(self.settings.fields(),
                                RowSettings.of([s.cfg for s in seqs], vocab,
                                               self.device).fields(), strict=True):
            mine[first:first + len(seqs)] = theirs
        self.seen[first:first + len(seqs)] = False
        for row, s, w in zip(rows, seqs, windows, strict=True):
            self.seen[row, torch.tensor(s.ids, device=self.device)] = True
            self.counters[row] = s.t
            for stream in self.streams.values():
                stream.start(row, w)
        self.seqs.extend(seqs)
        self.uses = _Uses.of([s.cfg for s in self.seqs])
        return seqs

    def remove(self, seq: Row) -> None:
        """Drop a finished or cancelled sequence: the last row moves into its place."""
        assert self.cache is not None and self.settings is not None
        row, last = seq.row, len(self.seqs) - 1
        if row != last:
            self.cache.move(last, row)
            tensors = [self.logits, self.seen, self.counters, *self.settings.fields()]
            for t in tensors:
                assert t is not None
                t[row] = t[last]
            for stream in self.streams.values():
                stream.move(last, row)
            moved = self.seqs[row] = self.seqs[last]
            moved.row = row
        self.seqs.pop()
        self.cache.rows -= 1
        self.cache.set_length(last, 0)
        self.uses = _Uses.of([s.cfg for s in self.seqs])

    def step(self) -> None:
        """Sample one token for every row (one call); each sequence's ``last`` is its token."""
        n = len(self.seqs)
        if not n:
            return
        assert self.logits is not None and self.seen is not None and self.settings is not None
        settings = RowSettings(*(f[:n] for f in self.settings.fields()))
        nxt = sample_rows(self.logits[:n], self.seen[:n], settings, self.uses,
                          self.counters[:n])
        if self.uses.penalty:
            self.seen[:n].scatter_(1, nxt[:, None], True)
        self.counters[:n] += 1
        for seq, tok in zip(self.seqs, nxt.tolist(), strict=True):
            seq.ids.append(tok)
            seq.last = tok

    def advance(self) -> None:
        """The next logits of every sequence that is not over: re-prefill those whose context
        is full (together), then one forward for all rows. Call after ``step`` and after
        removing the sequences that ended."""
        n = len(self.seqs)
        if not n:
            return
        assert self.cache is not None and self.logits is not None
        full = ([] if self.max_ctx is None
                else [s for s in self.seqs if len(s.ids) - s.start > self.max_ctx])
        if full:
            assert self.max_ctx is not None
            keep = max(1, self.max_ctx // 2)
            for s in full:
                s.start = s.t - keep
                self.cache.set_length(s.row, 0)  # its step below is a throwaway at position 0
            windows = [s.ids[s.start:] for s in full]
            logits, cache = self._prefill(torch.tensor(windows, dtype=torch.long,
                                                       device=self.device), keep)
        if len(full) < n:
            last = [s.last for s in self.seqs]
            feats = {name: torch.from_numpy(stream.push(np.arange(n), np.array(last))
                                            ).to(self.device)[:, None]
                     for name, stream in self.streams.items()}
            self.logits[:n] = self.model(
                torch.tensor(last, dtype=torch.long, device=self.device)[:, None],
                cache=self.cache, last_only=True, **self.memory, **feats).logits[:, -1].float()
        if full:  # the refilled rows' cache, state and logits replace their throwaway step's
            self.cache.put([s.row for s in full], cache)
            for i, (s, w) in enumerate(zip(full, windows, strict=True)):
                self.logits[s.row] = logits[i]
                for stream in self.streams.values():
                    stream.start(s.row, w)
