"""Exact held-out evaluation: every token scored once, independent of batching, in nats."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aura.config import ModelConfig
from aura.data.shards import PreparedData
from aura.data.tokenizers import ByteTokenizer
from aura.errors import AuraError, DataError
from aura.eval.perplexity import evaluate_prepared, evaluate_text, evaluate_tokens
from aura.models.base import AuraModel, build_model
from conftest import prepared_bytes

V = 256
BLOCK = 16


def tiny_gpt(seed: int = 0, dropout: float = 0.0, vocab: int = V) -> AuraModel:
    """A random GPT with weights far from init, so its predictions differ position to position."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32,
                      dropout=dropout)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture(scope="module")
def model() -> AuraModel:
    return tiny_gpt()


def stream(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, size=n).astype(np.uint16)


def naive_nll(model: AuraModel, tokens: np.ndarray, bs: int) -> float:
    """Token j is predicted from its window's prefix tokens[start:j], one forward per token."""
    t = torch.from_numpy(tokens.astype(np.int64))
    total = 0.0
    with torch.no_grad():
        for j in range(1, len(t)):
            start = (j - 1) // bs * bs
            logits = model(t[start:j][None]).logits[0, -1].double()
            total -= F.log_softmax(logits, -1)[t[j]].item()
    return total / (len(t) - 1)


@pytest.mark.parametrize(("n", "bs"), [(50, BLOCK), (50, 5), (17, BLOCK), (2, BLOCK)])
def test_matches_per_position_reference(model: AuraModel, n: int, bs: int) -> None:
    tokens = stream(n)  # 50 tokens: 49 targets, so the last window has one target (ragged)
    res = evaluate_tokens(model, tokens, n_bytes=n, block_size=bs if bs != BLOCK else None)
    assert res.n_tokens == n - 1
    assert res.loss == pytest.approx(naive_nll(model, tokens, bs), abs=1e-5)
    assert res.ppl == pytest.approx(math.exp(res.loss))


def test_stream_within_context_equals_model_loss(model: AuraModel) -> None:
    t = torch.from_numpy(stream(BLOCK + 1, seed=3).astype(np.int64))[None]
    model.eval()
    with torch.no_grad():
        ref = model(t[:, :-1], t[:, 1:]).loss.item()
    assert evaluate_tokens(model, t[0], n_bytes=1).loss == pytest.approx(ref, abs=1e-5)


def test_batch_size_does_not_change_the_result(model: AuraModel) -> None:
    tokens = torch.from_numpy(stream(203, seed=2).astype(np.int64))
    results = [evaluate_tokens(model, tokens, 203, batch_size=b).loss for b in (1, 3, 8, 100)]
    assert max(results) - min(results) < 1e-6


def test_max_tokens_evaluates_the_prefix(model: AuraModel) -> None:
    tokens = stream(120, seed=4)
    head = evaluate_tokens(model, tokens, 240, max_tokens=37)
    ref = evaluate_tokens(model, tokens[:37], 74)
    assert head.n_tokens == 36
    assert head.to_dict() == ref.to_dict()
    assert head.n_bytes == 72  # 2 bytes per token, pro-rated to the 36 scored tokens


def test_byte_tokenizer_bits_per_byte_is_loss_over_ln2(model: AuraModel) -> None:
    text = "Héllo, wörld: the river stone garden in winter. " * 3
    res = evaluate_text(model, ByteTokenizer(), text)
    assert res.n_tokens == len(text.encode("utf-8")) - 1
    assert res.n_bytes == res.n_tokens
    assert res.bits_per_byte == pytest.approx(res.loss / math.log(2), rel=1e-12)
    assert set(res.to_dict()) == {"loss", "ppl", "bits_per_byte", "n_tokens", "n_bytes", "metrics"}


def test_untrained_model_is_near_uniform() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32)
    res = evaluate_tokens(build_model(cfg), stream(300, seed=5), 300)
    assert abs(res.loss - math.log(V)) < 0.3


def test_runs_in_eval_mode_and_restores_the_mode() -> None:
    model = tiny_gpt(dropout=0.5)
    tokens = stream(60, seed=6)
    model.train()
    a = evaluate_tokens(model, tokens, 60)
    assert model.training
    model.eval()
    b = evaluate_tokens(model, tokens, 60)
    assert not model.training
    assert a.loss == b.loss == pytest.approx(naive_nll(model, tokens, BLOCK), abs=1e-5)


def test_progress_bar_goes_to_stderr(model: AuraModel, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    evaluate_tokens(model, stream(40), 40, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "eval" in err
    evaluate_tokens(model, stream(40), 40)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("text", ["", "x"])
def test_too_short_text_is_a_data_error(model: AuraModel, text: str) -> None:
    with pytest.raises(DataError, match="nothing to evaluate") as exc:
        evaluate_text(model, ByteTokenizer(), text)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("kw", [{"block_size": BLOCK + 1}, {"block_size": 0}, {"batch_size": 0}])
def test_bad_options_are_input_errors(model: AuraModel, kw: dict[str, int]) -> None:
    with pytest.raises(AuraError):
        evaluate_tokens(model, stream(40), 40, **kw)


def test_tokenizer_larger_than_the_model_vocab_is_a_data_error() -> None:
    with pytest.raises(DataError, match="256 tokens but the model only 64"):
        evaluate_text(tiny_gpt(vocab=64), ByteTokenizer(), "some text")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    """Byte tokens in 1024-token shards, so the val split spans several shards."""
    return prepared_bytes(tmp_path_factory.mktemp("eval"), 28, seed=8, shard_tokens=1024,
                          val_fraction=0.3)


def test_prepared_split_is_one_stream_across_shards(model: AuraModel, data: PreparedData) -> None:
    val = data.split("val")
    assert len(val.shards) >= 3
    res = evaluate_prepared(model, data, batch_size=16)
    ref = evaluate_tokens(model, val.tokens(), val.n_text_bytes, batch_size=5)
    assert res.n_tokens == ref.n_tokens == val.n_tokens - 1
    assert res.loss == pytest.approx(ref.loss, abs=1e-6)
    assert res.bits_per_byte == pytest.approx(ref.bits_per_byte, rel=1e-6)
    assert res.n_bytes == round(val.bytes_per_token * res.n_tokens)


def test_prepared_max_tokens_crosses_a_shard_boundary(model: AuraModel,
                                                      data: PreparedData) -> None:
    n = data.split("val").shards[0].n_tokens + 50
    res = evaluate_prepared(model, data, "val", max_tokens=n)
    ref = evaluate_tokens(model, data.split("val").tokens()[:n], n)
    assert res.n_tokens == n - 1
    assert res.loss == pytest.approx(ref.loss, abs=1e-6)


def test_missing_split_is_a_data_error(model: AuraModel, data: PreparedData) -> None:
    with pytest.raises(DataError):
        evaluate_prepared(model, data, "test")
