"""Fuzz of every `aura` command: hypothesis builds argument lists from each parser's own options
(read from `aura.cli.build_parser()`), mixed with hostile values (huge and negative numbers,
empty strings, bytes that are no UTF-8 as argv carries them, other scripts, `-`, paths to files,
directories and nothing), and runs them in process. Each run must exit 0, or 2 with one
`aura: error:` line last on stderr: a traceback or exit 1 (internal errors only) is a bug.

Runs stay small and finite: training and learning get a tiny model, one step and one pass
unless the fuzz picked those options itself (from values that stay small), `aura analyze` a tiny
affect model. Every value that names a file is `@NAME`, made in a fresh directory per example
(where the command also runs), so no example sees another's writes. Bugs found here are kept as
regression tests at the end. The default suite runs ``AURA_FUZZ_EXAMPLES`` (8) examples per
command, ``make test-slow`` 200.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aura.cli import build_parser, main
from aura.config import explain_config, load_config
from aura.data.tokenizers import TOKENIZER_FILE
from aura.plasticity.affect import AffectModel
from aura.train.checkpoint import list_checkpoints
from conftest import TINY_TRAIN, assert_answered, make_docs, write_dir

Command = tuple[str, ...]
TINY_SETS = [a for s in TINY_TRAIN for a in ("--set", s)]
SNN_RAG = ("model.name=snn_rag", "model.memory_layers=[1]", "model.memory_capacity=32",
           "model.memory_chunk=8")


# --- the commands and their options --------------------------------------------------------------


def leaf_parsers() -> dict[Command, argparse.ArgumentParser]:
    """Every command that runs something, by its words, with all its arguments added (those
    derived from option dataclasses are added when the parser first formats its help)."""
    found: dict[Command, argparse.ArgumentParser] = {}

    def walk(words: Command, parser: argparse.ArgumentParser) -> None:
        parser.format_help()
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            found[words] = parser
        for action in subs:
            for name, sub in action.choices.items():
                walk((*words, name), sub)

    walk((), build_parser())
    return found


# `aura serve` runs until it is signalled, so it is not fuzzed in process: test_serve.py holds
# its bad input to the same contract.
PARSERS = {cmd: p for cmd, p in leaf_parsers().items() if cmd != ("serve",)}


def test_the_fuzz_covers_every_command() -> None:
    assert set(PARSERS) == {("data", "prepare"), ("data", "stats"), ("config", "show"),
                            ("config", "list"), ("train",), ("generate",), ("eval",), ("plot",),
                            ("analyze",), ("memory", "build"), ("memory", "fit-keys"),
                            ("learn",), ("chat",),
                            ("cl",), ("learn-export",), ("viz",), ("ablate",), ("export",),
                            ("convert",)}


# Files an argument may name, made per example by ``scratch``; the plausible ones per option.
PATHS = ["@run", "@ckpt", "@data", "@text", "@latin1", "@binary", "@empty", "@dir", "@missing",
         "@nested/out", "@inbox", "@jsonl", "@yaml", "@yaml-bad", "@yaml-list", "@yaml-tag",
         "@affect", "@tokenizer", "@metrics", "@badrun", "@baddata", "-"]
PLAUSIBLE = {"run": ["@run", "@ckpt"], "data": ["@data"], "dir": ["@data", "@data-not-utf8"],
             "sources": ["@inbox", "@text", "@jsonl"], "out": ["@missing", "@nested/out", "@dir"],
             "config": ["@yaml"], "watch": ["@inbox"], "state": ["@missing", "@dir"],
             "device": ["cpu", "auto"], "glob": ["*.txt", "*"], "text_field": ["text"],
             "tokenizer": ["byte", "char", "bpe", "@data", "@tokenizer"],
             "preset": ["demo", "bdh-cpu", "hippocampal-cpu", "snn-rag-cpu"]}
PLAUSIBLE_IN = {(("train",), "out"): ["@missing", "@nested/out", "@run"],
                (("plot",), "run"): ["@run"], (("plot",), "out"): ["@dir/c.png"],
                (("eval",), "text"): ["@text"], (("learn",), "model"): ["@run", "@ckpt"],
                (("analyze",), "model"): ["@affect"],
                (("train",), "model"): ["gpt", "bdh", "hippocampal", "snn_rag"],
                # Ranks are child processes writing to the real stderr, which this in-process
                # fuzz cannot read; --nproc N > 1 is checked by subprocess in test_launch.py.
                (("train",), "nproc"): ["1"]}
SURROGATES = "\udcff\udcfe"  # the bytes ff fe of argv, as Python's surrogateescape decodes them
HOSTILE = ["", " ", "-", "--", "=", "-1", "0", "nan", "inf", "1e309", "\t\n", "/", "../..",
           SURROGATES, "caf" + SURROGATES, "日本語", "e\u0301", "\U0001f600", "\u202e", "a" * 300,
           "nope"]
HUGE_INTS = [str(2**31), str(2**63), str(10**30), str(-(10**30))]
GOOD_FLOATS = ["0", "0.5", "0.9", "1", "2"]
BAD_FLOATS = ["nan", "inf", "-inf", "-1", "1e-320", "1e308", "1e309", "0x10", "1_0"]
NOT_UTF8 = st.sampled_from(["\udcff", "ab\udce9", "\udc80x"])  # argv bytes as Python sees them
TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0"), min_size=1,
               max_size=30)

# Options whose huge values cost nothing (refused, or bounded by what exists); any other int
# option gets only small and malformed values, so no run trains, samples or sweeps for long.
HUGE_OK = {("data", "prepare"): {"vocab_size", "shard_tokens", "seed"},
           ("train",): {"checkpoint_interval", "keep_checkpoints"},
           ("generate",): {"max_new_tokens", "top_k", "seed"},
           ("eval",): {"max_tokens", "batch_size"},
           ("memory", "build"): {"max_chunks", "batch_size"},
           ("learn",): {"save_every", "seed"}}

CONFIG_KEYS = sorted(explain_config(load_config(preset="demo")))
SET_VALUES = ["1", "0", "-1", "2", "0.5", "nan", "inf", "1e309", str(10**30), "true", "null",
              "[1, 2]", "[[0, 8]]", "{a: 1}", "'x'", "[", "gpt", "bdh", "snn_rag", "hippocampal",
              "cpu", "cuda", "auto", "fp16", "bf16", "!!python/object/apply:os.system [ls]"]
# --set for a command that trains: values that keep it cheap (no giant model, no compile).
TRAIN_SETS = ["train.lr=1e-3", "model.dropout=0.1", "train.eval_interval=1",
              "train.schedule=constant", "train.precision=bf16", "train.grad_accum=2",
              "train.optimizer=muon", "data.curriculum=[[0, 8], [1, 16]]", "model.name=bdh",
              "model.name=hippocampal", "model.name=snn_rag", "train.label_smoothing=0.1",
              "train.checkpoint_interval=1", "train.keep_checkpoints=1"]
BAD_TRAIN_SETS = ["train.lr=-1", "train.lr=nan", "train.lr=inf", "train.lr=1e308",
                  "model.dropout=1.5", "train.batch_size=0", "train.grad_accum=0",
                  "model.n_layer=0", "model.n_head=3", "model.block_size=0",
                  "train.max_steps=abc", "train.seed=-1", f"train.seed={2**40}",
                  "train.schedule=nope", "train.precision=fp16", "train.label_smoothing=2",
                  "train.eval_iters=0", "model.vocab_size=3", "train.warmup_steps=-5",
                  "data.num_workers=-1", "train.grad_clip=-1", "data.curriculum=[[0, 999]]",
                  "model.name=nope", "nokey=1", "=", "model.", "train.lr"]


def sampled(values: list[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(values)


def plausible(command: Command, action: argparse.Action) -> st.SearchStrategy[str]:
    """A value the option may well accept: its choices, a number of its type, the file it
    names."""
    dest, huge = action.dest, action.dest in HUGE_OK.get(command, set())
    if dest == "set":
        if command == ("train",):
            return sampled(TRAIN_SETS)
        return st.builds("{}={}".format, sampled(CONFIG_KEYS), sampled(SET_VALUES))
    if (command, dest) in PLAUSIBLE_IN:
        return sampled(PLAUSIBLE_IN[(command, dest)])
    if dest in PLAUSIBLE:
        return sampled(PLAUSIBLE[dest])
    if dest in ("prompt", "stop", "text", "hf_split", "hf_config"):
        return TEXT
    if action.choices:
        return sampled([str(c) for c in action.choices])
    if action.type is int:
        return st.one_of(st.integers(0, 3).map(str), sampled(HUGE_INTS)) if huge else \
            st.integers(0, 3).map(str)
    if action.type is float:
        return sampled(GOOD_FLOATS)
    return sampled(PATHS)


def hostile(command: Command, action: argparse.Action) -> st.SearchStrategy[str]:
    """A value the option should refuse (or survive): malformed, out of range, no UTF-8, a
    path to the wrong kind of thing."""
    if action.dest == "set" and command == ("train",):
        return sampled(BAD_TRAIN_SETS)
    if action.dest == "set":
        return st.builds("{}={}".format, sampled(HOSTILE + CONFIG_KEYS),
                         st.one_of(TEXT, sampled(HOSTILE)))
    if action.type is int:
        return st.one_of(st.integers(-3, -1).map(str), sampled(
            [h for h in HOSTILE if not h.isdigit()] + BAD_FLOATS[:3]))
    if action.type is float:
        return sampled(BAD_FLOATS + HOSTILE)
    return st.one_of(sampled(HOSTILE), sampled(PATHS), TEXT, NOT_UTF8)


def value_strategy(command: Command, action: argparse.Action) -> st.SearchStrategy[str]:
    """Mostly plausible values, about one in five hostile: runs get past parsing and validation
    to the work, and the work still meets bad input."""
    return st.integers(0, 4).flatmap(  # shrinks towards 0: a plausible value
        lambda i: hostile(command, action) if i == 4 else plausible(command, action))


def option_args(command: Command, action: argparse.Action) -> st.SearchStrategy[list[str]]:
    flag = st.sampled_from(action.option_strings)
    if action.nargs == 0:
        return flag.map(lambda f: [f])
    values = value_strategy(command, action)
    if action.nargs == "+":
        return st.builds(lambda f, vs: [f, *vs], flag, st.lists(values, min_size=1, max_size=3))
    return st.builds(lambda f, v: [f, v], flag, values)


# What keeps a run small and finite, unless the fuzz set the option itself.
ENSURE: dict[Command, list[list[str]]] = {
    ("train",): [["--max-steps", "1"]],
    ("learn",): [["--once"], ["--warmup-samples", "8"]],
    ("analyze",): [["--model", "@affect"]],
}
# Arguments without which a command does nothing, given when the fuzz did not (9 times in 10).
NEEDED: dict[Command, list[tuple[tuple[str, ...], list[str]]]] = {
    ("train",): [(("--preset", "--config"), ["--preset", "demo"]),
                 (("--data",), ["--data", "@data"])],
    ("eval",): [(("--text", "--data"), ["--data", "@data"])],
    ("generate",): [(("--prompt",), ["--prompt", "The "])],
}


@st.composite
def argv_for(draw: st.DrawFn, command: Command) -> list[str]:
    """One command line: the command's positionals, up to four of its options (any may repeat),
    what it needs and what keeps it small, now and then an argument it does not take."""
    parser = PARSERS[command]
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    argv = list(command)
    if command == ("train",):
        argv += TINY_SETS  # before the fuzz's --set, which may override them (cheaply)
    for action in actions:
        if not action.option_strings:
            n = draw(st.integers(1, 3)) if action.nargs == "+" else 1
            argv += [draw(value_strategy(command, action)) for _ in range(n)]
    options = [a for a in actions if a.option_strings]
    for action in draw(st.lists(st.sampled_from(options), max_size=4)):
        argv += draw(option_args(command, action))
    needed = [((a.option_strings[0],), [a.option_strings[0], draw(plausible(command, a))])
              for a in options if a.required]
    for flags, args in needed + NEEDED.get(command, []):
        if not any(f in argv for f in flags) and draw(st.integers(0, 9)) < 9:
            argv += args
    for flag, *value in ENSURE.get(command, []):
        if flag not in argv:
            argv += [flag, *value]
    if draw(st.integers(0, 19)) == 0:  # now and then an argument no command takes
        argv.append(draw(st.sampled_from(["--bogus", "extra", "-x"])))
    return argv


# --- a fresh directory per example -------------------------------------------------------------


@dataclass
class Inputs:
    """What examples copy or point at, made once per module."""

    run: Path
    data: Path
    affect: Path
    corpus: Path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inputs]:
    """A byte-level corpus (one file named by bytes that are no UTF-8), its prepared data, a
    2-step snn_rag run on it (a memory to build) and a tiny affect model."""
    root = tmp_path_factory.mktemp("fuzz-inputs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    write_dir(root / "corpus", make_docs(6, seed=8, words=(30, 60)))
    os.rename(root / "corpus" / "doc04.txt", os.fsencode(root / "corpus") + b"/caf\xe9.txt")
    data, run = root / "data", root / "run"
    sets = [a for s in (*TINY_TRAIN, *SNN_RAG) for a in ("--set", s)]
    for argv in (["data", "prepare", root / "corpus", "--tokenizer", "byte", "--val-fraction",
                  "0.3", "--out", data],
                 ["train", "--preset", "demo", *sets, "--data", data, "--out", run,
                  "--max-steps", "2"]):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main([str(a) for a in argv]) == 0, argv
    texts = [f"I {w} this, {v}!" for w in ("love", "hate", "like", "fear") for v in ("yes", "no")]
    affect = AffectModel.fit(texts, dim=32, max_components=4, batch=4).save(root / "affect")
    yield Inputs(run, data, affect, root / "corpus")
    torch.set_num_threads(threads)


def scratch(root: Path, inputs: Inputs) -> dict[str, Path]:
    """Every ``@NAME`` an argument may use, made fresh under ``root``."""
    shutil.copytree(inputs.run, root / "run")
    shutil.copytree(inputs.data, root / "data")
    shutil.copytree(inputs.data, root / "data\udcff")  # a name that is no UTF-8: b"data\xff"
    shutil.copytree(inputs.corpus, root / "inbox")
    (root / "inbox" / "nul.txt").write_bytes(b"GIF89a\0\0")  # files learn and prepare skip
    (root / "inbox" / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    shutil.copytree(inputs.run, root / "badrun")  # a run and a dataset damaged in every way
    (root / "badrun" / "metrics.jsonl").write_text('{"step": 1}\n{torn\n{"step": 2}\n')
    (root / "badrun" / "best.json").write_text("[]")
    for ckpt in list_checkpoints(root / "badrun"):
        with open(ckpt / "model.safetensors", "r+b") as f:
            f.seek(100)
            f.write(b"\xff" * 8)
    shutil.copytree(inputs.data, root / "baddata")
    manifest = root / "baddata" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:200])
    paths = {"run": root / "run", "ckpt": list_checkpoints(root / "run")[-1],
             "data": root / "data", "data-not-utf8": root / "data\udcff",
             "inbox": root / "inbox", "affect": inputs.affect,
             "dir": root / "dir", "missing": root / "missing", "nested": root / "nested",
             "tokenizer": list_checkpoints(root / "run")[-1] / TOKENIZER_FILE,
             "metrics": root / "run" / "metrics.jsonl", "badrun": root / "badrun",
             "baddata": root / "baddata"}
    paths["dir"].mkdir()
    files = {"text": "Some text to read.\n\nAnd a second paragraph.\n",
             "latin1": "caf\xe9\n".encode("latin-1"), "binary": b"\x00\x01\x02GIF",
             "empty": "", "jsonl": '{"text": "one line"}\n{"text": 5}\nnot json\n',
             "yaml": "model:\n  n_layer: 1\n  n_embd: 16\n  n_head: 2\n  block_size: 16\n",
             "yaml-bad": "model: [unclosed\n", "yaml-list": "- 1\n- 2\n",
             "yaml-tag": "model: !!python/object/apply:os.system [ls]\n"}
    for name, content in files.items():
        path = paths[name] = root / f"{name}.txt"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return paths


def resolve(arg: str, paths: dict[str, Path]) -> str:
    """``@NAME`` or ``@NAME/REST`` as the path it names; any other argument as it is."""
    name, _, rest = arg.removeprefix("@").partition("/")
    if not arg.startswith("@") or name not in paths:
        return arg
    return str(paths[name] / rest if rest else paths[name])


# --- the contract ------------------------------------------------------------------------------


@dataclass
class Ran:
    """How one in-process command ended."""

    code: int
    out: str
    err: str


def run_in(root: Path, argv: list[str], stdin: bytes) -> Ran:
    """``aura ARGV`` in process with ``root`` as its working directory and ``stdin`` as its
    input; an exception escaping ``main`` counts as the traceback it would print. The streams
    are a UTF-8 terminal's (en_US.UTF-8): stdout strict, stderr escaping what it cannot encode."""
    cwd, streams = os.getcwd(), (sys.stdin, sys.stdout, sys.stderr)
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace",
                           write_through=True)
    os.chdir(root)
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    sys.stdout, sys.stderr = out, err
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except BaseException:
        print(traceback.format_exc(), file=sys.stderr)
        code = 1
    finally:
        sys.stdin, sys.stdout, sys.stderr = streams
        os.chdir(cwd)
    return Ran(code, *(s.buffer.getvalue().decode("utf-8", "replace")  # type: ignore[attr-defined]
                       for s in (out, err)))


