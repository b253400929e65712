"""Device and mixed-precision choice, and the CUDA memory helpers.

Precision is picked by device: bf16 autocast where the hardware has it, fp16 with a GradScaler
on older GPUs; on CPU bf16 only where it is native and the model wide enough for it to pay
(benchmarks/precision_bench.py), fp32 otherwise and on MPS. On CPUs without native bf16 it is
emulated and far slower: asking for it there is said once.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from aura import cpu
from aura.errors import ConfigError

# bf16 / fp32 step time of gpt at width 128 on AVX2: 13x on an EPYC, 27x on a Xeon restricted to
# AVX2 (docs/BENCHMARKS.md)
EMULATED_BF16_SLOWDOWN = "13-27"
# Narrowest model (n_embd) whose CPU training step is reliably faster under native bf16 autocast:
# 1.72x at 256 and more above (gpt, 4 layers, B8 x T128); at 128 it was 1.40x there and 1.15x
# for the demo preset in one run but 0.95x at nanoGPT's shape in another, so 128 stays fp32.
AUTO_BF16_MIN_WIDTH = 256
# The same with AMX tiles (a Xeon): every 128-wide preset 1.0-1.25x faster under bf16 and gpt at
# nanoGPT's shape 1.15-1.22x; at 64, 0.54x (benchmarks/precision_bench.py).
AUTO_BF16_MIN_WIDTH_AMX = 128
_said: set[str] = set()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def say_once(message: str, log: Callable[[str], None] = _stderr) -> None:
    """A warning about the machine is worth one line per process, not one per model built."""
    if message not in _said:
        _said.add(message)
        log(message)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device {name!r} is not a torch device (auto, cpu, cuda, mps)"
                          ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA device is available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device is mps but MPS is not available")
    return device


@dataclass
class Precision:
    """How forward passes run: an autocast dtype (None = fp32) and whether losses are scaled."""

    name: str
    device_type: str
    dtype: torch.dtype | None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def new_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
        if self.name == "fp16" and self.device_type == "cuda":
            return torch.amp.GradScaler("cuda")
        return None


def pick_precision(name: str, device: torch.device, log: Callable[[str], None] = _stderr,
                   width: int | None = None) -> Precision:
    """``auto`` is bf16 (else fp16) on CUDA; on CPU bf16 where it is native and the model is at
    least ``AUTO_BF16_MIN_WIDTH`` wide (``AUTO_BF16_MIN_WIDTH_AMX`` with AMX; ``width`` = n_embd,
    unknown counts as narrow), else fp32.
    An explicit bf16 on a CPU without native bf16 runs, after one line saying what it costs."""
    if name == "bf16" and device.type == "cpu" and not cpu.native_bf16():
        say_once(f"warning: this CPU ({cpu.capability()}) has no native bf16: bf16 autocast is "
                 f"emulated, about {EMULATED_BF16_SLOWDOWN}x slower than fp32 (measured on AVX2 "
                 "CPUs); train.precision=fp32 (or auto) is faster here", log)
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif (device.type == "cpu" and width is not None and cpu.native_bf16()
              and width >= (AUTO_BF16_MIN_WIDTH_AMX if cpu.amx() else AUTO_BF16_MIN_WIDTH)):
            name = "bf16"
        else:
            name = "fp32"
    if name == "fp32":
        return Precision("fp32", device.type, None)
    if name == "fp16" and device.type == "cpu":
        raise ConfigError("train.precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    return Precision(name, device.type, torch.bfloat16 if name == "bf16" else torch.float16)


def maybe_empty_cuda_cache(reason: str = "", min_free_ratio: float = 0.12,
                           log: Callable[[str], None] = print) -> bool:
    """Empty the CUDA cache only when free memory is below ``min_free_ratio``.

    Emptying on every step thrashes the allocator; emptying never lets fragmentation cause OOMs.
    """
    if not torch.cuda.is_available():
        return False
    free, total = torch.cuda.mem_get_info()
    if free / total >= min_free_ratio:
        return False
    log(f"emptying the CUDA cache{f' ({reason})' if reason else ''}: free {free / total:.1%}")
    torch.cuda.empty_cache()
    return True


def memory_mb(device: torch.device) -> float:
    """Peak accelerator memory, or this process's resident memory on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.current_allocated_memory() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# Dense peak FLOP/s (no 2:4 sparsity) of the units each precision's matmuls run on, from NVIDIA's
# datasheets; fp32 without TF32, which Aura leaves off. An entry applies when all its words are
# words of torch.cuda.get_device_name(); the first that applies wins, so variants come first.
# Names not listed (and every CPU) have no peak: an MFU against a guessed peak would mislead.
PEAK_FLOPS: tuple[tuple[tuple[str, ...], dict[str, float]], ...] = (
    (("h100", "pcie"), {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    (("h100", "hbm3"), {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # SXM5
    (("h100", "sxm5"), {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    (("a100",), {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    (("l4",), {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    (("t4",), {"fp16": 65e12, "fp32": 8.1e12}),  # no bf16 units
    (("v100", "pcie"), {"fp16": 112e12, "fp32": 14e12}),
    (("v100",), {"fp16": 125e12, "fp32": 15.7e12}),  # SXM2; no bf16 units
)


def peak_flops(device_name: str, precision: str) -> float | None:
    """The peak FLOP/s of a GPU named ``device_name`` at ``precision``; None when not known."""
    words = set(re.split(r"[^a-z0-9]+", device_name.lower()))
    for needed, peaks in PEAK_FLOPS:
        if words.issuperset(needed):
            return peaks.get(precision)
    return None


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """``peak_flops`` of a CUDA device; None for any other device."""
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device), precision)
