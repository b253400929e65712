"""Data parallelism on PyTorch's own engine: a process group from torchrun's environment, DDP or
FSDP2 (``fully_shard`` per block over a 1-D device mesh), and the few collectives the trainer
needs so that every rank takes the same decisions while rank 0 alone writes.

The contract (docs/architecture.md, "Data parallelism"):

- The global micro-batch is ``train.batch_size`` rows whatever the world size: every rank draws
  the same window offsets and keeps its own ``batch_size / world`` rows (``BatchSampler(part=)``),
  so the data order, the effective batch and the loss curve do not depend on the world size, and
  a checkpoint resumes on any world size that divides the batch.
- Losses and logged metrics are all-reduced means; gradients are averaged by DDP / FSDP2, so a
  step equals the single-process step up to float summation order (dropout aside: each rank
  draws its own masks).
- Rank 0 alone creates, locks and writes the run directory (checkpoints, metrics, config);
  every rank reads the checkpoint rank 0 chose. Checkpoints are consolidated (the same
  safetensors + JSON a single process writes), so any command reads them.
- Episodic memories (state outside the parameters): every rank keeps a full copy, and each
  flush writes the union of all ranks' queued memories in rank order, so the copies stay
  identical and hold what one process would have written (see ``gather_queue``).

Outside torchrun (no ``WORLD_SIZE`` or 1) everything here is a no-op.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from aura.errors import AuraError, ConfigError
from aura.memory.writer import _Queued
from aura.models import AuraModel, build_model
from aura.train.device import Precision, pick_device


class FollowerError(AuraError):
    """Rank 0 refused the run (its message is printed by rank 0): the other ranks stop too."""

    said_elsewhere = True


class RankLost(AuraError):
    """A collective failed: another rank of the job died or became unreachable."""


def quiet(_message: str) -> None:
    """The log of ranks other than 0: one voice per job (errors still raise on every rank)."""


class _NoLock:
    """What ranks other than 0 hold instead of the run's lock (rank 0 holds it for the job)."""

    def release(self) -> None:
        pass


class _NoMetrics:
    """What ranks other than 0 write metrics to: nothing (rank 0 writes the job's rows)."""

    def write(self, _row: dict[str, Any]) -> None:
        pass

    def rewind(self, _step: int) -> None:
        pass

    def close(self) -> None:
        pass


NO_LOCK, NO_METRICS = _NoLock(), _NoMetrics()


def env_rank() -> int:
    """This process's rank under torchrun (0 outside it), readable before any group exists."""
    return int(os.environ.get("RANK", "0"))


def env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_world() -> int:
    """Ranks of the job on this host (torchrun's LOCAL_WORLD_SIZE; 1 outside torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


@dataclass
class Group:
    """This process's place in the job and the collectives the trainer uses; with ``world == 1``
    each is the identity."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this object initialised the process group and destroys it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def _tensor(self, values: list[float]) -> torch.Tensor:
        # gloo reduces CPU tensors, nccl CUDA ones; the group has both backends on a GPU
        return torch.tensor(values, dtype=torch.float64, device=self.device)

    def mean(self, values: list[float]) -> list[float]:
        """The mean over ranks of each value."""
        if self.world == 1 or not values:
            return values
        t = self._tensor(values)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def max(self, value: int) -> int:
        """The largest ``value`` of any rank."""
        if self.world == 1:
            return value
        t = self._tensor([float(value)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank."""
        if self.world == 1:
            return flag
        t = self._tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast_json(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (JSON data) on every rank. Bytes of JSON, never pickle (which
        ``broadcast_object_list`` would use)."""
        if self.world == 1:
            return obj
        data = json.dumps(obj).encode() if self.main else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        dist.broadcast(size, 0)
        buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device) if self.main
               else torch.empty(int(size.item()), dtype=torch.uint8, device=self.device))
        dist.broadcast(buf, 0)
        return json.loads(bytes(buf.cpu().tolist()).decode()) if not self.main else obj

    def share(self, decide: Callable[[], Any]) -> Any:
        """Rank 0 runs ``decide`` (which may write) and every rank gets its JSON result; an
        exception on rank 0 stops the others with ``FollowerError``."""
        if self.world == 1:
            return decide()
        if self.main:
            try:
                result = decide()
            except Exception as exc:  # the others must not wait for an answer that never comes
                self.broadcast_json({"error": str(exc) if isinstance(exc, AuraError)
                                     else f"rank 0 failed: {type(exc).__name__}: {exc}"})
                raise
            return self.broadcast_json({"ok": result})["ok"]
        got = self.broadcast_json(None)
        if "error" in got:
            raise FollowerError(got["error"])
        return got["ok"]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self, together: bool = False) -> None:
        """Destroy the group this process made. ``together`` (a run that ended normally on
        every rank): meet at a barrier first, so no rank tears its gloo connections down while
        another still has traffic in flight on them (a rank then aborted at exit, "terminate
        called without an active exception", in ~1 of 6 FSDP2 runs with sharded checkpoints)."""
        if self.owns_group and dist.is_initialized():
            if together and self.world > 1:
                dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False


