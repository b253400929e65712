"""``--quantize int8``: dynamic int8 Linear layers for every model, guarded, through the CLI."""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest
import torch
from torch import nn

from aura.data.prosody import token_features
from aura.data.sampler import compute_features
from aura.data.tokenizers import ByteTokenizer
from aura.errors import AuraError
from aura.infer.quantize import quantize, weight_bytes
from aura.models.base import build_model
from conftest import assert_usage_error, tiny_config
from serving import tiny_run

MODELS = [("gpt",), ("hippocampal",),
          ("snn_rag", "model.memory_capacity=64", "model.memory_chunk=8")]


@pytest.mark.parametrize("overrides", MODELS, ids=lambda o: o[0])
def test_every_model_runs_quantized_and_close_to_fp32(overrides: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config(f"model.name={overrides[0]}", "model.vocab_size=64",
                                    *overrides[1:]).model).eval()
    x = torch.randint(0, 64, (2, 16))
    kw = compute_features(token_features(model.token_features, ByteTokenizer()), x)
    linears = sum(type(m) is nn.Linear for m in model.modules())
    with torch.inference_mode():
        ref = model(x, **kw).logits.float()
        fp32_bytes = weight_bytes(model)
        quantize(model, "int8", ByteTokenizer())
        out = model(x, **kw).logits.float()
    left = sum(type(m) is nn.Linear for m in model.modules())
    # all of them, but the grid cells' plane and prosody's gain layers, whose weight is read
    assert left == 0 if overrides[0] != "hippocampal" else 0 < left < linears / 2
    assert weight_bytes(model) < fp32_bytes
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 0.05


def test_bdh_has_no_linear_layers_to_quantize() -> None:
    model = build_model(tiny_config("model.name=bdh", "model.vocab_size=64").model)
    with pytest.raises(AuraError, match=r"'bdh'.*nothing to quantize"):
        quantize(model, "int8", ByteTokenizer())


def test_quantize_none_changes_nothing_and_unknown_modes_are_refused() -> None:
    model = build_model(tiny_config("model.vocab_size=64").model)
    assert quantize(model, "none", ByteTokenizer()) is model
    assert any(type(m) is nn.Linear for m in model.modules())
    with pytest.raises(AuraError, match="none or int8"):
        quantize(model, "int4", ByteTokenizer())  # type: ignore[arg-type]


def test_a_torch_without_quantize_dynamic_is_one_clear_line(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    real_import = builtins.__import__

    def no_ao(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("torch.ao.quantization"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_ao)
    model = build_model(tiny_config("model.vocab_size=64").model)
    with pytest.raises(AuraError, match=r"quantize_dynamic.*run without --quantize"):
        quantize(model, "int8", ByteTokenizer())


def test_generate_and_eval_take_quantize(run_cli: object, tmp_path: Path) -> None:
    run = tiny_run(tmp_path)
    text = tmp_path / "held-out.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    res = run_cli("generate", run, "--prompt", "Hi", "--max-new-tokens", "5", "--seed", "1",  # type: ignore
                  "--quantize", "int8", "--json")
    assert res.code == 0, res.err
    evals = {q: run_cli("eval", run, "--text", text, "--quantize", q, "--json").json()  # type: ignore
             for q in ("none", "int8")}
    assert evals["int8"]["bits_per_byte"] == pytest.approx(evals["none"]["bits_per_byte"],
                                                          rel=0.01)
    assert evals["int8"]["bits_per_byte"] != evals["none"]["bits_per_byte"]
    assert_usage_error(run_cli("generate", run, "--quantize", "int3"), "invalid choice")  # type: ignore
