"""Prosody of text, per token: the rhythm and affect cues a reader hears without audio.

Random "prosody" adds nothing to a model (the hippocampal benchmark's shuffled control); these
features come from the text itself, computed once per batch in the data pipeline (the sampler,
its DataLoader workers, the evaluator, the generator) and handed to the model, never recomputed
per layer. Channels, each in [0, 1] except valence in [-1, 1]:

    punct         the token holds punctuation
    sentence_end  it ends a sentence (. ! ?)
    paragraph     it ends a paragraph (a blank line)
    capital       it starts with a capital letter (names, sentence starts, shouting)
    word_pos      tokens since the current word began, /8, capped at 1
    sentence_pos  log(1 + tokens since the last sentence or paragraph end), /log(257), capped at 1
    valence       VADER lexicon valence /4 of the last sentiment word finished in this sentence
    arousal       its intensity: |valence|, x1.5 for an all-caps word, +0.5 on a "!" token

Every feature of token t depends on tokens <= t only. A word counts as finished when the token
holding the character after it arrives, so a valence never reveals how the next token continues
the word ("good" vs "goods"). VADER has no arousal rating; intensity plus VADER's own emphasis cues
(capitals, exclamation marks) stands in for it.
"""

from __future__ import annotations

import re
import string
from functools import cache
from importlib import resources

import numpy as np

from aura.data.tokenizers import Tokenizer
from aura.extras import VADER_INSTALL, require

FEATURES = ("punct", "sentence_end", "paragraph", "capital", "word_pos", "sentence_pos",
            "valence", "arousal")
N_FEATURES = len(FEATURES)
SENTENCE_END, PARAGRAPH = FEATURES.index("sentence_end"), FEATURES.index("paragraph")
_WORD = re.compile(r"[A-Za-z']+")
_PUNCT = set(string.punctuation)


@cache
def vader_lexicon() -> dict[str, float]:
    """word -> mean valence in [-4, 4], from the lexicon file vaderSentiment ships (offline)."""
    package = require("vaderSentiment", "prosody features (the VADER lexicon)", VADER_INSTALL)
    text = resources.files(package).joinpath("vader_lexicon.txt").read_text("utf-8")
    out = {}
    for line in text.splitlines():
        word, valence, *_ = line.split("\t")
        out[word] = float(valence)
    return out


def _elapsed(mark: np.ndarray) -> np.ndarray:
    """Tokens since the latest marked position at or before each one (start counts as marked)."""
    pos = np.broadcast_to(np.arange(mark.shape[1]), mark.shape)
    return pos - np.maximum.accumulate(np.where(mark, pos, 0), axis=1)


class Prosody:
    """``prosody(ids)``: (B, T) token ids -> (B, T, N_FEATURES) float32 features.

    Per-token facts (is it punctuation, does it start with a letter...) are looked up in tables
    built once from the vocabulary; cross-token facts are running maxima over positions. Only the
    lexicon lookup walks words, one regex pass per row.
    """

    def __init__(self, pieces: list[str], lexicon: dict[str, float] | None = None):
        self.pieces = np.array(pieces, dtype=object)
        self.lexicon = vader_lexicon() if lexicon is None else lexicon

        def table(test: object) -> np.ndarray:
            return np.array([bool(p) and bool(test(p)) for p in pieces])  # type: ignore[operator]

        self.length = np.array([len(p) for p in pieces], dtype=np.int64)
        self.punct = table(lambda p: any(c in _PUNCT for c in p))
        self.sentence_end = table(lambda p: p.rstrip()[-1:] in (".", "!", "?"))
        self.exclaim = table(lambda p: "!" in p)
        self.newline_end = table(lambda p: p.endswith("\n"))
        self.newline_start = table(lambda p: p.startswith("\n"))
        self.blank_line = table(lambda p: "\n\n" in p)
        self.letter_start = table(lambda p: p[0].isalpha())
        self.letter_end = table(lambda p: p[-1].isalpha())
        self.capital = table(lambda p: p.lstrip()[:1].isupper())

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> Prosody:
        return cls([tokenizer.decode([i]) for i in range(tokenizer.vocab_size)])

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2:
            raise ValueError(f"expected (batch, time) token ids, got shape {ids.shape}")
        B, T = ids.shape
        out = np.zeros((B, T, N_FEATURES), dtype=np.float32)
        prev_newline = np.zeros_like(ids, dtype=bool)
        prev_letter = np.zeros_like(ids, dtype=bool)
        prev_newline[:, 1:] = self.newline_end[ids[:, :-1]]
        prev_letter[:, 1:] = self.letter_end[ids[:, :-1]]
        paragraph = self.blank_line[ids] | (self.newline_start[ids] & prev_newline)
        sentence_end = self.sentence_end[ids] | paragraph
        word_start = ~(self.letter_start[ids] & prev_letter)
        boundary_before = np.zeros_like(sentence_end)
        boundary_before[:, 1:] = sentence_end[:, :-1]  # a sentence starts after its predecessor
        out[..., 0] = self.punct[ids]
        out[..., SENTENCE_END] = sentence_end
        out[..., PARAGRAPH] = paragraph
        out[..., 3] = self.capital[ids]
        out[..., 4] = np.minimum(_elapsed(word_start), 8) / 8
        out[..., 5] = np.minimum(np.log1p(_elapsed(boundary_before)) / np.log(257.0), 1.0)
        out[..., 6:8] = self._affect(ids, boundary_before)
        return out

    def _affect(self, ids: np.ndarray, sentence_start: np.ndarray) -> np.ndarray:
        """(valence, arousal) of the last sentiment word finished in the current sentence."""
        B, T = ids.shape
        hit = np.zeros((B, T), dtype=bool)
        value = np.zeros((B, T, 2), dtype=np.float32)
        for row in range(B):
            ends = np.cumsum(self.length[ids[row]])
            text = "".join(self.pieces[ids[row]])
            for m in _WORD.finditer(text):
                valence = self.lexicon.get(m.group().lower())
                if valence is None:
                    continue
                t = int(np.searchsorted(ends, m.end(), side="right"))  # holds the next char
                if t < T:
                    emphasis = 1.5 if m.end() - m.start() > 1 and m.group().isupper() else 1.0
                    hit[row, t] = True
                    value[row, t] = valence / 4, min(abs(valence) / 4 * emphasis, 1.0)
        pos = np.broadcast_to(np.arange(T), (B, T))
        last_hit = np.maximum.accumulate(np.where(hit, pos, -1), axis=1)
        last_start = np.maximum.accumulate(np.where(sentence_start, pos, -1), axis=1)
        live = last_hit >= last_start  # the word was finished in the current sentence
        held = np.take_along_axis(value, np.maximum(last_hit, 0)[..., None], axis=1)
        held[~live] = 0.0
        held[..., 1] = np.minimum(held[..., 1] + 0.5 * self.exclaim[ids], 1.0)
        return held


def token_features(names: tuple[str, ...], tokenizer: Tokenizer
                   ) -> dict[str, Prosody]:
    """The per-token feature builders a model asks for (``AuraModel.token_features``), by name."""
    builders = {"prosody": Prosody.from_tokenizer}
    unknown = [n for n in names if n not in builders]
    if unknown:
        raise ValueError(f"unknown token features {unknown}; known: {sorted(builders)}")
    return {name: builders[name](tokenizer) for name in names}
