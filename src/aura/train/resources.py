"""How much memory a training run needs, estimated from its config before anything is built, and
how much this process may use: a run that cannot fit is refused in one line instead of dying in
the allocator with a traceback minutes later (and leaving a stub run directory).

The estimate (``estimate_training_memory``) adds up the peak of a training step:

- weights and gradients: 4 bytes per parameter each (weights stay fp32 under autocast), 2 with
  ``train.weights=bf16``. The parameter count is exact: the model is built on the ``meta``
  device, which gives every tensor its shape and allocates nothing, so each registered model is
  counted by its own code;
- optimizer state, in the weights' dtype (``aura.train.optim.optimizer_state_bytes``): AdamW's
  two moments per parameter; with ``train.optimizer=muon`` one momentum for the matrices Muon
  trains (``muon_matrices``) and two moments for the rest; with ``adafactor`` a row and a
  column per matrix;
- buffers: the model's buffers and its episodic memory stores;
- activations of one micro-batch (``train.batch_size`` sequences of the longest training
  length): what the model declares its autograd graph keeps (``AuraModel.activation_bytes``,
  which knows the precision and ``train.grad_checkpoint``), plus autocast's half-precision
  copies of the weight matrices (none when the weights are bf16 already), plus the loss's
  vocabulary-wide tensors in backward (the kept logits and two fp32 gradients of the
  log-softmax);
- the checkpoint copy: safetensors copies a file's tensors into memory before writing them, so
  saving the optimizer state briefly needs that much again. Gradients and activations are gone
  by then, so the total counts the larger of the two;
- continual learning's state (``continual.hook.state_bytes``): EWC's anchor and Fishers, the
  replay buffer, a distilling sleep phase's teacher;
- ``OVERHEAD``: what the trainer loads after the check (TensorBoard's libraries, ~85 MB
  measured) and allocator slack.

Real runs' peaks (RSS growth from before the trainer is built, glibc told to return freed
blocks) measured 0.98-1.13 times this total (tests/test_resources.py).

Available memory is the smallest of /proc/meminfo's MemAvailable, the cgroup (v2 or v1) limit
minus the working set (usage less inactive page cache, which the kernel reclaims) at each level
of this process's cgroup, and RLIMIT_AS / RLIMIT_DATA minus what the process already maps; on
CUDA, the device's free memory (and the host must still hold the model, which is built there).
The run is refused when the estimate exceeds it; ``train.memory_check=false`` skips the check.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from aura.config import AuraConfig
from aura.continual.hook import state_bytes
from aura.errors import AuraError
from aura.models import AuraModel, build_model
from aura.train.device import pick_device, pick_precision
from aura.train.optim import muon_matrices, optimizer_state_bytes, weight_dtypes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OVERHEAD = 96 * 2**20
# Per cgroup version: its mount under /sys/fs/cgroup, the (limit, usage) files, and the
# memory.stat keys of the inactive page cache. v1 writes "no limit" as the largest page-aligned
# signed 64-bit number, v2 as "max".
_CGROUP_V2 = ("", ("memory.max", "memory.current"), ("inactive_file",))
_CGROUP_V1 = ("memory", ("memory.limit_in_bytes", "memory.usage_in_bytes"),
              ("total_inactive_file", "inactive_file"))
_V1_UNLIMITED = 2**60


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training run needs at its peak, by part (see the module docstring)."""

    params: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    buffer_bytes: int
    activation_bytes: int
    """One micro-batch's, with autocast's weight copies and the loss's gradients."""
    checkpoint_bytes: int
    """The in-memory copy safetensors makes of the larger checkpoint file."""
    batch: int
    """Sequences in the micro-batch the activations are for."""
    seq: int
    """Tokens per sequence (the longest the run trains on)."""
    precision: str
    overhead_bytes: int = OVERHEAD
    """What the trainer loads after the check, and allocator slack."""
    continual_bytes: int = 0
    """EWC's anchor and Fishers, the replay buffer, a sleep teacher (``continual.*``)."""

    @property
    def model_bytes(self) -> int:
        """What the built model holds: weights and buffers (memory stores included)."""
        return self.param_bytes + self.buffer_bytes

    @property
    def total(self) -> int:
        """The peak: weights, buffers and optimizer state throughout, plus the larger of a
        step's gradients and activations and a checkpoint's copy, plus the overhead."""
        step = self.grad_bytes + self.activation_bytes
        return (self.model_bytes + self.optimizer_bytes + max(step, self.checkpoint_bytes)
                + self.overhead_bytes + self.continual_bytes)

    def describe(self) -> str:
        """One line: the total and its parts."""
        return (f"{format_bytes(self.total)} ({self.params:,} parameters: weights "
                f"{format_bytes(self.param_bytes)}, gradients {format_bytes(self.grad_bytes)}, "
                f"optimizer state {format_bytes(self.optimizer_bytes)}; activations "
                f"{format_bytes(self.activation_bytes)} for a micro-batch of {self.batch} x "
                f"{self.seq} tokens in {self.precision})")