def init(device_name: str) -> Group:
    """The group of this process, from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK);
    under torchrun a CUDA device is ``cuda:LOCAL_RANK`` and the backend nccl (gloo for CPU
    tensors), on CPU gloo."""
    world = env_world()
    device = pick_device(device_name)
    if world == 1:
        return Group(device=device)
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed: run without torchrun")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "mps":
        raise ConfigError("data parallelism runs on CUDA (nccl) or CPU (gloo), not MPS")
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return Group(dist.get_rank(), dist.get_world_size(), local, device, owns)


def check_batch(group: Group, batch_size: int) -> None:
    """The global micro-batch must split into equal per-rank shares."""
    if batch_size % group.world:
        raise ConfigError(f"train.batch_size {batch_size} (the global micro-batch) does not "
                          f"split over {group.world} ranks; use a multiple of {group.world}")


# --- episodic memories --------------------------------------------------------------------------


def _all_rows(group: Group, t: torch.Tensor, n_max: int) -> list[torch.Tensor]:
    """Every rank's (n_i, ...) ``t``, padded to ``n_max`` rows for the all-gather, then cut."""
    counts = torch.zeros(group.world, dtype=torch.int64, device=group.device)
    counts[group.rank] = t.size(0)
    dist.all_reduce(counts)
    padded = torch.zeros((n_max, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.size(0)] = t
    parts = [torch.empty_like(padded) for _ in range(group.world)]
    dist.all_gather(parts, padded)
    return [p[: int(n)] for p, n in zip(parts, counts.tolist(), strict=True)]


def gather_queue(group: Group, queued: _Queued | None) -> _Queued | None:
    """The union of every rank's queued memories in rank order (rows of the global batch in
    order). A queue with importance is its forward's most important states (the hippocampus's
    top-k by novelty): the union keeps the most important, as many as one rank queued, which
    is the top-k of the whole batch, i.e. what one process would have queued. Each memory's
    source token ids (what ``--show-memory`` prints) travel with it."""
    # rows, key dim, value dim, has importance, has source_pos, source_tokens width (0: none)
    shape = [0, 0, 0, 0, 0, 0]
    if queued is not None:
        shape = [queued.keys.numel() // queued.keys.size(-1), queued.keys.size(-1),
                 queued.values.size(-1), int(queued.importance is not None),
                 int(queued.source_pos is not None),
                 0 if queued.source_tokens is None else queued.source_tokens.size(-1)]
    dims = torch.zeros((group.world, 6), dtype=torch.int64, device=group.device)
    dims[group.rank] = torch.tensor(shape, device=group.device)
    dist.all_reduce(dims)
    rows, dk, dv, has_imp, has_pos, width = dims.max(0).values.tolist()
    if rows == 0:
        return None
    device = group.device

    def part(t: torch.Tensor | None, width: int | None, dtype: torch.dtype) -> torch.Tensor:
        if t is None:
            return torch.zeros((0, width) if width else (0,), dtype=dtype, device=device)
        return t.reshape(-1, width).to(device, dtype) if width else t.reshape(-1).to(device, dtype)

    q = queued
    keys = torch.cat(_all_rows(group, part(q and q.keys, dk, torch.float32), rows))
    values = torch.cat(_all_rows(group, part(q and q.values, dv, torch.float32), rows))
    importance = (torch.cat(_all_rows(group, part(q and q.importance, None, torch.float32),
                                      rows)) if has_imp else None)
    source_pos = (torch.cat(_all_rows(group, part(q and q.source_pos, None, torch.int64),
                                      rows)) if has_pos else None)
    source_tokens = None
    if width:
        mine = q and q.source_tokens
        if q is not None and mine is None:  # this rank kept none: its rows have no text
            mine = torch.full((*q.keys.shape[:-1], width), -1, dtype=torch.int64)
        source_tokens = torch.cat(_all_rows(group, part(mine, width, torch.int64), rows))
    if importance is not None and importance.numel() > rows:
        importance, top = importance.topk(rows)
        keys, values = keys[top], values[top]
        source_pos = None if source_pos is None else source_pos[top]
        source_tokens = None if source_tokens is None else source_tokens[top]
    return _Queued(keys, values, importance, source_pos, source_tokens)


def share_memories(group: Group, model: AuraModel) -> None:
    """From now on each flush of the model's memories writes every rank's queue (a collective,
    so every rank's model must flush at the same points: each forward, and before a save)."""
    if group.world == 1:
        return
    for writer in model.writers.values():
        writer.gather = functools.partial(gather_queue, group)


@contextlib.contextmanager
def local_memories(model: AuraModel) -> Iterator[None]:
    """Flushes by this rank alone (rank 0 saving stores every rank has just flushed)."""
    saved = {name: w.gather for name, w in model.writers.items()}
    for w in model.writers.values():
        w.gather = None
    try:
        yield
    finally:
        for name, w in model.writers.items():
            w.gather = saved[name]


# --- wrapping -----------------------------------------------------------------------------------


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP2 shards one by one: the members of the model's top-level ModuleLists
    (a decoder's blocks); a model without any (BDH shares one layer's weights) is one unit."""
    return [m for child in model.children() if isinstance(child, nn.ModuleList) for m in child]


def _checkpointed(module: nn.Module) -> None:
    """Activation checkpointing applied from outside: the module's forward recomputes in
    backward (non-reentrant, so FSDP2's hooks see the recompute)."""
    forward = module.forward

    def run(*args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = run  # type: ignore[method-assign]


class Parallel:
    """How the model is replicated (``ddp``) or sharded (``fsdp``) and how its full state is
    taken and restored; with one process a plain pass-through."""

    def __init__(self, group: Group, kind: str):
        self.group, self.kind = group, kind if group.world > 1 else "none"

    def wrap(self, model: AuraModel, precision: Precision, grad_checkpoint: bool) -> nn.Module:
        """The module to call for training forwards (``model`` itself stays the AuraModel)."""
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.group.device.index] if self.group.device.type == "cuda" else None
            # a switch (use_memory) leaves some parameters unused in some steps
            return DistributedDataParallel(model, device_ids=ids,
                                           find_unused_parameters=model.has_memory_switch)
        if self.kind == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            if precision.name == "fp16":
                raise ConfigError("train.parallel=fsdp runs in bf16 or fp32 (fp16's loss "
                                  "scaling is not sharded here); set train.precision=bf16")
            mesh = init_device_mesh(self.group.device.type, (self.group.world,))
            policy = MixedPrecisionPolicy(param_dtype=precision.dtype,
                                          reduce_dtype=torch.float32)
            units = shard_units(model)
            if grad_checkpoint:  # composed here, around each unit, not by the model
                model.grad_checkpoint = False
                for unit in units or [model]:
                    _checkpointed(unit)
            for unit in units:
                fully_shard(unit, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
        return model

    def sync_gradients(self, forward: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Within a step, gradients are exchanged only after the last micro-batch."""
        if self.kind == "ddp" and not last:
            return forward.no_sync()  # type: ignore[operator]
        if self.kind == "fsdp":
            forward.set_requires_gradient_sync(last)  # type: ignore[operator]
        return contextlib.nullcontext()

    @staticmethod
    def local(value: torch.Tensor) -> torch.Tensor:
        """A plain tensor of a possibly distributed one (FSDP2's gradient norm)."""
        return value.full_tensor() if hasattr(value, "full_tensor") else value

    # --- full state, for consolidated checkpoints ---------------------------------------------

    def io_model(self, model: AuraModel) -> AuraModel:
        """A model whose weights are read and written as a whole: ``model`` itself unless
        sharded; then an unsharded CPU twin (allocated, not initialised) sharing its memories."""
        if self.kind != "fsdp":
            return model
        with torch.device("meta"):
            twin = build_model(model.config)
        shared: dict[int, list[str]] = {}  # tied weights (a head tied to the embedding)
        for name, p in twin.named_parameters(remove_duplicate=False):
            shared.setdefault(id(p), []).append(name)
        twin.writers = {}
        twin.to_empty(device="cpu")
        for first, *others in (names for names in shared.values() if len(names) > 1):
            for name in others:  # to_empty allocates each name anew: tie them again
                owner, _, leaf = name.rpartition(".")
                setattr(twin.get_submodule(owner), leaf, twin.get_parameter(first))
        twin.writers = model.writers
        return twin

    def full_state(self, model: AuraModel, optimizers: Any
                   ) -> tuple[AuraModel | None, list[dict[str, Any]] | None]:
        """The model to save and the optimizer states as a single process holds them (int
        keys in parameter order); on rank 0 only (None elsewhere). Collective under fsdp."""
        if self.kind != "fsdp":
            return (model, optimizers.state_dict()) if self.group.main else (None, None)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=options)
        states = [_index_keyed(get_optimizer_state_dict(model, opt, options=options))
                  for opt in optimizers.optimizers]
        if not self.group.main:
            return None, None
        twin = self.io_model(model)
        twin.load_state_dict(weights)
        return twin, states

    def load_full(self, model: AuraModel, twin: AuraModel, optimizers: Any,
                  states: list[dict[str, Any]]) -> None:
        """Restore what ``full_state`` saved: ``twin`` holds the loaded weights (``io_model``)."""
        if self.kind != "fsdp":
            optimizers.load_state_dict(states)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, twin.state_dict(), options=options)
        for opt, state in zip(optimizers.optimizers, states, strict=True):
            set_optimizer_state_dict(model, opt, _name_keyed(opt, state, model),
                                     options=options)


def _index_keyed(state: dict[str, Any]) -> dict[str, Any]:
    """A full optimizer state keyed by parameter names -> torch's own layout (param ids in
    group order), the layout single-process checkpoints hold."""
    ids: dict[str, int] = {}
    groups = []
    for group in state.get("param_groups", []):
        names = group["params"]
        ids.update({name: len(ids) + i for i, name in enumerate(names)})
        groups.append({**group, "params": [ids[n] for n in names]})
    return {"state": {ids[name]: s for name, s in state.get("state", {}).items()},
            "param_groups": groups}


def _name_keyed(opt: torch.optim.Optimizer, state: dict[str, Any], model: nn.Module
                ) -> dict[str, Any]:
    """The inverse of ``_index_keyed`` for ``opt``'s parameters of ``model``."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in opt.param_groups for p in group["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {order[int(i)]: s for i, s in state["state"].items()},
            "param_groups": groups}


def collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because a peer went away."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        word in text for word in ("Connection closed by peer", "Connection reset", "gloo",
                                  "NCCL", "Broken pipe"))
