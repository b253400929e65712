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

from aura.allocator import keep_freed_memory
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

    cfg = load_config(preset=_preset(args.preset), config_file=args.config, overrides=args.set)
    if args.estimate:
        from aura.train.gpu import describe, estimate_gpu

        if args.nproc < 1:
            raise AuraError(f"--nproc must be at least 1, got {args.nproc}")
        est = estimate_gpu(cfg, args.nproc)
        if args.json:
            _print_json(est.as_dict())
        else:
            sys.stdout.write(describe(est))
    elif args.explain and args.json:
        _print_json(explain_config(cfg))
    elif args.explain:
        _print_explained(explain_config(cfg))
    elif args.json:
        _print_json(config_to_dict(cfg))
    else:
        sys.stdout.write(config_to_yaml(cfg))
    return EXIT_OK


def _preset(name: str | None) -> str | None:
    """``auto`` is the preset for this machine's device and memory (aura.train.gpu)."""
    if name != "auto":
        return name
    from aura.train.gpu import auto_preset

    chosen = auto_preset()
    print(f"note: --preset auto chose {chosen}", file=sys.stderr)
    return chosen


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
    src.add_argument("--preset", metavar="NAME",
                     help="a named preset (`aura config list`); auto: the one for this "
                          "machine's GPU and its memory")
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
    show.add_argument("--estimate", action="store_true",
                      help="print the parameter count and the estimated peak GPU memory "
                           "(bf16 unless the config says otherwise) instead of the config")
    show.add_argument("--nproc", type=int, default=1, metavar="N",
                      help="with --estimate: per GPU of N (train.parallel=fsdp shards the "
                           "weights, gradients and optimizer state over them)")
    show.add_argument("--json", action="store_true")
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
                      ("keep_checkpoints", "train.keep_checkpoints"), ("model", "model.name"),
                      ("viz_interval", "train.viz_interval")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.strict_sanity:
        overrides.append("train.strict_sanity=true")
    saved = Path(args.out) / CONFIG_FILE
    if args.resume and args.preset is None and args.config is None and saved.is_file():
        from aura.config import apply_overrides, parse_override

        cfg = config_from_dict(json.loads(saved.read_text()))
        return apply_overrides(cfg, dict(parse_override(o) for o in overrides))
    if args.init_from is not None and args.preset is None and args.config is None:
        from aura.config import apply_overrides, parse_override
        from aura.train.checkpoint import newest_checkpoint

        cfg = config_from_dict(newest_checkpoint(Path(args.init_from))[1]["config"])
        return apply_overrides(cfg, dict(parse_override(o) for o in overrides))
    if args.preset is None and args.config is None:
        raise AuraError("give --preset NAME or --config FILE (`aura config list` shows presets)")
    return load_config(preset=_preset(args.preset), config_file=args.config,
                       overrides=overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    import signal

    from aura.atomic import check_writable_dir
    from aura.train.distributed import env_rank
    from aura.train.gpu import colab_run_dir
    from aura.train.trainer import Trainer

    if args.nproc is not None:  # a thin launcher over torchrun (aura.train.launch)
        from aura.train.device import pick_device
        from aura.train.launch import check_nproc, launch, strip_nproc

        check_nproc(args.nproc, pick_device(_train_config(args).train.device).type)
        if args.nproc > 1:  # one rank is this process itself
            return launch(strip_nproc(args.argv), args.nproc)
    out = colab_run_dir(Path(args.out))  # on Colab a relative run goes to the mounted Drive
    if out != Path(args.out):
        print(f"note: Colab: the run is {out} on your Drive (it outlives the session; "
              "--resume continues it after a disconnect)", file=sys.stderr)
        args.out = str(out)
    if out.exists() and not out.is_dir():
        raise AuraError(f"--out {out} exists and is not a directory")
    main_rank = env_rank() == 0  # under torchrun, rank 0 alone writes the run and reports
    if main_rank:
        check_writable_dir(out)  # now, not after loading the data and building the model
    if args.init_continual and args.init_from is None:
        raise AuraError("--init-continual needs --init-from RUN")
    cfg = _train_config(args)
    data_dir = args.data or cfg.data.dir
    cfg.data.dir = data_dir
    if args.init_from is not None and args.resume:
        raise AuraError("--init-from starts a new run; --resume continues one: give one")
    result = Trainer(cfg, data_dir, args.out, resume=args.resume,
                     restart_discarding_checkpoints=args.restart_discarding_checkpoints,
                     progress=not args.json, init_from=args.init_from,
                     init_continual=args.init_continual).run()
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(result).items()}
    if main_rank and args.json:
        _print_json(summary)
    elif main_rank:
        val = f"{result.val_loss:.4f}" if result.val_loss is not None else "-"
        print(f"{result.stopped} at step {result.step}: val loss {val}, "
              f"{result.tokens_per_s:,.0f} tokens/s in {result.precision}, run in "
              f"{result.run_dir}")
    if result.stopped == "sanity":
        raise AuraError(f"stopped by --strict-sanity: {result.sanity_warnings[0]}; the run is "
                        "saved (continue with --resume)")
    if result.stop_signal is not None:  # saved, but not finished: scripts must see the difference
        return 128 + signal.Signals[result.stop_signal].value
    return EXIT_OK


