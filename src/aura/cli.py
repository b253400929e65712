"""`aura` command line: a thin layer over the library.

Exit codes: 0 success, 2 bad input or usage (one line on stderr, no traceback), 1 internal error.
Commands that report results take ``--json`` and then print exactly one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from aura.errors import AuraError

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"aura: error: {message} (see `{self.prog} --help`)\n")


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


# --- aura data -------------------------------------------------------------------------------


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from aura.data.prepare import PrepareOptions, prepare

    opts = PrepareOptions(
        sources=args.sources,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        weights=args.weights,
        val_fraction=args.val_fraction,
        seed=args.seed,
        glob=args.glob,
        text_field=args.text_field,
        doc_boundary=args.doc_boundary,
        on_invalid=args.on_invalid,
        shard_tokens=args.shard_tokens,
        hf_split=args.hf_split,
        hf_config=args.hf_config,
        hf_streaming=args.hf_streaming,
    )
    result = prepare(opts, args.out, force=args.force, progress=not args.json)
    if args.json:
        _print_json(result.summary())
    else:
        print(result.describe())
    return EXIT_OK


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from aura.data.shards import PreparedData

    data = PreparedData.open(args.dir, verify="full")
    if args.json:
        _print_json(data.stats())
    else:
        print(data.describe())
    return EXIT_OK


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="prepare and inspect pretokenized datasets")
    dsub = data.add_subparsers(dest="data_cmd", required=True, parser_class=_Parser)

    p = dsub.add_parser(
        "prepare",
        help="tokenize sources once into memmap shards + manifest",
        description="SOURCE is a text file, a directory, a .jsonl file, hf:NAME_OR_PATH, "
        "or builtin:shakespeare. A second run with the same inputs reuses the cache.",
    )
    p.add_argument("sources", nargs="+", metavar="SOURCE")
    p.add_argument(
        "--tokenizer",
        required=True,
        metavar="{byte,char,bpe,gpt2,PATH}",
        help="PATH: a tokenizer.json, or a prepared data / run directory to reuse its tokenizer",
    )
    p.add_argument("--vocab-size", type=int, default=None, help="for bpe (default 8192)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument(
        "--weights", type=float, nargs="+", default=None, metavar="W",
        help="sampling weight per SOURCE (default: proportional to token count)",
    )
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/val document split")
    p.add_argument("--glob", default="*.txt", help="file pattern inside directories (recursive)")
    p.add_argument("--text-field", default="text", help="field holding the text in JSONL / HF rows")
    p.add_argument(
        "--doc-boundary", choices=["auto", "file", "blank-line"], default="auto",
        help="what one document of a text file is; auto: blank-line for a lone file, else file",
    )
    p.add_argument(
        "--on-invalid", choices=["skip", "replace"], default="skip",
        help="invalid UTF-8: skip the document, or keep it with U+FFFD replacements",
    )
    p.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per shard file")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--hf-config", default=None)
    p.add_argument("--hf-streaming", action="store_true", help="stream a hub dataset")
    p.add_argument("--force", action="store_true", help="rebuild even if the cache matches")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_data_prepare)

    s = dsub.add_parser("stats", help="verify a prepared dataset and report its statistics")
    s.add_argument("dir", metavar="DIR")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_data_stats)


# --- aura config -----------------------------------------------------------------------------


def _cmd_config_show(args: argparse.Namespace) -> int:
    from aura.config import config_to_dict, config_to_yaml, load_config

    cfg = load_config(preset=args.preset, config_file=args.config, overrides=args.set)
    if args.json:
        _print_json(config_to_dict(cfg))
    else:
        sys.stdout.write(config_to_yaml(cfg))
    return EXIT_OK


def _cmd_config_list(args: argparse.Namespace) -> int:
    from aura.config import PRESETS

    if args.json:
        _print_json({name: p.description for name, p in PRESETS.items()})
    else:
        width = max(map(len, PRESETS))
        for name, p in PRESETS.items():
            print(f"{name:<{width}}  {p.description}")
    return EXIT_OK


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """The config flags every command that builds a config shares."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", metavar="NAME", help="a named preset (`aura config list`)")
    src.add_argument("--config", metavar="FILE", help="a YAML config file")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override one field, e.g. --set train.lr=3e-4 (repeatable)",
    )


def _add_config(sub: argparse._SubParsersAction) -> None:
    cfg = sub.add_parser("config", help="show presets and resolved configs")
    csub = cfg.add_subparsers(dest="config_cmd", required=True, parser_class=_Parser)
    show = csub.add_parser("show", help="print the resolved config as YAML (or --json)")
    add_config_arguments(show)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_cmd_config_show)
    lst = csub.add_parser("list", help="list the named presets")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_cmd_config_list)


# --- entry point -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from aura import __version__

    parser = _Parser(prog="aura", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"aura {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    _add_data(sub)
    _add_config(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AuraError as exc:
        print(f"aura: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("aura: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
