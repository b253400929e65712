"""Experiment configuration: typed dataclass sections, named presets, YAML files, overrides.

Every source of settings (a preset, a YAML file, ``--set KEY=VALUE``, a config saved in a
checkpoint) is flattened to dotted keys and goes through one coercion path, so a value is
accepted or rejected the same way wherever it comes from. Cross-field checks run once, on the
finished config, so overrides may pass through an inconsistent state on the way
(``--set model.n_head=6 --set model.n_embd=384``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import math
import os
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from aura.errors import ConfigError

Schedule = Literal["cosine", "plateau", "constant"]
Optimizer = Literal["adamw", "muon"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class ModelConfig:
    """The network's shape."""

    name: str = "gpt"  # model family
    vocab_size: int | None = None  # None: taken from the prepared data
    block_size: int = 256  # context length in tokens
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False  # biases in the Linear and LayerNorm layers
    ffn: Literal["mlp", "snn"] = "mlp"  # the block's feed-forward; "snn" = SNNFeedForward
    snn_steps: int = 4  # time steps the "snn" feed-forward integrates each token over

    def problems(self) -> list[str]:
        """What a model-specific config finds wrong with its own values (one line each)."""
        return []


@dataclass
class DataConfig:
    """Where the tokens come from and how they are fed."""

    dir: str = "data/shakespeare-char"  # written by `aura data prepare`
    num_workers: int = 0  # DataLoader worker processes; 0 loads in the main process
    pin_memory: bool = False  # page-locked batches for faster copies to a CUDA device
    prefetch_factor: int = 2  # batches each worker loads ahead
    # Sequence-length curriculum: [from_step, block_size] pairs, from_step increasing.
    curriculum: list[list[int]] = field(default_factory=list)


@dataclass
class TrainConfig:
    """The optimisation loop: batch, schedule, optimiser, precision, bookkeeping."""

    batch_size: int = 12  # sequences per micro-batch
    block_size: int | None = None  # training sequence length; None = model.block_size
    grad_accum: int = 1  # micro-batches per optimiser step
    max_steps: int = 2000  # optimiser steps
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the schedule's floor, as a fraction of lr
    warmup_steps: int = 100  # linear warm-up to lr
    schedule: Schedule = "cosine"
    plateau_patience: int = 3  # evaluations without improvement before "plateau" lowers lr
    early_stop_patience: int = 0  # evaluations without improvement before stopping; 0 = off
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    label_smoothing: float = 0.0
    optimizer: Optimizer = "adamw"
    precision: Precision = "auto"  # auto: chosen for the device
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    compile: bool = False  # torch.compile the model
    grad_checkpoint: bool = False  # recompute activations in backward to save memory
    eval_interval: int = 250  # steps between evaluations
    eval_iters: int = 20  # batches per evaluation
    log_interval: int = 10  # steps between log lines
    checkpoint_interval: int = 500  # steps between checkpoints
    keep_checkpoints: int = 3  # most recent checkpoints kept on disk
    max_nonfinite: int = 3  # non-finite steps in a row before rolling back with half the lr
    memory_warmup_steps: int = 0  # steps the hippocampal memory stays off at the start
    seed: int = 1337


