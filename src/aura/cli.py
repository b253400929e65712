"""`aura` command line: a thin layer over the library.

Exit codes: 0 success; 2 bad input or usage, or a file system that refuses (permission denied,
read-only, full: `aura.errors.environment_error`), as one line on stderr without a traceback;
1 internal error; 130 / 143 stopped by SIGINT / SIGTERM (a training run saves a checkpoint
first).
Commands that report results take ``--json`` and then print exactly one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import collections
import collections.abc
import dataclasses
import io
import json
import sys
import textwrap
import types
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn, Union, get_args, get_origin, get_type_hints

from aura.errors import AuraError, environment_error
from aura.field_docs import field_docs

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line, like every other bad input.

    ``add_arguments``, when given, adds the parser's arguments the first time it parses or
    prints help: flags derived from an options dataclass then import its module (and torch) only
    when that command runs, not for every ``aura`` invocation."""

    def __init__(self, *args: Any,
                 add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._add_arguments = add_arguments

    def _complete(self) -> None:
        if self._add_arguments is not None:
            add, self._add_arguments = self._add_arguments, None
            add(self)

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._complete()
        return super().format_help()

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"aura: error: {one_line(message)} (see `{self.prog} --help`)\n")


def one_line(message: str) -> str:
    """``message`` as one line of visible text: a character that is not printable (a newline or
    a terminal control in a path the user typed, a byte that was no UTF-8) is shown escaped, as
    Python writes it in a string literal, so an error stays one line and shows what was typed."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in message)


def add_option_flags(parser: argparse.ArgumentParser, options: type,
                     skip: Collection[str] = ()) -> None:
    """One argument per field of the dataclass ``options``, so an option is declared once.

    ``--field-name``, typed by the annotation (``X | None`` as X, a ``Literal`` as its choices,
    a sequence as one or more values, ``bool`` as a switch), defaulted by the field (required
    without a default) and helped by the field's docstring. Field metadata may give a
    ``metavar`` or make the field ``positional``. ``skip``: fields the caller fills itself."""
    hints = get_type_hints(options)
    docs = field_docs(options)
    for f in dataclasses.fields(options):
        if f.name in skip:
            continue
        tp = hints[f.name]
        if get_origin(tp) in (Union, types.UnionType):
            (tp,) = (arg for arg in get_args(tp) if arg is not type(None))
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (
            f.default_factory() if f.default is dataclasses.MISSING else f.default)
        kwargs: dict[str, Any] = {}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        elif get_origin(tp) is Literal:
            kwargs["choices"] = get_args(tp)
        elif get_origin(tp) in (list, collections.abc.Sequence):
            kwargs.update(nargs="+", type=get_args(tp)[0])
        else:
            kwargs["type"] = tp
        help_text = docs[f.name].replace("%", "%%")  # argparse %-formats help
        if default is not None and default is not False:
            # "%(default)s" also stops the argparse versions whose BooleanOptionalAction appends
            # its own default from saying it twice
            shown = ("%(default)s" if not isinstance(default, list)
                     else " ".join(map(str, default)).replace("%", "%%"))
            help_text = f"{help_text.removesuffix('.')} (default: {shown})."
        kwargs["help"] = help_text
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        if f.metadata.get("positional"):
            parser.add_argument(f.name, **kwargs)
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, required=required,
                                default=default, **kwargs)


def options_from_args(options: type, args: argparse.Namespace, **filled: Any) -> Any:
    """The dataclass ``options`` built from the arguments ``add_option_flags`` added, plus the
    fields it was told to ``skip``, given here."""
    parsed = {f.name: getattr(args, f.name) for f in dataclasses.fields(options)
              if f.name not in filled}
    return options(**parsed, **filled)


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


# --- aura data -------------------------------------------------------------------------------


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from aura.data.prepare import PrepareOptions, prepare

    opts = options_from_args(PrepareOptions, args)
    result = prepare(opts, args.out, force=args.force, progress=not args.json)
    if args.json:
        _print_json(result.summary())
    else:
        print(result.describe())
    return EXIT_OK


def _prepare_arguments(p: argparse.ArgumentParser) -> None:
    from aura.data.prepare import PrepareOptions

    add_option_flags(p, PrepareOptions)
    p.add_argument("--out", required=True, metavar="DIR", help="the prepared data directory")
    p.add_argument("--force", action="store_true", help="rebuild even if the cache matches")
    p.add_argument("--json", action="store_true")


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

    dsub.add_parser(
        "prepare",
        help="tokenize sources once into memmap shards + manifest",
        description="SOURCE is a text file, a directory, a .jsonl file, hf:NAME_OR_PATH, "
        "or builtin:shakespeare. A second run with the same inputs reuses the cache.",
        add_arguments=_prepare_arguments,
    ).set_defaults(func=_cmd_data_prepare)

    s = dsub.add_parser("stats", help="verify a prepared dataset and report its statistics")
    s.add_argument("dir", metavar="DIR")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_data_stats)


# --- aura config -----------------------------------------------------------------------------


def _cmd_config_show(args: argparse.Namespace) -> int:
    from aura.config import config_to_dict, config_to_yaml, explain_config, load_config

    cfg = load_config(preset=args.preset, config_file=args.config, overrides=args.set)
    if args.estimate:
        return _print_estimate(cfg, args.json)
    if args.explain and args.json:
        _print_json(explain_config(cfg))
    elif args.explain:
        _print_explained(explain_config(cfg))
    elif args.json:
        _print_json(config_to_dict(cfg))
    else:
        sys.stdout.write(config_to_yaml(cfg))
    return EXIT_OK


def _print_estimate(cfg: Any, as_json: bool) -> int:
    """Parameters and the training memory estimate on the run's accelerator (CUDA unless
    train.device names another), with its parts."""
    from aura.train.resources import estimate_training_memory, format_bytes

    if cfg.model.vocab_size is None:
        raise AuraError("--estimate needs model.vocab_size (it normally comes from the data): "
                        "add --set model.vocab_size=N")
    t = cfg.train
    device = "cuda" if t.device in ("auto", "cuda") or t.device.startswith("cuda") else t.device
    precision = t.precision if t.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    est = estimate_training_memory(cfg, precision, device.split(":")[0])
    parts = {"params": est.params, "weights": est.param_bytes, "gradients": est.grad_bytes,
             "optimizer": est.optimizer_bytes, "buffers": est.buffer_bytes,
             "activations": est.activation_bytes, "overhead": est.overhead_bytes,
             "total": est.total}
    if as_json:
        _print_json({"device": device, "precision": precision, "batch": est.batch,
                     "seq": est.seq, **parts})
        return EXIT_OK
    print(f"params: {est.params:,}")
    print(f"estimated {device} training memory: {format_bytes(est.total)} "
          f"({est.total:,} bytes; {precision}, micro-batch {est.batch} x {est.seq} tokens)")
    for key in ("weights", "gradients", "optimizer", "buffers", "activations", "overhead"):
        print(f"  {key:<12}{format_bytes(parts[key]):>12}")
    return EXIT_OK


def _print_explained(explained: dict[str, dict[str, Any]]) -> None:
    """``KEY=VALUE`` as ``--set`` takes it, then the field's docstring indented below it."""
    from aura.config import override_text

    for key, entry in explained.items():
        print(f"{key}={override_text(entry['value'])}")
        print(textwrap.fill(entry["doc"], width=100, initial_indent="    ",
                            subsequent_indent="    "))


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
    show.add_argument("--explain", action="store_true",
                      help="every key as KEY=VALUE with what it means (with --json: an object "
                           "KEY -> {value, doc})")
    show.add_argument("--json", action="store_true")
    show.add_argument("--estimate", action="store_true",
                      help="print the parameter count and the training memory estimate "
                           "(weights, gradients, optimizer state, activations) instead")
    show.set_defaults(func=_cmd_config_show)
    lst = csub.add_parser("list", help="list the named presets")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_cmd_config_list)


