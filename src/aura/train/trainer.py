"""The training loop: batches by step, accumulation, clipping, schedule, evaluation, checkpoints,
and recovery from the faults small-compute runs actually hit.

Precision, optimizers, schedules, checkpoints and metrics are separate pieces (see the sibling
modules); this file only composes them. A run is a pure function of (config, data, step): batches
come from the step, the LR from the step and saved scales, so `--resume` continues bit-identically.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from aura.atomic import atomic_write_text
from aura.config import AuraConfig, config_to_dict
from aura.data.prosody import token_features
from aura.data.sampler import BatchSampler, Curriculum
from aura.data.shards import PreparedData
from aura.errors import AuraError
from aura.models import AuraModel, build_model
from aura.train.checkpoint import (
    TrainState,
    latest_good,
    list_checkpoints,
    load_train_state,
    mark_best,
    prune,
    save_checkpoint,
    step_dir,
)
from aura.train.device import maybe_empty_cuda_cache, memory_mb, pick_device, pick_precision
from aura.train.metrics import MetricsLog
from aura.train.optim import build_optimizers
from aura.train.schedule import Plateau, lr_factor

CONFIG_FILE = "config.json"
MAX_ROLLBACKS = 5


def _stderr(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stopped: str  # "max_steps", "early_stop" or "interrupted"
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    nonfinite_skipped: int
    rollbacks: int
    micro_split: int
    seconds: float
    tokens_per_s: float


class _NonFinite(Exception):
    """A step whose loss or gradient norm is NaN/inf: skipped, never applied."""


class Trainer:
    def __init__(self, cfg: AuraConfig, data_dir: str | Path, run_dir: str | Path, *,
                 resume: bool = False, progress: bool = True,
                 log: Callable[[str], None] = _stderr):
        self.cfg, self.run_dir, self.log, self.progress = cfg, Path(run_dir), log, progress
        t = cfg.train
        if list_checkpoints(self.run_dir) and not resume:
            raise AuraError(f"{self.run_dir} already holds checkpoints: pass --resume to continue "
                            "it, or choose another --out")
        self.data = PreparedData.open(data_dir, verify="full")
        vocab = self.data.vocab_size
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = vocab
        elif cfg.model.vocab_size != vocab:
            raise AuraError(f"model.vocab_size is {cfg.model.vocab_size} but the data's "
                            f"tokenizer has {vocab}")
        self.device = pick_device(t.device)
        self.precision = pick_precision(t.precision, self.device)
        self.scaler = self.precision.new_scaler()
        torch.manual_seed(t.seed)
        self.model: AuraModel = build_model(cfg.model).to(self.device)
        self.model.grad_checkpoint = t.grad_checkpoint
        self.forward: Callable[..., Any] = self.model
        self._compiled = False
        if t.compile:
            try:
                self.forward, self._compiled = torch.compile(self.model), True
            except Exception as exc:  # any backend failure: eager still trains correctly
                self.log(f"warning: torch.compile unavailable ({exc}); training eagerly")
        self.opt = build_optimizers(self.model, t, self.device)
        self.block = t.block_size or cfg.model.block_size
        stages = cfg.data.curriculum
        block_fn = Curriculum(stages, self.block) if stages else self.block
        features = token_features(self.model.token_features, self.data.tokenizer)
        self.train_batches = BatchSampler(self.data.split("train"), t.batch_size, block_fn, t.seed,
                                          features=features,
                                          corpus_pos=self.model.wants_corpus_pos)
        val = self.data.splits.get("val")
        self.val_batches = (BatchSampler(val, t.batch_size, self.block, t.seed + 1,
                                         features=features)
                            if val is not None and val.n_tokens > self.block else None)
        self.plateau = Plateau(t.plateau_patience, t.early_stop_patience)
        self.state = TrainState()
        self._stop_signal: str | None = None
        resumed = self._resume() if resume else False
        if not resumed:
            self.model.on_train_start(self.data)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / CONFIG_FILE, json.dumps(config_to_dict(cfg), indent=1))
        self.metrics = MetricsLog(self.run_dir, resume_step=self.state.step if resumed else None)

    # --- state --------------------------------------------------------------------------------

    def _resume(self) -> bool:
        found = latest_good(self.run_dir, self.log)
        if found is None:
            self.log(f"note: no checkpoint in {self.run_dir} to resume from; starting afresh")
            return False
        path, meta = found
        saved, current = meta["config"]["model"], config_to_dict(self.cfg)["model"]
        changed = [f"model.{k} {saved[k]!r} -> {v!r}" for k, v in current.items()
                   if k != "dropout" and k in saved and saved[k] != v]
        if changed:  # the weights would not fit: say so in one line, not a state-dict dump
            raise AuraError(f"{path} holds a different model ({', '.join(changed)}); resume "
                            "with the run's saved config (omit --preset/--config)")
        self._load(path)
        self.log(f"resumed from {path} at step {self.state.step}")
        return True

    def _load(self, path: Path) -> None:
        self.state, opt_states = load_train_state(path, self.model)
        self.opt.load_state_dict(opt_states)
        self.plateau = Plateau(**self.state.plateau) if self.state.plateau else self.plateau

    def _rollback(self) -> None:
        """K non-finite steps in a row: back to the last good checkpoint with half the LR."""
        found = latest_good(self.run_dir, self.log)
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

    def _micro_batches(self, step: int) -> Any:
        """(x, y, features, weight) chunks of the step's batches; after an OOM each batch is
        split, so the data and the effective batch stay exactly what they were."""
        t = self.cfg.train
        split = self.state.micro_split
        for micro in range(t.grad_accum):
            x, y, feats = self.train_batches.batch(step * t.grad_accum + micro)
            chunks = {name: f.chunk(split) for name, f in feats.items()}
            for i, (xc, yc) in enumerate(zip(x.chunk(split), y.chunk(split), strict=True)):
                weight = xc.size(0) / x.size(0) / t.grad_accum
                yield (xc.to(self.device, non_blocking=True),
                       yc.to(self.device, non_blocking=True),
                       {name: c[i].to(self.device, non_blocking=True)
                        for name, c in chunks.items()}, weight)

    def _step(self, step: int) -> tuple[float, float, dict[str, float]]:
        t = self.cfg.train
        self.opt.set_lr_factor(lr_factor(t, step, self.plateau) * self.state.fault_lr_scale)
        self.model.train()
        total = torch.zeros((), device=self.device)
        aux: dict[str, torch.Tensor] = {}
        use_memory = step >= t.memory_warmup_steps
        for x, y, feats, weight in self._micro_batches(step):
            with self.precision.autocast():
                out = self.forward(x, y, label_smoothing=t.label_smoothing, use_memory=use_memory,
                                   **feats)
            loss = out.loss * weight
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
            aux = out.aux
        if self.scaler is not None:
            self.opt.unscale_(self.scaler)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip or math.inf)
        loss_value, norm_value = torch.stack([total, norm.to(total)]).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)) and self.scaler is None:
            self.opt.zero_grad()
            raise _NonFinite
        self.opt.step(self.scaler)
        if self.scaler is not None:
            self.scaler.update()
        self.opt.zero_grad()
        return loss_value, norm_value, {k: float(v) for k, v in aux.items() if k != "ce"}

    def _guarded_step(self, step: int) -> tuple[float, float, dict[str, float]] | None:
        """``_step`` with OOM recovery and the compile fallback; None: run this step again."""
        try:
            return self._step(step)
        except torch.OutOfMemoryError:
            self.opt.zero_grad()
            maybe_empty_cuda_cache("out of memory", min_free_ratio=1.0, log=self.log)
            if self.state.micro_split >= self.cfg.train.batch_size:
                raise
            self.state.micro_split *= 2
            self.log(f"warning: out of memory; each micro-batch now runs in "
                     f"{self.state.micro_split} chunks (same effective batch)")
            return None
        except _NonFinite:
            raise
        except Exception as exc:
            if not self._compiled:
                raise
            self.opt.zero_grad()
            self.forward, self._compiled = self.model, False
            self.log(f"warning: compiled model failed ({type(exc).__name__}: {exc}); "
                     "falling back to eager")
            return None

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_batches is None:
            return None
        self.model.eval()
        losses = []
        use_memory = self.state.step >= self.cfg.train.memory_warmup_steps
        for i in range(self.cfg.train.eval_iters):
            x, y, feats = self.val_batches.batch(i)
            feats = {name: f.to(self.device) for name, f in feats.items()}
            with self.precision.autocast():
                out = self.model(x.to(self.device), y.to(self.device), use_memory=use_memory,
                                 **feats)
            losses.append(out.loss.float())
        self.model.train()
        return torch.stack(losses).mean().item()

    # --- the loop -----------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signal.Signals(signum).name
        self.log(f"{self._stop_signal}: saving a checkpoint after this step, then stopping")

    def run(self) -> TrainResult:
        handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: the caller handles them
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            return self._loop()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            self.metrics.close()

    def _loop(self) -> TrainResult:
        t, st = self.cfg.train, self.state
        t0 = time.perf_counter()
        bar = tqdm(total=t.max_steps, initial=st.step, desc="train", unit="step",
                   disable=None if self.progress else True, dynamic_ncols=True)
        tokens_at_start, window_t, window_tokens = st.tokens_seen, time.perf_counter(), 0
        train_loss = val_loss = None
        consecutive_bad, stopped = 0, "max_steps"
        while st.step < t.max_steps:
            if self._stop_signal:
                stopped = "interrupted"
                break
            step = st.step
            try:
                result = self._guarded_step(step)
            except _NonFinite:
                st.nonfinite_skipped += 1
                consecutive_bad += 1
                self.log(f"warning: non-finite loss or gradient at step {step}; step skipped")
                if consecutive_bad >= t.max_nonfinite:
                    self._rollback()
                    st, consecutive_bad = self.state, 0  # the rollback loaded a new state
                else:  # its batch too: on the same weights it would fail the same way again
                    st.step = step + 1
                bar.n = st.step
                continue
            if result is None:
                continue
            consecutive_bad = 0
            train_loss, grad_norm, aux = result
            tokens = t.batch_size * t.grad_accum * self.train_batches.block_size(step)
            st.step, st.tokens_seen = step + 1, st.tokens_seen + tokens
            window_tokens += tokens
            bar.update(1)
            done = st.step == t.max_steps
            if st.step % t.log_interval == 0 or done or step == 0:
                now = time.perf_counter()
                row = {
                    "step": st.step, "loss": train_loss,
                    "ppl": math.exp(min(train_loss, 50.0)),
                    "lr": self.opt.param_groups[0]["lr"], "grad_norm": grad_norm,
                    "tokens_per_s": window_tokens / max(now - window_t, 1e-9),
                    "mem_mb": memory_mb(self.device), "tokens": st.tokens_seen,
                    **{f"aux/{k}": v for k, v in aux.items()},
                }
                self.metrics.write(row)
                bar.set_postfix(loss=f"{train_loss:.4f}", ppl=f"{row['ppl']:.2f}",
                                lr=f"{row['lr']:.2e}", gnorm=f"{grad_norm:.2f}",
                                tok_s=f"{row['tokens_per_s']:.0f}", mem=f"{row['mem_mb']:.0f}M")
                window_t, window_tokens = now, 0
            evaluated = False
            if st.step % t.eval_interval == 0 or done:
                val_loss = self.evaluate()
                evaluated = val_loss is not None
            early_stop = False
            if evaluated:
                assert val_loss is not None
                bpb = val_loss / math.log(2) / self.data.split("val").bytes_per_token
                self.metrics.write({"step": st.step, "val_loss": val_loss,
                                    "val_ppl": math.exp(min(val_loss, 50.0)), "val_bpb": bpb})
                self.log(f"step {st.step}: train {train_loss:.4f}  val {val_loss:.4f}  "
                         f"({bpb:.3f} bits/byte)")
                if t.schedule == "plateau" or t.early_stop_patience:
                    early_stop = self.plateau.observe(val_loss)
            if st.step % t.checkpoint_interval == 0 or done or early_stop:
                self._checkpoint(val_loss if evaluated else None)
            if early_stop:
                stopped = "early_stop"
                self.log(f"early stop: no val improvement in {t.early_stop_patience} evaluations")
                break
        if stopped == "interrupted" or not step_dir(self.run_dir, st.step).is_dir():
            self._checkpoint(None)  # also when the last step was skipped as non-finite
        if stopped == "interrupted":
            self.log(f"stopped at step {st.step}; continue with --resume")
        bar.close()
        seconds = time.perf_counter() - t0
        return TrainResult(
            self.run_dir, st.step, stopped, train_loss, val_loss, st.best_val_loss,
            st.nonfinite_skipped, st.rollbacks, st.micro_split, seconds,
            (st.tokens_seen - tokens_at_start) / max(seconds, 1e-9),
        )

    def _checkpoint(self, val_loss: float | None) -> None:
        """Save, mark the best by val loss, and keep the newest N plus the best (seed 003)."""
        st = self.state
        best = st.best_val_loss
        improved = val_loss is not None and (best is None or val_loss < best)
        if improved:
            st.best_val_loss = val_loss
        st.plateau = self.plateau.state()
        path = save_checkpoint(self.run_dir, self.model, self.data.tokenizer, self.cfg, st,
                               self.opt.state_dict(), val_loss)
        if improved:
            assert val_loss is not None
            mark_best(self.run_dir, st.step, val_loss)
        prune(self.run_dir, self.cfg.train.keep_checkpoints)
        self.log(f"checkpoint: {path}")
