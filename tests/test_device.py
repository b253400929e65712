"""Device and precision choice (with what the CPU computes natively), and the free-memory rule
of maybe_empty_cuda_cache."""

from __future__ import annotations

import contextlib

import pytest
import torch

from aura import cpu
from aura.errors import ConfigError
from aura.nn import attention
from aura.train import device as dev


def test_auto_device_is_cpu_without_accelerators(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert dev.pick_device("auto").type == "cpu"


def test_auto_device_prefers_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.pick_device("auto").type == "cuda"


@pytest.mark.parametrize("name", ["cuda", "mps", "tpu"])
def test_unavailable_or_unknown_device_is_a_config_error(
        monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError):
        dev.pick_device(name)


def test_cpu_auto_precision_is_fp32_without_autocast() -> None:
    p = dev.pick_precision("auto", torch.device("cpu"))
    assert (p.name, p.dtype) == ("fp32", None)
    assert p.new_scaler() is None


@pytest.mark.parametrize(("bf16_ok", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_auto_precision_follows_bf16_support(monkeypatch: pytest.MonkeyPatch, bf16_ok: bool,
                                                  expected: torch.dtype) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    p = dev.pick_precision("auto", torch.device("cuda"))
    assert p.dtype == expected


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled:UserWarning")
def test_fp16_uses_a_grad_scaler_on_cuda_only() -> None:
    assert isinstance(dev.pick_precision("fp16", torch.device("cuda")).new_scaler(),
                      torch.amp.GradScaler)
    assert dev.pick_precision("bf16", torch.device("cuda")).new_scaler() is None
    with pytest.raises(ConfigError):
        dev.pick_precision("fp16", torch.device("cpu"))


def test_bf16_autocast_on_cpu_runs_matmuls_in_bf16() -> None:
    p = dev.pick_precision("bf16", torch.device("cpu"))
    with p.autocast():
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize(("free", "emptied"), [(5, True), (11, True), (12, False), (80, False)])
def test_cuda_cache_is_emptied_only_below_the_free_ratio(
        monkeypatch: pytest.MonkeyPatch, free: int, emptied: bool) -> None:
    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free, 100))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    assert dev.maybe_empty_cuda_cache("test", log=lambda _m: None) is emptied
    assert len(calls) == int(emptied)


def test_no_cuda_means_nothing_to_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.maybe_empty_cuda_cache() is False


@pytest.mark.parametrize(("native", "amx", "width", "picked"), [
    (False, False, 768, "fp32"), (False, False, None, "fp32"), (True, False, 64, "fp32"),
    (True, False, None, "fp32"), (True, False, dev.AUTO_BF16_MIN_WIDTH_AMX, "fp32"),
    (True, False, dev.AUTO_BF16_MIN_WIDTH, "bf16"), (True, False, 768, "bf16"),
    (True, True, 64, "fp32"), (True, True, None, "fp32"),
    (True, True, dev.AUTO_BF16_MIN_WIDTH_AMX, "bf16"), (True, True, 768, "bf16")])
def test_cpu_auto_precision_is_bf16_only_where_native_and_wide_enough(
        monkeypatch: pytest.MonkeyPatch, native: bool, amx: bool, width: int | None,
        picked: str) -> None:
    """With AMX tiles bf16 pays from a narrower width than with AVX512-BF16 alone."""
    monkeypatch.setattr(cpu, "native_bf16", lambda: native)
    monkeypatch.setattr(cpu, "amx", lambda: amx)
    said: list[str] = []
    assert dev.pick_precision("auto", torch.device("cpu"), said.append, width=width).name == picked
    assert said == []


def test_auto_never_picks_cpu_bf16_for_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "native_bf16", lambda: True)
    assert dev.pick_precision("auto", torch.device("mps"), width=768).name == "fp32"


def test_explicit_bf16_without_native_bf16_runs_and_is_said_exactly_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    monkeypatch.setattr(dev, "_said", set())
    said: list[str] = []
    for _ in range(3):
        assert dev.pick_precision("bf16", torch.device("cpu"), said.append).dtype == torch.bfloat16
    assert len(said) == 1
    assert "no native bf16" in said[0] and "fp32" in said[0]
    assert f"{dev.EMULATED_BF16_SLOWDOWN}x slower" in said[0]


def test_explicit_bf16_with_native_bf16_says_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "native_bf16", lambda: True)
    monkeypatch.setattr(dev, "_said", set())
    said: list[str] = []
    dev.pick_precision("bf16", torch.device("cpu"), said.append)
    dev.pick_precision("bf16", torch.device("cuda"), said.append)
    assert said == []


@pytest.mark.parametrize("native", [True, False])
def test_cpu_attention_is_written_out_with_dropout_or_native_bf16_and_short(
        monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(cpu, "native_bf16", lambda: native)
    short, long = attention.WRITTEN_OUT_MAX_LEN, attention.WRITTEN_OUT_MAX_LEN + 1
    assert attention.keeps_attention_weights("cpu", torch.bfloat16, 0.0, short) is native
    assert attention.keeps_attention_weights("cpu", torch.bfloat16, 0.0, long) is False
    assert attention.keeps_attention_weights("cpu", torch.float32, 0.0, short) is False
    assert attention.keeps_attention_weights("cpu", torch.bfloat16, 0.1, long) is True
    assert attention.keeps_attention_weights("cpu", torch.float32, 0.1, long) is True
    assert attention.keeps_attention_weights("cuda", torch.bfloat16, 0.1, short) is False


@pytest.mark.parametrize("native", [True, False])
def test_cached_cpu_bf16_attention_takes_the_math_kernel_only_native_and_short(
        monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(cpu, "native_bf16", lambda: native)
    q = torch.zeros(1, 1, attention.MATH_KERNEL_MAX_LEN, 8, dtype=torch.bfloat16)
    assert isinstance(attention._kernel_for(q), contextlib.nullcontext) is not native
    q_long = torch.zeros(1, 1, attention.MATH_KERNEL_MAX_LEN + 1, 8, dtype=torch.bfloat16)
    assert isinstance(attention._kernel_for(q_long), contextlib.nullcontext)


def test_compiled_bf16_attention_traces_without_a_graph_break() -> None:
    """The kernel choice reads the CPU probe's answer as a constant: calling the probe inside a
    compiled forward broke the graph at every attention layer (slower than eager under bf16)."""
    layer = attention.CausalSelfAttention(n_embd=16, n_head=2, dropout=0.0, bias=False, layer=0)
    x = torch.randn(1, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(layer)(x)
    assert explained.break_reasons == []
