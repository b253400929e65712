"""`aura data prepare` / `aura data stats` from the command line: output, exit codes, bad input.

Every bad input exits 2 with exactly one line on stderr starting ``aura: error:`` and no
traceback; ``--json`` prints exactly one JSON object on stdout.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aura.data.prepare as prepare_mod
from aura.data.shards import MANIFEST, PreparedData
from aura.data.tokenizers import CharTokenizer
from aura.errors import ENVIRONMENT_ERRNOS, environment_error
from conftest import CliResult, assert_usage_error, make_docs, write_dir
from faults import FsFaults

Run = Callable[..., CliResult]


def prepare_ok(run_cli: Run, *argv: str | Path) -> dict:
    res = run_cli("data", "prepare", *argv, "--json")
    assert res.code == 0, res.err
    return res.json()


def manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text(encoding="utf-8"))


def shard_path(out: Path, split: str = "train", index: int = 0) -> Path:
    return out / manifest(out)["splits"][split]["shards"][index]["file"]


@pytest.fixture
def prepared(tmp_path: Path, corpus_dir: Path, run_cli: Run) -> Path:
    out = tmp_path / "prepared"
    prepare_ok(run_cli, corpus_dir, "--tokenizer", "byte", "--out", out, "--shard-tokens", "4096")
    return out


# --- output ------------------------------------------------------------------------------------


def test_prepare_and_stats_json_print_one_object(tmp_path: Path, corpus_dir: Path,
                                                 run_cli: Run) -> None:
    out = tmp_path / "out"
    res = run_cli("data", "prepare", corpus_dir, "--tokenizer", "byte", "--out", out, "--json")
    assert res.code == 0, res.err
    first = json.loads(res.out)  # the whole of stdout is one object
    assert isinstance(first, dict)
    assert first["cached"] is False
    assert first["skipped"] == {}
    assert first["tokenizer"]["type"] == "byte"
    assert first["splits"]["train"]["n_tokens"] > 0
    assert first["splits"]["train"]["bytes_per_token"] == 1.0

    again = run_cli("data", "prepare", corpus_dir, "--tokenizer", "byte", "--out", out, "--json")
    assert again.code == 0
    assert json.loads(again.out)["cached"] is True

    stats = run_cli("data", "stats", out, "--json")
    assert stats.code == 0, stats.err
    st_obj = json.loads(stats.out)
    assert st_obj["splits"] == first["splits"]
    assert st_obj["cache_key"] == first["cache_key"]
    assert st_obj["dtype"] == "uint16"


def test_human_output(tmp_path: Path, corpus_dir: Path, run_cli: Run) -> None:
    out = tmp_path / "out"
    res = run_cli("data", "prepare", corpus_dir, "--tokenizer", "char", "--out", out)
    assert res.code == 0, res.err
    assert "prepared in" in res.out
    assert "tokenizer char" in res.out
    stats = run_cli("data", "stats", out)
    assert stats.code == 0
    assert "train" in stats.out and "val" in stats.out
    assert "bytes/token" in stats.out
    assert "reused the cache" in run_cli("data", "prepare", corpus_dir, "--tokenizer", "char",
                                         "--out", out).out


def test_json_stays_one_object_when_a_corrupt_cache_is_rebuilt(prepared: Path, corpus_dir: Path,
                                                               run_cli: Run) -> None:
    shard = shard_path(prepared)
    blob = bytearray(shard.read_bytes())
    blob[100] ^= 0xFF
    shard.write_bytes(bytes(blob))
    res = run_cli("data", "prepare", corpus_dir, "--tokenizer", "byte", "--out", prepared,
                  "--shard-tokens", "4096", "--json")
    assert res.code == 0, res.err
    obj = json.loads(res.out)
    assert obj["cached"] is False
    assert "rebuilding" in res.err  # the note goes to stderr, not into the JSON
    assert run_cli("data", "stats", prepared, "--json").code == 0


def test_skipped_files_are_counted_in_json(tmp_path: Path, corpus_dir: Path,
                                           run_cli: Run) -> None:
    (corpus_dir / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me.\n".encode("latin-1"))
    (corpus_dir / "image.txt").write_bytes(b"GIF89a\x00\x01\x00\x01" * 8)
    (corpus_dir / "blank.txt").write_text("  \n\n\t\n", encoding="utf-8")
    skip = prepare_ok(run_cli, corpus_dir, "--tokenizer", "byte", "--out", tmp_path / "a")
    assert skip["skipped"] == {"binary": 1, "invalid_utf8": 1, "empty": 1}
    assert skip["sources"][0]["skipped"] == skip["skipped"]
    human = run_cli("data", "prepare", corpus_dir, "--tokenizer", "byte", "--out", tmp_path / "a")
    assert "--on-invalid replace" in human.out

    keep = prepare_ok(run_cli, corpus_dir, "--tokenizer", "char", "--out", tmp_path / "b",
                      "--on-invalid", "replace")
    assert keep["skipped"] == {"binary": 1, "replaced_invalid_utf8": 1, "empty": 1}
    data = PreparedData.open(tmp_path / "b")
    assert "\ufffd" in data.tokenizer.chars
    text = "".join(data.tokenizer.decode(data.splits[s].tokens()) for s in ("train", "val"))
    assert "Caf\ufffd cr\ufffdme.\n" in text


def test_tokenizer_from_a_hf_json_file_and_from_prepared_data(tmp_path: Path, corpus_dir: Path,
                                                              run_cli: Run) -> None:
    bpe_dir = tmp_path / "bpe"
    prepare_ok(run_cli, corpus_dir, "--tokenizer", "bpe", "--vocab-size", "320", "--out", bpe_dir)
    bpe = PreparedData.open(bpe_dir)
    exported = tmp_path / "tokenizer.json"
    bpe.tokenizer._tok.save(str(exported))

    via_file = prepare_ok(run_cli, corpus_dir, "--tokenizer", exported, "--out", tmp_path / "f")
    via_dir = prepare_ok(run_cli, corpus_dir, "--tokenizer", bpe_dir, "--out", tmp_path / "d")
    assert via_file["tokenizer"]["vocab_size"] == 320
    assert via_file["tokenizer"]["hash"] == via_dir["tokenizer"]["hash"] == bpe.tokenizer.hash
    for other in ("f", "d"):
        data = PreparedData.open(tmp_path / other, expect_tokenizer_hash=bpe.tokenizer.hash)
        for split in ("train", "val"):
            assert np.array_equal(data.splits[split].tokens(), bpe.splits[split].tokens())


# --- bad input: prepare ------------------------------------------------------------------------


def test_missing_source(tmp_path: Path, run_cli: Run) -> None:
    res = run_cli("data", "prepare", tmp_path / "nope.txt", "--tokenizer", "byte",
                  "--out", tmp_path / "out")
    assert_usage_error(res, "nope.txt", "not found")
    assert not (tmp_path / "out").exists()


def test_empty_file(tmp_path: Path, run_cli: Run) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    for tok in ("byte", "char", "bpe"):
        res = run_cli("data", "prepare", tmp_path / "empty.txt", "--tokenizer", tok,
                      "--out", tmp_path / "out")
        assert_usage_error(res, "empty")


def test_whitespace_only_files(tmp_path: Path, run_cli: Run) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    (root / "a.txt").write_text("   \n\n  ", encoding="utf-8")
    (root / "b.txt").write_text("\t\r\n", encoding="utf-8")
    res = run_cli("data", "prepare", root, "--tokenizer", "byte", "--out", tmp_path / "out")
    assert_usage_error(res, "no usable text", "2 empty")
    res = run_cli("data", "prepare", root / "a.txt", "--tokenizer", "byte",
                  "--out", tmp_path / "out")
    assert_usage_error(res, "empty")


def test_no_files_match_the_glob(tmp_path: Path, corpus_dir: Path, run_cli: Run) -> None:
    res = run_cli("data", "prepare", corpus_dir, "--tokenizer", "byte", "--glob", "*.md",
                  "--out", tmp_path / "out")
    assert_usage_error(res, "*.md", "--glob")


def test_an_all_bad_corpus(tmp_path: Path, run_cli: Run) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.txt").write_bytes(b"\xff\xfe not utf-8 \xc3")
    (root / "b.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00")
    res = run_cli("data", "prepare", root, "--tokenizer", "byte", "--out", tmp_path / "out")
    assert_usage_error(res, "no usable text", "1 binary", "1 invalid_utf8")
    res = run_cli("data", "prepare", root / "a.txt", "--tokenizer", "byte",
                  "--out", tmp_path / "out")
    assert_usage_error(res, "invalid_utf8")
    # Kept with replacement characters, the invalid file is usable after all.
    res = run_cli("data", "prepare", root, "--tokenizer", "byte", "--out", tmp_path / "out",
                  "--on-invalid", "replace", "--val-fraction", "0", "--json")
    assert res.code == 0, res.err
    assert res.json()["skipped"] == {"binary": 1, "replaced_invalid_utf8": 1}


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--tokenizer", "wordpiece"], ["unknown tokenizer", "wordpiece"]),
        (["--tokenizer", "byte", "--weights", "1", "2"], ["--weights", "2 values", "1 sources"]),
        (["--tokenizer", "byte", "--weights", "-1"], ["--weights"]),
        (["--tokenizer", "byte", "--val-fraction", "1.5"], ["--val-fraction", "1.5"]),
        (["--tokenizer", "byte", "--val-fraction", "-0.1"], ["--val-fraction"]),
        (["--tokenizer", "byte", "--shard-tokens", "10"], ["--shard-tokens"]),
        (["--tokenizer", "byte", "--vocab-size", "500"], ["--vocab-size"]),
        (["--tokenizer", "bpe", "--vocab-size", "100"], ["--vocab-size"]),
        (["--tokenizer", "bpe", "--vocab-size", "0"], ["--vocab-size", "got 0"]),
        (["--tokenizer", "bpe", "--vocab-size", "-1"], ["--vocab-size", "got -1"]),
        (["--tokenizer", "char", "--vocab-size", "300"], ["--vocab-size", "bpe only"]),
    ],
)
def test_bad_options(tmp_path: Path, corpus_dir: Path, run_cli: Run, extra: list[str],
                     needles: list[str]) -> None:
    res = run_cli("data", "prepare", corpus_dir, "--out", tmp_path / "out", *extra)
    assert_usage_error(res, *needles)


def test_bad_source_specs(tmp_path: Path, run_cli: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never the network
    for spec, needle in [("builtin:poetry", "poetry"), ("hf:", "hf:"),
                         (f"hf:{tmp_path / 'no_such_dataset'}", "offline")]:
        res = run_cli("data", "prepare", spec, "--tokenizer", "byte", "--out", tmp_path / "out")
        assert_usage_error(res, needle)


def test_out_is_a_file(tmp_path: Path, corpus_dir: Path, run_cli: Run) -> None:
    (tmp_path / "file").write_text("x", encoding="utf-8")
    res = run_cli("data", "prepare", corpus_dir, "--tokenizer", "byte", "--out", tmp_path / "file")
    assert_usage_error(res, "not a directory")


def test_one_bad_paragraph_is_skipped_and_counted(tmp_path: Path, run_cli: Run) -> None:
    """--on-invalid skip (the default) drops the paragraph holding a bad byte, not the file it
    is in; the summary counts it."""
    path = tmp_path / "notes.txt"
    paragraphs = [f"Paragraph {i} of the notes.\n".encode() for i in range(6)]
    paragraphs[2] = b"A Latin-1 caf\xe9.\n"
    path.write_bytes(b"\n".join(paragraphs))
    report = prepare_ok(run_cli, path, "--tokenizer", "byte", "--out", tmp_path / "out",
                        "--val-fraction", "0")
    assert report["skipped"] == {"invalid_utf8": 1}
    assert report["splits"]["train"]["n_docs"] == 5
    human = run_cli("data", "prepare", path, "--tokenizer", "byte", "--out", tmp_path / "out",
                    "--val-fraction", "0")
    assert "skipped: 1 invalid utf8" in human.out


def test_char_tokenizer_file_with_unseen_characters(tmp_path: Path, corpus_dir: Path,
                                                    run_cli: Run) -> None:
    path = tmp_path / "abc.json"
    CharTokenizer("abc \n").save(path)
    res = run_cli("data", "prepare", corpus_dir, "--tokenizer", path, "--out", tmp_path / "out")
    assert_usage_error(res, "not in its vocabulary")


def test_garbage_tokenizer_file(tmp_path: Path, corpus_dir: Path, run_cli: Run) -> None:
    path = tmp_path / "tok.json"
    path.write_text('{"vocab": [1, 2', encoding="utf-8")
    res = run_cli("data", "prepare", corpus_dir, "--tokenizer", path, "--out", tmp_path / "out")
    assert_usage_error(res, "tok.json")


def test_a_failed_prepare_via_cli_keeps_the_old_data(prepared: Path, tmp_path: Path,
                                                     run_cli: Run) -> None:
    before = {p.name: p.read_bytes() for p in prepared.iterdir()}
    one = tmp_path / "one.txt"
    one.write_text("Just one document.\n", encoding="utf-8")
    res = run_cli("data", "prepare", one, "--tokenizer", "byte", "--out", prepared,
                  "--val-fraction", "0.5")
    assert_usage_error(res)
    assert {p.name: p.read_bytes() for p in prepared.iterdir()} == before
    assert run_cli("data", "stats", prepared).code == 0


def test_usage_errors_are_one_line_too(tmp_path: Path, run_cli: Run) -> None:
    for argv in (["data", "prepare", "x.txt", "--out", tmp_path],  # no --tokenizer
                 ["data", "prepare", "x.txt", "--tokenizer", "byte", "--out", tmp_path,
                  "--val-fraction", "half"],
                 ["data", "frobnicate"]):
        res = run_cli(*argv)
        assert res.code == 2
        lines = res.err.splitlines()
        assert len(lines) == 1, res.err
        assert lines[0].startswith("aura") and "error:" in lines[0]


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(weights=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=3),
       val=st.floats(allow_nan=True, allow_infinity=True))
def test_any_weights_and_val_fraction_exit_0_or_2(corpus_dir: Path, tmp_path: Path,
                                                  run_cli: Run, weights: list[float],
                                                  val: float) -> None:
    """Whatever numbers a user types, the answer is a result or one line, never a crash."""
    res = run_cli("data", "prepare", corpus_dir, "--tokenizer", "byte", "--out", tmp_path / "h",
                  "--weights", *map(repr, weights), "--val-fraction", repr(val), "--json")
    ok = len(weights) == 1 and weights[0] > 0 and weights[0] < float("inf") and 0 <= val < 1
    if ok:
        assert res.code == 0, res.err
        assert res.json()["sources"][0]["weight"] == 1.0
    else:
        assert res.code == 2
        assert "Traceback" not in res.err
        lines = res.err.splitlines()
        assert len(lines) == 1, res.err
        # A value like -1e+16 looks like an option to argparse: a usage error, same contract.
        assert lines[0].startswith(("aura: error: ", "aura data prepare: error: ")), lines[0]


# --- bad input: stats --------------------------------------------------------------------------


def test_stats_of_a_corrupt_shard(prepared: Path, run_cli: Run) -> None:
    shard = shard_path(prepared, "train", 1)
    blob = bytearray(shard.read_bytes())
    blob[10:14] = bytes(b ^ 0x01 for b in blob[10:14])
    shard.write_bytes(bytes(blob))
    assert_usage_error(run_cli("data", "stats", prepared), shard.name, "corrupt")
    assert_usage_error(run_cli("data", "stats", prepared, "--json"), shard.name)


def test_stats_of_a_truncated_or_missing_shard(prepared: Path, run_cli: Run) -> None:
    shard = shard_path(prepared, "val", 0)
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    assert_usage_error(run_cli("data", "stats", prepared), shard.name, "truncated")
    shard.write_bytes(data + b"\0\0")
    assert_usage_error(run_cli("data", "stats", prepared), shard.name)
    shard.unlink()
    assert_usage_error(run_cli("data", "stats", prepared), shard.name, "missing")


@pytest.mark.parametrize(
    "damage",
    [
        "truncated",
        "binary",
        "empty",
        "list",
        "missing_fields",
        "tokenizer_not_an_object",
        "shard_without_size",
        "bad_dtype",
        "source_without_token_counts",
        "shard_of_no_source",
        "future_version",
    ],
)
def test_stats_of_a_garbage_manifest(prepared: Path, corpus_dir: Path, run_cli: Run,
                                     damage: str) -> None:
    path = prepared / MANIFEST
    text = path.read_text(encoding="utf-8")
    m = json.loads(text)
    if damage == "truncated":
        path.write_text(text[: len(text) // 2], encoding="utf-8")
    elif damage == "binary":
        path.write_bytes(bytes(range(256)))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "list":
        path.write_text("[]", encoding="utf-8")
    else:
        if damage == "missing_fields":
            del m["splits"]
        elif damage == "tokenizer_not_an_object":
            m["tokenizer"] = "byte"
        elif damage == "shard_without_size":
            del m["splits"]["train"]["shards"][0]["n_tokens"]
        elif damage == "bad_dtype":
            m["dtype"] = "float128x"
        elif damage == "source_without_token_counts":
            del m["sources"][0]["n_tokens"]["train"]
        elif damage == "shard_of_no_source":
            m["splits"]["val"]["shards"][0]["source"] = 3
        elif damage == "future_version":
            m["format_version"] = 99
        path.write_text(json.dumps(m), encoding="utf-8")
    assert_usage_error(run_cli("data", "stats", prepared), MANIFEST)
    # Preparing again repairs it.
    again = prepare_ok(run_cli, corpus_dir, "--tokenizer", "byte", "--out", prepared,
                       "--shard-tokens", "4096")
    assert again["cached"] is False
    assert run_cli("data", "stats", prepared).code == 0


def test_stats_of_no_data(tmp_path: Path, run_cli: Run) -> None:
    assert_usage_error(run_cli("data", "stats", tmp_path / "nothing"), "no prepared data")
    (tmp_path / "empty").mkdir()
    assert_usage_error(run_cli("data", "stats", tmp_path / "empty"), MANIFEST)


def test_stats_notices_an_edited_tokenizer_file(prepared: Path, run_cli: Run) -> None:
    tok_file = prepared / manifest(prepared)["tokenizer"]["file"]
    CharTokenizer("abc").save(tok_file)
    assert_usage_error(run_cli("data", "stats", prepared), "tokenizer")
    tok_file.write_text("{", encoding="utf-8")
    assert_usage_error(run_cli("data", "stats", prepared), "tokenizer")
    tok_file.unlink()
    assert_usage_error(run_cli("data", "stats", prepared), "missing")


# --- the file system ---------------------------------------------------------------------------


@pytest.mark.parametrize("err", [errno.EACCES, errno.EROFS, errno.ENOSPC])
def test_out_where_writes_are_refused_fails_before_any_work(
        tmp_path: Path, corpus_dir: Path, run_cli: Run, monkeypatch: pytest.MonkeyPatch,
        err: int) -> None:
    (tmp_path / "locked").mkdir()
    FsFaults(monkeypatch).deny(tmp_path / "locked", err)
    monkeypatch.setattr(prepare_mod, "_open_sources", lambda _opts: pytest.fail("sources read"))
    for out in (tmp_path / "locked", tmp_path / "locked" / "a" / "b"):
        res = run_cli("data", "prepare", corpus_dir, "--tokenizer", "byte", "--out", out)
        # the path the OS refused: the directory, or the first one that could not be made
        assert_usage_error(res, os.strerror(err), str(tmp_path / "locked"))
    assert list((tmp_path / "locked").iterdir()) == []


def test_unreadable_data_is_reported_as_unreadable_not_corrupt(
        prepared: Path, run_cli: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    faults = FsFaults(monkeypatch)
    faults.deny(shard_path(prepared), errno.EACCES, reads=True)
    assert_usage_error(run_cli("data", "stats", prepared), shard_path(prepared).name,
                       "Permission denied")
    faults.deny(prepared / MANIFEST, errno.EACCES, reads=True)
    line = assert_usage_error(run_cli("data", "stats", prepared), MANIFEST, "Permission denied")
    assert "corrupt" not in line


@pytest.mark.parametrize("err", sorted(ENVIRONMENT_ERRNOS))
def test_file_system_errors_become_one_line_with_path_and_reason(err: int) -> None:
    assert environment_error(OSError(err, os.strerror(err), "/x/y")) == (
        f"/x/y: {os.strerror(err)}")
    assert environment_error(OSError(err, os.strerror(err), "/a", None, "/b")) == (
        f"/a -> /b: {os.strerror(err)}")
    assert environment_error(OSError(err, os.strerror(err))) == os.strerror(err)


def test_other_errors_keep_their_traceback(tmp_path: Path, corpus_dir: Path, run_cli: Run,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A file missing where Aura itself should have made it, or any non-OSError, is a bug."""
    for exc in (FileNotFoundError(errno.ENOENT, "No such file or directory", "/internal"),
                ValueError("a bug")):
        def fail(_opts: object, exc: Exception = exc) -> None:
            raise exc

        assert environment_error(exc) is None
        monkeypatch.setattr(prepare_mod, "_open_sources", fail)
        with pytest.raises(type(exc)):
            run_cli("data", "prepare", corpus_dir, "--tokenizer", "byte", "--out", tmp_path / "o")


# --- the real process --------------------------------------------------------------------------


def test_the_installed_command_exits_2_without_traceback(tmp_path: Path) -> None:
    corpus = tmp_path / "c"
    write_dir(corpus, make_docs(4), nested=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def aura(*argv: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "aura", *map(str, argv)],
                              capture_output=True, text=True, env=env, timeout=60, check=False)

    bad = aura("data", "prepare", tmp_path / "missing", "--tokenizer", "byte", "--out",
               tmp_path / "o")
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [f"aura: error: source not found: {tmp_path / 'missing'}"]
    assert bad.stdout == ""

    good = aura("data", "prepare", corpus, "--tokenizer", "byte", "--out", tmp_path / "o",
                "--json")
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["cached"] is False
    shard = shard_path(tmp_path / "o")
    shard.write_bytes(shard.read_bytes()[:-1])
    broken = aura("data", "stats", tmp_path / "o")
    assert broken.returncode == 2
    assert "Traceback" not in broken.stderr
    assert len(broken.stderr.splitlines()) == 1
    assert shard.name in broken.stderr