def format_bytes(n: int) -> str:
    """``n`` bytes in binary units, to three significant figures or so."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def meta_model(config: AuraConfig) -> AuraModel:
    """``config``'s model built on the meta device: every shape, no memory, no init cost."""
    with torch.device("meta"):
        model = build_model(config.model)
    model.grad_checkpoint = config.train.grad_checkpoint
    return model


def training_seq_len(config: AuraConfig) -> int:
    """The longest sequence the run trains on (a curriculum may go past train.block_size)."""
    base = config.train.block_size or config.model.block_size
    return max([base, *(block for _, block in config.data.curriculum)])


def estimate_training_memory(config: AuraConfig, precision: str | None = None,
                             device_type: str | None = None) -> MemoryEstimate:
    """Peak bytes a training step of ``config`` needs on its device, from the config alone.

    ``precision`` ("fp32", "bf16" or "fp16") and ``device_type`` ("cpu", "cuda", ...) default to
    what the trainer picks for ``config.train``; ``model.vocab_size`` must be set (the trainer
    takes it from the data)."""
    t = config.train
    if device_type is None:
        device_type = pick_device(t.device).type
    if precision is None:
        precision = pick_precision(t.precision, torch.device(device_type),
                                   width=config.model.n_embd).name
    dtype = DTYPES[precision]
    model = meta_model(config)
    params = list(model.parameters())
    trained = [p for p in params if p.requires_grad]
    dtypes = weight_dtypes(model, t.weights)  # the meta model is fp32; the trainer casts
    size = {id(p): dtypes.get(id(p), p.dtype).itemsize for p in params}
    param_bytes = sum(p.numel() * size[id(p)] for p in params)
    grad_bytes = sum(p.numel() * size[id(p)] for p in trained)
    muon = {id(p) for p in muon_matrices(model)} if t.optimizer == "muon" else set()
    optimizer_bytes = sum(optimizer_state_bytes(tuple(p.shape), t.optimizer, size[id(p)],
                                                id(p) in muon) for p in trained)
    stores = sum(writer.store.nbytes() for writer in model.writers.values())
    buffer_bytes = sum(b.nbytes for b in model.buffers()) + stores
    seq = training_seq_len(config)
    tokens = t.batch_size * seq
    activations = model.activation_bytes(t.batch_size, seq, dtype, device_type)
    # autocast keeps a half copy of each fp32 weight matrix for backward
    activations += sum(p.numel() for p in params if p.dim() >= 2 and size[id(p)] > dtype.itemsize
                       ) * dtype.itemsize
    vocab = config.model.vocab_size or 0
    activations += tokens * vocab * (dtype.itemsize + 2 * 4)  # logits, log-softmax gradients
    return MemoryEstimate(
        params=sum(p.numel() for p in params), param_bytes=param_bytes, grad_bytes=grad_bytes,
        optimizer_bytes=optimizer_bytes, buffer_bytes=buffer_bytes,
        activation_bytes=activations, checkpoint_bytes=max(optimizer_bytes, param_bytes + stores),
        batch=t.batch_size, seq=seq, precision=precision,
        continual_bytes=state_bytes(config.continual, grad_bytes, param_bytes + buffer_bytes,
                                    seq))


