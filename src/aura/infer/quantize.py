"""``--quantize int8``: dynamic int8 quantisation of a model's Linear layers for CPU inference.

Weights are stored as int8 (per-tensor scale) and activations quantised on the fly per batch
(torch's ``quantize_dynamic``, the measured fastest CPU option in torch 2.x); embeddings,
norms, attention, memory stores and the Linear layers whose weight other code reads (a grid
cell's plane, prosody's gains) stay in fp32. torch has deprecated its quantised tensors, so
the call is guarded: a torch without it gives one line saying so, not a traceback.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch import nn

from aura.data.prosody import token_features
from aura.data.sampler import compute_features
from aura.data.tokenizers import Tokenizer
from aura.errors import AuraError
from aura.models.base import AuraModel

Quantize = Literal["none", "int8"]


class _Watched(nn.Linear):
    """A Linear that notes when its ``weight`` is read by anything but its own forward."""

    def __getattr__(self, name: str) -> Any:
        state = self.__dict__
        if name == "weight" and not state["_in_forward"]:
            state["_watch"]["read"].add(state["_watch_name"])
        return super().__getattr__(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.__dict__["_in_forward"] = True
        self.__dict__["_watch"]["called"].add(self.__dict__["_watch_name"])
        try:
            return super().forward(x)
        finally:
            self.__dict__["_in_forward"] = False


def quantizable_linears(model: AuraModel, tokenizer: Tokenizer) -> set[str]:
    """Names of the Linear layers a forward only calls. A quantised layer's weight is packed,
    so a layer whose ``weight`` other code reads (a grid cell's plane, a dtype lookup) must stay
    as it is; a probe forward of two tokens finds which are which."""
    watch: dict[str, set[str]] = {"called": set(), "read": set()}
    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    for name, m in linears:
        m.__class__ = _Watched
        m.__dict__.update(_watch=watch, _watch_name=name, _in_forward=False)
    try:
        _probe(model, tokenizer)
    finally:
        for _, m in linears:
            m.__class__ = nn.Linear
            for key in ("_watch", "_watch_name", "_in_forward"):
                del m.__dict__[key]
    return watch["called"] - watch["read"]


def _probe(model: AuraModel, tokenizer: Tokenizer) -> None:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.zeros(1, 2, dtype=torch.long, device=device)
    feats = compute_features(token_features(model.token_features, tokenizer), x)
    with torch.inference_mode():
        model(x, **feats)


def quantize(model: AuraModel, mode: Quantize, tokenizer: Tokenizer) -> AuraModel:
    """``model`` with its Linear layers quantised as ``mode`` says (in place; "none": as is).
    ``tokenizer`` makes the token features of the probe forward (``quantizable_linears``)."""
    if mode == "none":
        return model
    if mode != "int8":
        raise AuraError(f"--quantize must be none or int8, got {mode!r}")
    names = quantizable_linears(model, tokenizer)
    if not names:
        raise AuraError(f"model {model.config.name!r} keeps its weights outside Linear layers: "
                        "--quantize int8 has nothing to quantize")
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
            quantize_dynamic(model, names, dtype=torch.qint8, inplace=True)
            _probe(model, tokenizer)
        except (RuntimeError, NotImplementedError, AttributeError) as exc:
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
