"""Reading a document longer than the context window: consecutive windows, memory carried.

``aura eval RUN --text FILE --stream`` cuts the text into the same windows as the windowed
evaluation (``block_size + 1`` tokens overlapping by one, so every token after the first is
scored once) but feeds them one at a time, in order, and keeps between them what the model
keeps:

- its episodic memory, written at inference (``--memory write``, the default for models that
  can): window i's forward queues its memories, written as window i+1's forward starts, so every
  token reads only memories of earlier windows (aura.models.memory_mode);
- its recurrent state, when it has one and no context limit (BDH): the next window continues
  the state, so the stream is read as one sequence;
- an optional kNN-LM datastore (aura.memory.knn_lm), which the stream extends with each
  window's (hidden state, next token) pairs after the window is scored.

Models with a bounded context (learned absolute positions, a KV cache of ``block_size``) start
each window from its own prefix, as the windowed evaluation does: what crosses a window
boundary is the memory. So with memory off a stream scores exactly what ``evaluate_text`` scores.

The result has loss and bits per byte for every window index, so the gain past the first
window (where memory has nothing yet) is visible.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from aura.data.sampler import TokenFeatures, compute_features
from aura.data.tokenizers import Tokenizer
from aura.errors import ConfigError, DataError
from aura.eval.perplexity import UNBOUNDED_WINDOW, _check_vocab, _device, _features, _windows
from aura.models.base import AuraModel
from aura.models.memory_mode import default_memory_mode, memory_kwargs


class ReadOut(Protocol):
    """What turns a window's logits and hidden states into next-token log-probabilities, and
    learns from the window once it is scored (a kNN-LM datastore)."""

    def log_probs(self, logits: torch.Tensor, hidden: torch.Tensor, x: torch.Tensor,
                  carry: bool = False) -> torch.Tensor: ...

    def observe(self, hidden: torch.Tensor, x: torch.Tensor, targets: torch.Tensor
                ) -> None: ...


@dataclass
class WindowScore:
    """One window of the stream: its index, scored tokens, mean nats and bits per byte."""

    index: int
    n_tokens: int
    loss: float
    bits_per_byte: float


@dataclass
class StreamResult:
    """Totals over the stream (as ``EvalResult``), each window's scores, and the mean bits per
    byte of the first window and of all later ones (token-weighted): the memory's effect."""

    loss: float
    ppl: float
    bits_per_byte: float
    n_tokens: int
    n_bytes: int
    memory: str
    carries_state: bool
    first_window_bpb: float
    later_windows_bpb: float | None
    windows: list[WindowScore] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StreamStep:
    """What one window's forward produced: the inputs, targets, final hidden states and
    next-token log-probabilities (after any read-out), each (1, T, ...)."""

    index: int
    x: torch.Tensor
    y: torch.Tensor
    hidden: torch.Tensor | None
    log_probs: torch.Tensor


def stream_steps(model: AuraModel, tokens: np.ndarray, *, memory: str,
                 block_size: int | None = None, features: TokenFeatures | None = None,
                 readout: ReadOut | None = None) -> Iterator[StreamStep]:
    """Run the windows of ``tokens`` through ``model`` in order, one forward each, carrying
    memory (and recurrent state) as the module docstring says. The caller owns eval mode and
    inference mode."""
    limit = model.max_context
    bs = block_size if block_size is not None else limit or UNBOUNDED_WINDOW
    if bs < 1 or (limit is not None and bs > limit):
        raise ConfigError(f"block_size must be in 1..{limit or 'inf'}, got {bs}")
    kwargs = memory_kwargs(model, memory, other_memory=readout is not None)
    device = _device(model)
    cache = model.new_cache(1, bs) if limit is None else None
    for index, window in enumerate(_windows([tokens], len(tokens), bs + 1)):
        x = torch.from_numpy(window[:-1]).to(device)[None]
        y = torch.from_numpy(window[1:]).to(device)[None]
        out = model(x, cache=cache, **kwargs, **compute_features(features or {}, x))
        if readout is not None and out.hidden is not None:
            log_probs = readout.log_probs(out.logits, out.hidden, x, carry=True)
            readout.observe(out.hidden, x, y)
        else:
            log_probs = F.log_softmax(out.logits.float(), dim=-1)
        yield StreamStep(index, x, y, out.hidden, log_probs)


def evaluate_stream(model: AuraModel, tokenizer: Tokenizer, text: str, *,
                    memory: str | None = None, block_size: int | None = None,
                    max_tokens: int | None = None, progress: bool = False,
                    readout: ReadOut | None = None) -> StreamResult:
    """Score ``text`` (its first ``max_tokens``) as one stream of consecutive windows;
    ``memory`` is ``off`` / ``read`` / ``write`` (default: ``write`` where the model can)."""
    if not text:
        raise DataError("nothing to evaluate: the text is empty")
    _check_vocab(model, tokenizer.vocab_size)
    tokens = np.asarray(tokenizer.encode(text), dtype=np.int64)
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    if n < 2:
        raise DataError(f"nothing to evaluate: {n} token(s), need at least 2")
    bytes_per_token = len(text.encode("utf-8")) / len(tokens)
    mode = memory or default_memory_mode(model, streaming=True, knn=readout is not None)
    features = _features(model, tokenizer)
    windows: list[WindowScore] = []
    total = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=n - 1, unit="tok", unit_scale=True,
                                           desc="stream", disable=not progress,
                                           file=sys.stderr) as bar:
            for step in stream_steps(model, tokens[:n], memory=mode, block_size=block_size,
                                     features=features, readout=readout):
                nll = F.nll_loss(step.log_probs.reshape(-1, step.log_probs.size(-1)),
                                 step.y.reshape(-1), reduction="sum").item()
                k = step.y.numel()
                total += nll
                windows.append(WindowScore(step.index, k, nll / k,
                                           nll / math.log(2) / (bytes_per_token * k)))
                bar.update(k)
    finally:
        model.train(was_training)
    scored = sum(w.n_tokens for w in windows)
    later = windows[1:]
    later_tokens = sum(w.n_tokens for w in later)
    later_bpb = (sum(w.bits_per_byte * w.n_tokens for w in later) / later_tokens
                 if later_tokens else None)
    loss = total / scored
    return StreamResult(
        loss=loss, ppl=math.exp(loss) if loss < 700 else math.inf,
        bits_per_byte=total / math.log(2) / (bytes_per_token * scored), n_tokens=scored,
        n_bytes=round(bytes_per_token * scored), memory=mode,
        carries_state=model.max_context is None, first_window_bpb=windows[0].bits_per_byte,
        later_windows_bpb=later_bpb, windows=windows)


def window_buckets(windows: list[WindowScore]) -> list[tuple[str, float, int]]:
    """Token-weighted bits per byte over window indices 0, 1, 2-3, 4-7, ... (label, bpb,
    tokens): a per-position summary short enough to print for thousands of windows."""
    out: list[tuple[str, float, int]] = []
    lo = 0
    while lo < len(windows):
        hi = 1 if lo == 0 else 2 * lo
        part = windows[lo:hi]
        tokens = sum(w.n_tokens for w in part)
        bpb = sum(w.bits_per_byte * w.n_tokens for w in part) / tokens
        label = str(lo) if hi - lo == 1 else f"{lo}-{min(hi, len(windows)) - 1}"
        out.append((label, bpb, tokens))
        lo = hi
    return out
