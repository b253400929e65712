"""Prosody one token at a time, for many rows: what ``Prosody`` gives the newest token of a
window, from a few numbers of state per row instead of the whole window again.

A batching decoder feeds each row one new token per round; ``Prosody(window)[:, -1]`` would redo
the row's whole window (and its regex pass) every round. Every feature of token t depends on
tokens <= t through a handful of running facts, kept here per row: whether the previous token
ended a line, a word, a sentence; tokens since the word and the sentence began; the word still
being spelled (it is finished, and looked up in the lexicon, when a token holding a character
after it arrives); the valence and arousal held since the last sentiment word of the sentence.
``start`` builds a row's state from its window (the window's start counts as the start of
text, as in ``Prosody``), ``push`` takes one id per row and returns their features, equal to
``Prosody`` of the whole window's last token (tested on random windows, bit for bit).
"""

from __future__ import annotations

import re

import numpy as np

from aura.data.prosody import N_FEATURES, PARAGRAPH, SENTENCE_END, Prosody

_WORD_CHAR = re.compile(r"[A-Za-z']")
_WORD = re.compile(r"[A-Za-z']+")
_LOG_257 = np.log(257.0)


class _Pieces:
    """Per id, what ``push`` needs of its text beyond ``Prosody``'s tables."""

    def __init__(self, prosody: Prosody):
        lexicon = prosody.lexicon
        n = len(prosody.pieces)
        self.word_only = np.zeros(n, dtype=bool)  # non-empty, every character a word character
        self.lead: list[str] = [""] * n  # word characters before its first other character
        self.trail: list[str] = [""] * n  # word characters after its last other character
        self.inner: list[tuple[float, float] | None] = [None] * n  # its own last lexicon word
        for i, piece in enumerate(prosody.pieces.tolist()):
            if piece and all(_WORD_CHAR.match(c) for c in piece):
                self.word_only[i] = True
                continue
            words = list(_WORD.finditer(piece))
            if words and words[0].start() == 0:
                self.lead[i] = words[0].group()
            if words and words[-1].end() == len(piece):
                self.trail[i] = words[-1].group()
            for m in words:  # words that start and finish inside the piece
                if m.start() > 0 and m.end() < len(piece):
                    self.inner[i] = _affect(m.group(), lexicon) or self.inner[i]


def _affect(word: str, lexicon: dict[str, float]) -> tuple[float, float] | None:
    """(valence, arousal) of a finished word, as ``Prosody._affect`` rates it; None: not in
    the lexicon."""
    valence = lexicon.get(word.lower())
    if valence is None:
        return None
    emphasis = 1.5 if len(word) > 1 and word.isupper() else 1.0
    return valence / 4, min(abs(valence) / 4 * emphasis, 1.0)