def _sampling(args: argparse.Namespace) -> Any:
    from aura.infer.sampling import SamplingConfig

    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          typical_p=args.typical_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, modulation=not getattr(args, "no_modulation", False))


def _cmd_generate(args: argparse.Namespace) -> int:
    import contextlib

    from aura.infer.generate import generate_text

    prompt = _argv_text(args.prompt, "--prompt")
    stop = [_argv_text(s, "--stop") for s in args.stop]
    loaded = _load_quantized(args)
    sampling = _sampling(args)
    stream = None if args.json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    # The prompt is echoed once every input is validated: bad input leaves stdout empty.
    on_ready = None if stream is None else (lambda: stream(prompt))
    knn = None
    if args.knn is not None:
        from aura.eval.knn import knn_readout

        knn = knn_readout(loaded.model, loaded.path, lam=args.knn,
                          temperature=args.knn_temperature, k=args.knn_k, span=None,
                          stream=False, learn=False)
    trace = None
    if args.show_memory:
        from aura.infer.memory_trace import MemoryTrace

        if args.memory_span < 1:
            raise AuraError(f"--memory-span must be >= 1, got {args.memory_span}")
        trace = MemoryTrace(loaded.model, loaded.tokenizer, span=args.memory_span, knn=knn)
        if not trace.active:
            raise AuraError(f"model {loaded.model.config.name!r} has no episodic memory to show "
                            "(--show-memory needs hippocampal, snn_rag or natural_brain's "
                            "hippocampus, or a kNN datastore read with --knn)")
    with contextlib.nullcontext() if trace is None else trace.recording():
        text = generate_text(loaded.model, loaded.tokenizer, prompt, args.max_new_tokens,
                             sampling, use_cache=not args.no_cache, stop=stop, stream=stream,
                             on_ready=on_ready, memory=args.memory or "read",
                             on_token=None if trace is None else trace.push, knn=knn)
    if args.json:
        from aura.infer.generate import modulated

        applied, factors = modulated(loaded.model, sampling)
        report = {"checkpoint": str(loaded.path), "prompt": prompt, "text": text,
                  "sampling": {"temperature": applied.temperature, "top_k": applied.top_k,
                               "modulation": factors}}
        if trace is not None:
            report["memory_reads"] = trace.spans()
        _print_json(report)
    else:
        sys.stdout.write("\n")
        if trace is not None:
            from aura.infer.memory_trace import format_spans

            print("\n".join(format_spans(trace.spans())))
    return EXIT_OK


def _cmd_eval(args: argparse.Namespace) -> int:
    from aura.data.shards import PreparedData
    from aura.eval.perplexity import evaluate_prepared, evaluate_text

    loaded = _load_quantized(args)
    if args.stream or args.knn is not None:
        return _eval_stream(args, loaded)
    kw = {"batch_size": args.batch_size, "max_tokens": args.max_tokens, "progress": not args.json,
          "memory": args.memory or "read"}
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


def _eval_stream(args: argparse.Namespace, loaded: Any) -> int:
    """``aura eval --stream`` (consecutive windows with memory carried, aura.eval.stream) and
    ``--knn`` (the kNN-LM read-out; without --stream, the windowed evaluation one window at a
    time, which the stream with memory read equals)."""
    from aura.eval.knn import knn_readout
    from aura.eval.stream import evaluate_stream, window_buckets
    from aura.models.memory_mode import default_memory_mode

    if args.text is None or args.energy:
        raise AuraError("--stream and --knn read one document: give --text FILE (and no "
                        "--energy)")
    mode = args.memory or (default_memory_mode(loaded.model, streaming=True,
                                               knn=args.knn is not None)
                           if args.stream else "read")
    readout = None
    if args.knn is not None:
        readout = knn_readout(loaded.model, loaded.path, lam=args.knn,
                              temperature=args.knn_temperature, k=args.knn_k,
                              span=args.knn_span, stream=args.stream, learn=mode == "write")
    path = Path(args.text)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuraError(f"cannot read {path}: {exc}") from None
    result = evaluate_stream(loaded.model, loaded.tokenizer, text, memory=mode,
                             max_tokens=args.max_tokens, progress=not args.json,
                             readout=readout)
    if args.json:
        _print_json({"checkpoint": str(loaded.path), **result.to_dict()})
        return EXIT_OK
    later = ("-" if result.later_windows_bpb is None else f"{result.later_windows_bpb:.4f}")
    print(f"{loaded.path}: memory {result.memory}  loss {result.loss:.4f}  bits/byte "
          f"{result.bits_per_byte:.4f}  first window {result.first_window_bpb:.4f}  later "
          f"windows {later}  ({len(result.windows):,} windows, {result.n_tokens:,} tokens)")
    for label, bpb, tokens in window_buckets(result.windows):
        print(f"  windows {label}: bits/byte {bpb:.4f} ({tokens:,} tokens)")
    return EXIT_OK


