"""Prosody a token at a time, per row: bit for bit what ``Prosody`` gives a whole window."""

from __future__ import annotations

import numpy as np

from aura.data.prosody import Prosody
from aura.data.prosody_stream import ProsodyStream

# multi-character pieces that split, join and finish words in every way a tokenizer can
PIECES = ["good", " bad", "!", ".", "\n", "\n\n", "HAPPY", " ", "o", "d", "go", "od.", "a b",
          "x'y", "", "Sad!", " happy day.", "G", "ood", "?", "don't", " 'love'", "a", "B", ", ",
          "\nX", "sad", " terrible, good ", "\ufffd", "I"]
LEXICON = {"good": 1.9, "bad": -2.5, "happy": 2.7, "sad": -2.1, "love": 3.2, "terrible": -2.5,
           "don't": -0.5, "a": 0.3, "i": 0.1}


def test_each_pushed_token_gets_its_windows_last_features() -> None:
    """Rows started from random windows (cut anywhere, mid-word included), interleaved, moved
    and grown, each fed its own tokens: every push equals ``Prosody`` of the row's window."""
    prosody = Prosody(PIECES, LEXICON)
    rng = np.random.default_rng(0)
    stream = ProsodyStream(prosody, 2)
    rows: list[list[int]] = []
    for _ in range(6):  # six rows, capacity grown on the way
        stream.grow(len(rows) + 1)
        window = rng.integers(0, len(PIECES), int(rng.integers(1, 12))).tolist()
        stream.start(len(rows), window)
        rows.append(window)
    checked = nonzero_affect = 0
    for step in range(60):
        if step == 30:  # the last row moves into row 1's place, as a batch compacts
            stream.move(len(rows) - 1, 1)
            rows[1] = rows.pop()
        ids = rng.integers(0, len(PIECES), len(rows))
        got = stream.push(np.arange(len(rows)), ids)
        for r, tok in enumerate(ids.tolist()):
            rows[r].append(tok)
            want = prosody(np.array([rows[r]]))[0, -1]
            assert np.array_equal(got[r], want), (step, r, got[r], want)
            checked += 1
            nonzero_affect += bool(want[6] != 0)
    assert checked == 30 * 6 + 30 * 5
    assert nonzero_affect > 30  # the lexicon path was exercised, not just zeros


def test_a_windows_start_counts_as_the_start_of_text() -> None:
    """A row restarted from a later window (a refill) forgets what came before it."""
    prosody = Prosody(PIECES, LEXICON)
    ids = [PIECES.index("go"), PIECES.index("od."), PIECES.index(" "), PIECES.index("good"),
           PIECES.index(" ")]
    stream = ProsodyStream(prosody, 1)
    stream.start(0, ids[:2])  # "good." : a sentence ended, valence from "good"
    whole = stream.push(np.array([0]), np.array([ids[2]]))[0]
    stream.start(0, ids[1:2])  # "od." alone: "od" is no word
    cut = stream.push(np.array([0]), np.array([ids[2]]))[0]
    assert whole[6] == 0 and cut[6] == 0  # a new sentence forgets the last one's words
    stream.start(0, ids[3:4])
    after = stream.push(np.array([0]), np.array([ids[4]]))[0]
    assert after[6] == np.float32(1.9 / 4)  # "good" finished by the space
    assert np.array_equal(after, prosody(np.array([ids[3:5]]))[0, -1])