class ProsodyStream:
    """Prosody features of each row's newest token, rows ``0..capacity-1`` (see the module
    docstring). ``move`` follows a batch's rows as it compacts them."""

    _STATE = (("prev_newline", bool), ("prev_letter", bool), ("prev_sentence_end", bool),
              ("word_elapsed", np.int64), ("sentence_elapsed", np.int64))

    def __init__(self, prosody: Prosody, capacity: int = 0):
        self.prosody, self.pieces = prosody, _Pieces(prosody)
        self.capacity = 0
        self.prev_newline = self.prev_letter = self.prev_sentence_end = np.zeros(0, bool)
        self.word_elapsed = self.sentence_elapsed = np.zeros(0, np.int64)
        self.held = np.zeros((0, 2), dtype=np.float32)  # (valence, arousal) of the sentence
        self.pending: list[str] = []  # the word still being spelled
        self.grow(capacity)

    def grow(self, capacity: int) -> None:
        """Room for ``capacity`` rows (existing rows keep their state)."""
        if capacity <= self.capacity:
            return
        for name, dtype in self._STATE:
            new = np.zeros(capacity, dtype=dtype)
            new[:self.capacity] = getattr(self, name)
            setattr(self, name, new)
        held = np.zeros((capacity, 2), dtype=np.float32)
        held[:self.capacity] = self.held
        self.held = held
        self.pending += [""] * (capacity - self.capacity)
        self.capacity = capacity

    def start(self, row: int, window: list[int]) -> None:
        """Row ``row`` has seen ``window`` (non-empty) from its start: ``Prosody``'s
        computation, kept at the window's last token."""
        p, ids = self.prosody, np.asarray(window, dtype=np.int64)
        n = len(ids)
        pos = np.arange(n)
        prev_newline, prev_letter = np.zeros(n, bool), np.zeros(n, bool)
        prev_newline[1:], prev_letter[1:] = p.newline_end[ids[:-1]], p.letter_end[ids[:-1]]
        paragraph = p.blank_line[ids] | (p.newline_start[ids] & prev_newline)
        sentence_end = p.sentence_end[ids] | paragraph
        word_start = ~(p.letter_start[ids] & prev_letter)
        sentence_start = np.zeros(n, bool)
        sentence_start[1:] = sentence_end[:-1]
        self.prev_newline[row] = p.newline_end[ids[-1]]
        self.prev_letter[row] = p.letter_end[ids[-1]]
        self.prev_sentence_end[row] = sentence_end[-1]
        self.word_elapsed[row] = n - 1 - np.where(word_start, pos, 0).max()
        self.sentence_elapsed[row] = n - 1 - np.where(sentence_start, pos, 0).max()
        ends = np.cumsum(p.length[ids])
        text = "".join(p.pieces[ids].tolist())
        last_hit, value, pending = -1, (0.0, 0.0), ""
        for m in _WORD.finditer(text):
            if m.end() == len(text):
                pending = m.group()
                break
            affect = _affect(m.group(), p.lexicon)
            if affect is not None:
                last_hit, value = int(np.searchsorted(ends, m.end(), side="right")), affect
        last_start = np.where(sentence_start, pos, -1).max()
        self.held[row] = value if last_hit >= 0 and last_hit >= last_start else (0.0, 0.0)
        self.pending[row] = pending

    def move(self, src: int, dst: int) -> None:
        """Row ``src``'s state becomes row ``dst``'s."""
        for name, _ in self._STATE:
            a = getattr(self, name)
            a[dst] = a[src]
        self.held[dst] = self.held[src]
        self.pending[dst] = self.pending[src]

    def push(self, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Each row's next token, ``ids[i]`` for row ``rows[i]`` (rows that have ``start``ed):
        their (len(rows), N_FEATURES) float32 features; the rows' states move past them."""
        p, ids = self.prosody, np.asarray(ids, dtype=np.int64)
        out = np.zeros((len(ids), N_FEATURES), dtype=np.float32)
        paragraph = p.blank_line[ids] | (p.newline_start[ids] & self.prev_newline[rows])
        sentence_end = p.sentence_end[ids] | paragraph
        word_start = ~(p.letter_start[ids] & self.prev_letter[rows])
        sentence_start = self.prev_sentence_end[rows]  # ``Prosody``'s boundary_before
        word = np.where(word_start, 0, self.word_elapsed[rows] + 1)
        sentence = np.where(sentence_start, 0, self.sentence_elapsed[rows] + 1)
        out[:, 0] = p.punct[ids]
        out[:, SENTENCE_END] = sentence_end
        out[:, PARAGRAPH] = paragraph
        out[:, 3] = p.capital[ids]
        out[:, 4] = np.minimum(word, 8) / 8
        out[:, 5] = np.minimum(np.log1p(sentence) / _LOG_257, 1.0)
        held = self.held[rows]
        held[sentence_start] = 0.0  # a new sentence forgets the last one's words
        for i, (row, tok) in enumerate(zip(rows.tolist(), ids.tolist(), strict=True)):
            hit = self._finish_words(row, tok)
            if hit is not None:
                held[i] = hit
        self.held[rows] = held
        out[:, 6] = held[:, 0]
        out[:, 7] = np.minimum(held[:, 1] + 0.5 * p.exclaim[ids], 1.0)
        self.prev_newline[rows] = p.newline_end[ids]
        self.prev_letter[rows] = p.letter_end[ids]
        self.prev_sentence_end[rows] = sentence_end
        self.word_elapsed[rows] = word
        self.sentence_elapsed[rows] = sentence
        return out

    def _finish_words(self, row: int, tok: int) -> tuple[float, float] | None:
        """The affect of the last lexicon word token ``tok`` finishes in row ``row``, if any;
        keeps the word still being spelled after it."""
        piece = self.prosody.pieces[tok]
        if self.pieces.word_only[tok]:
            self.pending[row] += piece
            return None
        if not piece:
            return None
        hit = self.pieces.inner[tok]
        first = self.pending[row] + self.pieces.lead[tok]
        if hit is None and first:
            hit = _affect(first, self.prosody.lexicon)
        self.pending[row] = self.pieces.trail[tok]
        return hit