def _cmd_plot(args: argparse.Namespace) -> int:
    from aura.eval.plots import plot_runs

    print(plot_runs(args.run, args.out))
    return EXIT_OK


def _cmd_viz(args: argparse.Namespace) -> int:
    import hashlib

    from aura.eval.viz import INDEX, probe_state, render
    from aura.train.checkpoint import load_for_inference
    from aura.train.device import pick_device

    text = _argv_text(args.text, "--text")
    run = Path(args.run)
    if args.out is None and (run / "meta.json").is_file():
        raise AuraError(f"{run} is a checkpoint: give --out DIR for the pictures")
    out = Path(args.out) if args.out is not None else (
        run / "viz" / f"text-{hashlib.sha256(text.encode()).hexdigest()[:8]}")
    if out.exists() and not out.is_dir():
        raise AuraError(f"--out {out} exists and is not a directory")
    loaded = load_for_inference(run, pick_device(args.device))
    ids = loaded.tokenizer.encode(text)
    if len(ids) == 0:
        raise AuraError("--text is empty: give the text to look at")
    limit = loaded.model.max_context
    if limit is not None and len(ids) > limit:
        print(f"aura: note: --text is {len(ids)} tokens; looking at the first {limit}",
              file=sys.stderr)
        ids = ids[:limit]
    state, tokens = probe_state(loaded.model, loaded.tokenizer, ids)
    pictures = render(state, tokens, out, f"{loaded.path}: {len(tokens)} tokens")
    if args.json:
        _print_json({"checkpoint": str(loaded.path), "out": str(out),
                     "pictures": [str(p.png) for p in pictures]})
    else:
        print(out / INDEX)
    return EXIT_OK


