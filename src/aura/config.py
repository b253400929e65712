"""Experiment configuration: typed dataclass sections, named presets, YAML files, overrides.

Every source of settings (a preset from ``presets.yaml`` beside this module, a YAML file,
``--set KEY=VALUE``, a config saved in a checkpoint) is flattened to dotted keys and goes through
one coercion path, so a value is accepted or rejected the same way wherever it comes from.
Cross-field checks run once, on the finished config, so overrides may pass through an
inconsistent state on the way (``--set model.n_head=6 --set model.n_embd=384``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import json
import math
import os
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from aura.errors import ConfigError
from aura.field_docs import field_docs
from aura.models import ModelConfig, model_config_class

Schedule = Literal["cosine", "plateau", "constant"]
Optimizer = Literal["adamw", "muon", "adafactor"]
Weights = Literal["fp32", "bf16"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Parallel = Literal["ddp", "fsdp"]
CheckpointFormat = Literal["consolidated", "sharded"]


@dataclass
class DataConfig:
    """Where the tokens come from and how they are fed."""

    dir: str = "data/shakespeare-char"
    """Prepared data directory, written by `aura data prepare`; `aura train --data` overrides
    it."""
    num_workers: int = 0
    """DataLoader worker processes; 0 loads batches in the main process."""
    pin_memory: bool = False
    """Page-locked host memory for batches: faster copies to a CUDA device (ignored on CPU)."""
    prefetch_factor: int = 2
    """Batches each worker loads ahead."""
    curriculum: list[list[int]] = field(default_factory=list)
    """Sequence-length curriculum: [from_step, block_size] pairs, from_step increasing; from each
    from_step on, training windows have that block_size (before the first, train.block_size).
    Short sequences early are cheap and already carry useful gradient signal."""


@dataclass
class TrainConfig:
    """The optimisation loop: batch, schedule, optimiser, precision, bookkeeping."""

    batch_size: int = 12
    """Sequences per micro-batch (of all ranks together under torchrun)."""
    block_size: int | None = None
    """Training sequence length; None: model.block_size."""
    grad_accum: int = 1
    """Micro-batches per optimiser step: the effective batch is batch_size x grad_accum."""
    max_steps: int = 2000
    """Optimiser steps to train for."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warm-up."""
    min_lr_ratio: float = 0.1
    """The cosine schedule's floor at max_steps, as a fraction of lr, in [0, 1]."""
    warmup_steps: int = 100
    """Steps of linear warm-up from near 0 to lr."""
    schedule: Schedule = "cosine"
    """The learning rate after warm-up: "cosine" (decays to min_lr_ratio x lr at max_steps),
    "plateau" (halved after plateau_patience evaluations without improvement) or "constant"."""
    plateau_patience: int = 3
    """Evaluations without improvement before "plateau" halves the learning rate."""
    early_stop_patience: int = 0
    """Evaluations without improvement before training stops; 0: never stop early."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to 2-D weight matrices only."""
    beta1: float = 0.9
    """Adam's decay rate of the gradient's running mean."""
    beta2: float = 0.95
    """Adam's decay rate of the squared gradient's running mean."""
    grad_clip: float = 1.0
    """Largest global gradient norm (larger gradients are scaled down to it); 0: no clipping."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy loss, in [0, 1)."""
    optimizer: Optimizer = "adamw"
    """"adamw", or "muon": Muon for the hidden 2-D matrices and AdamW for embeddings, the head
    and everything else, or "adafactor": factored second moments (a row and a column per
    matrix), no first moment, for a run whose AdamW state would not fit."""
    precision: Precision = "auto"
    """Forward precision: "auto" (bf16, else fp16, on CUDA; on CPU bf16 where it is native and
    model.n_embd >= 256, or >= 128 with AMX tiles, where it measured faster, else fp32; fp32 on
    MPS), "fp32", "bf16", or "fp16" (GPU only, with loss scaling)."""
    weights: Weights = "fp32"
    """The parameters' (and so gradients' and optimizer state's) dtype: "fp32", or "bf16" (half
    the memory, needs train.precision=bf16; updates below bf16's resolution are lost, so it
    suits a model that would not fit otherwise)."""
    device: str = "auto"
    """"auto" (CUDA, then MPS, then CPU) or a torch device: cpu, cuda, cuda:N, mps."""
    compile: bool = False
    """torch.compile the model; where that is unavailable (on a CPU, Inductor needs a C++
    compiler such as g++), training runs eagerly with a warning. Off by default: for the 128-wide
    `demo` GPT on a 2-core CPU it paid 1.02-1.09x a step in fp32 after ~15 s of compiling, which
    a short run does not win back; under bf16 on a Xeon with AMX it paid 1.3x
    (docs/BENCHMARKS.md)."""
    grad_checkpoint: bool = False
    """Recompute activations in the backward pass instead of storing them: less memory for more
    compute."""
    memory_check: bool = True
    """Before building anything, estimate the run's memory (weights, gradients, optimizer
    state, one micro-batch's activations) and refuse to start when it exceeds what this process
    may use; false skips the check, e.g. when swap or a better estimate says the run fits."""
    eval_interval: int = 250
    """Steps between evaluations on the validation split."""
    eval_iters: int = 20
    """Batches per evaluation."""
    log_interval: int = 10
    """Steps between log lines."""
    checkpoint_interval: int = 500
    """Steps between checkpoints."""
    keep_checkpoints: int = 3
    """Most recent checkpoints kept on disk; the best one is kept besides."""
    max_nonfinite: int = 3
    """Non-finite steps in a row before rolling back to the last checkpoint with half the
    learning rate."""
    memory_warmup_steps: int = 0
    """Steps at the start that run with use_memory=False: the model reads no memories (and
    hippocampal forms none), so it learns language before leaning on recall."""
    memory_stream: bool = False
    """Memorizing Transformers' regime for a model's own memory: each batch row reads its own
    stretch of the corpus in consecutive windows, step after step, and its tokens read only
    memories of that stretch's current document (aura.data.streams); off: random windows."""
    seed: int = 1337
    """Seed of the initial weights and of the batch order, in [0, 2**32)."""
    viz_interval: int = 0
    """Steps between pictures of the model's insides (as `aura viz` draws them) on a fixed
    held-out probe, under RUN/viz/step-XXXXXXX/; 0: none."""
    sanity: bool = True
    """Watch the run for the usual failures (loss stuck near ln(vocab), gradient norm out of
    [0.1, 10], LR not reaching the optimizer, dead spiking layers, ...) and warn, once each."""
    strict_sanity: bool = False
    """Stop the run (a checkpoint saved, exit 2) at the first sanity warning."""
    empty_cache_interval: int = 100
    """Steps between checks of free CUDA memory: below 12% free the cache is emptied (never
    on every step, which thrashes the allocator); 0: only after an out-of-memory. Ignored off
    CUDA."""
    auto_micro_batch: bool = True
    """On CUDA, split each micro-batch at the start into as many chunks as the GPU's free
    memory needs (estimated; the first step's out-of-memory split is the backstop); the
    effective batch and the data are unchanged."""
    parallel: Parallel = "ddp"
    """Under torchrun: "ddp" (every rank holds the whole model, gradients are averaged) or
    "fsdp" (FSDP2: parameters, gradients and optimizer state sharded block by block over the
    ranks). batch_size is the global micro-batch, split evenly over the ranks; without torchrun
    this is ignored."""
    checkpoint_format: CheckpointFormat = "consolidated"
    """"consolidated": rank 0 gathers the full weights and optimizer state into one
    model.safetensors + train_state (what every command reads; rank 0's host must hold it
    all). "sharded": every rank writes its own shards (safetensors + a JSON index, via
    torch.distributed.checkpoint), resumable on any world size; `aura export` consolidates."""
    phases: list[int] = field(default_factory=list)
    """Steps at which the next training phase starts, increasing (e.g. [5000, 20000]: seed
    000's three phases); what trains in each phase is the model's (`aura config show
    --explain` lists them under model.name). Empty: one phase, the whole model."""