# --- what this process may use ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Available:
    """Bytes this process may still allocate, and what limits it (for the message)."""

    bytes: int
    source: str


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def _fields(text: str | None) -> dict[str, int]:
    """``key value [kB]`` lines (meminfo, status, memory.stat) as bytes by key."""
    out = {}
    for line in (text or "").splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1]) * (1024 if parts[2:3] == ["kB"] else 1)
    return out


def _cgroup_dirs(base: Path, path: str) -> list[tuple[str, Path]]:
    """(cgroup, directory) of cgroup ``path`` and of each of its ancestors up to the root: a
    parent's limit applies too."""
    parts = [p for p in path.strip().split("/") if p and p != ".."]
    return [("/" + "/".join(parts[:i]), base.joinpath(*parts[:i]))
            for i in range(len(parts), -1, -1)]


def _cgroup_limits(root: Path) -> list[Available]:
    """What each cgroup level this process is in (v2, and v1's memory controller) leaves:
    the limit minus the working set (usage less the inactive page cache, which the kernel
    would reclaim before failing an allocation)."""
    found = []
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            mount, files, inactive = _CGROUP_V2
        elif "memory" in controllers.split(","):
            mount, files, inactive = _CGROUP_V1
        else:
            continue
        base = root / "sys/fs/cgroup" / mount
        for cgroup, d in _cgroup_dirs(base, path):
            limit, usage = _int(_read(d / files[0])), _int(_read(d / files[1]))
            if limit is None or usage is None or limit >= _V1_UNLIMITED:
                continue  # "max", missing, or v1's "unlimited"
            stat = _fields(_read(d / "memory.stat"))
            cache = next((stat[k] for k in inactive if k in stat), 0)
            found.append(Available(max(0, limit - max(0, usage - cache)),
                                   f"memory limit {format_bytes(limit)} of cgroup {cgroup}"))
    return found


def _rlimits() -> dict[str, int]:
    """This process's finite soft RLIMIT_AS / RLIMIT_DATA, by name."""
    try:
        import resource
    except ImportError:  # not a Unix
        return {}
    out = {}
    for name in ("RLIMIT_AS", "RLIMIT_DATA"):
        soft, _ = resource.getrlimit(getattr(resource, name))
        if soft != resource.RLIM_INFINITY:
            out[name] = soft
    return out


def host_memory(root: Path = Path("/"), rlimits: Mapping[str, int] | None = None
                ) -> Available | None:
    """The least of what /proc/meminfo, this process's cgroups and its rlimits leave for it to
    allocate on the host; None where none of them can be read (not Linux, no rlimit).
    ``root`` and ``rlimits`` (RLIMIT_AS / RLIMIT_DATA soft limits, by name; default: this
    process's) are for tests, which hand it a fake filesystem."""
    found = []
    meminfo = _fields(_read(root / "proc/meminfo"))
    if "MemAvailable" in meminfo:
        found.append(Available(meminfo["MemAvailable"], "MemAvailable in /proc/meminfo"))
    found += _cgroup_limits(root)
    status = _fields(_read(root / "proc/self/status"))
    limits = _rlimits() if rlimits is None else rlimits
    for name, used in (("RLIMIT_AS", "VmSize"), ("RLIMIT_DATA", "VmData")):
        if name in limits:
            left = max(0, limits[name] - status.get(used, 0))
            found.append(Available(left, f"{name} {format_bytes(limits[name])}"))
    return min(found, key=lambda a: a.bytes, default=None)


def cuda_memory(device: torch.device,
                mem_get_info: Callable[[torch.device], tuple[int, int]] | None = None
                ) -> Available:
    """Free memory on a CUDA device (``mem_get_info``: torch's, or a test's stand-in)."""
    free, _total = (mem_get_info or torch.cuda.mem_get_info)(device)
    return Available(free, f"free on {device}")


# --- the check ---------------------------------------------------------------------------------


def _advice(estimate: MemoryEstimate, config: AuraConfig, available: int) -> str:
    """What to change, most effective first: activations shrink with the micro-batch and
    checkpointing, everything else only with the model."""
    fixed = dataclasses.replace(estimate, activation_bytes=0).total
    model = "a smaller model (model.n_embd, model.n_layer)"
    if fixed > available:
        return (f"the weights, gradients and optimizer state alone need "
                f"{format_bytes(fixed)}: use {model}")
    steps = ["a smaller train.batch_size (a larger train.grad_accum keeps the effective batch)"]
    if not config.train.grad_checkpoint:
        steps.append("train.grad_checkpoint=true")
    return f"use {', '.join(steps)} or {model}"