def _plan_value(opts: dict[str, Any], key: str, flag: Any, kind: type, default: Any = None
                ) -> Any:
    """A flag given on the command line, else the --plan's value of ``key`` (of type ``kind``),
    else ``default``."""
    if flag is not None and flag != []:
        return flag
    value = opts.get(key, default)
    if value is None:
        return None
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise AuraError(f"--plan: {key} must be an integer, got {value!r}")
    if kind is list and (not isinstance(value, list)
                         or not all(isinstance(v, str) for v in value)):
        raise AuraError(f"--plan: {key} must be a list of strings, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise AuraError(f"--plan: {key} must be a string, got {value!r}")
    return value


def _cmd_ablate(args: argparse.Namespace) -> int:
    from aura.config import load_config
    from aura.eval.ablate import TABLE, AblationPlan, plan_options_from_yaml, run_ablation
    from aura.eval.ablate import markdown_table as table
    from aura.train.ablation import train_and_evaluate

    opts = plan_options_from_yaml(Path(args.plan)) if args.plan is not None else {}
    preset, config = args.preset, args.config
    if preset is None and config is None:
        preset, config = _plan_value(opts, "preset", None, str), _plan_value(opts, "config",
                                                                             None, str)
    if (preset is None) == (config is None):
        raise AuraError("give one of --preset NAME or --config FILE (or either in --plan)")
    steps = _plan_value(opts, "steps", args.steps, int)
    seeds = _plan_value(opts, "seeds", args.seeds, int, 3)
    eval_tokens = _plan_value(opts, "eval_tokens", args.eval_tokens, int, 20_000)
    data, out = _plan_value(opts, "data", args.data, str), _plan_value(opts, "out", args.out, str)
    for name, value in (("--steps", steps), ("--data", data), ("--out", out)):
        if value is None:
            raise AuraError(f"give {name} (or its key in --plan)")
    if steps < 1 or seeds < 1:
        raise AuraError(f"--steps and --seeds must be >= 1, got {steps} and {seeds}")
    sets = [*_plan_value(opts, "set", None, list, []), *args.set]
    full = load_config(preset=preset, config_file=config,
                       overrides=[*sets, f"train.max_steps={steps}"])
    switches = _plan_value(opts, "switch", args.switch, list, [])
    plan = AblationPlan(full, Path(data), switches,
                        [full.train.seed + i for i in range(seeds)], Path(out), eval_tokens)
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    summaries = run_ablation(plan, lambda cfg, d, run: train_and_evaluate(
        cfg, d, run, eval_tokens=plan.eval_tokens, progress=not args.json), log)
    if args.json:
        _print_json({"out": str(plan.out), "variants": [vars(v) for v in summaries]})
    else:
        print(table(summaries), end="")
        print(plan.out / TABLE)
    return EXIT_OK


def _knn_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """--knn LAMBDA (``what`` it mixes), --knn-temperature, --knn-k: eval's and generate's."""
    p.add_argument("--knn", type=float, metavar="LAMBDA", help=what)
    p.add_argument("--knn-temperature", type=float, default=0.05,
                   help="softmax temperature over the neighbours' cosines (default 0.05)")
    p.add_argument("--knn-k", type=int, default=16, help="neighbours per token (default 16)")


def _memory_argument(p: argparse.ArgumentParser) -> None:
    """The inference memory switch eval and generate share (aura.models.memory_mode)."""
    p.add_argument("--memory", choices=["off", "read", "write"],
                   help="the episodic memory: off (no reads), read (the checkpoint's, the "
                        "default), write (also remember what is read; a token reads only "
                        "memories of earlier forwards)")


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
    t.add_argument("--init-from", metavar="RUN",
                   help="start this new run (step 0: the LR warms up and decays again) from the "
                        "weights of RUN's newest checkpoint; without --preset/--config, with "
                        "RUN's config too (--set still applies)")
    t.add_argument("--init-continual", action="store_true",
                   help="with --init-from: also take RUN's EWC anchor and Fisher and its replay "
                        "buffer (continual.*)")
    t.add_argument("--max-steps", type=int)
    t.add_argument("--checkpoint-interval", type=int)
    t.add_argument("--keep-checkpoints", type=int)
    t.add_argument("--viz-interval", type=int, metavar="N",
                   help="every N steps, pictures of the model's insides under RUN/viz/")
    t.add_argument("--strict-sanity", action="store_true",
                   help="stop (saved, exit 2) at the first sanity warning")
    t.add_argument("--json", action="store_true")
    t.add_argument("--nproc", type=int, metavar="N",
                   help="train on N processes of this host (a thin launcher over torchrun: "
                        "one rank per GPU, or per CPU core group over gloo)")
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
    g.add_argument("--no-modulation", action="store_true",
                   help="ignore the model's own factors on temperature and top-k (e.g. "
                        "natural_brain's hormones): sample exactly as asked")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text (repeatable)")
    g.add_argument("--no-cache", action="store_true", help="re-run the prefix for every token")
    g.add_argument("--device", default="auto")
    _add_quantize(g)
    g.add_argument("--json", action="store_true")
    _memory_argument(g)
    g.add_argument("--show-memory", action="store_true",
                   help="after the text, per span of generated tokens: the memories read (source "
                        "text, similarity, gate); --json carries them as memory_reads")
    g.add_argument("--memory-span", type=int, default=16, metavar="N",
                   help="tokens per span for --show-memory")
    _knn_arguments(g, "draw each token from the next-token distribution mixed with the "
                      "checkpoint's kNN-LM datastore's (aura memory build --knn), weight "
                      "LAMBDA in [0, 1] (0: the plain model's tokens)")
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
    _add_quantize(e)
    e.add_argument("--energy", action="store_true",
                   help="also count MACs and spike-driven ACs per layer over the first batch and "
                        "estimate its energy (45 nm: MAC 4.6 pJ, AC 0.9 pJ)")
    e.add_argument("--json", action="store_true")
    e.add_argument("--stream", action="store_true",
                   help="read --text as one document in consecutive windows, carrying the "
                        "memory (and a recurrent state) across them; loss and bits/byte per "
                        "window (--memory defaults to write where the model can)")
    _memory_argument(e)
    _knn_arguments(e, "mix the next-token distribution with a kNN-LM datastore's, weight "
                      "LAMBDA in [0, 1]: the checkpoint's (aura memory build --knn), or with "
                      "--stream the document's own, filled as it is read (--memory write)")
    e.add_argument("--knn-span", type=int,
                   help="with --stream: positions (states and tokens) a key spans (default 12;"
                        " 1: the hidden state alone, starting from the corpus datastore)")
    e.set_defaults(func=_cmd_eval)

    p = sub.add_parser("plot", help="write a PNG of a run's curves (several runs: overlaid)")
    p.add_argument("run", metavar="RUN_DIR", nargs="+")
    p.add_argument("--out", metavar="PNG",
                   help="default: RUN_DIR/curves.png (several runs: the first's compare.png)")
    p.set_defaults(func=_cmd_plot)

    a = sub.add_parser("ablate", help="train the full model and each switch off, over seeds; "
                       "a table of what each part is worth")
    a.add_argument("--plan", metavar="YAML", help="the options below as a YAML mapping "
                   "(preset, config, set, data, switch, steps, seeds, out, eval_tokens)")
    add_config_arguments(a)
    a.add_argument("--data", metavar="DIR", help="prepared data with a val split")
    a.add_argument("--switch", action="append", default=[], metavar="KEY",
                   help="a boolean config key to turn off, e.g. model.place_cells, or "
                   "KEY=VALUE for another value, e.g. model.ffn=mlp (repeatable)")
    a.add_argument("--steps", type=int, help="training steps of every run")
    a.add_argument("--seeds", type=int, help="seeds per variant (default 3)")
    a.add_argument("--eval-tokens", type=int,
                   help="val tokens each run is scored on (default 20000)")
    a.add_argument("--out", metavar="DIR", help="the ablation's directory (resumable)")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=_cmd_ablate)

    v = sub.add_parser("viz", help="pictures of what a model does inside on a text")
    v.add_argument("run", metavar="RUN", help="a run directory or a checkpoint")
    v.add_argument("--text", required=True, help="the text to look at")
    v.add_argument("--out", metavar="DIR", help="default: RUN/viz/text-HASH")
    v.add_argument("--device", default="auto")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=_cmd_viz)


