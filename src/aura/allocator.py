"""Host memory: keep what PyTorch frees for its next tensors instead of handing it back.

glibc serves every allocation above its mmap threshold (128 KiB, rising with use to at most
32 MiB) with a fresh mapping that it unmaps on free, and gives the free top of its heap back to
the kernel. A training step frees and allocates the same large buffers every step (a BPE model's
logits, a spiking layer's (T, B, N) states), so each step faulted them in again page by page:
132-142k page faults a step at `cpu-small` with a 4096-token vocabulary, 15% of the step, and half
of a LIF layer's time at T 32 B 256 N 2048 (docs/BENCHMARKS.md). PyTorch's CPU launcher
(`torch.backends.xeon.run_cpu`) answers the same by preloading jemalloc; glibc's ``mallopt``
does it inside the process, with nothing to install. The cost: the process's resident memory
stays at its peak, and the heap, fragmented by PyTorch's aligned blocks for its first steps, can
raise that peak (within 5% for the CPU presets, +33-38% for a large LIF layer alone).
``AURA_KEEP_FREED_MEMORY=0`` leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_NEVER = 2**31 - 1  # mallopt takes a C int
# some glibc versions refuse a threshold above 32 MiB (half their HEAP_MAX_SIZE): buffers larger
# than that are then still mapped afresh
_MMAP_THRESHOLDS = (1 << 30, 32 << 20)
_OFF = ("0", "false", "no", "off")

_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in this process (once; later calls only answer). Returns
    whether it does: False off Linux, on another C library (musl's ``mallopt`` does nothing),
    or when ``AURA_KEEP_FREED_MEMORY`` is 0."""
    global _kept
    if _kept is None:
        _kept = _apply()
    return _kept


def keeps_freed_memory() -> bool:
    """Whether :func:`keep_freed_memory` took effect in this process (benchmarks record it)."""
    return bool(_kept)


def _apply() -> bool:
    if os.environ.get("AURA_KEEP_FREED_MEMORY", "1").strip().lower() in _OFF:
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
    except (OSError, AttributeError):
        return False
    if not mallopt(_M_TRIM_THRESHOLD, _NEVER):
        return False
    return any(mallopt(_M_MMAP_THRESHOLD, t) for t in _MMAP_THRESHOLDS)