ReplayPriority = Literal["uniform", "loss"]
FisherKind = Literal["empirical", "sampled"]
SleepOptimizer = Literal["sgd", "main"]
SleepSource = Literal["buffer", "store", "both"]


@dataclass
class ContinualConfig:
    """Learning a new domain without forgetting the old ones (aura.continual): EWC, a replay
    buffer and sleep consolidation. All off by default, so a plain run is unchanged."""

    ewc: bool = False
    """Elastic weight consolidation: penalise moving away from the anchored weights (those of
    the run this one started from with --init-from, weighted by their Fisher), and at the end of
    the run estimate this run's Fisher and fold it into the anchor for the next one."""
    ewc_lambda: float = 0.4
    """EWC strength: the penalty is ewc_lambda/2 x sum F (theta - theta*)^2."""
    fisher: FisherKind = "empirical"
    """Diagonal Fisher of the sequence log-likelihood: "empirical" (gradients at the data's own
    next tokens) or "sampled" (at tokens sampled from the model, the true Fisher)."""
    fisher_samples: int = 32
    """Sequences the Fisher is averaged over at the end of a run."""
    fisher_decay: float = 1.0
    """Online EWC: F = fisher_decay x F_old + F_new at each consolidation (1: plain sum)."""
    replay_tokens: int = 0
    """Replay buffer size in tokens (whole windows of block_size + 1); 0: no replay. Every
    training window is offered to it (reservoir sampling: a uniform sample of all seen)."""
    replay_fraction: float = 0.25
    """Share of each micro-batch's sequences taken from the replay buffer once it holds any."""
    replay_priority: ReplayPriority = "uniform"
    """Which stored windows are replayed: "uniform", or "loss" (prioritised by their last
    loss, with importance-sampling weights correcting the bias)."""
    replay_alpha: float = 0.6
    """Prioritised replay: P(i) ~ priority_i ** replay_alpha."""
    replay_beta: float = 0.4
    """Prioritised replay: importance weights (N P(i)) ** -replay_beta, normalised by their
    maximum."""
    sleep_interval: int = 0
    """Every this many steps a sleep phase runs; 0: never."""
    sleep_steps: int = 25
    """Steps of replay-only training per sleep phase."""
    sleep_lr_scale: float = 0.1
    """Sleep learning rate as a fraction of train.lr."""
    sleep_distill: float = 0.0
    """Weight of the KL divergence toward the pre-sleep model's outputs on the replayed windows;
    0: plain replay."""
    sleep_optimizer: SleepOptimizer = "sgd"
    """"sgd": sleep steps are plain SGD and leave the main optimizer's state untouched; "main":
    they go through the main optimizer (its moments see them)."""
    sleep_source: SleepSource = "buffer"
    """What a sleep phase replays: "buffer" (the replay buffer), "store" (the training windows
    where the memories the model's episodic stores formed in this run were formed, drawn by the
    store's retention), or "both" (half of each batch from each)."""