# --- aura export -----------------------------------------------------------------------------


def _cmd_export(args: argparse.Namespace) -> int:
    from aura.train.export import export_checkpoint

    print(export_checkpoint(args.run, args.out))
    return EXIT_OK


def _add_export(sub: argparse._SubParsersAction) -> None:
    x = sub.add_parser("export", help="copy a run's best checkpoint as a weights-only one",
                       description="Write the best (else newest good) checkpoint of RUN_DIR, "
                       "verified, to a new directory without what only resuming needs "
                       "(optimizer and RNG state): model.safetensors, tokenizer, memories, "
                       "meta.json, which `aura generate` and `aura eval` take as it is. "
                       "Checkpoints of data-parallel and FSDP2 runs are consolidated already.")
    x.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    x.add_argument("--out", required=True, metavar="DIR", help="a directory that does not exist")
    x.set_defaults(func=_cmd_export)


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
        if args.knn:
            from aura.eval.knn import KNN_CORPUS_CAPACITY, build_datastore

            store = build_datastore(loaded.model, data.split(args.split), loaded.tokenizer,
                                    capacity=args.max_chunks or KNN_CORPUS_CAPACITY,
                                    batch_size=args.batch_size)
            n = len(store)
        else:
            n = loaded.model.build_memory(data.split(args.split), loaded.tokenizer,
                                          args.max_chunks, args.batch_size)
            from aura.memory.knn_lm import load_datastore

            store = load_datastore(loaded.path)  # kept: it is not what this build replaces
        if store is not None:
            from aura.memory.knn_lm import KNN_NAME
            from aura.memory.writer import MemoryWriter

            loaded.model.writers[KNN_NAME] = MemoryWriter(store)
        replace_memory(loaded.path, loaded.model)
    report = {"checkpoint": str(loaded.path), "split": args.split, "entries": n,
              "banks": sorted(loaded.model.writers)}
    if args.json:
        _print_json(report)
    else:
        print(f"{loaded.path}: {n:,} entries from the {args.split} split of {args.data} "
              f"in each of {len(report['banks'])} bank(s)")
    return EXIT_OK


