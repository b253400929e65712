"""What the service applies to each text: local plasticity, episodic memories, optional gradients.

``Learner`` is the small interface the service knows (apply a text, evaluate held-out texts,
save and load its state, say what it is). ``PlasticLearner`` is the real one. A text is cut into
windows (the model's block size, else 256 tokens) and processed a chunk of 16 windows at a time;
everything a chunk learns is in place before the next chunk is measured:

* **Tokens** come from the model's tokenizer with ``--model``, else the byte tokenizer.
* **Surprise** of each token, in bits: ``-log2 p(token | preceding tokens of its window)`` under
  the model, or without one ``-log2 p(token)`` under the add-one token frequencies learned so
  far (frequency-based novelty). The frequencies are state too; their held-out surprise is the
  validation metric without a model.
* **Salience spikes**, three channels, what text has in place of speech's loudness, pitch and
  pauses:
  *novelty* (surprise above its running mean, an EMA over windows kept in the state),
  *boundary* (the token ends a sentence or paragraph) and *affect* (VADER arousal >= 0.5), the
  last two from ``aura.data.prosody``. A token whose channels spiked is potentiated by
  ``TokenSTDP``, the others depressed (lr+ 0.01, lr- 0.005, w in [-1, 1]: potentiation twice
  depression, so a token must spike in about a third of its occurrences to gain weight).
* **Salience** = surprise / running mean, scaled by the STDP weight (``modulate``, alpha 0.2):
  tokens that keep spiking become more salient.
* **Oja** (GHA with neurogenesis) over one feature vector per window, whitened online: the mean
  final hidden state under a model, else hashed token-bigram frequencies (64 buckets). Its
  residual is how much of a text's content the learned components do not explain.
* **Episodic memories** (a model with memory writers): a model that declares
  ``writes_own_memory`` (snn_rag) writes its own entries (in the surprise pass, or with
  ``remembers_by_salience`` in the pass below), told each window's service-wide token offset
  (``corpus_pos``, counted from just past the bank's newest entry, so the model's reads, limited
  to text before each token, still see every entry it came with); into any other store whose
  keys and values are as wide as the final hidden state the learner writes each window's most
  salient positions (importance the salience, ``source_pos`` the service-wide token position).
  A model that declares ``remembers_by_salience`` (hippocampal, natural_brain, snn_rag) is run
  once more over each chunk, told which tokens to remember (each window's most salient) and at
  which service-wide positions, and writes them itself: keyed by its own key projection and
  valued by its own memory layer's states, so its reads retrieve what the service found
  surprising. snn_rag, which writes its own memories, keeps every chunk (its bank is a
  retrieval corpus) and is told every token's salience: a chunk's importance is its most
  salient token's, so a full bank evicts the dullest text. A store keyed by its own projection
  in a model that cannot be told what to remember is only written by the model's training
  forwards (``--train-steps``); the service says so once at start.
* **Gradient steps** (``train_steps > 0``): AdamW (clip 1.0) on random windows of the text,
  seeded by its content hash, so a text learned again after a crash gets the same steps (a
  model that writes its own memories or is told what to remember forms none in them). A
  replay buffer (``aura.continual.replay``) keeps a reservoir of past windows, each entering
  with its mean salience as priority (the plasticity layer decides what is rehearsed) and
  re-prioritised by its loss when replayed; ``replay_fraction`` of each step's windows come from
  it. With ``ewc_lambda`` the steps are held toward the run's weights by the Fisher its
  checkpoint carries (``continual.ewc``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from aura.continual.ewc import EWC
from aura.continual.replay import ReplayBuffer, keyed_generator
from aura.continual.sleep import token_losses
from aura.data.prosody import FEATURES, PARAGRAPH, SENTENCE_END, Prosody, token_features
from aura.data.sampler import compute_features
from aura.data.tokenizers import ByteTokenizer, Tokenizer, split_pieces
from aura.errors import ConfigError, DataError
from aura.memory.store import SNIPPET_TOKENS, EpisodicStore
from aura.memory.writer import snippets
from aura.models.base import AuraModel
from aura.plasticity import OjaLayer, OnlineWhitener, TokenSTDP

PIECE_CHARS = 1 << 20  # text tokenised at once: bounds the tokenizer's memory
LEARNER_FILE, MODEL_FILE, OPTIM_FILE = (
    "learner.safetensors", "model.safetensors", "optimizer.safetensors")
REPLAY_FILE, REPLAY_JSON = "replay.safetensors", "replay.json"
STDP_DIR, WHITENER_DIR, OJA_DIR, MEMORY_DIR = "stdp", "whitener", "oja", "memory"
EMA_BETA = 0.05  # weight of one window's mean surprise in the running mean (the spike threshold)
HASH_DIM = 64  # hashed token-bigram features per window: Oja's input without a model
AROUSAL = FEATURES.index("arousal")


class Learner(Protocol):
    """What the service needs from whatever learns from the texts."""

    tokenizer: Tokenizer
    notes: list[str]  # what the service should tell the user once at start

    def apply(self, text: str, key: str, *, warmup: bool = False) -> dict[str, float]:
        """Learn from ``text``; ``key`` (its content hash) seeds anything random. Warmup passes
        train the local rules only. Returns per-text statistics, ``tokens`` among them.
        A text that cannot be learned raises ``DataError`` before anything changes."""
        ...

    def evaluate(self, texts: Sequence[str]) -> dict[str, float]:
        """Held-out metrics; learns nothing (a model's memory reads may still refresh the
        memories they return, as any forward does)."""
        ...

    def plastic_weights(self) -> dict[str, torch.Tensor]:
        """The weights warmup is meant to settle; their change per sweep is reported."""
        ...

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...

    def identity(self) -> dict[str, Any]:
        """What a saved state must match to be continued (tokenizer, sizes, model)."""
        ...


@dataclass
class LearnerConfig:
    window: int = 256  # tokens per window without a model (a model uses its block size)
    chunk_windows: int = 16  # windows per forward pass / per local-learning update
    memories_per_window: int = 4
    train_steps: int = 0  # gradient steps per file
    train_batch: int = 4
    lr: float = 1e-4
    seed: int = 1337
    replay_tokens: int = 0
    replay_fraction: float = 0.25
    ewc_lambda: float = 0.0


def _key_seed(key: str, seed: int) -> int:
    """A 63-bit seed from a content hash (or any string) and the run's seed."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class PlasticLearner:
    """Token statistics, STDP on salience spikes, Oja on window features (+ a model's memories
    and gradient steps); see the module docstring."""

    def __init__(self, tokenizer: Tokenizer | None = None, model: AuraModel | None = None,
                 model_id: dict[str, Any] | None = None, cfg: LearnerConfig | None = None,
                 device: torch.device | str = "cpu"):
        self.cfg = cfg or LearnerConfig()
        self.tokenizer = tokenizer or ByteTokenizer()
        self.model, self.model_id = model, model_id
        self.device = torch.device(device)
        self.vocab = self.tokenizer.vocab_size
        self.window = self.cfg.window
        if model is not None:
            self.vocab = max(self.vocab, model.config.vocab_size or self.vocab)
            self.window = int(model.max_context or self.cfg.window)
        self.counts = torch.zeros(self.vocab, dtype=torch.float64)
        self.surprise_ema = torch.full((1,), math.log2(self.vocab), dtype=torch.float64)
        self.position = torch.zeros(1, dtype=torch.int64)  # tokens learned, service-wide
        self.stores = self._stores()
        # A model that writes its own memories (snn_rag) is asked to; for the others the learner
        # writes final hidden states into stores of that width.
        self.own_writer = model is not None and model.writes_own_memory
        self.salience_writer = model is not None and model.remembers_by_salience
        # Where the service's text starts in the positions an own writer reads by: after every
        # entry its bank holds (e.g. a trained bank's corpus offsets), so those stay readable.
        self.origin = torch.tensor([self._bank_end() if self.own_writer else 0])
        self.features = self._features()
        hidden_dim = model.hidden_size if model is not None else None
        self.feature_kind = "hidden_mean" if hidden_dim else "bigrams"
        dim = hidden_dim or HASH_DIM
        self.prosody = Prosody.from_tokenizer(self.tokenizer)
        self.notes = self._notes(hidden_dim)
        self.stdp = TokenSTDP(self.vocab, lr_plus=0.01, lr_minus=0.005, alpha=0.2)
        # float64: LAPACK's float32 eigh fails to converge on some near-zero covariances of
        # sparse features; eps ~1 keeps the order of the variances for Oja
        self.whitener = OnlineWhitener(dim, eps=1.0, dtype=torch.float64)
        self.oja = OjaLayer(dim, min(16, dim), grow_threshold=0.5, seed=self.cfg.seed,
                            dtype=torch.float64)
        self.optimizer: torch.optim.Optimizer | None = None
        self.model_changed = False  # weights differ from the run's: saved with the state
        self.optim_tensors: dict[str, torch.Tensor] = {}  # kept across a session not training
        self.replay: ReplayBuffer | None = None
        self.source: str | None = None  # the run the model came from (learn-export reads it)
        self.ewc: EWC | None = None
        if model is not None and self.cfg.train_steps > 0:
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.cfg.lr)
            if self.cfg.replay_tokens > 0:
                self.replay = ReplayBuffer(self.cfg.replay_tokens, self.window + 1, "loss")

    def _notes(self, hidden_dim: int | None) -> list[str]:
        notes = []
        for name, store in self.stores.items():
            model_writes = self.own_writer or self.salience_writer
            if not model_writes and (store.dim_key, store.dim_value) != (hidden_dim,) * 2:
                notes.append(f"memory store {name!r} ({store.dim_key}-d keys) is written only by "
                             "the model itself (its training forwards: --train-steps)")
        return notes

    def _stores(self) -> dict[str, EpisodicStore]:
        """The model's stores, with its queued writes applied."""
        return self.model.memory_stores() if self.model is not None else {}

    def _features(self) -> dict[str, Any]:
        names = self.model.token_features if self.model is not None else ()
        return token_features(names, self.tokenizer) if names else {}

    def identity(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer.hash, "vocab": self.vocab, "window": self.window,
                "features": [self.feature_kind, self.whitener.dim], "model": self.model_id,
                "memory": sorted(self.stores)}

    # --- learning ------------------------------------------------------------------------------

    def encode(self, text: str) -> torch.Tensor:
        parts = [self.tokenizer.encode(p) for p in split_pieces(text, PIECE_CHARS)]
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return torch.from_numpy(ids.astype(np.int64))

    def apply(self, text: str, key: str, *, warmup: bool = False) -> dict[str, float]:
        ids = self.encode(text)
        n = ids.numel()
        if n and int(ids.max()) >= self.vocab:
            raise DataError(f"token id {int(ids.max())} is outside the model's vocabulary")
        chunk = self.window * self.cfg.chunk_windows
        bits_sum, spiked, residual, windows, grew, oja_skipped = 0.0, 0, 0.0, 0, 0, 0
        saliences = []
        written = self._memories_written()
        for start in range(0, n, chunk):
            part = ids[start:start + chunk]
            bits, hidden = self._surprise(part, remember=not warmup and not self.salience_writer)
            spikes = self._spikes(part, bits)
            self.stdp.update(part, spikes)
            salience = self.stdp.modulate((bits / self.surprise_ema).float(), part)
            saliences.append(salience)
            feats = self._window_features(part, hidden)
            out = self._oja_step(feats)
            if self.salience_writer and not warmup:
                self._memorize_through_model(part, salience)
            elif hidden is not None and self.stores and not warmup and not self.own_writer:
                self._memorize(part, salience, hidden)
            self.counts += torch.bincount(part, minlength=self.vocab).double()
            self._update_ema(bits)
            self.position += part.numel()
            bits_sum += float(bits.sum())
            spiked += int((spikes.sum(1) > 0).sum())
            if out is not None:
                residual += out["residual"] * feats.shape[0]
                windows += feats.shape[0]
                grew += int(out["grew"])
            else:
                oja_skipped += 1
        stats = {"tokens": float(n), "surprise_bits": bits_sum / max(n, 1),
                 "spike_rate": spiked / max(n, 1), "oja_residual": residual / max(windows, 1),
                 "oja_components": float(self.oja.k), "oja_grew": float(grew),
                 "oja_skipped": float(oja_skipped)}
        if self.stores and not warmup:
            stats["memories"] = float(self._memories_written() - written)
        if self.optimizer is not None and not warmup and n >= 2:
            stats["train_loss"] = self._train(ids, key, torch.cat(saliences))
        return stats

    def _update_ema(self, bits: torch.Tensor) -> None:
        """The running mean surprise after one EMA step per window, in closed form."""
        means = torch.stack([w.mean() for w in bits.split(self.window)])
        decay = (1 - EMA_BETA) ** torch.arange(len(means) - 1, -1, -1, dtype=torch.float64)
        self.surprise_ema.mul_((1 - EMA_BETA) ** len(means)).add_(EMA_BETA * (decay * means).sum())

    def _spikes(self, ids: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """(T, 3) salience channels: novelty, boundary, affect (see the module docstring)."""
        prosody = torch.from_numpy(self.prosody(ids.numpy()[None])[0])
        boundary = (prosody[:, SENTENCE_END] > 0) | (prosody[:, PARAGRAPH] > 0)
        return torch.stack([bits > self.surprise_ema, boundary, prosody[:, AROUSAL] >= 0.5],
                           dim=1).float()

    def _oja_step(self, feats: torch.Tensor) -> dict[str, Any] | None:
        """Whiten and learn one chunk's window features; None (the chunk's Oja step skipped,
        the whitener's statistics kept) if the covariance's eigendecomposition fails."""
        self.whitener.update(feats)
        try:
            return self.oja.step(self.whitener.transform(feats))
        except torch.linalg.LinAlgError:
            return None

    def _window_features(self, ids: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        """One vector per window: the mean hidden state, or hashed bigram frequencies."""
        if hidden is not None and self.feature_kind == "hidden_mean":
            return torch.stack([h.mean(0) for h in hidden.split(self.window)])
        n_win = (ids.numel() + self.window - 1) // self.window
        pair = (ids[:-1] * 1000003 + ids[1:] * 8191) % HASH_DIM
        win = torch.arange(1, ids.numel()) // self.window
        feats = torch.zeros(n_win * HASH_DIM).index_add_(
            0, win * HASH_DIM + pair, torch.ones(pair.numel()))
        feats = feats.view(n_win, HASH_DIM)
        return feats / feats.sum(1, keepdim=True).clamp(min=1.0)

    def _unigram_bits(self, ids: torch.Tensor) -> torch.Tensor:
        total = self.counts.sum() + self.vocab
        return -torch.log2((self.counts[ids] + 1.0) / total)

    @torch.no_grad()
    def _surprise(self, ids: torch.Tensor, remember: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Bits per token (float64) and, with a model, its final hidden states (T, D).

        Under a model the first token of each window has no context: it keeps its unigram bits.
        ``remember`` lets a model that writes its own memories queue this input's.
        """
        bits = self._unigram_bits(ids)
        if self.model is None:
            return bits, None
        full = ids.numel() // self.window * self.window
        groups = [g for g in (ids[:full].view(-1, self.window), ids[full:][None]) if g.numel()]
        hidden, off = [], 0
        for g in groups:
            x = g.to(self.device)
            kw = compute_features(self.features, x)
            if self.own_writer:
                starts = (int(self.origin) + int(self.position) + off
                          + torch.arange(g.shape[0]) * g.shape[1])
                kw |= {"remember": remember, "corpus_pos": starts.to(self.device)}
            out = self.model(x, **kw)
            if x.shape[1] > 1:
                logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
                nll = -logp.gather(2, x[:, 1:, None]).squeeze(2).double().cpu() / math.log(2)
                bits.view(-1)[off:off + g.numel()].view_as(g)[:, 1:] = nll
            assert out.hidden is not None
            hidden.append(out.hidden.float().cpu().reshape(g.numel(), -1))
            off += g.numel()
        return bits, torch.cat(hidden)

    def _memories_written(self) -> int:
        """Memories ever written into the model's stores (ids are never reused); asking for
        the stores also applies a model's queued writes."""
        return sum(s.next_id for s in self._stores().values())

    def _memorize(self, ids: torch.Tensor, salience: torch.Tensor, hidden: torch.Tensor) -> None:
        """Write each window's most salient positions into every store of the hidden width."""
        fits = [s for s in self.stores.values()
                if s.dim_key == hidden.shape[1] and s.dim_value == hidden.shape[1]]
        base = int(self.position)
        text = snippets(ids.reshape(1, -1).cpu(), SNIPPET_TOKENS)[0]  # what each memory shows
        for off in range(0, ids.numel(), self.window):
            w = salience[off:off + self.window]
            top = torch.topk(w, min(self.cfg.memories_per_window, w.numel())).indices + off
            for store in fits:
                store.write(hidden[top], hidden[top], salience[top], step=base + off,
                            source_pos=base + top, source_tokens=text[top])

    def _top_salience(self, salience: torch.Tensor) -> torch.Tensor:
        """``salience`` kept at each window's ``memories_per_window`` most salient tokens (ties
        to the earliest), 0 elsewhere; floored above 0 so every chosen token is written."""
        keep = torch.zeros_like(salience)
        for off in range(0, salience.numel(), self.window):
            w = salience[off:off + self.window]
            top = torch.topk(w, min(self.cfg.memories_per_window, w.numel())).indices + off
            keep[top] = salience[top].clamp_min(1e-6)
        return keep

    @torch.no_grad()
    def _memorize_through_model(self, ids: torch.Tensor, salience: torch.Tensor) -> None:
        """Have the model write each window's most salient tokens (``remembers_by_salience``)
        at their service-wide positions; the stores then hold them. A model that writes its
        own memories keeps choosing what (snn_rag: every chunk, its bank a retrieval corpus)
        and is given every token's salience as importance."""
        assert self.model is not None
        chosen = (salience.clamp_min(1e-6) if self.own_writer
                  else self._top_salience(salience))
        self.model.eval()
        full = ids.numel() // self.window * self.window
        off = 0
        for g, s in ((ids[:full].view(-1, self.window), chosen[:full].view(-1, self.window)),
                     (ids[full:][None], chosen[full:][None])):
            if not g.numel():
                continue
            x = g.to(self.device)
            starts = (int(self.origin) + int(self.position) + off
                      + torch.arange(g.shape[0]) * g.shape[1])
            self.model(x, remember=True, memory_salience=s.to(self.device),
                       corpus_pos=starts.to(self.device), **compute_features(self.features, x))
            off += g.numel()
        self.stores = self._stores()  # applies the last window's queued writes

    def _train(self, ids: torch.Tensor, key: str, salience: torch.Tensor) -> float:
        """``train_steps`` AdamW steps on random windows of this text, seeded by ``key``, with
        replayed windows mixed in and the EWC penalty added when configured; the text's windows
        then enter the replay buffer with their mean salience as priority."""
        assert self.model is not None and self.optimizer is not None
        gen = torch.Generator().manual_seed(_key_seed(key, self.cfg.seed))
        torch.manual_seed(_key_seed(key, self.cfg.seed + 1))  # dropout
        size = min(self.window, ids.numel() - 1)
        self.model.train()
        losses = []
        for _ in range(self.cfg.train_steps):
            starts = torch.randint(0, ids.numel() - size, (self.cfg.train_batch,), generator=gen)
            x = torch.stack([ids[s:s + size] for s in starts.tolist()]).to(self.device)
            y = torch.stack([ids[s + 1:s + 1 + size] for s in starts.tolist()]).to(self.device)
            kw = compute_features(self.features, x)
            if self.own_writer or self.salience_writer:  # this text's memories are written:
                kw["remember"] = False  # its salient tokens, not what a training step finds novel
            step_key = (_key_seed(key, self.cfg.seed), len(losses))
            loss = self._replay_loss(x, y, kw, step_key)
            if self.ewc is not None and self.ewc.active:
                loss = loss + self.ewc.penalty(self.model)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            losses.append(loss.item())
        if self.replay is not None and size + 1 == self.replay.length:
            starts = torch.arange(0, ids.numel() - size, size)
            windows = torch.stack([ids[s:s + size + 1] for s in starts.tolist()])
            priority = torch.stack([salience[s:s + size + 1].mean() for s in starts.tolist()])
            self.replay.offer(windows, keyed_generator(_key_seed(key, self.cfg.seed), -1),
                              priority)
        self.model_changed = True
        self.model.eval()
        return sum(losses) / len(losses)

    def _replay_loss(self, x: torch.Tensor, y: torch.Tensor, kw: dict[str, Any],
                     key: tuple[int, int]) -> torch.Tensor:
        """The step's loss: the text's windows, and with a non-empty buffer ``replay_fraction``
        of the rows replayed (importance-weighted; their priorities become their losses)."""
        assert self.model is not None
        buf = self.replay
        k = 0 if buf is None or not len(buf) else min(
            round(self.cfg.replay_fraction * x.size(0)), x.size(0) - 1)
        n = x.size(0) - k
        replayed = None
        if k:  # first, reading no memories: see aura.continual.hook.ContinualHook.forward
            assert buf is not None
            idx, windows, weights = buf.sample(k, keyed_generator(*key))
            xr, yr = windows[:, :-1].to(self.device), windows[:, 1:].to(self.device)
            rkw: dict[str, Any] = compute_features(self.features, xr)
            if self.own_writer:
                rkw["remember"] = False
            if self.model.has_memory_switch:
                rkw["use_memory"] = False
            per_seq = token_losses(self.model(xr, **rkw).logits, yr)
            buf.update(idx, per_seq)
            replayed = (per_seq * weights.to(per_seq.device)).sum()
        out = self.model(x[:n], y[:n], **{name: v[:n] if torch.is_tensor(v) else v
                                          for name, v in kw.items()})
        return out.loss if replayed is None else (out.loss * n + replayed) / (n + k)

    # --- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, texts: Sequence[str]) -> dict[str, float]:
        """Held-out unigram bits/token, model bits/token (with a model) and the fraction of the
        whitened window features Oja's components leave unexplained."""
        bits = model_bits = 0.0
        n = model_n = 0
        feats = []
        for text in texts:
            ids = self.encode(text)
            if not ids.numel():
                continue
            bits += float(self._unigram_bits(ids).sum())
            n += ids.numel()
            under_model, hidden = self._surprise(ids)
            if self.model is not None:
                in_context = torch.arange(ids.numel()) % self.window != 0
                model_bits += float(under_model[in_context].sum())
                model_n += int(in_context.sum())
            feats.append(self._window_features(ids, hidden))
        out = {"unigram_bits": bits / max(n, 1)}
        if self.model is not None:
            out["model_bits"] = model_bits / max(model_n, 1)
        if feats and self.whitener.steps:
            with contextlib.suppress(torch.linalg.LinAlgError):  # see _oja_step
                z = self.whitener.transform(torch.cat(feats))
                w = self.oja.components
                energy = float(z.square().sum())
                lost = float((z - (z @ w.T) @ w).square().sum())
                out["oja_residual"] = lost / energy if energy > 0 else 0.0
        return out

    # --- state ---------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The learner's own tensors; the rules save theirs in their own directories."""
        return {"counts": self.counts, "surprise_ema": self.surprise_ema,
                "position": self.position, "origin": self.origin}

    def _bank_end(self) -> int:
        """One past the largest ``source_pos`` in the model's stores (0 when they are empty)."""
        ends = [int(st.source_pos[st.ids >= 0].max()) + 1 for st in self.stores.values()
                if len(st)]
        return max(ends, default=0)

    def plastic_weights(self) -> dict[str, torch.Tensor]:
        return {"stdp": self.stdp.weights, "oja": self.oja.components,
                "token_frequencies": self.counts / self.counts.sum().clamp(min=1.0)}

    def save(self, directory: Path) -> None:
        save_file({k: v.contiguous() for k, v in self.state_tensors().items()},
                  str(directory / LEARNER_FILE))
        (directory / "learner.json").write_text(json.dumps(
            {"config": asdict(self.cfg), "identity": self.identity(), "model_path": self.source},
            indent=1))
        self.stdp.save(directory / STDP_DIR)
        self.whitener.save(directory / WHITENER_DIR)
        self.oja.save(directory / OJA_DIR)
        if self.model is not None and self.model_changed:
            save_model(self.model, str(directory / MODEL_FILE))
        optim = (_optimizer_tensors(self.optimizer) if self.optimizer is not None
                 else self.optim_tensors)
        if optim:
            save_file(optim, str(directory / OPTIM_FILE))
        for name, store in self._stores().items():  # with a model's queued writes applied
            store.save(directory / MEMORY_DIR / name)
        if self.replay is not None and len(self.replay):
            save_file(self.replay.tensors(), str(directory / REPLAY_FILE))
            (directory / REPLAY_JSON).write_text(json.dumps(self.replay.state()))

    def load(self, directory: Path) -> None:
        try:
            tensors = load_file(str(directory / LEARNER_FILE))
            for name, target in self.state_tensors().items():
                if name == "origin" and name not in tensors:  # a state saved before origins
                    continue
                if tensors[name].shape != target.shape:
                    raise ValueError(name)
                target.copy_(tensors[name])
            if self.model is not None and (directory / MODEL_FILE).is_file():
                load_model(self.model, str(directory / MODEL_FILE), device=str(self.device))
                self.model_changed = True
            if (directory / OPTIM_FILE).is_file():
                self.optim_tensors = load_file(str(directory / OPTIM_FILE))
                if self.optimizer is not None:
                    _load_optimizer(self.optimizer, self.optim_tensors)
            if self.replay is not None and (directory / REPLAY_FILE).is_file():
                self.replay.load(load_file(str(directory / REPLAY_FILE)),
                                 json.loads((directory / REPLAY_JSON).read_text()))
        except (OSError, SafetensorError, KeyError, ValueError, RuntimeError) as exc:
            raise DataError(f"state {directory}: cannot load the learner ({exc})") from None
        self.stdp = TokenSTDP.load(directory / STDP_DIR)
        self.whitener = OnlineWhitener.load(directory / WHITENER_DIR)
        self.oja = OjaLayer.load(directory / OJA_DIR)
        if self.stdp.vocab_size != self.vocab or self.oja.dim != self.whitener.dim:
            raise DataError(f"state {directory}: plasticity sizes do not match the learner")
        for name, store in self.stores.items():
            store.restore(directory / MEMORY_DIR / name)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    sd = opt.state_dict()
    return {f"{pid}.{k}": v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
            for pid, state in sd["state"].items() for k, v in state.items()}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def build_learner(model: Path | None, device: str, cfg: LearnerConfig) -> PlasticLearner:
    """The learner for ``--model RUN_DIR`` (its tokenizer, weights and memories) or for none."""
    if model is None:
        if cfg.train_steps:
            raise ConfigError("--train-steps needs --model RUN_DIR")
        return PlasticLearner(cfg=cfg)
    from aura.train.checkpoint import MODEL_FILE as CKPT_MODEL
    from aura.train.checkpoint import load_for_inference
    from aura.train.device import pick_device

    dev = pick_device(device)
    loaded = load_for_inference(model, dev)
    if CKPT_MODEL not in loaded.meta["files"]:  # train.checkpoint_format=sharded
        raise DataError(f"{loaded.path} is a sharded checkpoint; consolidate it first with "
                        f"`aura export {model} --out DIR` and learn from DIR")
    model_id = {"name": loaded.config.model.name, "step": loaded.meta.get("step"),
                "weights_sha256": loaded.meta["files"][CKPT_MODEL]}
    learner = PlasticLearner(loaded.tokenizer, loaded.model, model_id, cfg, dev)
    learner.source = str(Path(model).resolve())
    if cfg.train_steps and cfg.ewc_lambda > 0:
        from aura.continual.hook import STATE_TENSORS

        if not (loaded.path / STATE_TENSORS).is_file():
            raise ConfigError(f"--ewc-lambda needs a Fisher: {loaded.path} was not trained "
                              "with continual.ewc=true")
        learner.ewc = EWC(cfg.ewc_lambda)
        learner.ewc.load_tensors({k: v.to(dev) for k, v in
                                  load_file(str(loaded.path / STATE_TENSORS)).items()})
    return learner
