"""Autoregressive decoding: token ids with or without a KV cache, and a text-level helper.

With a cache the prompt is prefilled in one forward and each new token costs one single-token
forward; without one the whole (cropped) context is re-run every step, which is the reference
the cache must agree with and the only way to decode models that have no cache.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from aura.data.prosody import token_features
from aura.data.sampler import TokenFeatures, compute_features
from aura.data.tokenizers import Tokenizer
from aura.errors import AuraError
from aura.infer.row_sampling import RowSampler
from aura.infer.sampling import SamplingConfig
from aura.models.base import AuraModel
from aura.models.memory_mode import memory_kwargs

if TYPE_CHECKING:
    from aura.memory.knn_lm import KNNLM

TokenCallback = Callable[[torch.Tensor], bool | None]
# The output ids are allocated whole before decoding (8 bytes per token and row), so an extra
# digit typed by mistake would otherwise ask for terabytes, or overflow an int64.
MAX_NEW_TOKENS = 1 << 24


# However a model modulates its sampling, the generator never lets it more than halve or
# double the user's temperature or top-k.
MODULATION_BOUNDS = (0.5, 2.0)


def modulated(model: AuraModel, sampling: SamplingConfig
              ) -> tuple[SamplingConfig, dict[str, float]]:
    """``sampling`` with the model's declared factors (``AuraModel.sampling_modulation``)
    applied, and the factors as applied: temperature times its factor (greedy stays greedy),
    top-k times its factor rounded, at least 1 (no top-k set: nothing to scale). Each factor
    is clamped to ``MODULATION_BOUNDS``; ``sampling.modulation`` off: unchanged."""
    if not sampling.modulation:
        return sampling, {}
    factors = {}
    for name, value in model.sampling_modulation().items():
        if name not in ("temperature", "top_k") or not math.isfinite(value):
            raise ValueError(f"model {model.config.name!r} declares a sampling factor "
                             f"{name}={value}; only finite temperature and top_k factors exist")
        factors[name] = min(max(float(value), MODULATION_BOUNDS[0]), MODULATION_BOUNDS[1])
    changes: dict[str, Any] = {}
    if factors.get("temperature", 1.0) != 1.0:
        changes["temperature"] = sampling.temperature * factors["temperature"]
    if factors.get("top_k", 1.0) != 1.0 and sampling.top_k is not None:
        changes["top_k"] = max(1, round(sampling.top_k * factors["top_k"]))
    return (dataclasses.replace(sampling, **changes) if changes else sampling), factors


def _check_max_new_tokens(max_new_tokens: int) -> None:
    if not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise AuraError(f"max_new_tokens must be in 0..{MAX_NEW_TOKENS}, got {max_new_tokens}")


def _new_cache(model: AuraModel, batch: int, start: int, total: int,
               max_ctx: int | None) -> Any:
    """A cache for tokens start..total, no longer than the model can attend over."""
    length = total - start if max_ctx is None else min(total - start, max_ctx)
    return model.new_cache(batch, length)


def _last_logits(model: AuraModel, window: torch.Tensor, n_new: int, cache: Any,
                 features: TokenFeatures, memory: dict[str, bool] | None = None,
                 knn: KNNLM | None = None) -> torch.Tensor:
    """Logits after ``window``, feeding the model its last ``n_new`` tokens (the rest are in
    the cache). Token features are computed over the whole window, since e.g. a word's valence
    depends on the tokens before it, then cut to the tokens fed. With ``knn`` (a kNN-LM
    read-out) they are the mixture's log-probabilities (``KNNLM.next_logits``)."""
    feats = {name: f[:, -n_new:] for name, f in compute_features(features, window).items()}
    out = model(window[:, -n_new:], cache=cache, last_only=True, **(memory or {}), **feats)
    if knn is None:
        return out.logits[:, -1]
    if out.hidden is None:
        raise AuraError(f"model {model.config.name!r} returns no hidden states to read a kNN "
                        "datastore with")
    return knn.next_logits(out.logits[:, -1], out.hidden[:, -1], window[:, -1])