@dataclass
class AuraConfig:
    """One experiment: every setting a run needs besides its data and output paths."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)


@dataclass(frozen=True)
class Preset:
    """A named starting point: dotted keys mapped to values, applied over the defaults."""

    description: str
    overrides: dict[str, Any]


_SECTIONS: dict[str, type] = {
    f.name: get_type_hints(AuraConfig)[f.name] for f in dataclasses.fields(AuraConfig)
}


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type. Cached: resolving string annotations compiles each one, and
    every applied override needs them. Callers must not mutate the result."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _section_types(cfg: AuraConfig) -> dict[str, dict[str, Any]]:
    return {section: _field_types(type(getattr(cfg, section))) for section in _SECTIONS}


def _with_model(cfg: AuraConfig, name: str) -> AuraConfig:
    """``cfg`` whose model section is ``name``'s config class, shared fields carried over.

    Fields the new class has and the old one had keep their values unless the old value was
    just the old class's default (so switching gpt -> bdh takes bdh's own defaults)."""
    cls = model_config_class(name)
    old = cfg.model
    if type(old) is cls:
        return cfg
    old_defaults = type(old)()
    kept = {
        f.name: getattr(old, f.name)
        for f in dataclasses.fields(cls)
        if hasattr(old, f.name) and getattr(old, f.name) != getattr(old_defaults, f.name)
    }
    return dataclasses.replace(cfg, model=cls(**{**kept, "name": name}))


_FIELD_TYPES: dict[str, dict[str, Any]] = _section_types(AuraConfig())
_ALL_KEYS = [f"{s}.{name}" for s, names in _FIELD_TYPES.items() for name in names]
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~"}


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _suggest(word: str, choices: Sequence[str]) -> str:
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name is an error that lists the presets."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown preset '{name}'{_suggest(name, list(PRESETS))}; "
            f"presets: {', '.join(PRESETS)}"
        ) from None


def _resolve(key: str, types: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """Split a dotted key into (section, field), or explain which keys exist."""
    section, _, name = key.partition(".")
    if section in types and name in types[section]:
        return section, name
    if section in types:
        choices = [f"{section}.{n}" for n in types[section]]
        valid = f"valid keys: {', '.join(choices)}"
    else:
        choices = _ALL_KEYS
        valid = f"valid sections: {', '.join(_FIELD_TYPES)}"
    hint = _suggest(key, choices)
    if not hint and "." not in key:
        same_name = [k for k in _ALL_KEYS if k.endswith(f".{key}")]
        hint = f" (did you mean '{same_name[0]}'?)" if same_name else ""
    raise ConfigError(f"unknown config key '{key}'{hint}; {valid}")


def _type_name(tp: Any) -> str:
    if tp is bool:
        return "bool (true/false/yes/no/1/0)"
    return tp.__name__ if isinstance(tp, type) else str(tp)


def _expects(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{key} expects {_type_name(tp)}, got {value!r}")


def _scalar(tp: type, value: Any) -> Any:
    """``value`` as a bool, int, float or str; ValueError or OverflowError if it is not one."""
    if tp is bool:
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(value)
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return float(value) if tp is float else value
    if isinstance(value, str):
        if tp is int:
            with contextlib.suppress(ValueError):
                return int(value)
        value = float(value)  # "3e-4" from --set, or from YAML, which reads it as a string
    if isinstance(value, float) and math.isfinite(value):
        if tp is float:
            return value
        if value.is_integer():
            return int(value)
    raise ValueError(value)


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """``value`` (typed, from YAML or Python, or a ``--set`` string) as a ``tp``, or an error."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        (inner,) = (a for a in get_args(tp) if a is not type(None))
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        try:
            return _coerce(key, inner, value)
        except ConfigError:
            raise _expects(key, tp, value) from None
    if origin is list:
        parsed = value
        if isinstance(value, str):
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                raise _expects(key, tp, value) from None
        if not isinstance(parsed, list | tuple):
            raise _expects(key, tp, value)
        (item_type,) = get_args(tp)
        return [_coerce(f"{key}[{i}]", item_type, item) for i, item in enumerate(parsed)]
    if tp in (bool, int, float, str):
        try:
            return _scalar(tp, value)
        except (ValueError, OverflowError):
            raise _expects(key, tp, value) from None
    raise TypeError(f"unsupported config type {tp!r}")