def _cmd_memory_fit_keys(args: argparse.Namespace) -> int:
    from aura.data.shards import PreparedData
    from aura.train.checkpoint import load_for_inference, lock_run, replace_memory
    from aura.train.device import pick_device
    from aura.train.key_fit import KeyFitOptions, fit_memory_keys

    if min(args.passages, args.chars, args.steps) < 1:
        raise AuraError(f"--passages, --chars and --steps must be >= 1, got {args.passages}, "
                        f"{args.chars} and {args.steps}")
    opts = KeyFitOptions(passages=args.passages, chars=args.chars, steps=args.steps,
                         seed=args.seed)
    with lock_run(Path(args.run), "aura memory fit-keys"):
        loaded = load_for_inference(args.run, pick_device(args.device))
        data = PreparedData.open(args.data, expect_tokenizer_hash=loaded.tokenizer.hash)
        report = fit_memory_keys(loaded.model, loaded.tokenizer, data.split("train"),
                                 data.split("val"), opts)
        replace_memory(loaded.path, loaded.model, weights=True)
    if args.json:
        _print_json({"checkpoint": str(loaded.path), "layers": report})
        return EXIT_OK
    for name, r in report.items():
        pct = " / ".join(f"{how} {100 * r['top5_before'][how]:.1f} -> "
                         f"{100 * r['top5_after'][how]:.1f}%" for how in r["top5_after"])
        print(f"{name}: top-5 recall of {r['held_out_passages']} altered val passages: {pct}; "
              f"{r['memories_rekeyed']:,} memories keyed again")
    print(f"wrote {loaded.path}")
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
    b.add_argument("--max-chunks", type=int, help="entries per bank (default: its capacity; "
                   "with --knn the whole split up to 1,048,576 positions)")
    b.add_argument("--knn", action="store_true",
                   help="build a kNN-LM datastore instead (any model: each position's final "
                        "hidden state and the token after it), saved as the checkpoint's "
                        "memory/knn for aura eval --knn")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--device", default="auto")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_cmd_memory_build)
    f = msub.add_parser(
        "fit-keys", help="fit a memory's key projection so altered text finds its memory",
        description="Fit the key projection of each hippocampal memory of a run's best "
        "checkpoint contrastively on the frozen model's states of training passages and their "
        "altered versions (typos, dropped words, a shifted start), key the stored memories "
        "again, and save weights and memories into the checkpoint. Reports top-5 recall of "
        "altered validation passages before and after.")
    f.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    f.add_argument("--data", required=True, metavar="DIR", help="prepared data (same tokenizer)")
    f.add_argument("--passages", type=int, default=1500)
    f.add_argument("--chars", type=int, default=64, help="tokens per passage")
    f.add_argument("--steps", type=int, default=300)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default="auto")
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=_cmd_memory_fit_keys)


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


# --- aura serve / chat -----------------------------------------------------------------------


def _add_quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: dynamic int8 quantisation of the Linear layers (CPU inference)")


def _inference_device(args: argparse.Namespace) -> Any:
    """--device, where "auto" is the CPU for a quantised model (int8 kernels are CPU ones)."""
    from aura.train.device import pick_device

    return pick_device("cpu" if args.quantize != "none" and args.device == "auto"
                       else args.device)


def _load_quantized(args: argparse.Namespace) -> Any:
    """The run's model and tokenizer (``load_for_inference``), quantised as ``--quantize`` says."""
    from aura.infer.quantize import quantize
    from aura.train.checkpoint import load_for_inference

    loaded = load_for_inference(args.run, _inference_device(args))
    quantize(loaded.model, args.quantize, loaded.tokenizer)
    return loaded


def _template(args: argparse.Namespace) -> Any:
    from aura.infer.template import ChatTemplate

    user = _argv_text(args.user_prefix, "--user-prefix")
    assistant = _argv_text(args.assistant_prefix, "--assistant-prefix")
    if not user.strip() or not assistant.strip():
        raise AuraError("--user-prefix and --assistant-prefix must not be empty")
    return ChatTemplate(user=user, assistant=assistant)


def _add_template(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user-prefix", default="User:", metavar="TEXT",
                   help="what starts a user turn in the prompt (default: %(default)s)")
    p.add_argument("--assistant-prefix", default="Assistant:", metavar="TEXT",
                   help="what starts the model's turn (default: %(default)s)")


