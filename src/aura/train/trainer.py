"""The training loop: batches by step, accumulation, clipping, schedule, evaluation, checkpoints,
and recovery from the faults small-compute runs actually hit.

Precision, optimizers, schedules, checkpoints and metrics are separate pieces (see the sibling
modules); this file only composes them. A run is a pure function of (config, data, step): batches
come from the step, the LR from the step and saved scales, so `--resume` continues bit-identically.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from aura.allocator import keep_freed_memory
from aura.atomic import atomic_write_text
from aura.config import AuraConfig, config_to_dict
from aura.continual.hook import ContinualHook
from aura.data.prosody import token_features
from aura.data.sampler import BatchSampler, Curriculum, StepBatches, TokenFeatures
from aura.data.shards import PreparedData
from aura.data.streams import DocumentStreams
from aura.errors import AuraError, ConfigError, DataError, environment_error
from aura.models import AuraModel, build_model
from aura.train import distributed, gpu, sharded
from aura.train.checkpoint import (
    Checkpointer,
    NoUsableCheckpoint,
    TrainState,
    latest_good,
    list_checkpoints,
    load_sharded_train_state,
    load_train_state,
    load_weights,
    lock_run,
    new_history,
    newest_checkpoint,
    run_history,
    set_aside,
    write_history,
)
from aura.train.device import (
    device_peak_flops,
    maybe_empty_cuda_cache,
    memory_mb,
    pick_precision,
)
from aura.train.metrics import MetricsLog, TrainLog, progress_fields, training_flops_per_token
from aura.train.optim import build_optimizers, cast_weights
from aura.train.resources import check_ranks_memory
from aura.train.sanity import SanityMonitor, SanityWarning
from aura.train.schedule import Every, Plateau, lr_factor

CONFIG_FILE = "config.json"
MAX_ROLLBACKS = 5
# At or below this loss scale a gradient that overflows would overflow unscaled too: a fault of
# the run, not of the scale.
LOSS_SCALE_FLOOR = 1.0
MicroBatch = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], float]


def _stderr(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stopped: str  # "max_steps", "early_stop", "interrupted" or "sanity" (train.strict_sanity)
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    nonfinite_skipped: int
    rollbacks: int
    micro_split: int
    seconds: float
    tokens_per_s: float
    stop_signal: str | None = None  # "SIGINT" / "SIGTERM" when one stopped the run early
    sanity_warnings: list[str] = field(default_factory=list)  # aura.train.sanity's, one line each
    precision: str = "fp32"  # what ran: train.precision=auto resolves by device and CPU kind


class _NonFinite(Exception):
    """A step whose loss or gradient norm is NaN/inf: skipped, never applied."""


class _LossScaleOverflow(Exception):
    """A GradScaler's scale was too high for this step's gradients: it has backed off, and the
    step runs again."""


class Trainer:
    """Training of one run directory, which it locks from construction to the end of ``run()``.

    ``resume`` continues from the newest good checkpoint of the run's history. A run whose
    checkpoints cannot be resumed (none is usable, or ``resume`` is off) is refused, unless
    ``restart_discarding_checkpoints``: then everything in it is moved into RUN/discarded-TIME/
    and training starts afresh, so no checkpoint is ever lost or mixed into a new history."""

    def __init__(self, cfg: AuraConfig, data_dir: str | Path, run_dir: str | Path, *,
                 resume: bool = False, restart_discarding_checkpoints: bool = False,
                 progress: bool = True, log: Callable[[str], None] = _stderr,
                 init_from: str | Path | None = None, init_continual: bool = False):
        self.cfg, self.run_dir, self.log, self.progress = cfg, Path(run_dir), log, progress
        self.init_from, self.init_continual = init_from, init_continual
        self.data = PreparedData.open(data_dir, verify="full")
        vocab = self.data.vocab_size
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = vocab
        elif cfg.model.vocab_size != vocab:
            raise AuraError(f"model.vocab_size is {cfg.model.vocab_size} but the data's "
                            f"tokenizer has {vocab}")
        # settings errors leave no run directory; under torchrun, rank 0 alone speaks and writes
        self.group = distributed.init(cfg.train.device)
        self.device = self.group.device
        keep_freed_memory()  # a Trainer built in a notebook runs as `aura train` does
        if not self.group.main:
            self.log, self.progress = distributed.quiet, False
        try:
            distributed.check_batch(self.group, cfg.train.batch_size)
            self.precision = pick_precision(cfg.train.precision, self.device, self.log,
                                            width=cfg.model.n_embd)
            if cfg.train.memory_check:  # before anything is built or written: no run on refusal
                check_ranks_memory(cfg, self.device, self.precision.name, self.group.world,
                                   distributed.env_local_world())
            self.lock: Any = distributed.NO_LOCK
            self.group.share(lambda: self._lock(resume))
        except AuraError as exc:  # every rank decided the same: rank 0 alone says it
            self.group.close()
            if self.group.main or isinstance(exc, distributed.FollowerError):
                raise
            raise distributed.FollowerError(str(exc)) from None
        except BaseException:
            self.group.close()
            raise
        try:
            self._setup(resume, restart_discarding_checkpoints)
        except BaseException:
            self.lock.release()
            self.group.close()
            raise

    def _lock(self, resume: bool) -> None:
        """Create and lock the run directory (rank 0)."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"cannot create run directory {self.run_dir}: {exc.strerror}"
                            ) from None
        self.lock = lock_run(self.run_dir, "aura train --resume" if resume else "aura train")

    def _setup(self, resume: bool, restart: bool) -> None:
        """Everything after the lock: where the run starts, the model, optimizers, batches."""
        cfg, t = self.cfg, self.cfg.train
        start = self._shared_start(resume, restart)
        self.parallel = distributed.Parallel(self.group, t.parallel)
        self.scaler = self.precision.new_scaler()
        torch.manual_seed(t.seed)
        self.model: AuraModel = build_model(cfg.model).to(self.device)
        cast_weights(self.model, t.weights)
        self.model.grad_checkpoint = t.grad_checkpoint
        self.wrapped = self.parallel.wrap(self.model, self.precision, t.grad_checkpoint)
        self.forward: Callable[..., Any] = self.wrapped
        self._compiled = False
        if t.compile:
            try:
                self.forward, self._compiled = torch.compile(self.wrapped), True
            except Exception as exc:  # any backend failure: eager still trains correctly
                self.log(f"warning: torch.compile unavailable ({exc}); training eagerly")
        self.opt = build_optimizers(self.model, t, self.device)
        self.block = t.block_size or cfg.model.block_size
        stages = cfg.data.curriculum
        block_fn = Curriculum(stages, self.block) if stages else self.block
        features = token_features(self.model.token_features, self.data.tokenizer)
        part = (self.group.rank, self.group.world)  # this rank's rows of each global batch
        self.train_batches = (
            self._document_streams(features, part) if t.memory_stream else
            BatchSampler(self.data.split("train"), t.batch_size, block_fn, t.seed,
                         features=features, corpus_pos=self.model.wants_corpus_pos, part=part))
        val = self.data.splits.get("val")
        self.val_batches = (BatchSampler(val, t.batch_size, self.block, t.seed + 1,
                                         features=features, part=part)
                            if val is not None and val.n_tokens > self.block else None)
        d = cfg.data
        self.step_batches = StepBatches(self.train_batches, t.grad_accum, t.max_steps,
                                        num_workers=d.num_workers,
                                        # pinned host memory only speeds copies to a GPU
                                        pin_memory=d.pin_memory and self.device.type == "cuda",
                                        prefetch_factor=d.prefetch_factor)
        self.plateau = Plateau(t.plateau_patience, t.early_stop_patience)
        self.evaluation = Every(t.eval_interval, t.max_steps)
        self.checkpointer = Checkpointer(self.run_dir, t.checkpoint_interval, t.max_steps,
                                         t.keep_checkpoints, self.log, self.history)
        self.state = TrainState()
        self._nonfinite_in_a_row = 0
        self._stop_signal: str | None = None
        self.continual = ContinualHook(cfg, self.model, self.data.split("train"), self.block,
                                       features, self.model.wants_corpus_pos,
                                       self.precision.autocast)
        if start is not None:
            self._resume(*start)
        else:
            self.model.on_train_start(self.data)
            if self.init_from is not None:
                self._init_from(Path(self.init_from))
        distributed.share_memories(self.group, self.model)
        if self.device.type == "cuda" and t.auto_micro_batch:  # never fewer chunks than saved
            split = gpu.probe_split(cfg, self.device, self.precision.name, self.group.world)
            self.state.micro_split = self.group.max(max(self.state.micro_split, split))
        self.peak_flops = device_peak_flops(self.device, self.precision.name)
        if self.peak_flops is not None:  # the job's peak: its tokens/s counts every rank's
            self.peak_flops *= self.group.world
        self.flops_per_token = self._flops_per_token() if self.peak_flops else None
        self.metrics: Any = distributed.NO_METRICS
        if self.group.main:
            atomic_write_text(self.run_dir / CONFIG_FILE,
                              json.dumps(config_to_dict(cfg), indent=1))
            self.metrics = MetricsLog(self.run_dir,
                                      resume_step=self.state.step if start is not None else None,
                                      log=self.log)
        self.sanity = SanityMonitor(cfg.model.vocab_size, t.max_steps) if t.sanity else None
        self.snapshots = None
        if t.viz_interval and t.parallel == "fsdp" and self.group.world > 1:
            raise AuraError("train.viz_interval draws on rank 0 alone, which FSDP2's sharded "
                            "forward cannot do: use train.parallel=ddp or `aura viz` afterwards")
        if t.viz_interval and self.group.main:
            from aura.eval.viz import Snapshots  # matplotlib only for runs that draw

            self.snapshots = Snapshots.for_run(self.run_dir, t.viz_interval, self.data,
                                               self.block)

    def _flops_per_token(self) -> float:
        """Model FLOPs per training token, at the first step's sequence length."""
        x, _, feats = self.train_batches.batch(self.state.step * self.cfg.train.grad_accum)
        return training_flops_per_token(self.cfg.model, x[:1],
                                        {name: f[:1] for name, f in feats.items()})

    # --- state --------------------------------------------------------------------------------

    def _shared_start(self, resume: bool, restart: bool) -> tuple[Path, dict[str, Any]] | None:
        """``_start`` on rank 0, its answer (and the history) on every rank."""
        def decide() -> dict[str, Any]:
            found = self._start(resume, restart)
            return {"history": self.history,
                    "start": None if found is None else [str(found[0]), found[1]]}

        shared = self.group.share(decide)
        self.history = shared["history"]
        return None if shared["start"] is None else (Path(shared["start"][0]),
                                                     shared["start"][1])

    def _start(self, resume: bool, restart: bool) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint to resume from, or None for step 0; sets ``self.history``. A fresh
        start over checkpoints is refused, or with ``restart`` moves the run aside first."""
        run = self.run_dir
        history = run_history(run, self.log)
        if resume and list_checkpoints(run):
            try:
                found = latest_good(run, self.log, history=history)
            except NoUsableCheckpoint as exc:
                if not restart:
                    raise NoUsableCheckpoint(f"{exc}; pass --restart-discarding-checkpoints to "
                                             "move them aside and start afresh") from None
                self._set_aside(str(exc))
            else:
                self.history = history or new_history()  # a run older than histories gets one
                write_history(run, self.history)
                return found
        elif list_checkpoints(run):
            if not restart:
                raise AuraError(f"{run} already holds checkpoints: pass --resume to continue it, "
                                "--restart-discarding-checkpoints to start afresh (they are "
                                "moved aside, not deleted), or choose another --out")
            self._set_aside(f"{run} already holds checkpoints")
        elif resume:
            self.log(f"note: no checkpoint in {run} to resume from; starting afresh")
        self.history = new_history()
        write_history(run, self.history)
        return None

    def _set_aside(self, reason: str) -> None:
        moved = set_aside(self.run_dir)
        self.log(f"note: {reason}; moved everything of the run so far into {moved}, starting "
                 "afresh")

    def _resume(self, path: Path, meta: dict[str, Any]) -> None:
        saved, current = meta["config"]["model"], config_to_dict(self.cfg)["model"]
        changed = [f"model.{k} {saved[k]!r} -> {v!r}" for k, v in current.items()
                   if k != "dropout" and k in saved and saved[k] != v]
        if changed:  # the weights would not fit: say so in one line, not a state-dict dump
            raise AuraError(f"{path} holds a different model ({', '.join(changed)}); resume "
                            "with the run's saved config (omit --preset/--config)")
        self._load(path)
        if self.group.main:
            self.checkpointer.finish(path, meta, self.state)
        self.log(f"resumed from {path} at step {self.state.step}")

    def _init_from(self, source: Path) -> None:
        """A fresh run (step 0, so the LR warms up and decays again) starting from the weights
        of another run's newest checkpoint, and with ``init_continual`` its EWC anchor and
        Fisher and its replay buffer."""
        path, meta = newest_checkpoint(source, self.log)
        if meta["tokenizer_hash"] != self.data.tokenizer.hash:
            raise AuraError(f"--init-from {path} was trained with another tokenizer than "
                            f"{self.data.root}'s; prepare the data with the same tokenizer")
        saved, current = meta["config"]["model"], config_to_dict(self.cfg)["model"]
        changed = [f"model.{k} {saved[k]!r} -> {v!r}" for k, v in current.items()
                   if k != "dropout" and k in saved and saved[k] != v]
        if changed:
            raise AuraError(f"--init-from {path} holds a different model ({', '.join(changed)})")
        load_weights(self.model, path, self.device)
        if self.init_continual and not self.continual.load(path, resume=False):
            self.log(f"note: {path} holds no Fisher or replay state; starting without")
        self.log(f"initialised from {path}")

    def _load(self, path: Path) -> None:
        if sharded.is_sharded(path):  # each rank reads its own chunks, on any world size
            self.state = load_sharded_train_state(path, self.model, self.opt)
        else:
            weights = self.parallel.io_model(self.model)
            self.state, opt_states = load_train_state(path, weights)
            self.parallel.load_full(self.model, weights, self.opt, opt_states)
        self.plateau = Plateau(**self.state.plateau) if self.state.plateau else self.plateau
        self.continual.load(path)
        if self.scaler is not None and self.state.grad_scaler:
            self.scaler.load_state_dict(self.state.grad_scaler)

    def _rollback(self) -> None:
        """K non-finite steps in a row: back to the last good checkpoint with half the LR."""
        found = latest_good(self.run_dir, self.log, history=self.history)
        if found is None:
            raise AuraError(f"training diverged: {self.cfg.train.max_nonfinite} non-finite steps "
                            "in a row before any checkpoint; lower train.lr")
        skipped, rollbacks = self.state.nonfinite_skipped, self.state.rollbacks + 1
        if rollbacks > MAX_ROLLBACKS:  # the LR is already 1/32: something else is wrong
            raise AuraError(f"training keeps diverging: {MAX_ROLLBACKS} rollbacks with the lr "
                            "halved each time; check the data and lower train.lr")
        scale = self.state.fault_lr_scale * 0.5
        self._load(found[0])
        self.metrics.rewind(self.state.step)  # the steps after it run again
        self.state.nonfinite_skipped, self.state.rollbacks = skipped, rollbacks
        self.state.fault_lr_scale = scale
        self.log(f"warning: rolled back to step {self.state.step} with the lr scaled by {scale}")

    # --- one step -----------------------------------------------------------------------------

    def _micro_batches(self, step: int) -> Iterator[MicroBatch]:
        """(x, y, features, weight) chunks of the step's batches; after an OOM each batch is
        split, so the data and the effective batch stay exactly what they were."""
        t = self.cfg.train
        split = self.state.micro_split
        for x, y, feats in self.step_batches(step):
            chunks = {name: f.chunk(split) for name, f in feats.items()}
            for i, (xc, yc) in enumerate(zip(x.chunk(split), y.chunk(split), strict=True)):
                weight = xc.size(0) / x.size(0) / t.grad_accum
                yield (xc.to(self.device, non_blocking=True),
                       yc.to(self.device, non_blocking=True),
                       {name: c[i].to(self.device, non_blocking=True)
                        for name, c in chunks.items()}, weight)

    def _switches(self, step: int) -> dict[str, bool]:
        """The per-step switches the model declares: memory reads stay off for
        ``train.memory_warmup_steps``."""
        if not self.model.has_memory_switch:
            return {}
        return {"use_memory": step >= self.cfg.train.memory_warmup_steps}

    def _step(self, step: int) -> tuple[float, float, dict[str, float]]:
        t = self.cfg.train
        self.model.on_step(step, bisect.bisect_right(t.phases, step) if t.phases else None)
        # the model's own scale (limbic hormones) included: what the sanity check compares to
        self._lr_applied = (lr_factor(t, step, self.plateau) * self.state.fault_lr_scale
                            * self.model.lr_scale())
        self.opt.set_lr_factor(self._lr_applied)
        if not self.model.training:  # only when something left it in eval: setting every
            self.model.train()       # module's flag each step cost ~0.17 ms of a 17 ms step
        total = torch.zeros((), device=self.device)
        aux: dict[str, torch.Tensor] = {}
        switches = self._switches(step)
        self.continual.begin_step()
        micro = list(self._micro_batches(step))
        for i, (x, y, feats, weight) in enumerate(micro):
            with (self.parallel.sync_gradients(self.wrapped, i == len(micro) - 1),
                  self.precision.autocast()):
                out, loss = self.continual.forward(self.forward, step, i, x, y, feats,
                                                   label_smoothing=t.label_smoothing, **switches)
            loss = loss * weight
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
            aux = out.aux
        penalty = self.continual.penalty_backward(self.scaler.scale if self.scaler else
                                                  lambda v: v)
        if penalty is not None:
            aux = {**aux, "ewc": torch.tensor(penalty)}
        if self.scaler is not None:
            self.opt.unscale_(self.scaler)
        total_norm = torch.nn.utils.get_total_norm(
            [p.grad for p in self.opt.params if p.grad is not None])
        norm = self.parallel.local(total_norm)
        loss_value, norm_value = torch.stack([total, norm.to(total)]).tolist()
        aux_values = {k: float(v) for k, v in aux.items() if k != "ce"}
        # every rank sees the global mean loss (its norm is global already): same decisions
        loss_value, *means = self.group.mean([loss_value, *aux_values.values()])
        aux_values = dict(zip(aux_values, means, strict=True))
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self.opt.zero_grad()
            raise self._nonfinite_error(loss_value)
        self.opt.step(self.scaler, clip=(total_norm, t.grad_clip or math.inf))
        if self.scaler is not None:
            self.scaler.update()
        self.opt.zero_grad()
        self.continual.commit()
        return loss_value, norm_value, aux_values

    def _nonfinite_error(self, loss: float) -> Exception:
        """The one policy for non-finite steps in every precision: count, skip, roll back after
        ``train.max_nonfinite`` in a row. The exception is a GradScaler calibrating its scale
        (it starts at 2**16, and overflows there are normal early in a run): with a finite loss
        and a scale above ``LOSS_SCALE_FLOOR``, the scaler backs off and the same step runs
        again, so calibration costs no data and can never trip a rollback."""
        if self.scaler is None:
            return _NonFinite()
        scale = self.scaler.get_scale()
        self.scaler.update()  # backs off on an overflow; unscale_ needs it before the next step
        backed_off = self.scaler.get_scale() < scale
        if math.isfinite(loss) and backed_off and scale > LOSS_SCALE_FLOOR:
            return _LossScaleOverflow()
        return _NonFinite()

    def _skip_nonfinite(self, step: int) -> None:
        """Skip a non-finite step, its batch too (on the same weights it would fail the same way
        again); the ``train.max_nonfinite``-th in a row rolls back instead."""
        self.state.nonfinite_skipped += 1
        self._nonfinite_in_a_row += 1
        self.log(f"warning: non-finite loss or gradient at step {step}; step skipped")
        if self._nonfinite_in_a_row >= self.cfg.train.max_nonfinite:
            self._rollback()
            self._nonfinite_in_a_row = 0
        else:
            self.state.step = step + 1

    def _guarded_step(self, step: int) -> tuple[float, float, dict[str, float]] | None:
        """``_step`` with the recoveries: None when the step must run again (an OOM split, the
        compile fallback, a loss-scale overflow) or was skipped or rolled back
        (``self.state.step`` says which step is next)."""
        try:
            result = self._step(step)
        except _LossScaleOverflow:
            return None
        except _NonFinite:
            self._skip_nonfinite(step)
            return None
        except torch.OutOfMemoryError:
            self.opt.zero_grad()
            maybe_empty_cuda_cache("out of memory", min_free_ratio=1.0, log=self.log)
            if self.state.micro_split >= self.cfg.train.batch_size // self.group.world:
                raise
            self.state.micro_split *= 2
            self.log(f"warning: out of memory; each micro-batch now runs in "
                     f"{self.state.micro_split} chunks (same effective batch)")
            return None
        except Exception as exc:
            if not self._compiled:
                raise
            self.opt.zero_grad()
            self.forward, self._compiled = self.model, False
            self.log(f"warning: compiled model failed ({type(exc).__name__}: {exc}); "
                     "falling back to eager")
            return None
        self._nonfinite_in_a_row = 0
        return result

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_batches is None:
            return None
        self.model.eval()
        losses = []
        switches = self._switches(self.state.step)
        for i in range(self.cfg.train.eval_iters):
            x, y, feats = self.val_batches.batch(i)
            feats = {name: f.to(self.device) for name, f in feats.items()}
            with self.precision.autocast():
                out = self.model(x.to(self.device), y.to(self.device), **switches, **feats)
            losses.append(out.loss.float())
        self.model.train()
        return self.group.mean([torch.stack(losses).mean().item()])[0]  # rows split over ranks

    # --- the loop -----------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signal.Signals(signum).name
        self.log(f"{self._stop_signal}: saving a checkpoint after this step, then stopping")

    def run(self) -> TrainResult:
        handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: the caller handles them
                handlers[sig] = signal.signal(sig, self._on_signal)
        finished = False
        try:
            result = self._loop()
            finished = True
            return result
        except OSError as exc:
            reason = environment_error(exc)
            if reason is None:
                raise
            raise AuraError(f"training stopped at step {self.state.step}: {reason}; "
                            f"{self._last_checkpoint_note()}") from None
        except Exception as exc:
            if not distributed.collective_failure(exc):
                raise
            raise distributed.RankLost(
                f"rank {self.group.rank} lost the other ranks of the job at step "
                f"{self.state.step} ({type(exc).__name__}); {self._last_checkpoint_note()}"
            ) from None
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            self.step_batches.close()
            self.metrics.close()
            self.lock.release()
            if finished:
                self._release_parallel_wrapper()
            self.group.close(together=finished)

    def _release_parallel_wrapper(self) -> None:
        """Free the DDP wrapper (and a compiled one around it) before the group is destroyed.
        Its reducer holds the gloo process group past ``destroy_process_group``; left to the
        interpreter's exit, gloo's threads can abort a rank whose run had finished (SIGABRT,
        "terminate called without an active exception", once in a default test suite). Only
        after a finished run: a reducer with work pending on a lost rank would block here."""
        if self.group.world > 1 and self.wrapped is not self.model:
            self.wrapped = self.forward = self.model
            gc.collect()  # the wrapper's own reference cycles go now, not at exit

    def _last_checkpoint_note(self) -> str:
        """Where the run can go on from once the file system lets it: checkpoints are renamed
        into place whole, so a failed save leaves the newest one as it was."""
        with contextlib.suppress(OSError):
            saved = list_checkpoints(self.run_dir)
            if saved:
                return f"the newest checkpoint, {saved[-1]}, is intact: continue with --resume"
        return "no checkpoint to continue from"

    def _loop(self) -> TrainResult:
        """Each step: train (or recover), then whatever is due after it: a log row, an
        evaluation (which may say stop early), a checkpoint."""
        t = self.cfg.train
        started, tokens_at_start = time.perf_counter(), self.state.tokens_seen
        bar = tqdm(total=t.max_steps, initial=self.state.step, desc="train", unit="step",
                   disable=None if self.progress else True, dynamic_ncols=True)
        train_log = TrainLog(self.metrics, t.log_interval, t.max_steps, self.flops_per_token,
                             self.peak_flops)
        train_loss = val_loss = None
        stopped = "max_steps"
        while self.state.step < t.max_steps:
            if self.group.any(self._stop_signal is not None):  # a signal to one rank stops all
                self._stop_signal = self._stop_signal or "SIGTERM"
                stopped = "interrupted"
                break
            step = self.state.step
            self.model.report_metrics = train_log.due(step + 1)  # descriptive aux: logged only
            try:
                result = self._guarded_step(step)
            finally:
                self.model.report_metrics = True
            bar.n = self.state.step
            if result is None:  # retried, skipped or rolled back: self.state.step is next
                continue
            train_loss, grad_norm, aux = result
            train_log.count(self._advance(step))
            bar.update(1)
            completed = self.state.step
            if self.continual.sleep_due(completed):
                self._sleep(completed)
            if t.empty_cache_interval and completed % t.empty_cache_interval == 0:
                maybe_empty_cuda_cache("periodic", log=self.log)
            if train_log.due(completed):
                row = train_log.write(completed, train_loss, self.opt.param_groups[0]["lr"],
                                      grad_norm, self.state.tokens_seen, memory_mb(self.device),
                                      aux)
                bar.set_postfix(progress_fields(row) | self._sanity_field())
            warned = self._watch(step, train_loss, grad_norm, aux)
            evaluated = None
            if self.evaluation.due(completed):
                evaluated = val_loss = self._evaluate_and_log(train_log, train_loss)
                if evaluated is not None and self.sanity is not None:
                    warned += self._said(self.sanity.after_eval(completed, evaluated))
            if self.snapshots is not None and self.snapshots.due(completed):
                self.snapshots.take(self.model, completed)
            if warned and t.strict_sanity:
                stopped = "sanity"
                self.log(f"stopping at step {completed} (train.strict_sanity); the run is saved")
                break
            early_stop = evaluated is not None and self._plateau_says_stop(evaluated)
            if self.checkpointer.due(completed) or early_stop:
                self._checkpoint(evaluated)
            if early_stop:
                stopped = "early_stop"
                self.log(f"early stop: no val improvement in {t.early_stop_patience} evaluations")
                break
        saved = self.group.broadcast_json(self.checkpointer.saved(self.state.step))
        if stopped == "interrupted" or not saved:
            self._checkpoint(None)  # also when the last step was skipped as non-finite
        if stopped == "interrupted":
            self.log(f"stopped at step {self.state.step}; continue with --resume")
        bar.close()
        summary = self.sanity.summary() if self.sanity is not None else []
        if summary:
            self.log(f"sanity: {len(summary)} warning(s) in this run:")
            for line in summary:
                self.log(f"  {line}")
        st, seconds = self.state, time.perf_counter() - started
        return TrainResult(
            self.run_dir, st.step, stopped, train_loss, val_loss, st.best_val_loss,
            st.nonfinite_skipped, st.rollbacks, st.micro_split, seconds,
            (st.tokens_seen - tokens_at_start) / max(seconds, 1e-9),
            self._stop_signal if stopped == "interrupted" else None, summary,
            self.precision.name,
        )

    def _document_streams(self, features: TokenFeatures, part: tuple[int, int]
                          ) -> DocumentStreams:
        """The batches of ``train.memory_stream``; settings it cannot honour are one line."""
        cfg, t = self.cfg, self.cfg.train
        if not self.model.wants_memory_floor:
            raise ConfigError(f"train.memory_stream trains a model's own episodic memory; model "
                              f"{cfg.model.name!r} has none that reads by document (hippocampal "
                              "with model.memory=true)")
        if cfg.data.curriculum:
            raise ConfigError("train.memory_stream reads consecutive windows of one block size: "
                              "drop data.curriculum")
        return DocumentStreams(self.data.split("train"), t.batch_size, self.block, t.seed,
                               features=features, part=part,
                               eot_id=self.data.tokenizer.eot_id)

    def _watch(self, step: int, loss: float, grad_norm: float, aux: dict[str, float]
               ) -> list[SanityWarning]:
        """The sanity monitor's look at step ``step`` (just done): the LR the step set for each
        parameter group (schedule, fault scale, the model's own scale) against what the optimizer
        holds, the loss, the norm, the aux."""
        if self.sanity is None:
            return []
        groups = self.opt.param_groups
        return self._said(self.sanity.after_step(
            step + 1, loss, grad_norm, [g["base_lr"] * self._lr_applied for g in groups],
            [g["lr"] for g in groups], aux))

    def _said(self, warnings: list[SanityWarning]) -> list[SanityWarning]:
        """Each new warning on stderr (above the progress bar) and in metrics.jsonl."""
        for w in warnings:
            self.log(w.line())
            self.metrics.write({"step": w.step, "event": "sanity", "check": w.check,
                                "message": w.message})
        return warnings

    def _sanity_field(self) -> dict[str, str]:
        """The progress bar's count of sanity warnings so far, when there are any."""
        n = len(self.sanity.warnings) if self.sanity is not None else 0
        return {"sanity": f"{n} warning(s)"} if n else {}

    def _advance(self, step: int) -> int:
        """Count ``step`` done; returns its tokens."""
        t = self.cfg.train
        tokens = t.batch_size * t.grad_accum * self.train_batches.block_size(step)
        self.state.step, self.state.tokens_seen = step + 1, self.state.tokens_seen + tokens
        return tokens

    def _evaluate_and_log(self, train_log: TrainLog, train_loss: float) -> float | None:
        """The val loss now, logged; None without a val split."""
        val_loss = self.evaluate()
        if val_loss is None:
            return None
        step = self.state.step
        row = train_log.write_eval(step, val_loss, self.data.split("val").bytes_per_token)
        self.log(f"step {step}: train {train_loss:.4f}  val {val_loss:.4f}  "
                 f"({row['val_bpb']:.3f} bits/byte)")
        return val_loss

    def _plateau_says_stop(self, val_loss: float) -> bool:
        """Feed an evaluation to the plateau schedule and early stopping, when either is on."""
        t = self.cfg.train
        if t.schedule == "plateau" or t.early_stop_patience:
            return self.plateau.observe(val_loss)
        return False

    def _sleep(self, step: int) -> None:
        """A sleep phase after ``step``, logged as its own row (``phase: sleep``)."""
        def main_step() -> None:
            self.opt.set_lr_factor(lr_factor(self.cfg.train, step, self.plateau)
                                   * self.state.fault_lr_scale * self.cfg.continual.sleep_lr_scale)
            self.opt.step(None)

        lr = self.cfg.train.lr * lr_factor(self.cfg.train, step, self.plateau)
        row = self.continual.sleep(step, lr, main_step, self._switches(step))
        self.metrics.write({"step": step, "phase": "sleep", **row})

    def _checkpoint(self, val_loss: float | None) -> None:
        """Save now, with the state only the trainer holds (plateau, loss scale); the last
        step's checkpoint carries this run's Fisher (``continual.ewc``)."""
        st = self.state
        if st.step >= self.cfg.train.max_steps:
            self.continual.consolidate(st.step, self._switches(st.step))
        st.plateau = self.plateau.state()
        st.grad_scaler = self.scaler.state_dict() if self.scaler is not None else {}
        self.model.flush_memory()  # every rank: a flush gathers all ranks' queued memories
        shards = None
        if self.cfg.train.checkpoint_format == "sharded":  # every rank writes its shards
            shards = sharded.stage(self.run_dir, st.step, self.group, self.model, self.opt)
            model, opt_states = ((self.model, shards.plain) if self.group.main
                                 else (None, None))
        else:
            model, opt_states = self.parallel.full_state(self.model, self.opt)
        if model is not None and opt_states is not None:  # rank 0
            with distributed.local_memories(model):
                self.checkpointer.save(model, self.data.tokenizer, self.cfg, st, opt_states,
                                       val_loss, extra=self.continual.save, shards=shards)
        else:  # the others follow rank 0's best val loss
            improved = val_loss is not None and (st.best_val_loss is None
                                                 or val_loss < st.best_val_loss)
            st.best_val_loss = val_loss if improved else st.best_val_loss
        self.group.barrier()  # nobody reads the run's checkpoints while rank 0 writes them
