"""Exact held-out loss, perplexity and bits per byte, comparable across tokenizers.

Every token after the first is scored exactly once: the stream is cut into windows of
``block_size + 1`` tokens that overlap by one token, so window ``i`` predicts tokens
``i*bs + 1 .. (i+1)*bs`` from the window's own prefix. This is the standard non-overlapping
estimate: tokens early in a window see little context, so it is an upper bound on what a
sliding window would give, but it costs one forward per ``block_size`` tokens.

Bits per byte divides by the text bytes the *scored* tokens cover, so models with different
tokenizers can be ranked on the same text.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from aura.data.prosody import token_features
from aura.data.sampler import TokenFeatures, compute_features
from aura.data.shards import PreparedData
from aura.data.tokenizers import Tokenizer
from aura.errors import ConfigError, DataError
from aura.models.base import AuraModel
from aura.models.memory_mode import memory_kwargs

UNBOUNDED_WINDOW = 1024  # window for models without a context limit (recurrent ones)


@dataclass
class EvalResult:
    """``loss`` is mean nats per scored token; ``n_bytes`` the text bytes those tokens cover;
    ``metrics`` the model's own aux metrics (e.g. BDH sparsity), averaged over scored tokens."""

    loss: float
    ppl: float
    bits_per_byte: float
    n_tokens: int
    n_bytes: int
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_tokens(model: AuraModel, tokens: np.ndarray | torch.Tensor, n_bytes: int, *,
                    block_size: int | None = None, batch_size: int = 8,
                    max_tokens: int | None = None, progress: bool = False,
                    tokenizer: Tokenizer | None = None, memory: str = "read") -> EvalResult:
    """Exact NLL of a 1-D token stream (or its first ``max_tokens``).

    ``tokenizer`` is needed only by models that read token features (e.g. prosody).
    ``memory`` is the inference memory switch (aura.models.memory_mode); with ``write`` each
    batch of windows reads what the batches before it wrote.

    ``n_bytes`` is the UTF-8 size of the text ``tokens`` encode. The first token is never
    scored and ``max_tokens`` may drop a tail, so the bytes are pro-rated to the scored tokens
    (for a byte tokenizer this is exact: bits_per_byte == loss / ln 2).
    """
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    if n < 2:
        raise DataError(f"nothing to evaluate: {n} token(s), need at least 2")
    if n_bytes <= 0:
        raise DataError(f"n_bytes must be positive, got {n_bytes}")
    return _evaluate(model, [tokens], n, n_bytes / len(tokens), block_size=block_size,
                     batch_size=batch_size, progress=progress,
                     features=_features(model, tokenizer), memory=memory)


def evaluate_text(model: AuraModel, tokenizer: Tokenizer, text: str, **kw: Any) -> EvalResult:
    """Tokenise ``text`` and evaluate it; keywords as for :func:`evaluate_tokens`."""
    if not text:
        raise DataError("nothing to evaluate: the text is empty")
    _check_vocab(model, tokenizer.vocab_size)
    tokens = tokenizer.encode(text)
    if len(tokens) < 2:
        raise DataError(f"nothing to evaluate: the text is {len(tokens)} token(s), need at least 2")
    return evaluate_tokens(model, tokens, len(text.encode("utf-8")), tokenizer=tokenizer, **kw)


def evaluate_prepared(model: AuraModel, data: PreparedData, split: str = "val", *,
                      block_size: int | None = None, batch_size: int = 8,
                      max_tokens: int | None = None, progress: bool = False,
                      memory: str = "read") -> EvalResult:
    """Evaluate a prepared split as one stream: its shards in order, read window by window.

    The shards are never loaded whole. Prepared data keeps only the split's total text size, so
    ``n_bytes`` is the split's *average* bytes per token times the tokens scored: exact over a
    whole split, an estimate under ``max_tokens``.
    """
    s = data.split(split)
    _check_vocab(model, data.vocab_size)
    n = s.n_tokens if max_tokens is None else min(s.n_tokens, max_tokens)
    if n < 2:
        raise DataError(f"nothing to evaluate: the {split} split has {n} token(s), need 2")
    return _evaluate(model, s.maps, n, s.bytes_per_token, block_size=block_size,
                     batch_size=batch_size, progress=progress,
                     features=_features(model, data.tokenizer), memory=memory)


