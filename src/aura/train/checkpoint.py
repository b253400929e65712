"""A run's checkpoints: safetensors + JSON only, written atomically, verified by sha256 on load.

    RUN/
        lock                         held by the one command writing the run (aura.lock)
        history.json                 {"history": ID}: the line of training the checkpoints belong to
        best.json                    {"step": N, "val_loss": L}: the checkpoint to sample from
        checkpoints/step-00000500/
            model.safetensors        weights (all inference needs, with meta.json and the tokenizer)
            tokenizer.aura.json
            meta.json                step, history, config, tokenizer hash, val loss, sha256 of
                                     every file (each inside this directory)
            train_state.safetensors  optimizer tensors and RNG states       (resume only)
            train_state.json         optimizer groups, schedule and fault counters (resume only)
            memory/NAME/             each episodic memory the model keeps (``model.writers``)
            shards/                  instead of model.safetensors, with
                                     train.checkpoint_format=sharded (aura.train.sharded)
        discarded-TIME/              what a fresh start or a save moved aside, never deleted
                                     (itself a run directory)

A checkpoint directory is built under a temporary name and renamed into place, and meta.json is
written last inside it, so a crash leaves either no checkpoint or a complete one. Loading never
unpickles: tensors come from safetensors, everything else from JSON.

A history is one line of training from step 0. Resuming, pruning and sampling use only the
checkpoints of the run's history (one written before histories existed counts as the run's), so
a run never resumes from, mixes with or deletes checkpoints it did not write: a fresh start over
checkpoints moves them into ``discarded-TIME/`` first, and only when asked to.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from aura.atomic import atomic_dir, atomic_write_text, fsync_dir
from aura.config import AuraConfig, config_from_dict, config_to_dict
from aura.data.shards import file_sha256
from aura.data.tokenizers import TOKENIZER_FILE, Tokenizer, load_tokenizer
from aura.errors import AuraError, DataError
from aura.lock import DirectoryLock
from aura.models import AuraModel, build_model
from aura.train import sharded
from aura.train.schedule import Every
from aura.train.sharded import SHARD_INDEX

FORMAT = 1
CKPT_DIR = "checkpoints"
BEST_FILE, HISTORY_FILE, LOCK_FILE = "best.json", "history.json", "lock"
DISCARDED = "discarded-"
MODEL_FILE, META_FILE = "model.safetensors", "meta.json"
STATE_TENSORS, STATE_JSON = "train_state.safetensors", "train_state.json"
MEMORY_DIR = "memory"
STEP_NAME = re.compile(r"step-([0-9]+)")
Log = Callable[[str], None]


def warn_stderr(message: str) -> None:
    print(message, file=sys.stderr)


class UnusableCheckpoint(DataError):
    """A checkpoint that fails verification or belongs to another history: which, and why."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"checkpoint {path}: {reason}")
        self.path, self.reason = path, reason


class NoUsableCheckpoint(DataError):
    """A run has checkpoints, and none of them can be used."""


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
    """Weights (a sharded checkpoint's consolidated here), then every episodic memory the
    model keeps, restored in place."""
    if sharded.is_sharded(path):
        sharded.load_weights(model, path)
    else:
        load_model(model, str(path / MODEL_FILE), device=str(device))
    for name, writer in model.writers.items():
        writer.restore(path / MEMORY_DIR / name)


load_weights = _load_weights


def newest_checkpoint(path: Path, log: Log = warn_stderr) -> tuple[Path, dict[str, Any]]:
    """A checkpoint directory as itself, or a run's newest good checkpoint (its last weights,
    where ``--init-from`` continues, rather than its best), verified."""
    if (path / META_FILE).is_file():
        return path, verify_checkpoint(path)
    if not path.is_dir():
        raise DataError(f"no run or checkpoint at {path}")
    found = latest_good(path, log, need_train_state=False, history=run_history(path, log))
    if found is None:
        raise DataError(f"{path}: no usable checkpoint")
    return found


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CKPT_DIR / f"step-{step:08d}"