# --- aura train / generate / eval / plot -----------------------------------------------------


def _train_config(args: argparse.Namespace) -> Any:
    from aura.config import config_from_dict, load_config
    from aura.train.trainer import CONFIG_FILE

    overrides = list(args.set)
    for flag, key in (("max_steps", "train.max_steps"),
                      ("checkpoint_interval", "train.checkpoint_interval"),
                      ("keep_checkpoints", "train.keep_checkpoints"), ("model", "model.name")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    saved = Path(args.out) / CONFIG_FILE
    if args.resume and args.preset is None and args.config is None and saved.is_file():
        from aura.config import apply_overrides, parse_override

        cfg = config_from_dict(json.loads(saved.read_text()))
        return apply_overrides(cfg, dict(parse_override(o) for o in overrides))
    if args.init_from is not None and args.preset is None and args.config is None:
        from aura.config import apply_overrides, parse_override
        from aura.train.checkpoint import resolve_checkpoint

        meta = json.loads((resolve_checkpoint(args.init_from) / "meta.json").read_text())
        cfg = config_from_dict(meta["config"])
        return apply_overrides(cfg, dict(parse_override(o) for o in overrides))
    if args.preset is None and args.config is None:
        raise AuraError("give --preset NAME or --config FILE (`aura config list` shows presets)")
    return load_config(preset=args.preset, config_file=args.config, overrides=overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    import signal

    from aura.atomic import check_writable_dir
    from aura.train.trainer import Trainer

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise AuraError(f"--out {out} exists and is not a directory")
    check_writable_dir(out)  # now, not after loading the data and building the model
    cfg = _train_config(args)
    data_dir = args.data or cfg.data.dir
    cfg.data.dir = data_dir
    if args.init_from is not None and args.resume:
        raise AuraError("--init-from starts a new run; --resume continues one: give one")
    result = Trainer(cfg, data_dir, args.out, resume=args.resume,
                     restart_discarding_checkpoints=args.restart_discarding_checkpoints,
                     progress=not args.json, init_from=args.init_from).run()
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(result).items()}
    if args.json:
        _print_json(summary)
    else:
        val = f"{result.val_loss:.4f}" if result.val_loss is not None else "-"
        print(f"{result.stopped} at step {result.step}: val loss {val}, "
              f"{result.tokens_per_s:,.0f} tokens/s, run in {result.run_dir}")
    if result.stop_signal is not None:  # saved, but not finished: scripts must see the difference
        return 128 + signal.Signals[result.stop_signal].value
    return EXIT_OK


def _sampling(args: argparse.Namespace) -> Any:
    from aura.infer.sampling import SamplingConfig

    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          typical_p=args.typical_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed)