def _check_listen(host: str, port: int) -> None:
    """Refuse an address the server could not listen on now, before loading the model."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise AuraError(f"cannot listen on {host}:{port}: {reason}") from None


def _serve_threads(threads: int | None, engine: str) -> int:
    """The model's torch threads: a server's event loop needs a core of its own, or every
    decode round's OpenMP threads wait on it (on 2 cores, 1 thread served the demo model
    1.6x faster with 8 clients: docs/BENCHMARKS.md). With the model in a process of its own,
    this one stays at one thread until the fork: GNU OpenMP lets a forked child run more
    threads only if its parent never did (``engine.EngineProcess``)."""
    import os

    import torch

    if threads is None:
        threads = (torch.get_num_threads() if os.environ.get("OMP_NUM_THREADS")
                   else max(1, (os.cpu_count() or 1) - 1))
    if threads < 1:
        raise AuraError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(1 if engine == "process" else threads)
    return threads


def _cmd_serve(args: argparse.Namespace) -> int:
    from aura.extras import require

    for module in ("fastapi", "uvicorn", "sse_starlette"):
        require(module, "aura serve", "pip install 'aura[serve]'")
    from aura.infer.server import ServeOptions, serve

    if args.api_key_file is not None:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise AuraError(f"cannot read --api-key-file {args.api_key_file}: {exc}") from None
        if not key:
            raise AuraError(f"--api-key-file {args.api_key_file} is empty")
    else:
        key = None if args.api_key is None else _argv_text(args.api_key, "--api-key")
    if key is not None and not (key.isascii() and key.isprintable() and key.strip()):
        raise AuraError("the API key must be printable ASCII (an HTTP header carries it)")
    if not 0 <= args.port < 65536:
        raise AuraError(f"--port must be in 0..65535, got {args.port}")
    if not 1 <= args.max_tokens_limit <= (1 << 24):
        raise AuraError(f"--max-tokens-limit must be in 1..{1 << 24}, got "
                        f"{args.max_tokens_limit}")
    if not 0 < args.save_interval < float("inf"):
        raise AuraError(f"--save-interval must be a number of seconds > 0, got "
                        f"{args.save_interval}")
    _check_listen(args.host, args.port)
    from aura.infer.engine import resolve

    engine = resolve(args.engine, _inference_device(args))
    threads = _serve_threads(args.threads, engine)
    mode = _conversation_memory(args)
    from aura.infer.embeddings import check_spec

    check_spec(args.embeddings)
    if args.store_dir is not None:
        from aura.atomic import check_writable_dir

        check_writable_dir(args.store_dir)
    template = _template(args)
    loaded = _load_quantized(args)
    options = ServeOptions(host=args.host, port=args.port, api_key=key,
                           cors_origins=args.cors_origin, model_name=args.model_name,
                           max_tokens_limit=args.max_tokens_limit,
                           memory_dir=None if args.memory_dir is None else Path(args.memory_dir),
                           memory_mode=mode, save_interval=args.save_interval,
                           template=template, embeddings=args.embeddings,
                           store_dir=None if args.store_dir is None else Path(args.store_dir),
                           engine=engine, threads=threads)
    sig = serve(loaded.model, loaded.tokenizer, options,
                log=lambda line: print(line, file=sys.stderr, flush=True))
    return EXIT_OK if sig is None else 128 + sig


def _conversation_memory(args: argparse.Namespace) -> str:
    """chat/serve's --memory mode from --memory and --memory-dir (aura.infer.memory_flags)."""
    from aura.infer.memory_flags import conversation_memory_mode

    mode = conversation_memory_mode(args.memory, args.memory_dir)
    if args.memory_dir is not None and mode == "write":
        from aura.atomic import check_writable_dir

        check_writable_dir(args.memory_dir)
    return mode


def _conversation_memory_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", metavar="off|read|write",
                   help="the episodic memory, as on eval/generate: off (not read), read (the "
                        "default), write (also remember each exchange; the default with "
                        "--memory-dir)")
    p.add_argument("--memory-dir", metavar="DIR",
                   help="keep the conversation memory in DIR: restored at start, saved as it "
                        "is written")


def _cmd_chat(args: argparse.Namespace) -> int:
    from aura.infer.chat import ChatOptions, run_chat

    mode = _conversation_memory(args)
    options = ChatOptions(sampling=_sampling(args), max_new_tokens=args.max_new_tokens,
                          memory_dir=None if args.memory_dir is None else Path(args.memory_dir),
                          memory_mode=mode,
                          system=_argv_text(args.system, "--system"), template=_template(args),
                          load=None if args.load is None else Path(args.load),
                          show_memory=args.show_memory)
    if not 0 < options.max_new_tokens <= (1 << 24):
        raise AuraError(f"--max-new-tokens must be in 1..{1 << 24}, got {options.max_new_tokens}")
    loaded = _load_quantized(args)
    run_chat(loaded.model, loaded.tokenizer, options)
    return EXIT_OK


