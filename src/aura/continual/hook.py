"""The trainer's one continual-learning object: it mixes replayed windows into each
micro-batch, adds the EWC penalty's gradient, runs sleep phases, estimates the Fisher at the
end of a run, and saves and restores all of it with the run's checkpoints.

With the default config every method is a pass-through and nothing is written, so a plain run is
exactly what it was. Every random draw is keyed by (seed, step, micro-batch), so a resumed run
continues bit-identically.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from aura.config import AuraConfig, ContinualConfig
from aura.continual.episodes import BothSources, EpisodeSource, StoreEpisodes
from aura.continual.ewc import EWC, diagonal_fisher
from aura.continual.replay import ReplayBuffer, keyed_generator
from aura.continual.sleep import sleep_phase, token_losses
from aura.data.sampler import BatchSampler, compute_features
from aura.data.shards import SplitData
from aura.errors import AuraError

STATE_TENSORS, STATE_JSON = "continual.safetensors", "continual.json"
FORMAT = 1
# purposes of keyed draws, so no two share a stream
OFFER, REPLAY, SLEEP, FISHER = 1, 2, 3, 4

Forward = Callable[..., Any]


def state_bytes(c: ContinualConfig, trained_bytes: int, model_bytes: int, block: int) -> int:
    """The most memory ``c``'s state holds at once, for the trainer's memory check: with EWC
    the anchor, the Fisher and the new Fisher being estimated (fp32, like the trained weights),
    the replay buffer (int64 windows of ``block`` + 1 tokens, fp64 priorities), and with
    distillation the sleep phase's teacher (a copy of the model)."""
    total = 3 * trained_bytes if c.ewc else 0
    if c.replay_tokens > 0:
        slots = c.replay_tokens // (block + 1)
        total += slots * (block + 1) * 8 + slots * 8
    if c.sleep_interval > 0 and c.sleep_distill > 0:
        total += model_bytes
    return total


