"""GPU sizing: what a preset needs per GPU (``aura config show --estimate``), which preset fits
the device at hand (``--preset auto``), where a run lives on Colab, and the micro-batch split
a GPU's free memory calls for at the start of a run.

The GPU presets (``l4-24gb``, ``a100-40gb``, ``a100-80gb`` in presets.yaml) follow seed 001's
table: about 0.5-1B, 1-3B and 3-7B parameters. Their peak is estimated by
``aura.train.resources.estimate_training_memory`` (exact parameter count from a meta-device
model, AdamW state, one micro-batch's activations in bf16 with gradient checkpointing); under
FSDP2 the parameters, gradients and optimizer state are divided over the ranks.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from aura.config import AuraConfig
from aura.train.resources import MemoryEstimate, estimate_training_memory, format_bytes

ASSUMED_VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 64; the data sets the real one
GiB = 2**30
# (least device memory in GiB, preset): the largest that fits wins. Device memory as reported is
# a little under the marketing figure (an "80 GB" A100 reports 79.2 GiB, an L4 22.0 GiB).
CUDA_PRESETS = ((70, "a100-80gb"), (36, "a100-40gb"), (20, "l4-24gb"), (3.5, "gpu-4gb"))
COLAB_DRIVE = Path("/content/drive/MyDrive")


@dataclasses.dataclass(frozen=True)
class GpuEstimate:
    """A config's parameters and estimated peak memory per GPU at ``world`` ranks."""

    params: int
    vocab: int
    vocab_assumed: bool
    world: int
    sharded: bool
    peak_bytes: int
    parts: MemoryEstimate

    def as_dict(self) -> dict[str, Any]:
        return {"params": self.params, "vocab_size": self.vocab,
                "vocab_assumed": self.vocab_assumed, "world_size": self.world,
                "sharded": self.sharded, "peak_gpu_bytes": self.peak_bytes,
                "peak_gpu": format_bytes(self.peak_bytes),
                "bytes": {"weights": self.parts.param_bytes, "gradients": self.parts.grad_bytes,
                          "optimizer": self.parts.optimizer_bytes,
                          "buffers": self.parts.buffer_bytes,
                          "activations": self.parts.activation_bytes,
                          "overhead": self.parts.overhead_bytes}}


def estimate_gpu(cfg: AuraConfig, world: int = 1) -> GpuEstimate:
    """Parameters and peak GPU memory per rank of ``cfg`` on CUDA (its precision, bf16 when
    auto). Without a vocabulary (the data sets it) ``ASSUMED_VOCAB`` is used, and said."""
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model))
    assumed = cfg.model.vocab_size is None
    if assumed:
        cfg.model.vocab_size = ASSUMED_VOCAB
    precision = "bf16" if cfg.train.precision == "auto" else cfg.train.precision
    parts = estimate_training_memory(cfg, precision=precision, device_type="cuda")
    return per_gpu(parts, cfg.model.vocab_size, assumed, world, cfg.train.parallel == "fsdp")


def per_gpu(parts: MemoryEstimate, vocab: int, assumed: bool, world: int, fsdp: bool
            ) -> GpuEstimate:
    """The peak on each of ``world`` GPUs: FSDP2 divides weights, gradients and optimizer
    state over them, DDP does not; each holds its buffers and one micro-batch's activations
    (the checkpoint's copy is made on the host, not the GPU)."""
    sharded = fsdp and world > 1
    state = (parts.param_bytes + parts.grad_bytes + parts.optimizer_bytes) // (
        world if sharded else 1)
    peak = state + parts.buffer_bytes + parts.activation_bytes + parts.overhead_bytes
    return GpuEstimate(parts.params, vocab, assumed, world, sharded, peak, parts)


