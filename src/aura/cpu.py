"""What this CPU computes natively, where that decides how Aura runs on it.

Machines of one class differ: some have AVX-512 with native bf16 (AVX512-BF16, some with AMX
tiles too), some only AVX2, where oneDNN emulates bf16 and a bf16-autocast training step measured
13-27x slower than fp32 (docs/BENCHMARKS.md). Precision and the attention kernel are chosen from
these answers.
"""

from __future__ import annotations

import os

import torch


def _probe_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# Asked once, at import: a plain bool is a constant to torch.compile, where calling the probe
# inside a compiled forward broke the graph at every attention layer.
_NATIVE_BF16 = _probe_native_bf16()


def native_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls on bf16 hardware here (False when PyTorch is restricted
    to AVX2 by ``ONEDNN_MAX_CPU_ISA``, as the benchmarks do to measure the other kind)."""
    return _NATIVE_BF16


def amx() -> bool:
    """Whether oneDNN may run bf16 matmuls on AMX tiles here: the CPU has them, bf16 is native
    and ``ONEDNN_MAX_CPU_ISA`` (which the benchmarks set to measure other kinds) does not cap it
    below AMX. On a Xeon its bf16 matrix products ran about twice as fast as fp32's, so bf16 pays
    from width 128 there (docs/BENCHMARKS.md)."""
    try:
        tiles = bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return tiles and native_bf16() and (isa in ("ALL", "DEFAULT") or "AMX" in isa)


def capability() -> str:
    """The vector instruction set PyTorch's own kernels use: "AVX512", "AVX2", "DEFAULT"..."""
    return torch.backends.cpu.get_cpu_capability()
