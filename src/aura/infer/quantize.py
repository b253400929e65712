"""``--quantize int8``: dynamic int8 quantisation of a model's Linear layers for CPU inference.

Weights are stored as int8 (per-tensor scale) and activations quantised on the fly per batch
(torch's ``quantize_dynamic``, the measured fastest CPU option in torch 2.x); embeddings,
norms, attention and memory stores stay in fp32. torch has deprecated its quantised tensors, so
the call is guarded: a torch without it gives one line saying so, not a traceback.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import nn

from aura.errors import AuraError
from aura.models.base import AuraModel

Quantize = Literal["none", "int8"]


def quantize(model: AuraModel, mode: Quantize) -> AuraModel:
    """``model`` with its Linear layers quantised as ``mode`` says (in place; "none": as is)."""
    if mode == "none":
        return model
    if mode != "int8":
        raise AuraError(f"--quantize must be none or int8, got {mode!r}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type != "cpu":
        raise AuraError(f"--quantize int8 runs on the CPU only (the model is on {device}): "
                        "add --device cpu")
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:
        raise AuraError(f"--quantize int8 needs torch.ao.quantization.quantize_dynamic, which "
                        f"torch {torch.__version__} does not have: run without --quantize"
                        ) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notice of quantised tensors
        try:
            quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
        except (RuntimeError, NotImplementedError) as exc:
            raise AuraError(f"--quantize int8 failed on this torch/CPU: {exc}") from None
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as held in memory: int8 for quantised Linear layers."""
    total = 0
    for module in model.modules():
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(module, "weight") and callable(module.weight):
            w = module.weight()
            total += w.numel() * w.element_size()
            bias = module.bias()
            total += 0 if bias is None else bias.numel() * bias.element_size()
    seen = set()
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total