def _cmd_generate(args: argparse.Namespace) -> int:
    from aura.infer.generate import generate_text
    from aura.train.checkpoint import load_for_inference
    from aura.train.device import pick_device

    prompt = _argv_text(args.prompt, "--prompt")
    stop = [_argv_text(s, "--stop") for s in args.stop]
    loaded = load_for_inference(args.run, pick_device(args.device))
    sampling = _sampling(args)
    stream = None if args.json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    # The prompt is echoed once every input is validated: bad input leaves stdout empty.
    on_ready = None if stream is None else (lambda: stream(prompt))
    text = generate_text(loaded.model, loaded.tokenizer, prompt, args.max_new_tokens,
                         sampling, use_cache=not args.no_cache, stop=stop, stream=stream,
                         on_ready=on_ready)
    if args.json:
        _print_json({"checkpoint": str(loaded.path), "prompt": prompt, "text": text})
    else:
        sys.stdout.write("\n")
    return EXIT_OK


def _cmd_eval(args: argparse.Namespace) -> int:
    from aura.data.shards import PreparedData
    from aura.eval.perplexity import evaluate_prepared, evaluate_text
    from aura.train.checkpoint import load_for_inference
    from aura.train.device import pick_device

    loaded = load_for_inference(args.run, pick_device(args.device))
    kw = {"batch_size": args.batch_size, "max_tokens": args.max_tokens, "progress": not args.json}
    if args.text is not None:
        path = Path(args.text)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise AuraError(f"cannot read {path}: {exc}") from None
        result = evaluate_text(loaded.model, loaded.tokenizer, text, **kw)
    else:
        data = PreparedData.open(args.data, expect_tokenizer_hash=loaded.tokenizer.hash)
        result = evaluate_prepared(loaded.model, data, args.split, **kw)
    report = {"checkpoint": str(loaded.path), **result.to_dict()}
    energy = None
    if args.energy:
        from aura.eval.energy import energy_of_stream

        chunks = ([loaded.tokenizer.encode(text)] if args.text is not None
                  else data.split(args.split).maps)
        energy = energy_of_stream(loaded.model, chunks, batch_size=args.batch_size,
                                  tokenizer=loaded.tokenizer)
        report["energy"] = energy.to_dict()
    if args.json:
        _print_json(report)
    else:
        print(f"{loaded.path}: loss {result.loss:.4f}  ppl {result.ppl:.2f}  "
              f"bits/byte {result.bits_per_byte:.4f}  ({result.n_tokens:,} tokens)")
        for name, value in result.metrics.items():
            if "/" not in name:  # per-layer values are in --json
                print(f"  {name}: {value:.4f}")
        if energy is not None:
            print(energy.describe())
    return EXIT_OK