def _step_of(name: str) -> int | None:
    """N of a directory named as ``step_dir`` names it (step-00000500), else None."""
    match = STEP_NAME.fullmatch(name)
    return int(match[1]) if match and name == f"step-{int(match[1]):08d}" else None


def save_checkpoint(run_dir: Path, model: AuraModel, tokenizer: Tokenizer, config: AuraConfig,
                    state: TrainState, optimizer_states: list[dict[str, Any]] | None,
                    val_loss: float | None = None, history: str | None = None,
                    extra: Callable[[Path], None] | None = None, shards: Any = None) -> Path:
    """Write checkpoint ``state.step`` of ``history`` atomically; with no optimizer state it is
    weights-only. ``extra`` writes further files into it (continual-learning state), hashed
    and verified like the rest. ``shards`` (``aura.train.sharded.Staged``): the weights and
    optimizer tensors every rank has written, moved in instead of ``model.safetensors``; then
    ``optimizer_states`` is their JSON part."""
    final = step_dir(run_dir, state.step)
    with atomic_dir(final) as tmp:  # replaces the same step saved again (after a rollback)
        if shards is None:
            save_model(model, str(tmp / MODEL_FILE))
        else:
            shards.move_into(tmp)
        for name, writer in model.writers.items():  # queued writes applied first
            writer.save(tmp / MEMORY_DIR / name)
        tokenizer.save(tmp / TOKENIZER_FILE)
        if optimizer_states is not None:
            tensors, plain = (_pack_optimizer(optimizer_states) if shards is None
                              else ({}, optimizer_states))
            save_file({**tensors, **_rng_tensors()}, str(tmp / STATE_TENSORS))
            (tmp / STATE_JSON).write_text(json.dumps(
                {"optimizers": plain, "train_state": state.__dict__}))
        if extra is not None:
            extra(tmp)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        meta = {
            "format": FORMAT,
            "step": state.step,
            "history": history,
            "config": config_to_dict(config),
            "tokenizer_hash": tokenizer.hash,
            "val_loss": val_loss,
            "data_position": {"step": state.step, "tokens_seen": state.tokens_seen},
            "files": {name: file_sha256(tmp / name) for name in files},
        }
        if shards is not None:
            meta["sharded"] = {"world": shards.world}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    return final


class Checkpointer:
    """A run's checkpoints: due every ``interval`` steps and after the ``last`` step; each save
    records the best val loss and prunes to the newest ``keep`` plus the best, so a long run's
    disk use stays bounded and its best weights survive. Saves carry the run's ``history``."""

    def __init__(self, run_dir: Path, interval: int, last: int, keep: int, log: Log,
                 history: str | None = None):
        self.run_dir, self.cadence, self.keep, self.log = run_dir, Every(interval, last), keep, log
        self.history = history
        self._warned: set[str] = set()

    def due(self, step: int) -> bool:
        return self.cadence.due(step)

    def saved(self, step: int) -> bool:
        return step_dir(self.run_dir, step).is_dir()

    def finish(self, path: Path, meta: dict[str, Any], state: TrainState) -> None:
        """Do what the save of ``path``, the checkpoint a run resumes from, may not have done:
        it is renamed into place first, and a crash before best.json names it (when it was the
        new best) or before pruning leaves both undone, which nothing redoes before the next
        save (and a run resumed at its last step makes none)."""
        val_loss = meta.get("val_loss")
        if val_loss is not None and val_loss == state.best_val_loss:
            with contextlib.suppress(DataError):  # malformed: no crash writes that; prune warns
                best = read_best(self.run_dir)
                if best is None or best["step"] != meta["step"]:
                    mark_best(self.run_dir, meta["step"], val_loss)
        prune(self.run_dir, self.keep, self.history, self._warn_once)

    def _warn_once(self, message: str) -> None:
        """A problem every save would repeat (a malformed best.json) is said once."""
        if message not in self._warned:
            self._warned.add(message)
            self.log(message)

    def save(self, model: AuraModel, tokenizer: Tokenizer, config: AuraConfig,
             state: TrainState, optimizer_states: list[dict[str, Any]],
             val_loss: float | None, extra: Callable[[Path], None] | None = None,
             shards: Any = None) -> Path:
        improved = val_loss is not None and (state.best_val_loss is None
                                             or val_loss < state.best_val_loss)
        if improved:
            state.best_val_loss = val_loss
        existing = step_dir(self.run_dir, state.step)
        if existing.exists() and not _of_history(existing, self.history):
            moved = set_aside(self.run_dir, [existing])
            self.log(f"warning: {existing} is not of this run's history; moved it into {moved}")
        path = save_checkpoint(self.run_dir, model, tokenizer, config, state, optimizer_states,
                               val_loss, self.history, extra, shards)
        if improved:
            assert val_loss is not None
            mark_best(self.run_dir, state.step, val_loss)
        prune(self.run_dir, self.keep, self.history, self._warn_once)
        self.log(f"checkpoint: {path}")
        return path


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


