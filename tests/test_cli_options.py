"""Command-line flags derived from options dataclasses: `aura learn` and `aura data prepare`
declare each option once, as a field, and the flags, defaults, choices and help follow."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aura.cli import _Parser, add_option_flags, build_parser, options_from_args
from aura.data.prepare import PrepareOptions
from aura.field_docs import field_docs
from aura.learn import LearnOptions
from conftest import CliResult

# command, its options class, the fields the command fills itself, the other arguments it needs
COMMANDS: dict[str, tuple[list[str], type, dict[str, Any], list[str]]] = {
    "learn": (["learn"], LearnOptions, {"progress": True}, []),
    "prepare": (["data", "prepare"], PrepareOptions, {}, ["--out=out"]),
}


def values_of(tp: Any, in_list: bool = False) -> st.SearchStrategy[Any]:
    """Any value a user may give a field of type ``tp``."""
    if get_origin(tp) in (Union, types.UnionType):
        (inner,) = (a for a in get_args(tp) if a is not type(None))
        return st.none() | values_of(inner)
    if get_origin(tp) is Literal:
        return st.sampled_from(get_args(tp))
    if get_origin(tp) in (list, Sequence):
        return st.lists(values_of(get_args(tp)[0], in_list=True), min_size=1, max_size=3)
    if tp is float:  # in a list, "-1e-05" reads as an option to argparse: no negative numbers
        return st.floats(min_value=0.0 if in_list else None, allow_nan=False,
                         allow_infinity=False)
    if tp is Path:
        return st.text(min_size=1).map(Path)
    return {bool: st.booleans(), int: st.integers(), str: st.text()}[tp]


def argv_of(options: Any, filled: dict[str, Any]) -> list[str]:
    """The flags that give ``options``: ``--name=value``, a switch when set, positionals last."""
    argv, positional = [], []
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        flag = f"--{f.name.replace('_', '-')}"
        if f.name in filled or value is None:
            continue
        if f.metadata.get("positional"):
            positional += [str(v) for v in value]
        elif isinstance(value, bool):
            argv += [flag] if value else []
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv.append(f"{flag}={value}")
    return [*argv, "--", *positional] if positional else argv


@pytest.mark.parametrize("command", list(COMMANDS))
@given(data=st.data())
def test_any_options_given_as_flags_come_back_the_same(command: str, data: st.DataObject) -> None:
    """Every field is a flag: whatever values a user gives, the parsed options hold them."""
    words, cls, filled, extra = COMMANDS[command]
    hints = get_type_hints(cls)
    values = data.draw(st.fixed_dictionaries(
        {f.name: values_of(hints[f.name]) for f in dataclasses.fields(cls)
         if f.name not in filled}))
    expected = cls(**values, **filled)
    args = build_parser().parse_args([*words, *extra, *argv_of(expected, filled)])
    assert options_from_args(cls, args, **filled) == expected


def test_defaults_are_the_dataclass_defaults() -> None:
    args = build_parser().parse_args(["learn", "--watch", "inbox"])
    assert options_from_args(LearnOptions, args, progress=False) == LearnOptions(
        Path("inbox"), progress=False)
    args = build_parser().parse_args(["data", "prepare", "a", "b", "--tokenizer", "byte",
                                      "--out", "o"])
    assert options_from_args(PrepareOptions, args) == PrepareOptions(["a", "b"], "byte")
    assert args.out == "o" and not args.force and not args.json


@pytest.mark.parametrize(
    ("words", "flags"),
    [
        (["learn"], "--watch --once --state --model --glob --interval --settle --save-every "
                    "--save-seconds --max-file-mb --warmup-sweeps --warmup-samples "
                    "--train-steps --replay-tokens --replay-fraction --ewc-lambda --lr --device "
                    "--seed --json"),
        (["data", "prepare"], "--tokenizer --vocab-size --out --weights --val-fraction --seed "
                              "--glob --text-field --doc-boundary --on-invalid --shard-tokens "
                              "--hf-split --hf-config --hf-streaming --force --json"),
    ],
)
def test_help_names_every_flag_with_its_doc_and_default(
        run_cli: Callable[..., CliResult], words: list[str], flags: str) -> None:
    res = run_cli(*words, "--help")
    assert res.code == 0
    assert set(re.findall(r"^  (--[a-z][a-z-]*)", res.out, re.MULTILINE)) == set(flags.split())
    help_text = " ".join(res.out.split())
    cls = LearnOptions if words == ["learn"] else PrepareOptions
    for name, doc in field_docs(cls).items():
        if name != "progress":
            assert doc.removesuffix(".") in help_text, name
    if words == ["learn"]:
        assert "--watch DIR" in res.out and "Seconds between passes (default: 5.0)." in help_text
    else:
        assert "SOURCE [SOURCE ...]" in res.out and "--weights W [W ...]" in res.out
        assert "--tokenizer {byte,char,bpe,gpt2,PATH}" in res.out
        assert "--doc-boundary {auto,file,blank-line}" in res.out
        assert "(default: skip)." in help_text


@dataclass
class _Switches:
    name: str
    """Required, so --name must be given."""
    on: bool = True
    """A switch that is on unless --no-on: 100% of the time by default."""
    mode: Literal["a", "b"] = "a"
    """One of two modes."""
    paths: list[Path] = field(default_factory=lambda: [Path("x")])
    """Some paths."""


def test_switches_on_by_default_required_fields_and_percent_signs() -> None:
    parser = _Parser(prog="demo", add_arguments=lambda p: add_option_flags(p, _Switches))
    shown = " ".join(parser.format_help().split())
    assert "--name NAME" in shown and "[--on | --no-on]" in shown
    assert "100% of the time by default (default: True)." in shown
    assert "Some paths (default: x)." in shown
    assert options_from_args(_Switches, parser.parse_args(["--name", "n"])) == _Switches("n")
    parsed = parser.parse_args(["--name", "n", "--no-on", "--mode", "b", "--paths", "p", "q"])
    assert options_from_args(_Switches, parsed) == _Switches("n", False, "b", [Path("p"),
                                                                             Path("q")])
    with pytest.raises(SystemExit) as missing:
        parser.parse_args([])
    assert missing.value.code == 2


def test_building_the_parser_imports_no_options_module() -> None:
    """Flags are added when their subcommand parses: `aura --help` or `aura config list` must
    not import the learn service (and torch) to build a parser."""
    heavy = "{'aura.learn.service', 'aura.data.prepare', 'torch'}"
    code = ("import sys; from aura.cli import build_parser; build_parser(); "
            f"print(sorted({heavy} & set(sys.modules)))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=60, check=True)
    assert proc.stdout.strip() == "[]"