def _apply(cfg: AuraConfig, overrides: Mapping[str, Any]) -> AuraConfig:
    """``cfg`` with coerced overrides; no cross-field checks, so it may be inconsistent."""
    base = copy.deepcopy(cfg)  # the result shares no section or list with ``cfg``
    if "model.name" in overrides:  # first: it decides which keys the model section has
        base = _with_model(base, _coerce("model.name", str, overrides["model.name"]))
    types = _section_types(base)
    changes: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        section, name = _resolve(key, types)
        changes.setdefault(section, {})[name] = _coerce(key, types[section][name], value)
    return dataclasses.replace(
        base,
        **{s: dataclasses.replace(getattr(base, s), **c) for s, c in changes.items()},
    )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_config(cfg: AuraConfig) -> None:
    """Reject values no run could use: bad sizes, rates outside their range, a broken curriculum."""
    m, d, t = cfg.model, cfg.data, cfg.train
    for key, text in {"model.name": m.name, "data.dir": d.dir, "train.device": t.device}.items():
        _check(text.strip() != "", f"{key} must not be empty")
    positive = {
        "model.block_size": m.block_size,
        "model.n_layer": m.n_layer,
        "model.n_head": m.n_head,
        "model.n_embd": m.n_embd,
        "model.snn_steps": m.snn_steps,
        "data.prefetch_factor": d.prefetch_factor,
        "train.batch_size": t.batch_size,
        "train.grad_accum": t.grad_accum,
        "train.max_steps": t.max_steps,
        "train.lr": t.lr,
        "train.plateau_patience": t.plateau_patience,
        "train.eval_interval": t.eval_interval,
        "train.eval_iters": t.eval_iters,
        "train.log_interval": t.log_interval,
        "train.checkpoint_interval": t.checkpoint_interval,
        "train.keep_checkpoints": t.keep_checkpoints,
        "train.max_nonfinite": t.max_nonfinite,
    }
    if m.vocab_size is not None:
        positive["model.vocab_size"] = m.vocab_size
    for key, value in positive.items():
        _check(value > 0, f"{key} must be > 0, got {value!r}")
    for key in ("model.block_size", "model.n_layer", "model.n_head", "model.n_embd",
                "model.vocab_size", "train.batch_size"):
        value = positive.get(key)
        _check(value is None or value < 2**31,
               f"{key} must be below 2**31 (a tensor dimension), got {value!r}")
    non_negative = {
        "data.num_workers": d.num_workers,
        "train.warmup_steps": t.warmup_steps,
        "train.early_stop_patience": t.early_stop_patience,
        "train.weight_decay": t.weight_decay,
        "train.grad_clip": t.grad_clip,
        "train.memory_warmup_steps": t.memory_warmup_steps,
        "train.viz_interval": t.viz_interval,
    }
    for key, value in non_negative.items():
        _check(value >= 0, f"{key} must be >= 0, got {value!r}")
    half_open = {
        "model.dropout": m.dropout,
        "train.label_smoothing": t.label_smoothing,
        "train.beta1": t.beta1,
        "train.beta2": t.beta2,
    }
    for key, value in half_open.items():
        _check(0 <= value < 1, f"{key} must be in [0, 1), got {value!r}")
    _check(
        0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio!r}"
    )
    _check(0 <= t.seed < 2**32, f"train.seed must be in [0, 2**32), got {t.seed!r}")
    _check(
        m.n_embd % m.n_head == 0,
        f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})",
    )
    _check(t.weights == "fp32" or t.precision == "bf16",
           f"train.weights={t.weights} needs train.precision=bf16, got {t.precision!r}")
    for problem in m.problems():
        _check(False, problem)
    if t.block_size is not None:
        _check(
            0 < t.block_size <= m.block_size,
            f"train.block_size must be in [1, model.block_size={m.block_size}], got {t.block_size}",
        )
    _validate_continual(cfg.continual)
    phases = m.training_phases()
    _check(len(t.phases) in (0, len(phases) - 1),
           f"train.phases needs {len(phases) - 1} step(s) for model {m.name!r} (its phases: "
           f"{'; '.join(phases)}), got {t.phases!r}" if len(phases) > 1 else
           f"model {m.name!r} has no training phases; train.phases must be empty, got "
           f"{t.phases!r}")
    _check(all(isinstance(b, int) and b > 0 for b in t.phases)
           and all(a < b for a, b in zip(t.phases, t.phases[1:], strict=False)),
           f"train.phases must be increasing steps > 0, got {t.phases!r}")
    previous = -1
    for i, stage in enumerate(d.curriculum):
        _check(
            len(stage) == 2,
            f"data.curriculum[{i}] must be a [from_step, block_size] pair, got {stage!r}",
        )
        start, block = stage
        _check(
            start > previous,
            f"data.curriculum[{i}] from_step must be >= 0 and increasing, got {start}",
        )
        _check(
            0 < block <= m.block_size,
            f"data.curriculum[{i}] block_size must be in [1, model.block_size={m.block_size}], "
            f"got {block}",
        )
        previous = start