class ContinualHook:
    """Continual-learning state of one training run (``cfg.continual``)."""

    def __init__(self, cfg: AuraConfig, model: nn.Module, train_split: SplitData, block: int,
                 features: dict[str, Any], corpus_pos: bool, autocast: Callable[[], Any]):
        self.cfg, self.c, self.model = cfg, cfg.continual, model
        self.split, self.block, self.features = train_split, block, features
        self.corpus_pos, self.autocast = corpus_pos, autocast
        c = self.c
        self.ewc = EWC(c.ewc_lambda if c.ewc else 0.0, c.fisher_decay)
        self.buffer = (ReplayBuffer(c.replay_tokens, block + 1, c.replay_priority,
                                    c.replay_alpha, c.replay_beta)
                       if c.replay_tokens > 0 else None)
        self.consolidated_at: int | None = None
        self.episodes = self._store_episodes(model) if c.sleep_source != "buffer" else None
        # each store's clock when this run started: later memories were formed on its data
        self.store_since: dict[str, int] | None = None
        self._offers: list[tuple[torch.Tensor, tuple[int, ...]]] = []
        self._updates: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _store_episodes(self, model: nn.Module) -> StoreEpisodes:
        """The store side of ``continual.sleep_source``; a model with no store whose positions
        are this run's corpus positions is told in one line."""
        stores = model.memory_stores()
        if not stores or not self.corpus_pos:
            raise AuraError(f"continual.sleep_source={self.c.sleep_source}: model "
                            f"{self.cfg.model.name!r} keeps no episodic store of training text "
                            "to replay (with these settings); use continual.sleep_source=buffer")
        return StoreEpisodes(stores, self.split, self.block + 1, {})

    @property
    def enabled(self) -> bool:
        return self.c.ewc or self.buffer is not None or self.episodes is not None

    # --- a training step ---------------------------------------------------------------------

    def begin_step(self) -> None:
        """Forget what an attempt of the step that failed (OOM, non-finite) had queued; at the
        run's first step, note where its stores' clocks start."""
        self._offers, self._updates = [], []
        if self.episodes is not None and self.store_since is None:
            self.store_since = {n: s.step for n, s in self.episodes.stores.items()}
            self.episodes.since = self.store_since

    def _inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-token features the model declared, for windows not from the sampler; a
        replayed window's corpus position is unknown, so it is 0 (a memory of the corpus then
        shows it nothing)."""
        feats = compute_features(self.features, x)
        if self.corpus_pos:
            feats["corpus_pos"] = torch.zeros(x.size(0), dtype=torch.int64, device=x.device)
        return feats

    def forward(self, forward: Forward, step: int, micro: int, x: torch.Tensor, y: torch.Tensor,
                feats: dict[str, torch.Tensor], **kwargs: Any) -> tuple[Any, torch.Tensor]:
        """The micro-batch's model output and loss: with a non-empty buffer, the last
        round(replay_fraction x B) rows are replayed windows (their per-sequence losses weighted
        by importance), the rest new data; every new window is offered to the buffer."""
        buf = self.buffer
        k = 0 if buf is None or len(buf) == 0 else round(self.c.replay_fraction * x.size(0))
        k = min(k, x.size(0) - 1)
        n = x.size(0) - k
        replayed = None
        if k:
            assert buf is not None
            x, y = x[:n], y[:n]
            feats = {name: f[:n] for name, f in feats.items()}
            idx, windows, weights = buf.sample(k, keyed_generator(self.cfg.train.seed, step,
                                                                   micro, REPLAY))
            xr, yr = windows[:, :-1].to(x.device), windows[:, 1:].to(x.device)
            # Replayed windows run first and neither read nor form episodic memories: a model
            # applies queued memory writes as a forward starts, which must not change a store
            # an earlier forward of this micro-batch read (its backward needs it as it was).
            switches = {"use_memory": False} if "use_memory" in kwargs else {}
            per_seq = token_losses(forward(xr, None, **switches, **self._inputs(xr)).logits, yr)
            self._updates.append((idx, per_seq.detach()))
            replayed = (per_seq * weights.to(per_seq.device)).sum()
        out = forward(x, y, **kwargs, **feats)
        loss = out.loss if replayed is None else (out.loss * n + replayed) / (n + k)
        if buf is not None:
            self._offers.append((torch.cat([x, y[:, -1:]], 1).cpu(),
                                 (self.cfg.train.seed, step, micro, OFFER)))
        return out, loss

    def penalty_backward(self, scale: Callable[[torch.Tensor], torch.Tensor]) -> float | None:
        """Backpropagate the EWC penalty once per step; its value, or None when EWC is off."""
        if not self.ewc.active:
            return None
        penalty = self.ewc.penalty(self.model)
        scale(penalty).backward()
        return penalty.item()

    def commit(self) -> None:
        """The step was applied: its windows enter the buffer, replayed priorities update."""
        if self.buffer is not None:
            for windows, key in self._offers:
                self.buffer.offer(windows, keyed_generator(*key))
            for idx, losses in self._updates:
                self.buffer.update(idx, losses)
        self.begin_step()

    def _source(self) -> EpisodeSource | None:
        """What the next sleep phase draws from, None while it holds nothing."""
        if self.episodes is not None:
            # the last step's queued memories: the sleep's first forward would write them anyway
            self.model.flush_memory()
            self.episodes.refresh()
        source: EpisodeSource | None = {
            "buffer": self.buffer, "store": self.episodes,
            "both": None if self.episodes is None or self.buffer is None
            else BothSources(self.episodes, self.buffer)}[self.c.sleep_source]
        return source if source is not None and len(source) > 0 else None

    def sleep_due(self, step: int) -> bool:
        return (self.c.sleep_interval > 0 and step % self.c.sleep_interval == 0
                and self._source() is not None)

    def sleep(self, step: int, lr: float, optimizer_step: Callable[[], None] | None,
              switches: dict[str, bool]) -> dict[str, float]:
        """One sleep phase after ``step`` (see ``aura.continual.sleep``); the row names its
        phase by its source: ``sleep`` (buffer), ``sleep_store``, ``sleep_both``."""
        source = self._source()
        assert source is not None

        # Replayed windows sit at no known corpus position: they form no memories (a model
        # that cannot be told so has what a sleep forward queued dropped before it is written).
        if self.model.writes_own_memory or self.model.remembers_at_inference:
            switches = {**switches, "remember": False}

        def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
            for writer in model.writers.values():
                writer.discard()
            with self.autocast():
                return model(x, **switches, **self._inputs(x)).logits

        t = self.cfg.train
        kind = self.c.sleep_source
        row = sleep_phase(self.model, logits, source, steps=self.c.sleep_steps,
                          batch_size=t.batch_size, lr=lr * self.c.sleep_lr_scale,
                          distill=self.c.sleep_distill, grad_clip=t.grad_clip,
                          key=(t.seed, step, SLEEP),
                          optimizer_step=optimizer_step if self.c.sleep_optimizer == "main"
                          else None)
        for writer in self.model.writers.values():
            writer.discard()
        return {"phase": "sleep" if kind == "buffer" else f"sleep_{kind}",
                "sleep_episodes": float(len(source)), **row}

    # --- the end of a run: consolidate --------------------------------------------------------

    def _fisher_windows(self) -> Iterator[torch.Tensor]:
        t = self.cfg.train
        sampler = BatchSampler(self.split, t.batch_size, self.block, t.seed + 2)
        left, i = self.c.fisher_samples, 0
        while left > 0:
            window = torch.from_numpy(sampler.sample(i).astype("int64"))[:left]
            left, i = left - window.size(0), i + 1
            yield window.to(next(self.model.parameters()).device)

    def consolidate(self, step: int, switches: dict[str, bool]) -> None:
        """Estimate this run's Fisher at the weights now and fold it into the anchor (once)."""
        if not self.c.ewc or self.consolidated_at == step:
            return
        was_training = self.model.training
        self.model.eval()

        def logits(x: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return self.model(x, **switches, **self._inputs(x)).logits

        fisher = diagonal_fisher(self.model, logits, self._fisher_windows(), self.c.fisher,
                                 keyed_generator(self.cfg.train.seed, step, FISHER))
        self.ewc.consolidate(self.model, fisher)
        self.consolidated_at = step
        self.model.train(was_training)

    # --- checkpoints -------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Write continual.safetensors + continual.json into a checkpoint being built."""
        if not (self.enabled or self.ewc.fisher):
            return
        tensors = self.ewc.tensors()
        info: dict[str, Any] = {"format": FORMAT, "consolidated_at": self.consolidated_at,
                                "fisher": sorted(self.ewc.fisher)}
        if self.buffer is not None:
            tensors |= self.buffer.tensors()
            info["replay"] = self.buffer.state()
        if self.store_since is not None:
            info["store_since"] = self.store_since
        save_file(tensors, str(directory / STATE_TENSORS))
        (directory / STATE_JSON).write_text(json.dumps(info))

    def load(self, checkpoint: Path, *, fisher: bool = True, replay: bool = True,
             resume: bool = True) -> bool:
        """Restore what ``save`` wrote (nothing there: False). An --init-from start takes the
        Fisher and anchor and the buffer, not the consolidation mark (``resume=False``)."""
        if not (checkpoint / STATE_JSON).is_file():
            return False
        info = json.loads((checkpoint / STATE_JSON).read_text())
        tensors = load_file(str(checkpoint / STATE_TENSORS))
        if fisher:
            self.ewc.load_tensors(tensors)
        if replay and self.buffer is not None and "replay" in info:
            self.buffer.load(tensors, info["replay"])
        if resume:
            self.consolidated_at = info.get("consolidated_at")
            if self.episodes is not None and "store_since" in info:
                self.store_since = {str(k): int(v) for k, v in info["store_since"].items()}
                self.episodes.since = self.store_since
        return True