class Decoder:
    """Fills ``out[:, t:]`` one column per ``step``: the decoding loop of ``generate``, one token
    at a time, so a server can interleave many sequences (each with its own cache and
    seed) and still produce exactly what ``generate`` produces for each alone."""

    def __init__(self, model: AuraModel, out: torch.Tensor, t: int, sampling: SamplingConfig,
                 use_cache: bool, stop_ids: int | None, features: TokenFeatures,
                 memory: dict[str, bool] | None = None, knn: KNNLM | None = None):
        # the model's own factors (its state is read-only while generating: once is enough)
        sampling = modulated(model, sampling)[0]
        self.model, self.out, self.t, self.sampling = model, out, t, sampling
        self.stop_ids, self.features, self.memory, self.knn = stop_ids, features, memory, knn
        batch, self.total = out.shape
        self.max_ctx = model.max_context
        self.done = torch.zeros(batch, dtype=torch.bool, device=out.device)
        # first token the model sees
        self.start = 0 if self.max_ctx is None else max(0, t - self.max_ctx)
        self.cache = (_new_cache(model, batch, self.start, self.total, self.max_ctx)
                      if use_cache else None)
        self.logits = _last_logits(model, out[:, self.start:t], t - self.start, self.cache,
                                   features, memory, knn)
        # Each row's draws are keyed by (its seed, position), as in the server's batches.
        self.sampler = RowSampler([sampling] * batch, out[:, :t], self.logits.size(-1))

    def step(self) -> tuple[torch.Tensor, bool]:
        """Sample one column; returns its (B,) ids and whether decoding is over (the output is
        full or every row produced ``stop_ids``). Call under ``torch.inference_mode``."""
        out, t = self.out, self.t
        nxt = self.sampler.sample(self.logits, t)
        if self.stop_ids is not None:
            nxt = nxt.masked_fill(self.done, self.stop_ids)  # finished rows: padded with it
            self.done |= nxt == self.stop_ids
        self.sampler.see(nxt)
        out[:, t] = nxt
        self.t = t = t + 1
        if t == self.total or (self.stop_ids is not None and bool(self.done.all())):
            return nxt, True
        return nxt, False

    def needs_refill(self) -> bool:
        """True when the cache is full, so the next ``advance`` re-prefills it."""
        return (self.cache is not None and self.max_ctx is not None
                and self.t - self.start > self.max_ctx)

    def advance(self) -> None:
        """Compute the logits after the newest column (the forward of the next ``step``)."""
        model, out, t, max_ctx = self.model, self.out, self.t, self.max_ctx
        if self.cache is None:
            if max_ctx is not None:
                self.start = max(0, t - max_ctx)
            self.logits = _last_logits(model, out[:, self.start:t], t - self.start, None,
                                       self.features, self.memory, self.knn)
        elif self.needs_refill():
            assert max_ctx is not None
            # The cache is full. Learned absolute positions cannot slide: every cached key was
            # computed at its old position, so dropping the oldest token would need all of them
            # recomputed anyway. Re-prefill from the last half window instead, which buys
            # max_ctx // 2 cheap steps per prefill (a sliding window would prefill every step).
            self.start = t - max(1, max_ctx // 2)
            self.cache = _new_cache(model, out.size(0), self.start, self.total, max_ctx)
            self.logits = _last_logits(model, out[:, self.start:t], t - self.start, self.cache,
                                       self.features, self.memory, self.knn)
        else:
            self.logits = _last_logits(model, out[:, self.start:t], 1, self.cache, self.features,
                                       self.memory, self.knn)


def _decode(model: AuraModel, out: torch.Tensor, t: int, sampling: SamplingConfig,
            use_cache: bool, stop_ids: int | None, on_token: TokenCallback | None,
            features: TokenFeatures, memory: dict[str, bool], knn: KNNLM | None = None) -> int:
    """Fill ``out[:, t:]`` one column per step; return how many columns are filled."""
    decoder = Decoder(model, out, t, sampling, use_cache, stop_ids, features, memory, knn)
    while True:
        nxt, over = decoder.step()
        stop_asked = on_token is not None and on_token(nxt)
        if over or stop_asked:
            return decoder.t
        decoder.advance()


def generate(model: AuraModel, prompt_ids: torch.Tensor, max_new_tokens: int,
             sampling: SamplingConfig, *, use_cache: bool = True, stop_ids: int | None = None,
             on_token: TokenCallback | None = None, features: TokenFeatures | None = None,
             memory: str = "read", knn: KNNLM | None = None) -> torch.Tensor:
    """(B, T0 + n) ids: the prompt followed by n <= max_new_tokens generated tokens.

    Context beyond ``model.max_context`` is cropped to its last max_context tokens (uncached:
    a window sliding by one token; cached: see the re-prefill in ``_decode``). Generation stops
    early once every row has produced ``stop_ids`` (kept in the output; rows that stopped
    earlier are padded with it), or when ``on_token``, called with each step's (B,) new ids,
    returns True. A model whose ``new_cache`` returns None is always decoded uncached. The
    model runs in eval mode under inference_mode; its previous mode is restored afterwards.
    ``features`` builds the per-token inputs the model asks for (``model.token_features``);
    ``generate_text`` makes them from the tokenizer. ``memory`` is the inference memory
    switch (aura.models.memory_mode): with ``write`` every forward also queues memories of
    what it read, written as the next forward starts, so a token never reads its own.
    ``knn`` draws each token from the kNN-LM mixture (aura.memory.knn_lm) of the model and the
    read-out's datastore; its lambda 0 draws exactly the tokens of ``knn=None``.
    """
    if prompt_ids.dim() != 2 or prompt_ids.dtype != torch.long:
        raise ValueError(f"prompt_ids must be a (B, T) long tensor, got {prompt_ids.dtype} "
                         f"{tuple(prompt_ids.shape)}")
    if prompt_ids.size(0) == 0 or prompt_ids.size(1) == 0:
        raise AuraError(f"empty prompt: prompt_ids has shape {tuple(prompt_ids.shape)}")
    _check_max_new_tokens(max_new_tokens)
    memory_args = memory_kwargs(model, memory)
    features = features or {}
    missing = set(model.token_features) - set(features)
    if missing:
        raise AuraError(f"the model reads token features {sorted(missing)}: pass features= "
                        "(aura.data.prosody.token_features builds them from the tokenizer)")
    t0 = prompt_ids.size(1)
    # Allocated outside inference_mode so callers get an ordinary tensor they may edit in place.
    out = torch.empty(prompt_ids.size(0), t0 + max_new_tokens, dtype=torch.long,
                      device=prompt_ids.device)
    out[:, :t0] = prompt_ids
    if max_new_tokens == 0:
        return out
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            n = _decode(model, out, t0, sampling, use_cache, stop_ids, on_token, features,
                        memory_args, knn)
    finally:
        model.train(was_training)
    return out[:, :n]


class TextStream:
    """New ids -> text: finds stop strings and streams only text that can no longer change.

    Text is held back while it ends in U+FFFD (a multi-byte character split across tokens) or
    in a prefix of a stop string (it may turn out to be excluded), so the streamed pieces are
    always a prefix of the final result and concatenate to exactly it.

    Decoding is incremental (vLLM's prefix/read offsets): each token decodes only the few ids
    since the text last settled, with a little context before them so that tokenizers whose
    output depends on what precedes (a leading space) decode them as in the whole; stop strings
    are looked for only where a new one could end. A long reply costs the same per token as a
    short one.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str],
                 stream: Callable[[str], None] | None):
        self.tokenizer, self.stop, self.stream = tokenizer, stop, stream
        self.ids: list[int] = []
        self.result: str | None = None  # set once a stop string is found
        self.emitted = 0  # characters streamed so far
        self.text = ""  # the settled text of ids[:read]
        self.prefix = self.read = 0  # ids[prefix:read] is the context decoded before new ids
        self.longest_stop = max((len(x) for x in stop), default=0)
        # the proper prefixes of the stop strings by their last character, longest first: the
        # text's end can only be one whose last character it ends in (one lookup per token)
        self.prefixes: dict[str, list[str]] = {}
        for p in sorted({s[:k] for s in stop for k in range(1, len(s))}, key=len, reverse=True):
            self.prefixes.setdefault(p[-1], []).append(p)

    def push(self, token: torch.Tensor) -> bool:
        """Take one step's (1,) ids; True asks ``generate`` to stop."""
        return self.push_id(int(token[0]))

    def push_id(self, tok: int) -> bool:
        """Take one id; True when generation should stop (end of text or a stop string)."""
        if tok == self.tokenizer.eot_id:
            return True
        self.ids.append(tok)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        now = decode(self.ids[self.prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return False  # an incomplete character: wait for the rest of it
        old = len(self.text)
        self.text += now[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        found = self._find_stop(self.text, old)
        if found is not None:
            self.result = self.text[:found]
            return True
        if self.stream is not None:
            held = 0
            for p in self.prefixes.get(self.text[-1], ()):  # longest first
                if self.text.endswith(p):
                    held = len(p)
                    break
            settled = len(self.text) - held
            if settled > self.emitted:
                self.stream(self.text[self.emitted:settled])
                self.emitted = settled
        return False

    def _find_stop(self, text: str, old: int) -> int | None:
        """Where the first stop string in ``text`` starts, looking only where one could end
        after ``text[:old]`` (which held none)."""
        start = max(0, old - self.longest_stop + 1)
        found = [i for i in (text.find(x, start) for x in self.stop) if i >= 0]
        return min(found) if found else None

    def finish(self) -> str:
        """The whole new text, after streaming whatever was still held back."""
        text = self.result
        if text is None:
            text = self.text
            if self.read < len(self.ids):  # ids still waiting for the rest of a character
                before = (self.tokenizer.decode(self.ids[self.prefix:self.read])
                          if self.read > self.prefix else "")
                text += self.tokenizer.decode(self.ids[self.prefix:])[len(before):]
                found = self._find_stop(text, len(self.text))
                if found is not None:
                    text = text[:found]
        if self.stream is not None and len(text) > self.emitted:
            self.stream(text[self.emitted:])
        return text


def generate_text(model: AuraModel, tokenizer: Tokenizer, prompt: str, max_new_tokens: int,
                  sampling: SamplingConfig, *, use_cache: bool = True, stop: Sequence[str] = (),
                  stream: Callable[[str], None] | None = None,
                  on_ready: Callable[[], None] | None = None, memory: str = "read",
                  on_token: Callable[[torch.Tensor], None] | None = None,
                  knn: KNNLM | None = None) -> str:
    """The text generated after ``prompt``, ending before the first stop string or eot token.

    ``stream`` receives the same text in pieces as it is generated. An empty prompt starts
    from the tokenizer's end-of-text token, which is what a document start looks like in
    training; without one there is nothing to condition on. ``on_ready`` is called once every
    argument has been checked, before the first token: a caller that echoes the prompt there
    prints nothing for input that is refused. ``memory`` as for ``generate``; ``on_token``
    sees each step's (B,) ids (e.g. ``MemoryTrace.push``); ``knn`` as for ``generate``.
    """
    if any(s == "" for s in stop):
        raise AuraError("stop strings must not be empty")
    memory_kwargs(model, memory)  # a mode the model cannot honour is refused before the echo
    _check_max_new_tokens(max_new_tokens)
    ids = tokenizer.encode(prompt)
    if len(ids) == 0:
        if tokenizer.eot_id is None:
            raise AuraError(f"empty prompt: the {tokenizer.kind} tokenizer has no end-of-text "
                            "token to start from")
        ids = np.array([tokenizer.eot_id])
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    prompt_ids = torch.as_tensor(ids.astype(np.int64), device=device)[None]
    features = token_features(model.token_features, tokenizer)
    if on_ready is not None:
        on_ready()
    text = TextStream(tokenizer, stop, stream)

    def push(token: torch.Tensor) -> bool:
        if on_token is not None:
            on_token(token)
        return text.push(token)

    generate(model, prompt_ids, max_new_tokens, sampling, use_cache=use_cache,
             stop_ids=tokenizer.eot_id, on_token=push, features=features, memory=memory,
             knn=knn)
    return text.finish()