def _validate_continual(c: ContinualConfig) -> None:
    for key, value in {"ewc_lambda": c.ewc_lambda, "fisher_decay": c.fisher_decay,
                       "replay_tokens": c.replay_tokens, "replay_alpha": c.replay_alpha,
                       "replay_beta": c.replay_beta, "sleep_interval": c.sleep_interval,
                       "sleep_distill": c.sleep_distill}.items():
        _check(value >= 0, f"continual.{key} must be >= 0, got {value!r}")
    for key, value in {"fisher_samples": c.fisher_samples, "sleep_steps": c.sleep_steps,
                       "sleep_lr_scale": c.sleep_lr_scale}.items():
        _check(value > 0, f"continual.{key} must be > 0, got {value!r}")
    _check(0 <= c.replay_fraction < 1,
           f"continual.replay_fraction must be in [0, 1), got {c.replay_fraction!r}")
    _check(c.sleep_interval == 0 or c.replay_tokens > 0 or c.sleep_source == "store",
           "continual.sleep_interval needs a replay buffer: set continual.replay_tokens "
           "(or continual.sleep_source=store)")


def apply_overrides(cfg: AuraConfig, overrides: Mapping[str, Any]) -> AuraConfig:
    """A new, validated config: ``cfg`` with dotted-key overrides applied in order."""
    new = _apply(cfg, overrides)
    validate_config(new)
    return new