def check_training_memory(config: AuraConfig, device: torch.device, precision: str
                          ) -> MemoryEstimate:
    """The estimate for ``config`` on ``device``; an ``AuraError`` (one line: the estimate, the
    memory available and what to change) when it cannot fit there."""
    estimate = estimate_training_memory(config, precision, device.type)
    skip = "train.memory_check=false skips this check"
    if device.type == "cuda":
        host = host_memory()  # the model is built on the host, then moved
        if host is not None and estimate.model_bytes > host.bytes:
            raise AuraError(
                f"the model needs {format_bytes(estimate.model_bytes)} of host memory to be "
                f"built but {format_bytes(host.bytes)} is available ({host.source}); use a "
                f"smaller model (model.n_embd, model.n_layer); {skip}")
        available: Available | None = cuda_memory(device)
    else:
        available = host_memory()
    if available is not None and estimate.total > available.bytes:
        raise AuraError(
            f"training needs an estimated {estimate.describe()} but "
            f"{format_bytes(available.bytes)} is available ({available.source}); "
            f"{_advice(estimate, config, available.bytes)}; {skip}")
    return estimate


def check_ranks_memory(config: AuraConfig, device: torch.device, precision: str, world: int,
                       local: int) -> int:
    """``check_training_memory`` for a job of ``world`` ranks, ``local`` of them on this host;
    the bytes the host's ranks need. Each rank holds its ``batch_size / world`` rows'
    activations and, under FSDP2, a ``1/world`` share of weights, gradients and optimizer
    state. On CPU the host's ranks share its memory, and rank 0 also holds a consolidated
    checkpoint's full copy while saving (a sharded save: its own share); on CUDA each rank
    needs its GPU's free memory, and the host one built model per rank."""
    if world <= 1:
        return check_training_memory(config, device, precision).total
    train = dataclasses.replace(config.train, batch_size=max(1, config.train.batch_size // world))
    est = estimate_training_memory(dataclasses.replace(config, train=train), precision,
                                   device.type)
    share = world if config.train.parallel == "fsdp" else 1
    rank = dataclasses.replace(est, param_bytes=est.param_bytes // share,
                               grad_bytes=est.grad_bytes // share,
                               optimizer_bytes=est.optimizer_bytes // share, checkpoint_bytes=0)
    skip = "train.memory_check=false skips this check"

    def fewer(per_rank: int) -> str:
        fsdp = ("" if config.train.parallel == "fsdp"
                else "train.parallel=fsdp (shards the state over the ranks), ")
        return (f"use fewer ranks per host, {fsdp}or "
                f"{_advice(rank, config, per_rank).removeprefix('use ')}")

    if device.type == "cuda":
        host = host_memory()
        if host is not None and est.model_bytes * local > host.bytes:
            raise AuraError(
                f"{local} ranks on this host build one model each, "
                f"{format_bytes(est.model_bytes * local)} of host memory, but "
                f"{format_bytes(host.bytes)} is available ({host.source}); "
                f"{fewer(host.bytes // local)}; {skip}")
        available: Available | None = cuda_memory(device)
        need = rank.total
    else:
        ckpt = (est.checkpoint_bytes if config.train.checkpoint_format == "consolidated"
                else est.checkpoint_bytes // world)
        need = rank.total * (local - 1) + dataclasses.replace(rank, checkpoint_bytes=ckpt).total
        available = host_memory()
    if available is not None and need > available.bytes:
        where = "its GPU" if device.type == "cuda" else f"the {local} ranks on this host"
        raise AuraError(
            f"each of {world} ranks needs an estimated {rank.describe()}; {where} need "
            f"{format_bytes(need)} but {format_bytes(available.bytes)} is available "
            f"({available.source}); "
            f"{fewer(available.bytes // (1 if device.type == 'cuda' else local))}; {skip}")
    return need
