"""What every benchmark figure is recorded with: the code's commit, the CPU kind, torch, threads,
and whether the process keeps the memory it frees (aura/allocator.py).

CPUs of one machine class differ (AVX-512 with native bf16, with or without AMX tiles, or AVX2
only, where bf16 is emulated and 13-27x slower), so a figure without its CPU cannot be
compared. The commit is the one of the ``aura`` package actually imported, so a run against
another checkout names that checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import aura
from aura import cpu
from aura.allocator import keep_freed_memory, keeps_freed_memory

# Every benchmark measures Aura as its entry points run it (`aura ...`, the Trainer): keeping
# freed memory is process-wide, so systems compared inside one process all run with it.
keep_freed_memory()


def _commit() -> str:
    where = Path(aura.__file__).parent
    try:
        sha = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


# What makes this machine compute as an AVX2-only CPU. Each library takes its own cap: ATen's
# kernels, oneDNN (bf16 products), MKL, whose fp32 products otherwise stay on AVX-512 (1.6-1.7x
# faster than its AVX2 path on the Xeon of docs/BENCHMARKS.md), and numba (the `jit` extra),
# which compiles for the host's CPU name and features unless given both.
AVX2_RESTRICTION = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                    "MKL_ENABLE_INSTRUCTIONS": "AVX2", "NUMBA_CPU_NAME": "haswell",
                    "NUMBA_CPU_FEATURES": "+avx2"}


def restriction_missing() -> list[str]:
    """The variables an AVX2 run (``ATEN_CPU_CAPABILITY=avx2``) lacks to be AVX2 throughout."""
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() != "avx2":
        return []
    return [f"{k}={v}" for k, v in AVX2_RESTRICTION.items()
            if os.environ.get(k, "").lower() != v.lower()]


def machine() -> dict[str, Any]:
    """The facts a figure needs next to it (a JSON object). A partial AVX2 restriction is named
    in the record and on stderr: its fp32 figures would be an AVX-512 machine's."""
    restricted = {k: os.environ[k] for k in AVX2_RESTRICTION if k in os.environ}
    missing = restriction_missing()
    if missing:
        print(f"machine: AVX2 restriction incomplete, add {' '.join(missing)}", file=sys.stderr)
    return {"commit": _commit(), "cpu": _cpu_model(),
            "cpu_capability": cpu.capability(), "native_bf16": cpu.native_bf16(),
            "amx": cpu.amx(), "keeps_freed_memory": keeps_freed_memory(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            **({"restricted_by": restricted} if restricted else {}),
            **({"restriction_missing": missing} if missing else {})}