@dataclass
class AuraConfig:
    """One experiment: every setting a run needs besides its data and output paths."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class Preset:
    """A named starting point: dotted keys mapped to values, applied over the defaults."""

    description: str
    overrides: dict[str, Any]


def _model(n_layer: int, n_head: int, n_embd: int, block_size: int, dropout: float = 0.0) -> dict:
    return {
        "model.n_layer": n_layer,
        "model.n_head": n_head,
        "model.n_embd": n_embd,
        "model.block_size": block_size,
        "model.dropout": dropout,
    }


# The Hippocampal notes' 157M-class run; the GPU presets differ only in how the effective
# batch of 128 sequences is split into micro-batches.
_GPU_LARGE: dict[str, Any] = {
    **_model(12, 12, 768, 512, dropout=0.1),
    "train.lr": 1e-4,
    "train.warmup_steps": 2000,
    "train.max_steps": 100_000,
    "train.weight_decay": 0.01,
    "train.label_smoothing": 0.1,
    "train.precision": "bf16",
    "train.compile": True,
    "train.eval_interval": 1000,
    "train.checkpoint_interval": 2000,
    "train.memory_warmup_steps": 5000,
}


def _gpu_large(description: str, batch_size: int, grad_accum: int) -> Preset:
    return Preset(
        description,
        {**_GPU_LARGE, "train.batch_size": batch_size, "train.grad_accum": grad_accum},
    )


def _bdh(n_embd: int, mlp_multiplier: int, block_size: int) -> dict[str, Any]:
    return {
        "model.name": "bdh",  # first: it selects the model section's config class
        **_model(6, 4, n_embd, block_size, dropout=0.1),
        "model.mlp_multiplier": mlp_multiplier,
    }


def _hippocampal(n_place_cells: int) -> dict[str, Any]:
    return {"model.name": "hippocampal", "model.n_place_cells": n_place_cells}


def _snn_rag(n_layer: int, n_head: int, n_embd: int, block_size: int, memory_layers: list[int],
             dropout: float = 0.0) -> dict[str, Any]:
    return {
        "model.name": "snn_rag",  # first: it selects the model section's config class
        **_model(n_layer, n_head, n_embd, block_size, dropout),
        "model.memory_layers": memory_layers,
    }


PRESETS: dict[str, Preset] = {
    "demo": Preset(
        "GPT on Shakespeare characters, a couple of minutes on a laptop CPU",
        {
            **_model(4, 4, 128, 64),
            "train.batch_size": 12,
            "train.max_steps": 2000,
            "train.lr": 1e-3,
            "train.warmup_steps": 100,
            "train.eval_interval": 250,
            "train.eval_iters": 20,
            "train.checkpoint_interval": 500,
            "data.dir": "data/shakespeare-char",
        },
    ),
    "cpu-small": Preset(
        "6 layers x 384, block 256: a longer CPU run",
        {
            **_model(6, 6, 384, 256, dropout=0.1),
            "train.batch_size": 16,
            "train.max_steps": 5000,
            "train.lr": 6e-4,
            "train.warmup_steps": 200,
        },
    ),
    "m1-8gb": Preset(
        "Apple M1 8 GB: micro-batch 4 x accumulation 8, fp32 (no bf16 units), "
        "gradient checkpointing",
        {
            **_model(8, 8, 512, 512),
            "train.batch_size": 4,
            "train.grad_accum": 8,
            "train.precision": "fp32",
            "train.grad_checkpoint": True,
            "train.lr": 3e-4,
            "train.warmup_steps": 200,
        },
    ),
    "gpu-4gb": Preset(
        "4 GB GPU: micro-batch 8 x accumulation 4, fp16, gradient checkpointing",
        {
            **_model(8, 8, 512, 512),
            "train.batch_size": 8,
            "train.grad_accum": 4,
            "train.precision": "fp16",
            "train.grad_checkpoint": True,
            "train.lr": 3e-4,
            "train.warmup_steps": 500,
            "train.checkpoint_interval": 2000,
        },
    ),
    "l4-24gb": _gpu_large(
        "L4 24 GB: 157M-class model (12 x 768, block 512), bf16, compiled, "
        "micro-batch 8 x accumulation 16",
        batch_size=8,
        grad_accum=16,
    ),
    "a100-40gb": _gpu_large(
        "A100 40 GB: the l4-24gb model, micro-batch 16 x accumulation 8",
        batch_size=16,
        grad_accum=8,
    ),
    "a100-80gb": _gpu_large(
        "A100 80 GB: the l4-24gb model, micro-batch 32 x accumulation 4",
        batch_size=32,
        grad_accum=4,
    ),
    "hippocampal-157m": Preset(
        "The Hippocampal Transformer of seeds 000/002: 12 x 768 (heads of 64), block 512, "
        "2000 place cells; the l4-24gb training recipe with memory off for 5000 steps",
        {
            **_hippocampal(2000),
            **_GPU_LARGE,
            "train.batch_size": 8,
            "train.grad_accum": 16,
        },
    ),
    "hippocampal-cpu": Preset(
        "The Hippocampal Transformer in minutes on a CPU: Shakespeare characters, 4 x 128, "
        "block 128, 1000 place cells, a 1024-memory hippocampus",
        {
            **_hippocampal(1000),
            **_model(4, 4, 128, 128),
            "model.memory_capacity": 1024,
            "model.memory_dim": 32,
            "model.memory_writes": 32,
            "train.batch_size": 12,
            "train.max_steps": 2000,
            "train.lr": 1e-3,
            "train.warmup_steps": 100,
            "train.eval_interval": 250,
            "train.eval_iters": 20,
            "train.checkpoint_interval": 500,
            "train.memory_warmup_steps": 200,
            "data.dir": "data/shakespeare-char",
        },
    ),
    "bdh-ref": Preset(
        "BDH as pathwaycom/bdh trains it: bytes, D=256, 4 heads, N=8192, shared layers, "
        "batch 32 x 512, constant lr 1e-3, no clipping",
        {
            **_bdh(256, 128, 512),
            "train.batch_size": 32,
            "train.max_steps": 3000,
            "train.lr": 1e-3,
            "train.schedule": "constant",
            "train.warmup_steps": 0,
            "train.grad_clip": 0.0,
            "train.weight_decay": 0.1,
            "data.dir": "data/shakespeare-byte",
        },
    ),
    "bdh-cpu": Preset(
        "BDH small enough for minutes on a CPU: bytes, D=128, 4 heads, N=512, block 128",
        {
            **_bdh(128, 16, 128),
            "train.batch_size": 8,
            "train.max_steps": 1000,
            "train.lr": 1e-3,
            "train.warmup_steps": 100,
            "data.dir": "data/shakespeare-byte",
        },
    ),
    "snn-rag-cpu": Preset(
        "Spiking FFNs + a chunk-memory read in block 2, small enough for minutes on a CPU: "
        "chars, 4 x 128, block 128, a 2048-entry bank of 16-token chunks",
        {
            **_snn_rag(4, 4, 128, 128, memory_layers=[2]),
            "model.memory_capacity": 2048,
            "train.batch_size": 8,
            "train.max_steps": 1000,
            "train.lr": 1e-3,
            "train.warmup_steps": 100,
            "data.dir": "data/shakespeare-char",
        },
    ),
    "snn-rag": Preset(
        "SNN-RAG at seed 002's scale: 12 x 768, 16 heads, block 512, memory reads in blocks 6 "
        "and 10 (16k entries of 64-token chunks each); the l4-24gb training recipe",
        {
            **_GPU_LARGE,
            **_snn_rag(12, 16, 768, 512, memory_layers=[6, 10], dropout=0.1),
            "model.memory_capacity": 16384,
            "model.memory_chunk": 64,
            "train.batch_size": 8,
            "train.grad_accum": 16,
        },
    ),
}

_SECTIONS: dict[str, type] = {
    f.name: get_type_hints(AuraConfig)[f.name] for f in dataclasses.fields(AuraConfig)
}

# One config dataclass per model (litgpt style): ``model.name`` picks the class of the model
# section. Models register theirs from ``aura.models``, which is imported on first need so this
# module never imports a model at load time.
_MODEL_CONFIGS: dict[str, type[ModelConfig]] = {"gpt": ModelConfig}


def register_model_config(name: str, cls: type[ModelConfig]) -> None:
    _MODEL_CONFIGS[name] = cls


def model_config_class(name: str) -> type[ModelConfig]:
    """The config dataclass of model ``name`` (the base one for names no model registered)."""
    if name not in _MODEL_CONFIGS:
        import aura.models  # noqa: F401 - registers every model's config class
    return _MODEL_CONFIGS.get(name, ModelConfig)


def _field_types(cls: type) -> dict[str, Any]:
    return {f.name: get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)}


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
    non_negative = {
        "data.num_workers": d.num_workers,
        "train.warmup_steps": t.warmup_steps,
        "train.early_stop_patience": t.early_stop_patience,
        "train.weight_decay": t.weight_decay,
        "train.grad_clip": t.grad_clip,
        "train.memory_warmup_steps": t.memory_warmup_steps,
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
    for problem in m.problems():
        _check(False, problem)
    if t.block_size is not None:
        _check(
            0 < t.block_size <= m.block_size,
            f"train.block_size must be in [1, model.block_size={m.block_size}], got {t.block_size}",
        )
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
