"""Checkpoints: safetensors + JSON only, written atomically, verified by sha256 on load.

    RUN/checkpoints/step-00000500/
        model.safetensors        weights (all inference needs, with meta.json and the tokenizer)
        tokenizer.aura.json
        meta.json                step, config, tokenizer hash, val loss, sha256 of every file
        train_state.safetensors  optimizer tensors and RNG states       (resume only)
        train_state.json         optimizer groups, schedule and fault counters (resume only)
        memory/NAME/             each episodic memory the model keeps (``model.writers``)

A checkpoint directory is built under a temporary name and renamed into place, and meta.json is
written last inside it, so a crash leaves either no checkpoint or a complete one. Loading never
unpickles: tensors come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from aura.atomic import atomic_dir, atomic_write_text
from aura.config import AuraConfig, config_from_dict, config_to_dict
from aura.data.shards import file_sha256
from aura.data.tokenizers import TOKENIZER_FILE, Tokenizer, load_tokenizer
from aura.errors import DataError
from aura.models import AuraModel, build_model
from aura.train.schedule import Every

FORMAT = 1
CKPT_DIR = "checkpoints"
BEST_FILE = "best.json"
MODEL_FILE, META_FILE = "model.safetensors", "meta.json"
STATE_TENSORS, STATE_JSON = "train_state.safetensors", "train_state.json"
MEMORY_DIR = "memory"


@dataclass
class TrainState:
    """Everything besides weights that makes a resumed run continue exactly."""

    step: int = 0  # the next optimizer step to run
    tokens_seen: int = 0
    micro_split: int = 1  # each sampled micro-batch is run in this many chunks (after an OOM)
    fault_lr_scale: float = 1.0  # halved at every rollback after repeated non-finite steps
    nonfinite_skipped: int = 0
    rollbacks: int = 0
    plateau: dict[str, float] = field(default_factory=dict)
    best_val_loss: float | None = None
    grad_scaler: dict[str, float] = field(default_factory=dict)  # fp16's calibrated loss scale


def _pack_optimizer(states: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], list[Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: list[Any] = []
    for i, sd in enumerate(states):
        per_param: dict[str, dict[str, Any]] = {}
        for pid, pstate in sd["state"].items():
            for key, value in pstate.items():
                if torch.is_tensor(value):
                    tensors[f"opt{i}.{pid}.{key}"] = value.detach().cpu().contiguous()
                else:
                    per_param.setdefault(str(pid), {})[key] = value
        plain.append({"param_groups": sd["param_groups"], "plain_state": per_param,
                      "tensor_params": sorted({str(p) for p in sd["state"]})})
    return tensors, plain


def _unpack_optimizer(tensors: dict[str, torch.Tensor], plain: list[Any]) -> list[dict[str, Any]]:
    states = []
    for i, info in enumerate(plain):
        state: dict[int, dict[str, Any]] = {}
        for pid in info["tensor_params"]:
            state[int(pid)] = dict(info["plain_state"].get(pid, {}))
        prefix = f"opt{i}."
        for name, value in tensors.items():
            if name.startswith(prefix):
                pid, key = name[len(prefix):].split(".", 1)
                state.setdefault(int(pid), {})[key] = value
        states.append({"state": state, "param_groups": info["param_groups"]})
    return states


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def _restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _load_weights(model: AuraModel, path: Path, device: torch.device | str = "cpu") -> None:
    """Weights, then every episodic memory the model keeps, restored in place."""
    load_model(model, str(path / MODEL_FILE), device=str(device))
    for name, writer in model.writers.items():
        writer.restore(path / MEMORY_DIR / name)


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CKPT_DIR / f"step-{step:08d}"


def save_checkpoint(run_dir: Path, model: AuraModel, tokenizer: Tokenizer, config: AuraConfig,
                    state: TrainState, optimizer_states: list[dict[str, Any]] | None,
                    val_loss: float | None = None) -> Path:
    """Write checkpoint ``state.step`` atomically; with no optimizer state it is weights-only."""
    final = step_dir(run_dir, state.step)
    with atomic_dir(final) as tmp:  # replaces the same step saved again (after a rollback)
        save_model(model, str(tmp / MODEL_FILE))
        for name, writer in model.writers.items():  # queued writes applied first
            writer.save(tmp / MEMORY_DIR / name)
        tokenizer.save(tmp / TOKENIZER_FILE)
        if optimizer_states is not None:
            tensors, plain = _pack_optimizer(optimizer_states)
            save_file({**tensors, **_rng_tensors()}, str(tmp / STATE_TENSORS))
            (tmp / STATE_JSON).write_text(json.dumps(
                {"optimizers": plain, "train_state": state.__dict__}))
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        meta = {
            "format": FORMAT,
            "step": state.step,
            "config": config_to_dict(config),
            "tokenizer_hash": tokenizer.hash,
            "val_loss": val_loss,
            "data_position": {"step": state.step, "tokens_seen": state.tokens_seen},
            "files": {name: file_sha256(tmp / name) for name in files},
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    return final


class Checkpointer:
    """A run's checkpoints: due every ``interval`` steps and after the ``last`` step; each save
    records the best val loss and prunes to the newest ``keep`` plus the best, so a long run's
    disk use stays bounded and its best weights survive."""

    def __init__(self, run_dir: Path, interval: int, last: int, keep: int,
                 log: Callable[[str], None]):
        self.run_dir, self.cadence, self.keep, self.log = run_dir, Every(interval, last), keep, log

    def due(self, step: int) -> bool:
        return self.cadence.due(step)

    def saved(self, step: int) -> bool:
        return step_dir(self.run_dir, step).is_dir()

    def save(self, model: AuraModel, tokenizer: Tokenizer, config: AuraConfig,
             state: TrainState, optimizer_states: list[dict[str, Any]],
             val_loss: float | None) -> Path:
        improved = val_loss is not None and (state.best_val_loss is None
                                             or val_loss < state.best_val_loss)
        if improved:
            state.best_val_loss = val_loss
        path = save_checkpoint(self.run_dir, model, tokenizer, config, state, optimizer_states,
                               val_loss)
        if improved:
            assert val_loss is not None
            mark_best(self.run_dir, state.step, val_loss)
        prune(self.run_dir, self.keep)
        self.log(f"checkpoint: {path}")
        return path


def verify_checkpoint(path: Path, need_train_state: bool = False) -> dict[str, Any]:
    """The checkpoint's meta after checking every file against its sha256; DataError if not."""
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        files = meta["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"checkpoint {path}: missing or corrupt {META_FILE}") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"checkpoint {path}: unknown format {meta.get('format')!r}")
    needed = [MODEL_FILE, TOKENIZER_FILE] + ([STATE_TENSORS, STATE_JSON] if need_train_state
                                             else [])
    for name in needed:
        if name not in files:
            raise DataError(f"checkpoint {path}: has no {name}")
    for name, digest in files.items():
        f = path / name
        if not f.is_file() or file_sha256(f) != digest:
            raise DataError(f"checkpoint {path}: {name} is missing, truncated or corrupt")
    return meta


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first (temporary ones excluded)."""
    root = run_dir / CKPT_DIR
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")]
    return sorted(dirs, key=lambda p: int(p.name.removeprefix("step-")))


def latest_good(run_dir: Path, log: Callable[[str], None], need_train_state: bool = True
                ) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies; a corrupt newer one is skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, verify_checkpoint(path, need_train_state)
        except DataError as exc:
            log(f"warning: {exc}; falling back to the previous checkpoint")
    return None


def load_train_state(path: Path, model: AuraModel) -> tuple[TrainState, list[dict[str, Any]]]:
    """Load weights into ``model`` and RNG states; return the train state and optimizer states."""
    _load_weights(model, path)
    tensors = load_file(str(path / STATE_TENSORS))
    info = json.loads((path / STATE_JSON).read_text())
    _restore_rng(tensors)
    opt_states = _unpack_optimizer(
        {k: v for k, v in tensors.items() if not k.startswith("rng.")}, info["optimizers"])
    return TrainState(**info["train_state"]), opt_states


def read_best(run_dir: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((run_dir / BEST_FILE).read_text())
    return None


def mark_best(run_dir: Path, step: int, val_loss: float) -> None:
    atomic_write_text(run_dir / BEST_FILE, json.dumps({"step": step, "val_loss": val_loss}))


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints plus the best one: a long run's disk use stays
    bounded, and the weights worth sampling from are never pruned."""
    best = read_best(run_dir)
    best_step = best["step"] if best else None
    checkpoints = list_checkpoints(run_dir)
    for path in checkpoints[:-keep] if keep > 0 else checkpoints:
        if int(path.name.removeprefix("step-")) != best_step:
            shutil.rmtree(path, ignore_errors=True)
    root = run_dir / CKPT_DIR
    for stale in root.glob(".step-*.tmp"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory's best checkpoint (else its newest good one)."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    if not path.is_dir():
        raise DataError(f"no run or checkpoint at {path}")
    best = read_best(path)
    if best is not None and step_dir(path, best["step"]).is_dir():
        return step_dir(path, best["step"])
    found = latest_good(path, log=lambda _m: None, need_train_state=False)
    if found is None:
        raise DataError(f"{path}: no usable checkpoint (train first, or pass a checkpoint dir)")
    return found[0]


@dataclass
class Loaded:
    model: AuraModel
    tokenizer: Tokenizer
    config: AuraConfig
    meta: dict[str, Any]
    path: Path


def load_for_inference(path: str | Path, device: torch.device | str = "cpu") -> Loaded:
    """Model + tokenizer from a checkpoint (or a run's best), verified, in eval mode."""
    ckpt = resolve_checkpoint(path)
    meta = verify_checkpoint(ckpt)
    config = config_from_dict(meta["config"])
    tokenizer = load_tokenizer(ckpt / TOKENIZER_FILE)
    if tokenizer.hash != meta["tokenizer_hash"]:
        raise DataError(f"checkpoint {ckpt}: tokenizer does not match its meta")
    model = build_model(config.model)
    _load_weights(model, ckpt, device)
    return Loaded(model.to(device).eval(), tokenizer, config, meta, ckpt)


def replace_memory(path: Path, model: AuraModel) -> None:
    """Rewrite checkpoint ``path`` with ``model``'s episodic stores as they are now (e.g. a bank
    rebuilt by ``aura memory build``), every other file unchanged, the sha256s in meta.json
    updated. Built under a temporary name and renamed into place, like ``save_checkpoint``."""
    meta = verify_checkpoint(path)
    with atomic_dir(path) as tmp:
        for item in path.iterdir():
            if item.name in (MEMORY_DIR, META_FILE):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        for name, writer in model.writers.items():
            writer.save(tmp / MEMORY_DIR / name)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        meta["files"] = {name: file_sha256(tmp / name) for name in files}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
