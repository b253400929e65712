"""Prosody features: what each channel says about real text, causality, and the batch path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aura.data.prosody import (
    FEATURES,
    PARAGRAPH,
    SENTENCE_END,
    Prosody,
    token_features,
    vader_lexicon,
)
from aura.data.sampler import BatchSampler, batch_loader
from aura.data.shards import PreparedData
from aura.data.tokenizers import ByteTokenizer, CharTokenizer, gpt2_tokenizer

ALPHABET = "abcdefgHILOVE !?.,'\n"
CHAR = CharTokenizer(ALPHABET + "ghijklmnopqrstuvwxyzT")
PROSODY = Prosody.from_tokenizer(CHAR)


def channel(features: np.ndarray, name: str) -> np.ndarray:
    return features[0, :, FEATURES.index(name)]


def char_features(text: str) -> np.ndarray:
    return PROSODY(CHAR.encode(text)[None].astype(np.int64))


def test_lexicon_is_vader() -> None:
    lex = vader_lexicon()
    assert lex["love"] == pytest.approx(3.2) and lex["terrible"] < -2 and len(lex) > 7000


def test_valence_arrives_with_the_character_after_the_word() -> None:
    text = "I love thee. The terrible night"
    f = char_features(text)
    valence = channel(f, "valence")
    after_love = text.index("love") + 4
    assert np.all(valence[:after_love] == 0)  # "love" could still become "lovely"
    assert valence[after_love] == pytest.approx(vader_lexicon()["love"] / 4)
    assert valence[text.index(".")] == pytest.approx(0.8)  # held through the sentence
    assert valence[text.index(".") + 1] == 0  # a new sentence starts neutral
    assert valence[text.index("terrible") + 8] == pytest.approx(vader_lexicon()["terrible"] / 4)
    assert valence[-1] < 0
    arousal = channel(f, "arousal")
    assert arousal[after_love] == pytest.approx(abs(valence[after_love]))


def test_boundaries_capitals_and_emphasis() -> None:
    text = "Hi, LOVE!\n\nthe end?"
    f = char_features(text)
    assert channel(f, "sentence_end")[text.index("!")] == 1
    assert channel(f, "sentence_end")[text.index("?")] == 1
    assert channel(f, "punct")[text.index(",")] == 1
    para = np.flatnonzero(f[0, :, PARAGRAPH])
    assert para.tolist() == [text.index("\n") + 1]  # the second newline ends the paragraph
    assert channel(f, "capital")[0] == 1 and channel(f, "capital")[text.index("t")] == 0
    bang = text.index("!")  # finishes the all-caps "LOVE" and is an exclamation
    assert channel(f, "arousal")[bang] == 1.0
    assert channel(f, "word_pos")[text.index("E")] == pytest.approx(3 / 8)
    assert channel(f, "sentence_pos")[text.index("\n") + 2] == 0  # first token after the break


def test_word_level_tokens_get_the_same_valence() -> None:
    tok = gpt2_tokenizer()
    ids = tok.encode("What a wonderful day. Awful.")
    f = Prosody.from_tokenizer(tok)(ids[None].astype(np.int64))
    pieces = [tok.decode([i]) for i in ids]
    after = pieces.index(" wonderful") + 1  # " day" holds the space that ends "wonderful"
    assert channel(f, "valence")[after - 1] == 0
    assert channel(f, "valence")[after] == pytest.approx(vader_lexicon()["wonderful"] / 4)
    assert channel(f, "valence")[-1] == pytest.approx(vader_lexicon()["awful"] / 4)
    assert channel(f, "sentence_end")[pieces.index(".")] == 1


@given(st.text(ALPHABET, min_size=1, max_size=120), st.integers(1, 119))
def test_a_prefix_never_sees_the_future(text: str, cut: int) -> None:
    ids = CHAR.encode(text)[None].astype(np.int64)
    cut = min(cut, ids.shape[1])
    np.testing.assert_array_equal(PROSODY(ids[:, :cut]), PROSODY(ids)[:, :cut])


@given(st.binary(min_size=1, max_size=200))
def test_any_bytes_give_bounded_features(data: bytes) -> None:
    ids = np.frombuffer(data, dtype=np.uint8)[None].astype(np.int64)
    f = Prosody.from_tokenizer(ByteTokenizer())(ids)
    assert f.shape == (1, len(data), len(FEATURES)) and f.dtype == np.float32
    assert np.all(f[..., 6] >= -1) and np.all(f[..., 6] <= 1)
    others = np.delete(f, 6, axis=-1)
    assert np.all(others >= 0) and np.all(others <= 1)


def test_bad_shapes_and_names_raise() -> None:
    with pytest.raises(ValueError, match="batch, time"):
        PROSODY(np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match="unknown token features"):
        token_features(("pitch",), CHAR)


def test_prosody_travels_with_the_batch(train_data: Path) -> None:
    data = PreparedData.open(train_data)
    train = data.split("train")
    feats = token_features(("prosody",), data.tokenizer)
    sampler = BatchSampler(train, 4, 32, seed=1, features=feats)
    x, _, extra = sampler.batch(3)
    assert torch.equal(x, sampler(3)[0])
    assert extra["prosody"].shape == (4, 32, len(FEATURES))
    expected = Prosody.from_tokenizer(data.tokenizer)(x.numpy())
    np.testing.assert_array_equal(extra["prosody"].numpy(), expected)
    assert extra["prosody"][..., SENTENCE_END].sum() > 0  # real text has sentence ends
    workers = list(batch_loader(sampler, 3, 5, num_workers=2))
    assert torch.equal(workers[0][2]["prosody"], extra["prosody"])