def parse_override(item: str) -> tuple[str, str]:
    """Split one ``KEY=VALUE`` string; the value stays a string for the field's type to parse."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not KEY=VALUE, e.g. train.lr=3e-4")
    return key.strip(), value


def _flatten(tree: Any) -> dict[str, Any]:
    """Sections of a nested mapping as dotted keys, e.g. {"train": {"lr": 1}} -> {"train.lr": 1}."""
    if not isinstance(tree, Mapping):
        raise ConfigError(
            f"expected a mapping of sections ({', '.join(_SECTIONS)}), got {type(tree).__name__}"
        )
    flat: dict[str, Any] = {}
    for section, values in tree.items():
        if section in _SECTIONS and not isinstance(values, Mapping):
            raise ConfigError(f"section '{section}' must be a mapping, got {values!r}")
        if isinstance(values, Mapping):
            flat.update({f"{section}.{name}": value for name, value in values.items()})
        else:
            flat[str(section)] = values
    return flat


def _read_yaml(path: str | os.PathLike[str]) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"cannot read config file '{path}': {_one_line(reason)}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in config file '{path}': {_one_line(exc)}") from None


def _apply_file(cfg: AuraConfig, path: str | os.PathLike[str]) -> AuraConfig:
    """``cfg`` with a YAML file's ``preset:`` and then its sections applied."""
    tree = _read_yaml(path)
    where = f"config file '{path}'"
    if not isinstance(tree, Mapping):
        raise ConfigError(
            f"{where}: top level must be a mapping with model/data/train sections, "
            f"got {type(tree).__name__}"
        )
    tree = dict(tree)
    try:
        if "preset" in tree:
            preset = tree.pop("preset")
            if not isinstance(preset, str):
                raise ConfigError(f"preset must be a preset name, got {preset!r}")
            cfg = _apply(cfg, get_preset(preset).overrides)
        return _apply(cfg, _flatten(tree))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def read_presets(path: str | os.PathLike[str]) -> dict[str, Preset]:
    """The presets of a YAML file in file order, each resolved and validated once here, so a
    broken preset fails when the file is read rather than when someone picks it.

    A preset has a ``description`` and model/data/train sections read like a config file's;
    ``preset: NAME`` starts from a preset defined above (its keys, then this one's), which keeps
    a family of presets to one shared recipe and rules out cycles. ``overrides`` holds every key
    the preset sets, inherited ones included, as coerced values."""
    tree = _read_yaml(path)
    if not isinstance(tree, Mapping) or not tree:
        raise ConfigError(f"presets file '{path}' must map preset names to presets")
    presets: dict[str, Preset] = {}
    for name, body in tree.items():
        try:
            presets[str(name)] = _preset(body, presets)
        except ConfigError as exc:
            raise ConfigError(f"presets file '{path}', preset '{name}': {exc}") from None
    return presets