def _add_talk(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server with a chat page",
        description="Serves /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings "
        "(OpenAI's API), /health and a chat page at /. Stops on SIGINT/SIGTERM, saving memory.")
    s.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    s.add_argument("--port", type=int, default=8000)
    key = s.add_mutually_exclusive_group()
    key.add_argument("--api-key", metavar="KEY", help="require Authorization: Bearer KEY")
    key.add_argument("--api-key-file", metavar="FILE", help="the key, read from FILE")
    s.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from ORIGIN (repeatable; * for any)")
    s.add_argument("--model-name", default="aura", help="the model id clients see")
    s.add_argument("--max-tokens-limit", type=int, default=4096,
                   help="the largest max_tokens a request may ask for")
    _conversation_memory_arguments(s)
    s.add_argument("--embeddings", default="hidden", metavar="hidden|encoder[:NAME]",
                   help="what /v1/embeddings returns: the model's mean hidden state (default), "
                        "its configured memory text encoder, or encoder:minilm / encoder:http")
    s.add_argument("--store-dir", metavar="DIR",
                   help="keep chat completions requested with store=true in DIR (default: "
                        "in memory, for the server's life)")
    s.add_argument("--save-interval", type=float, default=30.0, metavar="SECONDS",
                   help="how often the memory is saved (and at shutdown)")
    s.add_argument("--threads", type=int, metavar="N",
                   help="torch threads of the model on a CPU (default: the cores but one, which "
                        "the HTTP loop keeps; OMP_NUM_THREADS, when set, decides instead)")
    s.add_argument("--engine", choices=("auto", "process", "thread"), default="auto",
                   help="run the model in a process of its own, so it and the HTTP loop do "
                        "not share one GIL (auto: a process on Linux), or in a thread")
    s.add_argument("--device", default="auto")
    _add_template(s)
    _add_quantize(s)
    s.set_defaults(func=_cmd_serve)

    c = sub.add_parser(
        "chat", help="talk to a model in the terminal",
        description="Multi-turn chat through the prompt template of aura.infer.template "
        "(User: / Assistant: turns, or --user-prefix / --assistant-prefix). Commands: /reset, "
        "/save, /memory, /set NAME VALUE, /help, /quit. Ctrl-C stops the reply; Ctrl-D or "
        "/quit leaves.")
    c.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    c.add_argument("--max-new-tokens", type=int, default=200)
    c.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    c.add_argument("--top-k", type=int)
    c.add_argument("--top-p", type=float)
    c.add_argument("--typical-p", type=float)
    c.add_argument("--repetition-penalty", type=float, default=1.0)
    c.add_argument("--seed", type=int)
    c.add_argument("--system", default="", help="a system message starting the conversation")
    c.add_argument("--load", metavar="FILE",
                   help="continue a conversation /save wrote (as /load FILE does)")
    c.add_argument("--show-memory", action="store_true",
                   help="after each reply, what it read from memory per span (as generate "
                        "--show-memory) and the past exchanges it retrieved (as /memory)")
    _conversation_memory_arguments(c)
    c.add_argument("--device", default="auto")
    _add_template(c)
    _add_quantize(c)
    c.set_defaults(func=_cmd_chat)


def _cmd_learn_export(args: argparse.Namespace) -> int:
    from aura.learn.export import export_state

    path = export_state(Path(args.state), Path(args.out),
                        Path(args.model) if args.model else None,
                        log=lambda m: print(m, file=sys.stderr))
    print(f"exported {args.state} to {path}")
    return EXIT_OK


def _add_learn_export(sub: argparse._SubParsersAction) -> None:
    x = sub.add_parser("learn-export", help="write a learn state's model as a run that aura "
                                            "generate / eval / train --init-from load")
    x.add_argument("state", metavar="STATE_DIR")
    x.add_argument("--out", required=True, metavar="RUN_DIR")
    x.add_argument("--model", metavar="RUN_DIR",
                   help="the run the state learned from (default: the one it recorded)")
    x.set_defaults(func=_cmd_learn_export)


# --- aura cl ---------------------------------------------------------------------------------


def _cmd_cl(args: argparse.Namespace) -> int:
    from aura.atomic import check_writable_dir
    from aura.train.cl_experiment import RESULT_MD, load_experiment, run_experiment

    exp = load_experiment(args.experiment)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise AuraError(f"--out {out} exists and is not a directory")
    check_writable_dir(out)
    result = run_experiment(exp, out, progress=not args.json)
    if "stopped" in result:
        import signal

        print(f"stopped in stage {result['stage']}; run the same command to continue",
              file=sys.stderr)
        return 128 + signal.Signals[result["stopped"]].value
    if args.json:
        _print_json(result)
    else:
        print((out / RESULT_MD).read_text(encoding="utf-8"), end="")
        print(f"results in {out}")
    return EXIT_OK


def _add_cl(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("cl", help="run a continual-learning experiment: domains in sequence, "
                                  "the loss matrix and forgetting")
    c.add_argument("experiment", metavar="EXPERIMENT.yaml",
                   help="domains (prepared datasets), strategy (naive, ewc, replay, replay+ewc, "
                        "sleep, joint), steps per domain, preset or config, --set overrides")
    c.add_argument("--out", required=True, metavar="DIR",
                   help="one run per stage and cl.json, cl.md, cl.png; run again to continue")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_cmd_cl)


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
    _add_talk(sub)
    _add_cl(sub)
    _add_learn_export(sub)
    _add_export(sub)
    _add_convert(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if isinstance(sys.stdout, io.TextIOWrapper):
        # Paths are bytes: one that is no UTF-8 reaches Python as surrogates, and is written back
        # as the same bytes (as `ls` shows it) instead of failing in the middle of a report.
        sys.stdout.reconfigure(errors="surrogateescape")
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # what --nproc relaunches
    keep_freed_memory()
    try:
        return args.func(args)
    except AuraError as exc:
        if not getattr(exc, "said_elsewhere", False):  # another rank of the job printed it
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