# meta.json's fields: (what it must be, the check, required); an optional one may also be null.
_META_FIELDS: dict[str, tuple[str, Callable[[Any], bool], bool]] = {
    "step": ("a non-negative integer", _is_count, True),
    "files": ("an object of file names and sha256s",
              lambda v: isinstance(v, dict)
              and all(isinstance(k, str) and isinstance(d, str) for k, d in v.items()), True),
    "config": ("an object with a model section",
               lambda v: isinstance(v, dict) and isinstance(v.get("model"), dict), True),
    "tokenizer_hash": ("a string", lambda v: isinstance(v, str), True),
    "val_loss": ("a number", lambda v: v is None or _is_number(v), False),
    "history": ("a string", lambda v: v is None or isinstance(v, str), False),
    "sharded": ("an object with a world size",
                lambda v: v is None or (isinstance(v, dict) and _is_count(v.get("world"))),
                False),
}


def _check_meta(path: Path, meta: Any) -> dict[str, Any]:
    """meta.json's fields as the loaders use them; a field of the wrong type is corruption."""
    if not isinstance(meta, dict):
        raise UnusableCheckpoint(path, f"{META_FILE} is not a JSON object")
    if meta.get("format") != FORMAT:
        raise UnusableCheckpoint(path, f"unknown format {meta.get('format')!r}")
    for name, (kind, ok, required) in _META_FIELDS.items():
        if name not in meta:
            if required:
                raise UnusableCheckpoint(path, f"{META_FILE} has no {name!r}")
        elif not ok(meta[name]):
            raise UnusableCheckpoint(path, f"{META_FILE}: {name!r} is not {kind}")
    named = _step_of(path.name)
    if named is not None and named != meta["step"]:
        raise UnusableCheckpoint(path, f"{META_FILE} says step {meta['step']}")
    return meta


def _inside(path: Path, name: str) -> Path:
    """The file ``name`` of checkpoint ``path``: a name that is absolute, climbs out with ``..``
    or leads out through a symlink is corruption, never read."""
    parts = name.split("/")
    if "\0" in name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise UnusableCheckpoint(path, f"names a file outside its directory: {name!r}")
    target = path / name
    if not target.resolve().is_relative_to(path.resolve()):
        raise UnusableCheckpoint(path, f"{name} links outside its directory")
    return target


