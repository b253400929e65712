"""The model registry and the `gpt` baseline: tying, init, causality, KV cache, checkpointing."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aura.config import ModelConfig, load_config
from aura.data.prosody import token_features
from aura.data.sampler import compute_features
from aura.data.tokenizers import ByteTokenizer
from aura.errors import ConfigError
from aura.models import AuraModel, build_model, model_names
from aura.models.gpt import GPT
from aura.nn.attention import KVCache
from conftest import assert_causal

V, BLOCK = 50, 24


def gpt(seed: int = 0, **kw: object) -> AuraModel:
    torch.manual_seed(seed)
    cfg = {"vocab_size": V, "block_size": BLOCK, "n_layer": 2, "n_head": 2, "n_embd": 32, **kw}
    return build_model(ModelConfig(**cfg))  # type: ignore[arg-type]


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- registry -------------------------------------------------------------------------------


def test_registry_builds_gpt() -> None:
    assert "gpt" in model_names()
    model = gpt()
    assert isinstance(model, GPT) and isinstance(model, AuraModel)
    assert model.max_context == BLOCK
    assert model.config.vocab_size == V


def test_unknown_model_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'transformer-xl'.*gpt"):
        build_model(ModelConfig(name="transformer-xl", vocab_size=V))


def test_missing_vocab_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="vocab_size"):
        build_model(ModelConfig())


# --- parameters -----------------------------------------------------------------------------


def test_head_is_tied_to_the_embedding() -> None:
    model = gpt()
    assert model.lm_head.weight is model.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # counted and optimised once


def test_init_std() -> None:
    """N(0, 0.02) everywhere, residual projections 0.02 / sqrt(2 * n_layer), zero biases."""
    n_layer = 4
    model = gpt(vocab_size=512, block_size=128, n_layer=n_layer, n_head=4, n_embd=128, bias=True)
    residual = 0.02 / math.sqrt(2 * n_layer)
    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):
            assert p.std().item() == pytest.approx(residual, rel=0.05), name
        elif name.endswith(("wte.weight", "wpe.weight", "qkv.weight", "fc.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
            assert abs(p.mean().item()) < 0.002, name
        elif "ln" in name:
            expected = 1.0 if name.endswith("weight") else 0.0
            assert torch.all(p == expected), name
        else:
            assert name.endswith("bias"), name
            assert torch.all(p == 0), name


def test_num_params() -> None:
    C, L = 32, 2
    model = gpt()
    per_block = 2 * C + 3 * C * C + C * C + 4 * C * C + 4 * C * C  # 2 LayerNorms (no bias)
    expected = V * C + BLOCK * C + L * per_block + C
    assert model.num_params() == expected
    assert model.num_params(non_embedding=True) == expected - V * C - BLOCK * C
    with_bias = gpt(bias=True)
    assert with_bias.num_params() == sum(p.numel() for p in with_bias.parameters())
    assert with_bias.num_params() > expected


# --- forward --------------------------------------------------------------------------------


def test_forward_shapes_and_loss() -> None:
    model = gpt().eval()
    x, y = tokens(3, 10), tokens(3, 10, seed=2)
    out = model(x, y)
    assert out.logits.shape == (3, 10, V)
    ref = F.cross_entropy(out.logits.reshape(-1, V), y.reshape(-1))
    assert out.loss is not None and torch.allclose(out.loss, ref)
    assert set(out.aux) == {"ce"}
    assert out.loss.item() == pytest.approx(math.log(V), abs=0.2)  # near-uniform at init
    assert model(x).loss is None
    assert model(x, last_only=True).logits.shape == (3, 1, V)
    assert torch.allclose(model(x, last_only=True).logits[:, 0], out.logits[:, -1], atol=1e-6)
    smoothed = model(x, y, label_smoothing=0.1).loss
    ref_smoothed = F.cross_entropy(out.logits.reshape(-1, V), y.reshape(-1), label_smoothing=0.1)
    assert torch.allclose(smoothed, ref_smoothed)
    ignored = y.clone()
    ignored[:, :5] = -1
    part = F.cross_entropy(out.logits[:, 5:].reshape(-1, V), y[:, 5:].reshape(-1))
    assert torch.allclose(model(x, ignored).loss, part, atol=1e-6)


MODELS = {"gpt": [], "bdh": ["model.mlp_multiplier=4"],
          "hippocampal": ["model.n_place_cells=40", "model.memory_capacity=32",
                          "model.memory_dim=8", "model.memory_writes=4"],
          "snn_rag": ["model.memory_capacity=32", "model.memory_chunk=4"]}


def registered(name: str) -> AuraModel:
    cfg = load_config(overrides=[f"model.name={name}", f"model.vocab_size={V}",
                                 f"model.block_size={BLOCK}", "model.n_layer=2",
                                 "model.n_head=2", "model.n_embd=32", *MODELS[name]])
    return build_model(cfg.model)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_an_unknown_forward_keyword_is_an_error_not_a_silent_no_op(name: str) -> None:
    model = registered(name)
    x = tokens(2, 8)
    feats = compute_features(token_features(model.token_features, ByteTokenizer()), x)
    model(x, **feats)  # what it declares is accepted
    with pytest.raises(TypeError, match="use_memroy"):
        model(x, use_memroy=False, **feats)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_declared_input_is_a_forward_keyword(name: str) -> None:
    """Callers pass what a model declares and nothing else, so each declaration must name a
    keyword its forward takes."""
    model = registered(name)
    params = inspect.signature(model.forward).parameters
    assert set(model.token_features) <= set(params)
    assert ("use_memory" in params) == model.has_memory_switch
    if model.wants_corpus_pos or model.writes_own_memory:
        assert "corpus_pos" in params
    if model.writes_own_memory:
        assert "remember" in params


def test_too_long_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="exceeds block_size"):
        gpt()(tokens(1, BLOCK + 1))


@pytest.mark.parametrize("t", [0, 7, BLOCK - 2])
def test_causality(t: int) -> None:
    """Changing token t+1 leaves every logit at positions <= t unchanged."""
    a, b = assert_causal(gpt().eval(), tokens(2, BLOCK), t, V)
    assert not torch.allclose(a[:, t + 1], b[:, t + 1], atol=1e-4)


# --- KV cache -------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 1, 3, 2], [4, 4, 4], [12]])
def test_cached_decoding_matches_the_full_forward(chunks: list[int]) -> None:
    model = gpt().eval()
    x = tokens(2, sum(chunks))
    full = model(x).logits
    cache = model.new_cache(batch_size=2, max_len=BLOCK)
    assert isinstance(cache, KVCache)
    start, pieces = 0, []
    for n in chunks:
        pieces.append(model(x[:, start:start + n], cache=cache).logits)
        start += n
        assert cache.pos == start
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)
    # last_only with a cache: the newest position only
    cache.reset()
    model(x[:, :-1], cache=cache)
    last = model(x[:, -1:], cache=cache, last_only=True).logits
    assert torch.allclose(last[:, 0], full[:, -1], atol=1e-5)


def test_cache_is_bounded_by_block_size() -> None:
    model = gpt().eval()
    cache = model.new_cache(batch_size=1, max_len=1000)
    assert cache.max_len == BLOCK
    model(tokens(1, BLOCK), cache=cache)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(tokens(1, 1), cache=cache)


def test_two_caches_do_not_interfere() -> None:
    model = gpt().eval()
    a, b = tokens(1, 6, seed=3), tokens(1, 6, seed=4)
    ca, cb = model.new_cache(1, BLOCK), model.new_cache(1, BLOCK)
    model(a[:, :5], cache=ca)
    model(b[:, :5], cache=cb)
    la = model(a[:, 5:], cache=ca).logits[:, -1]
    assert torch.allclose(la, model(a).logits[:, -1], atol=1e-5)


# --- gradient checkpointing -----------------------------------------------------------------


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(dropout: float) -> None:
    """Recomputing blocks in backward changes memory, not results (dropout masks included:
    the recomputation replays the RNG state)."""
    x, y = tokens(2, 16), tokens(2, 16, seed=5)
    results = []
    for flag in (False, True):
        model = gpt(dropout=dropout).train()
        model.grad_checkpoint = flag
        torch.manual_seed(123)
        loss = model(x, y).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6), name


def test_grad_checkpointing_is_off_in_eval_and_with_a_cache(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    import aura.models.decoder as gpt_module

    calls: list[int] = []

    def spy(fn: nn.Module, *args: object, **kw: object) -> torch.Tensor:
        calls.append(1)
        return fn(*args)

    monkeypatch.setattr(gpt_module, "checkpoint", spy)
    model = gpt()
    model.grad_checkpoint = True
    model.train()(tokens(1, 8))
    assert len(calls) == 2  # one per block
    model.eval()(tokens(1, 8))
    model.train()(tokens(1, 4), cache=model.new_cache(1, BLOCK))
    assert len(calls) == 2


def test_dropout_is_active_in_train_mode_only() -> None:
    model = gpt(dropout=0.5)
    x = tokens(1, 8)
    model.train()
    assert not torch.equal(model(x).logits, model(x).logits)
    model.eval()
    assert torch.equal(model(x).logits, model(x).logits)