def _preset(body: Any, earlier: Mapping[str, Preset]) -> Preset:
    if not isinstance(body, Mapping):
        raise ConfigError(
            f"expected a mapping with a description and model/data/train sections, got {body!r}"
        )
    body = dict(body)
    description = body.pop("description", None)
    if not isinstance(description, str) or not description.strip():
        raise ConfigError(f"description must be a non-empty string, got {description!r}")
    overrides: dict[str, Any] = {}
    if "preset" in body:
        base = body.pop("preset")
        if not isinstance(base, str) or base not in earlier:
            raise ConfigError(f"preset must name a preset defined above this one, got {base!r}")
        overrides.update(earlier[base].overrides)
    overrides.update(_flatten(body))
    cfg = apply_overrides(AuraConfig(), overrides)
    values = {}
    for key in overrides:
        section, _, name = key.partition(".")
        values[key] = getattr(getattr(cfg, section), name)
    return Preset(_one_line(description), values)


PRESETS_FILE = Path(__file__).with_name("presets.yaml")
PRESETS: dict[str, Preset] = read_presets(PRESETS_FILE)


def load_config(
    preset: str | None = None,
    config_file: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
) -> AuraConfig:
    """Defaults, then a preset or a YAML file, then each ``KEY=VALUE`` in order; validated once."""
    if preset is not None and config_file is not None:
        raise ConfigError("give a preset or a config file, not both (a file may name a preset)")
    cfg = AuraConfig()
    if preset is not None:
        cfg = _apply(cfg, get_preset(preset).overrides)
    if config_file is not None:
        cfg = _apply_file(cfg, config_file)
    for item in overrides:
        cfg = _apply(cfg, dict([parse_override(item)]))
    validate_config(cfg)
    return cfg


def config_to_dict(cfg: AuraConfig) -> dict[str, Any]:
    """Nested plain data (JSON- and YAML-serialisable), e.g. to save inside a checkpoint."""
    return dataclasses.asdict(cfg)


def explain_config(cfg: AuraConfig) -> dict[str, dict[str, Any]]:
    """Every dotted key -> its value and its field's docstring, so a user can read what a
    setting means without the source. Model keys are documented by the class ``model.name``
    resolves to: a bdh config explains ``model.mlp_multiplier``."""
    explained = {}
    for section, values in config_to_dict(cfg).items():
        docs = field_docs(type(getattr(cfg, section)))
        for name, value in values.items():
            explained[f"{section}.{name}"] = {"value": value, "doc": docs[name]}
    return explained


def override_text(value: Any) -> str:
    """``value`` as ``--set KEY=VALUE`` spells it, so a printed setting can be typed back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


def config_from_dict(data: Mapping[str, Any]) -> AuraConfig:
    """Rebuild a config from ``config_to_dict`` output with full validation.

    Unknown keys are errors; missing keys take their defaults, so a config saved before a field
    existed still loads.
    """
    return apply_overrides(AuraConfig(), _flatten(data))


class _Dumper(yaml.SafeDumper):
    """Block-style mappings, but a list of scalars on one line: ``- [0, 64]``, ``[]``."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = not any(isinstance(item, list | dict) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def config_to_yaml(cfg: AuraConfig) -> str:
    """The config as a YAML file that ``load_config(config_file=...)`` reads back unchanged."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False)