def verify_checkpoint(path: Path, need_train_state: bool = False) -> dict[str, Any]:
    """The checkpoint's meta after checking its fields, that every file it names lies inside it,
    and every file against its sha256; UnusableCheckpoint (a DataError) if not."""
    if not path.is_dir():
        raise UnusableCheckpoint(path, "is missing")
    try:
        meta = _check_meta(path, json.loads((path / META_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        raise UnusableCheckpoint(path, f"missing or corrupt {META_FILE}") from None
    files = meta["files"]
    weights = MODEL_FILE if meta.get("sharded") is None else SHARD_INDEX
    needed = [weights, TOKENIZER_FILE] + ([STATE_TENSORS, STATE_JSON] if need_train_state
                                          else [])
    for name in needed:
        if name not in files:
            raise UnusableCheckpoint(path, f"has no {name}")
    targets = {name: _inside(path, name) for name in files}  # all checked before any is read
    for name, digest in files.items():
        f = targets[name]
        if not f.is_file() or file_sha256(f) != digest:
            raise UnusableCheckpoint(path, f"{name} is missing, truncated or corrupt")
    return meta


def _of_history(path: Path, history: str | None) -> bool:
    """Whether checkpoint ``path`` belongs to ``history`` (or predates histories), by its
    meta.json alone; one whose meta.json cannot be read belongs to no one we know."""
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("history") in (None, history)


def _usable(path: Path, need_train_state: bool, history: str | None) -> dict[str, Any]:
    meta = verify_checkpoint(path, need_train_state)
    if meta.get("history") not in (None, history):
        raise UnusableCheckpoint(path, f"belongs to history {meta['history']}, not the run's "
                                       f"({history})")
    return meta


def list_checkpoints(run_dir: Path, log: Log | None = None) -> list[Path]:
    """Checkpoint directories of a run, oldest first. Anything else in checkpoints/ is left
    alone: a save's temporary silently, any other entry with a warning to ``log``."""
    root = run_dir / CKPT_DIR
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir()):
        step = _step_of(entry.name)
        if step is not None and entry.is_dir():
            found.append((step, entry))
        elif log is not None and not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            log(f"warning: ignoring {entry}: not a checkpoint (a directory named step-NNNNNNNN)")
    return [path for _, path in sorted(found)]


def latest_good(run_dir: Path, log: Log, need_train_state: bool = True,
                history: str | None = None, skipped: Sequence[UnusableCheckpoint] = ()
                ) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of ``history`` that verifies, with one warning per checkpoint
    skipped (newer ones, and ``skipped``: those the caller already tried) naming the one used.
    None when the run has no checkpoints; NoUsableCheckpoint, naming each, when none is usable."""
    unusable = list(skipped)
    tried = {exc.path for exc in unusable}
    for path in reversed(list_checkpoints(run_dir, log)):
        if path in tried:
            continue
        try:
            meta = _usable(path, need_train_state, history)
        except UnusableCheckpoint as exc:
            unusable.append(exc)
            continue
        for exc in unusable:
            log(f"warning: {exc}; falling back to {path}")
        return path, meta
    if not unusable:
        return None
    reasons = "; ".join(f"{exc.path.name}: {exc.reason}" for exc in unusable)
    raise NoUsableCheckpoint(f"{run_dir}: no usable checkpoint ({reasons})")


def load_train_state(path: Path, model: AuraModel) -> tuple[TrainState, list[dict[str, Any]]]:
    """Load weights into ``model`` and RNG states; return the train state and optimizer states."""
    try:
        info = json.loads((path / STATE_JSON).read_text())
        state, plain = TrainState(**info["train_state"]), info["optimizers"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UnusableCheckpoint(path, f"{STATE_JSON} is malformed") from None
    _load_weights(model, path)
    tensors = load_file(str(path / STATE_TENSORS))
    _restore_rng(tensors)
    opt_states = _unpack_optimizer(
        {k: v for k, v in tensors.items() if not k.startswith("rng.")}, plain)
    return state, opt_states


def load_sharded_train_state(path: Path, model: AuraModel, optimizers: Any) -> TrainState:
    """``load_train_state`` of a sharded checkpoint: weights and optimizer state restored
    straight into this rank's (possibly FSDP2-sharded) ``model`` and ``optimizers`` on any
    world size, then RNG states and memories; returns the train state. Collective under
    torchrun."""
    try:
        info = json.loads((path / STATE_JSON).read_text())
        state, plain = TrainState(**info["train_state"]), info["optimizers"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UnusableCheckpoint(path, f"{STATE_JSON} is malformed") from None
    sharded.load_state(path, model, optimizers, plain)
    for name, writer in model.writers.items():
        writer.restore(path / MEMORY_DIR / name)
    _restore_rng(load_file(str(path / STATE_TENSORS)))
    return state


def read_best(run_dir: Path) -> dict[str, Any] | None:
    """best.json, ``{"step": N, "val_loss": L}``; None when there is none, DataError when it is
    there but malformed."""
    path = run_dir / BEST_FILE
    try:
        best = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        best = None
    if not (isinstance(best, dict) and _is_count(best.get("step"))
            and _is_number(best.get("val_loss"))):
        raise DataError(f"{path} is malformed (not {{\"step\": N, \"val_loss\": L}})")
    return best


def mark_best(run_dir: Path, step: int, val_loss: float) -> None:
    atomic_write_text(run_dir / BEST_FILE, json.dumps({"step": step, "val_loss": val_loss}))


def prune(run_dir: Path, keep: int, history: str | None = None, log: Log | None = None) -> None:
    """Keep the newest ``keep`` checkpoints of ``history`` plus the best one: a long run's disk
    use stays bounded, and the weights worth sampling from are never pruned. Only checkpoints
    whose meta.json names ``history`` (or none) are ever deleted; while best.json is malformed,
    none is (which one is the best is unknown), with a warning to ``log``."""
    for stale in (run_dir / CKPT_DIR).glob(".step-*.tmp"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)
    try:
        best = read_best(run_dir)
    except DataError as exc:
        if log is not None:
            log(f"warning: {exc}; no checkpoint is pruned until a new best is saved")
        return
    best_step = best["step"] if best else None
    ours = [path for path in list_checkpoints(run_dir) if _of_history(path, history)]
    for path in ours[:-keep] if keep > 0 else ours:
        if _step_of(path.name) != best_step:
            _delete(path)


def _delete(ckpt: Path) -> None:
    """Remove a checkpoint in one step, then its files: deleted file by file, a crash midway
    would leave a checkpoint without its meta.json, which no run could then recognise as its own
    and prune; renamed first, it is a temporary the next prune removes."""
    trash = ckpt.parent / f".{ckpt.name}.{secrets.token_hex(4)}.tmp"
    try:
        os.replace(ckpt, trash)
    except OSError:  # pruning is housekeeping: a refusal leaves the checkpoint as it was
        return
    shutil.rmtree(trash, ignore_errors=True)


# --- the run directory around the checkpoints --------------------------------------------------


def lock_run(path: Path, command: str) -> DirectoryLock:
    """Lock the run ``path`` (a run directory, or a checkpoint: then the run holding it) for
    writing, before anything in it is read or written; a second writer gets one line naming
    this one. A checkpoint outside any run is locked by a ``.NAME.lock`` beside it."""
    path = Path(path)
    if (path / META_FILE).is_file():
        lock_file = (path.parent.parent / LOCK_FILE if path.parent.name == CKPT_DIR
                     else path.parent / f".{path.name}.lock")
    elif path.is_dir():
        lock_file = path / LOCK_FILE
    else:
        raise DataError(f"no run or checkpoint at {path}")
    return DirectoryLock(lock_file, command, f"{path} is being written by another process")


def new_history() -> str:
    return secrets.token_hex(8)


def write_history(run_dir: Path, history: str) -> None:
    atomic_write_text(run_dir / HISTORY_FILE, json.dumps({"history": history}) + "\n")


def run_history(run_dir: Path, log: Log) -> str | None:
    """The history the run continues: history.json's; else (a run older than history.json, or
    a damaged file, said to ``log``) the one its newest readable checkpoint names; None when
    neither names one."""
    path = run_dir / HISTORY_FILE
    if path.exists():
        try:
            history = json.loads(path.read_text(encoding="utf-8"))["history"]
        except (OSError, ValueError, KeyError, TypeError):
            history = None
        if isinstance(history, str):
            return history
        log(f"warning: {path} is malformed; the run's history is taken from its newest "
            "checkpoint")
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            meta = json.loads((ckpt / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and isinstance(meta.get("history"), str):
            return meta["history"]
    return None


def set_aside(run_dir: Path, entries: Sequence[Path] | None = None) -> Path:
    """Move ``entries`` of the run (default: all but its lock and what was set aside before)
    into a new ``RUN/discarded-TIME/`` at the same relative paths, which makes it a run
    directory of its own (``aura generate`` and ``--resume`` take it): nothing is deleted. The
    checkpoints move last, so a crash midway leaves them where the next start finds them."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = run_dir / f"{DISCARDED}{stamp}", 1
    while dest.exists():
        n += 1
        dest = run_dir / f"{DISCARDED}{stamp}-{n}"
    if entries is None:
        entries = sorted((p for p in run_dir.iterdir()
                          if p.name != LOCK_FILE and not p.name.startswith(DISCARDED)),
                         key=lambda p: (p.name == CKPT_DIR, p.name))
    touched = {run_dir}
    for entry in entries:
        target = dest / entry.relative_to(run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(entry, target)
        touched |= {entry.parent, target.parent}
    for directory in touched:
        fsync_dir(directory)
    return dest


# --- loading for inference ---------------------------------------------------------------------


def _pick(path: Path, log: Log) -> tuple[Path, dict[str, Any]]:
    """A checkpoint directory as itself; a run's best checkpoint, else its newest good one, with
    a warning naming any checkpoint skipped (the best too) and the one used instead."""
    if (path / META_FILE).is_file():
        return path, verify_checkpoint(path)
    if not path.is_dir():
        raise DataError(f"no run or checkpoint at {path}")
    history = run_history(path, log)
    skipped: list[UnusableCheckpoint] = []
    try:
        best = read_best(path)
    except DataError as exc:
        log(f"warning: {exc}; using the newest good checkpoint")
        best = None
    if best is not None:
        try:
            best_dir = step_dir(path, best["step"])
            return best_dir, _usable(best_dir, False, history)
        except UnusableCheckpoint as exc:
            skipped.append(exc)
    found = latest_good(path, log, need_train_state=False, history=history, skipped=skipped)
    if found is None:
        raise DataError(f"{path}: no usable checkpoint (train first, or pass a checkpoint dir)")
    return found


def resolve_checkpoint(path: str | Path, log: Log = warn_stderr) -> Path:
    """A checkpoint directory, or a run directory's best checkpoint (else its newest good one),
    verified."""
    return _pick(Path(path), log)[0]


@dataclass
class Loaded:
    model: AuraModel
    tokenizer: Tokenizer
    config: AuraConfig
    meta: dict[str, Any]
    path: Path


def load_for_inference(path: str | Path, device: torch.device | str = "cpu",
                       log: Log = warn_stderr) -> Loaded:
    """Model + tokenizer from a checkpoint (or a run's best), verified, in eval mode."""
    ckpt, meta = _pick(Path(path), log)
    config = config_from_dict(meta["config"])
    tokenizer = load_tokenizer(ckpt / TOKENIZER_FILE)
    if tokenizer.hash != meta["tokenizer_hash"]:
        raise DataError(f"checkpoint {ckpt}: tokenizer does not match its meta")
    model = build_model(config.model)
    _load_weights(model, ckpt, device)
    return Loaded(model.to(device).eval(), tokenizer, config, meta, ckpt)


def replace_memory(path: Path, model: AuraModel, weights: bool = False) -> None:
    """Rewrite checkpoint ``path`` with ``model``'s episodic stores as they are now (e.g. a bank
    rebuilt by ``aura memory build``) and, with ``weights``, its weights (``aura memory
    fit-keys``), every other file unchanged, the sha256s in meta.json updated. Built under a
    temporary name and renamed into place, like ``save_checkpoint``."""
    meta = verify_checkpoint(path)
    if weights and meta.get("sharded") is not None:
        raise AuraError(f"{path} holds sharded weights; only a one-file checkpoint's weights "
                        "can be replaced")
    with atomic_dir(path) as tmp:
        if weights:
            save_model(model, str(tmp / MODEL_FILE))
        for item in path.iterdir():
            if item.name in (MEMORY_DIR, META_FILE) or (weights and item.name == MODEL_FILE):
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