def describe(est: GpuEstimate) -> str:
    """Lines for ``aura config show --estimate``."""
    vocab = (f"vocab {est.vocab:,} assumed; the data sets it" if est.vocab_assumed
             else f"vocab {est.vocab:,}")
    p = est.parts
    where = (f"per GPU of {est.world} (FSDP2: weights, gradients and optimizer state sharded)"
             if est.sharded else "on one GPU" if est.world == 1
             else f"per GPU of {est.world} (DDP: each holds everything)")
    return (f"parameters: {est.params:,} ({est.params / 1e9:.2f}B; {vocab})\n"
            f"estimated peak GPU memory {where}: {format_bytes(est.peak_bytes)} "
            f"(weights {format_bytes(p.param_bytes)}, gradients {format_bytes(p.grad_bytes)}, "
            f"optimizer {format_bytes(p.optimizer_bytes)} before sharding; activations "
            f"{format_bytes(p.activation_bytes)} for {p.batch} x {p.seq} tokens in "
            f"{p.precision})\n"
            f"  weights        {format_bytes(p.param_bytes):>10}\n"
            f"  gradients      {format_bytes(p.grad_bytes):>10}\n"
            f"  optimizer      {format_bytes(p.optimizer_bytes):>10}\n"
            f"  buffers        {format_bytes(p.buffer_bytes):>10}  (memories, running state)\n"
            f"  activations    {format_bytes(p.activation_bytes):>10}  (one micro-batch, the "
            f"loss's vocabulary-wide tensors, autocast's weight copies)\n"
            f"  overhead       {format_bytes(p.overhead_bytes):>10}\n")


# --- the device at hand -------------------------------------------------------------------------


def auto_preset() -> str:
    """The preset for this machine: by the first CUDA device's memory, else Apple's MPS
    (``m1-8gb``), else the CPU (``cpu-small``)."""
    if torch.cuda.is_available():
        gib = torch.cuda.get_device_properties(0).total_memory / GiB
        for least, name in CUDA_PRESETS:
            if gib >= least:
                return name
        return "demo"
    if torch.backends.mps.is_available():
        return "m1-8gb"
    return "cpu-small"


def in_colab() -> bool:
    """Whether this is a Google Colab runtime (its kernel module, or the variables it sets)."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ or (
        "COLAB_GPU" in os.environ)


def colab_run_dir(out: Path, drive: Path = COLAB_DRIVE) -> Path:
    """Where a run named ``out`` lives on Colab: a relative ``out`` goes under the mounted Drive
    (``MyDrive/aura/OUT``), which outlives a disconnected session, so ``--resume`` after
    reconnecting finds its checkpoints; anything else stays as given."""
    if out.is_absolute() or not in_colab() or not drive.is_dir():
        return out
    return drive / "aura" / out


# --- the micro-batch a GPU's free memory allows ----------------------------------------------


def initial_split(rows: int, need: Callable[[int], int], free: int, headroom: float = 0.9
                  ) -> int:
    """The fewest chunks (a power of two, at most ``rows``) a micro-batch of ``rows``
    sequences must run in for ``need(rows per chunk)`` bytes to fit in ``headroom`` of
    ``free``; ``rows`` when even one row does not (the OOM split stays the backstop)."""
    split = 1
    while split < rows and need(-(-rows // split)) > headroom * free:
        split *= 2
    return min(split, rows)


def probe_split(cfg: AuraConfig, device: torch.device, precision: str, world: int = 1) -> int:
    """The split of each rank's micro-batch (``train.batch_size / world`` rows) the free memory
    of ``device`` calls for now, with the model on it but no gradient or optimizer state yet:
    those, sharded under FSDP2, plus one chunk's activations (the estimate's, per row) must
    fit. The first step is the probe that checks it: an OOM there splits further."""
    rows = cfg.train.batch_size // world
    sized = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=rows))
    parts = estimate_training_memory(sized, precision=precision, device_type=device.type)
    share = world if cfg.train.parallel == "fsdp" and world > 1 else 1
    pending = (parts.grad_bytes + parts.optimizer_bytes) // share
    per_row = parts.activation_bytes / rows
    free, _total = torch.cuda.mem_get_info(device)
    return initial_split(rows, lambda b: int(pending + per_row * b), free)