def run_example(tmp: Path, inputs: Inputs, argv: list[str], stdin: bytes = b"") -> Ran:
    """``aura ARGV``, its ``@NAME``s made fresh, held to the contract."""
    root = tmp / "example"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    try:
        paths = scratch(root, inputs)
        real = [resolve(a, paths) for a in argv]
        res = run_in(root, real, stdin)
        assert_answered(res.code, res.err, f"aura {real!r}")
        return res
    finally:
        shutil.rmtree(root, ignore_errors=True)


FUZZ = settings(max_examples=int(os.environ.get("AURA_FUZZ_EXAMPLES", "8")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def fuzz_test(examples: int) -> Callable[..., None]:
    @settings(FUZZ, max_examples=examples)
    @given(data=st.data())
    def check(command: Command, tmp: Path, inputs: Inputs, data: st.DataObject) -> None:
        argv = data.draw(argv_for(command), label="argv")
        stdin = data.draw(st.binary(max_size=40), label="stdin")
        run_example(tmp, inputs, argv, stdin)

    return check


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("command", sorted(PARSERS), ids=" ".join)
def test_any_arguments_exit_0_or_2_in_one_line(command: Command, tmp: Path,
                                              inputs: Inputs) -> None:
    fuzz_test(FUZZ.max_examples)(command, tmp, inputs)


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(PARSERS), ids=" ".join)
def test_many_more_arguments_exit_0_or_2_in_one_line(command: Command, tmp: Path,
                                                     inputs: Inputs) -> None:
    fuzz_test(200)(command, tmp, inputs)


# What the fuzz found, kept: (argv, exit code, the end of stderr's last line).
FOUND = [
    # an error naming what was typed printed it raw: a newline made it two lines
    (["plot", "\t\n"], 2, "no run directory at \\t\\n"),
    # torch's overflow error, as a traceback
    (["learn", "--watch", "@inbox", "--once", "--seed", str(10**30)], 2,
     f"--seed must be in [0, 2**64), got {10**30}"),
    # the inbox holds caf\xe9.txt: SQLite could not store its name, nor prepare hash it
    (["learn", "--watch", "@inbox", "--once", "--json"], 0, ""),
    (["data", "prepare", "@inbox", "--tokenizer", "byte", "--out", "@missing", "--json"], 0, ""),
    # printing that name on a strict UTF-8 stdout
    (["data", "stats", "@data-not-utf8"], 0, ""),
    # no tokenizer encodes the surrogates Python makes of such bytes in argv
    (["generate", "@run", "--prompt", "ab\udcff"], 2,
     "--prompt is not UTF-8 text (byte 0xff at offset 2): convert it first, e.g. with iconv"),
    (["generate", "@run", "--prompt", "a", "--stop", "\udcff"], 2,
     "--stop is not UTF-8 text (byte 0xff at offset 0): convert it first, e.g. with iconv"),
    # a temperature float32 holds as 0 divided the logits to nan (and a tiny repetition
    # penalty, found beside it, made a logit inf): torch.multinomial's RuntimeError
    (["generate", "@run", "--prompt", "a", "--temperature", "1e-320"], 0, ""),
    (["generate", "@run", "--prompt", "abab", "--repetition-penalty", "1e-320"], 0, ""),
    # pathlib's NotImplementedError for an absolute pattern
    (["learn", "--watch", "@inbox", "--once", "--glob", "/"], 2,
     "--glob must be a pattern under the directory, like *.txt, got '/'"),
    (["data", "prepare", "@inbox", "--tokenizer", "byte", "--out", "@missing", "--glob", "/"],
     2, "--glob must be a pattern under the directory, like *.txt, got '/'"),
    # TensorBoard's file layer could not encode a run directory named by bytes that are no UTF-8
    (["train", "--preset", "demo", *TINY_SETS, "--data", "@data", "--out", "\udcff",
      "--max-steps", "1"], 0, ""),
]


@pytest.mark.parametrize(("argv", "code", "says"), FOUND, ids=[repr(f[0]) for f in FOUND])
def test_what_the_fuzz_found(tmp: Path, inputs: Inputs, argv: list[str], code: int,
                             says: str) -> None:
    res = run_example(tmp, inputs, argv)
    assert res.code == code, res.err
    if says:
        assert res.err.splitlines()[-1].endswith(says), res.err