def _features(model: AuraModel, tokenizer: Tokenizer | None) -> TokenFeatures:
    names = model.token_features
    if names and tokenizer is None:
        raise ConfigError(f"the model reads token features {list(names)}: pass its tokenizer")
    return token_features(names, tokenizer) if names else {}


def _check_vocab(model: AuraModel, vocab_size: int) -> None:
    """Turn an embedding IndexError deep in the forward into a one-line input error."""
    model_vocab = model.config.vocab_size
    if model_vocab is not None and vocab_size > model_vocab:
        raise DataError(f"the tokenizer has {vocab_size} tokens but the model only "
                        f"{model_vocab}: evaluate with the tokenizer the model was trained on")


def _windows(chunks: Iterable[np.ndarray], n: int, size: int) -> Iterator[np.ndarray]:
    """Windows of ``size`` tokens overlapping by one over the first ``n`` tokens of the chunks
    read as one stream; the last window may be shorter (but has at least 2 tokens)."""
    carry = np.zeros(0, dtype=np.int64)
    left = n
    for chunk in chunks:
        pos, end = 0, min(len(chunk), left)
        left -= end
        while pos < end:
            take = min(size - len(carry), end - pos)
            carry = np.concatenate([carry, np.asarray(chunk[pos:pos + take], dtype=np.int64)])
            pos += take
            if len(carry) == size:
                yield carry
                carry = carry[-1:]
        if not left:
            break
    if len(carry) >= 2:
        yield carry


def _batches(windows: Iterator[np.ndarray], batch_size: int
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) of up to ``batch_size`` windows; short ones padded, targets with -1."""
    batch: list[np.ndarray] = []
    for w in windows:
        batch.append(w)
        if len(batch) == batch_size:
            yield _pad(batch)
            batch = []
    if batch:
        yield _pad(batch)


def _pad(batch: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    t = max(len(w) for w in batch) - 1
    x = np.zeros((len(batch), t), dtype=np.int64)
    y = np.full((len(batch), t), -1, dtype=np.int64)
    for row, w in enumerate(batch):
        x[row, :len(w) - 1] = w[:-1]
        y[row, :len(w) - 1] = w[1:]
    return x, y


def _device(model: AuraModel) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _evaluate(model: AuraModel, chunks: Iterable[np.ndarray], n: int, bytes_per_token: float, *,
              block_size: int | None, batch_size: int, progress: bool,
              features: TokenFeatures, memory: str = "read") -> EvalResult:
    """Sum the NLL of tokens 2..n of the chunks' stream; ``bytes_per_token`` prices a token."""
    limit = model.max_context
    bs = block_size if block_size is not None else limit or UNBOUNDED_WINDOW
    if bs < 1 or (limit is not None and bs > limit):
        raise ConfigError(f"block_size must be in 1..{limit or 'inf'}, got {bs}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    memory_args = memory_kwargs(model, memory)
    device = _device(model)
    total, scored = 0.0, 0
    aux_sums: dict[str, float] = defaultdict(float)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=n - 1, unit="tok", unit_scale=True,
                                           desc="eval", disable=not progress,
                                           file=sys.stderr) as bar:
            for x, y in _batches(_windows(chunks, n, bs + 1), batch_size):
                xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
                out = model(xt, **memory_args, **compute_features(features, xt))
                logits = out.logits
                nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                      yt.reshape(-1), reduction="sum", ignore_index=-1)
                total += nll.item()
                k = int((y >= 0).sum())
                scored += k
                for name, value in out.aux.items():
                    aux_sums[name] += float(value) * k
                bar.update(k)
    finally:
        model.train(was_training)
    loss = total / scored
    n_bytes = bytes_per_token * scored
    return EvalResult(loss=loss, ppl=math.exp(loss) if loss < 700 else math.inf,
                      bits_per_byte=total / math.log(2) / n_bytes,
                      n_tokens=scored, n_bytes=round(n_bytes),
                      metrics={name: v / scored for name, v in aux_sums.items()})