def _cmd_plot(args: argparse.Namespace) -> int:
    from aura.eval.plots import plot_run

    print(plot_run(args.run, args.out))
    return EXIT_OK


def _add_run_commands(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a model on prepared data")
    add_config_arguments(t)
    t.add_argument("--data", metavar="DIR", help="prepared data (default: the config's data.dir)")
    t.add_argument("--model", metavar="NAME", help="model from the registry (default: gpt)")
    t.add_argument("--out", required=True, metavar="RUN_DIR")
    t.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint")
    t.add_argument("--restart-discarding-checkpoints", action="store_true",
                   help="when the run's checkpoints cannot be resumed (none verifies, or no "
                        "--resume), move everything in RUN_DIR into RUN_DIR/discarded-TIME/ and "
                        "start afresh instead of refusing; nothing is deleted")
    t.add_argument("--init-from", metavar="RUN_OR_CHECKPOINT",
                   help="start from these weights (e.g. `aura convert`'s output) with fresh "
                        "optimizer state; without --preset/--config, its config")
    t.add_argument("--max-steps", type=int)
    t.add_argument("--checkpoint-interval", type=int)
    t.add_argument("--keep-checkpoints", type=int)
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=_cmd_train)

    g = sub.add_parser("generate", help="sample text from a run or checkpoint")
    g.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    g.add_argument("--prompt", default="")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--typical-p", type=float)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text (repeatable)")
    g.add_argument("--no-cache", action="store_true", help="re-run the prefix for every token")
    g.add_argument("--device", default="auto")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=_cmd_generate)

    e = sub.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint")
    e.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", metavar="FILE", help="a UTF-8 text file")
    src.add_argument("--data", metavar="DIR", help="a prepared dataset (same tokenizer)")
    e.add_argument("--split", default="val", choices=["train", "val"])
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-tokens", type=int)
    e.add_argument("--device", default="auto")
    e.add_argument("--energy", action="store_true",
                   help="also count MACs and spike-driven ACs per layer over the first batch and "
                        "estimate its energy (45 nm: MAC 4.6 pJ, AC 0.9 pJ)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_cmd_eval)

    p = sub.add_parser("plot", help="write a PNG of a run's curves")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--out", metavar="PNG", help="default: RUN_DIR/curves.png")
    p.set_defaults(func=_cmd_plot)


# --- aura analyze ----------------------------------------------------------------------------


def _cmd_analyze(args: argparse.Namespace) -> int:
    from aura.plasticity.affect import (
        TONES,
        AffectModel,
        default_model,
        default_model_dir,
        lexicon_labels,
    )

    if args.text == "-":
        text = _utf8(sys.stdin.buffer.read(), "standard input")
    else:
        text = _argv_text(args.text, "TEXT")
    if not text.strip():
        raise AuraError("TEXT is empty: give the text to analyze (or - to read stdin)")
    model = AffectModel.load(args.model) if args.model else default_model()
    result = model.predict([text])[0]
    if args.json:
        valence, arousal, tone = lexicon_labels([text])[0].tolist()
        lexicon = {"valence": valence, "arousal": arousal, "tone": TONES[int(tone)]}
        _print_json({**result.to_dict(), "lexicon": lexicon,
                     "model": str(args.model or default_model_dir())})
    else:
        print(f"valence {result.valence:+.3f}  arousal {result.arousal:.3f}  tone {result.tone}")
    return EXIT_OK


def _argv_text(value: str, what: str) -> str:
    """A text argument by ``_utf8``'s rule: Python decodes argv's bytes that are no UTF-8 to
    surrogates, which no tokenizer can encode; undone here, they are refused in one line."""
    return _utf8(value.encode("utf-8", "surrogateescape"), what)


def _utf8(raw: bytes, what: str) -> str:
    """``raw`` as strict UTF-8, the one rule for the argument and stdin alike: invalid bytes are
    text in another encoding, and scoring a guess at it (U+FFFD for each bad byte) would report
    on text the user never wrote, so it is refused, as `aura eval --text` refuses such a file."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AuraError(f"{what} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                        f"{exc.start}): convert it first, e.g. with iconv") from None


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser(
        "analyze", help="valence, arousal and tone of a text",
        description="Hashed n-gram features -> online whitener -> Oja layer -> ridge readout, "
        "trained on VADER lexicon labels. Without --model, a default model is trained once on "
        "builtin:shakespeare (a few seconds) and cached under $XDG_CACHE_HOME/aura.",
    )
    a.add_argument("text", metavar="TEXT", help="the text to analyze; - reads standard input")
    a.add_argument("--model", metavar="DIR", help="a saved affect model (AffectModel.save)")
    a.add_argument("--json", action="store_true", help="also the lexicon's own labels")
    a.set_defaults(func=_cmd_analyze)


# --- aura memory -----------------------------------------------------------------------------


def _cmd_memory_build(args: argparse.Namespace) -> int:
    from aura.data.shards import PreparedData
    from aura.train.checkpoint import load_for_inference, lock_run, replace_memory
    from aura.train.device import pick_device

    with lock_run(Path(args.run), "aura memory build"):
        loaded = load_for_inference(args.run, pick_device(args.device))
        data = PreparedData.open(args.data, expect_tokenizer_hash=loaded.tokenizer.hash)
        n = loaded.model.build_memory(data.split(args.split), loaded.tokenizer, args.max_chunks,
                                      args.batch_size)
        replace_memory(loaded.path, loaded.model)
    report = {"checkpoint": str(loaded.path), "split": args.split, "entries": n,
              "banks": sorted(loaded.model.writers)}
    if args.json:
        _print_json(report)
    else:
        print(f"{loaded.path}: {n:,} entries from the {args.split} split of {args.data} "
              f"in each of {len(report['banks'])} bank(s)")
    return EXIT_OK


def _add_memory(sub: argparse._SubParsersAction) -> None:
    mem = sub.add_parser("memory", help="build a model's memory bank from prepared data")
    msub = mem.add_subparsers(dest="memory_cmd", required=True, parser_class=_Parser)
    b = msub.add_parser(
        "build", help="refill the bank of a run's best checkpoint from a prepared corpus",
        description="Encode non-overlapping windows of a prepared split with the model itself "
        "(in corpus order, spread evenly when the bank cannot hold them all) and save the bank "
        "into the checkpoint, replacing the one training left there.")
    b.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    b.add_argument("--data", required=True, metavar="DIR", help="prepared data (same tokenizer)")
    b.add_argument("--split", default="train", choices=["train", "val"])
    b.add_argument("--max-chunks", type=int, help="entries per bank (default: its capacity)")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--device", default="auto")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_cmd_memory_build)


# --- aura learn ------------------------------------------------------------------------------


def _cmd_learn(args: argparse.Namespace) -> int:
    from aura.learn.service import LearnOptions, learn, summary_dict

    summary = learn(options_from_args(LearnOptions, args, progress=not args.json))
    if args.json:
        _print_json(summary_dict(summary))
    else:
        print(summary.describe())
    return EXIT_OK


def _learn_arguments(p: argparse.ArgumentParser) -> None:
    from aura.learn.service import LearnOptions

    add_option_flags(p, LearnOptions, skip=("progress",))
    p.add_argument("--json", action="store_true")


def _add_learn(sub: argparse._SubParsersAction) -> None:
    sub.add_parser(
        "learn", help="learn continuously from the text files of a directory",
        description="Learn each new or changed text file under DIR exactly once (token "
        "statistics, STDP, Oja; a model's episodic memories and optional gradient steps), "
        "surviving crashes. Polls every --interval seconds until SIGINT/SIGTERM, or --once.",
        add_arguments=_learn_arguments,
    ).set_defaults(func=_cmd_learn)


# --- aura convert ----------------------------------------------------------------------------


def _cmd_convert(args: argparse.Namespace) -> int:
    from aura.train.convert import convert

    moved, path = convert(args.run, args.set, args.out)
    if args.json:
        _print_json({"checkpoint": str(path), "tensors": [dataclasses.asdict(m) for m in moved]})
        return EXIT_OK
    width = max(len(m.name) for m in moved)
    for m in moved:
        shapes = " -> ".join("-" if s is None else "x".join(map(str, s)) or "scalar"
                             for s in (m.old, m.new))
        known = m.old is not None or m.new is not None  # a memory store has no one shape
        print(f"{m.name:<{width}}  {m.action:<8}  {shapes if known else ''}".rstrip())
    counts = collections.Counter(m.action for m in moved)
    print(", ".join(f"{n} {a}" for a, n in sorted(counts.items())) + f"; wrote {path}")
    return EXIT_OK


def _add_convert(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("convert", help="migrate a run's checkpoint to a larger model shape")
    c.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    c.add_argument("--set", action="append", default=[], metavar="model.KEY=VALUE",
                   help="a larger model size, e.g. --set model.n_embd=1024 (repeatable)")
    c.add_argument("--out", required=True, metavar="RUN_DIR",
                   help="the new run directory (`aura train --init-from RUN_DIR` continues it)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_cmd_convert)


# --- entry point -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from aura import __version__

    parser = _Parser(prog="aura", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"aura {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    _add_data(sub)
    _add_config(sub)
    _add_run_commands(sub)
    _add_analyze(sub)
    _add_memory(sub)
    _add_learn(sub)
    _add_convert(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if isinstance(sys.stdout, io.TextIOWrapper):
        # Paths are bytes: one that is no UTF-8 reaches Python as surrogates, and is written back
        # as the same bytes (as `ls` shows it) instead of failing in the middle of a report.
        sys.stdout.reconfigure(errors="surrogateescape")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AuraError as exc:
        print(f"aura: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("aura: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except OSError as exc:
        reason = environment_error(exc)
        if reason is None:  # not the file system's state: a bug, with its traceback
            raise
        print(f"aura: error: {one_line(reason)}", file=sys.stderr)
        return EXIT_USAGE
