"""The spiking feed-forward block and the `gpt` with ``ffn=snn``: rates, gradients, energy
counts, training, causality, the KV cache and the config switch."""

from __future__ import annotations

import pytest
import torch

from aura.config import ModelConfig, load_config
from aura.errors import ConfigError
from aura.models import AuraModel, build_model
from aura.nn.snn_ffn import SNNFeedForward
from conftest import assert_causal

V, BLOCK, D = 50, 24, 32


def snn_gpt(seed: int = 0) -> AuraModel:
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=V, block_size=BLOCK, n_layer=2, n_head=2,
                                   n_embd=D, ffn="snn", snn_steps=4))


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def ffn(steps: int = 4, neuron: str = "lif") -> tuple[SNNFeedForward, torch.Tensor]:
    torch.manual_seed(0)
    return SNNFeedForward(D, 4 * D, steps, neuron=neuron), torch.randn(2, 7, D)


def spikes_of(block: SNNFeedForward, x: torch.Tensor) -> torch.Tensor:
    current = block.fc(x)
    return block.neuron(current.expand(block.steps, *current.shape))[0]


# --- the block ------------------------------------------------------------------------------


@pytest.mark.parametrize("neuron", ["lif", "gif"])
def test_shape_and_gradients_reach_fc_and_proj(neuron: str) -> None:
    block, x = ffn(neuron=neuron)
    y = block(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    for p in (block.fc.weight, block.proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0  # fc only through the surrogate


def test_firing_rate_is_strictly_between_0_and_1() -> None:
    block, x = ffn()
    block(x)
    rate = block.metrics()["firing_rate"]
    assert 0 < rate.item() < 1 and not rate.requires_grad


def test_lif_rate_is_a_multiple_of_one_over_steps() -> None:
    steps = 5
    block, x = ffn(steps)
    rate = spikes_of(block, x).mean(0)
    counts = rate * steps
    assert torch.allclose(counts, counts.round(), atol=1e-5)
    assert counts.max() > 0


def test_synops_count_spikes_times_the_fan_out_and_macs_the_dense_fc() -> None:
    block, x = ffn()
    block(x)
    metrics = block.metrics()
    assert metrics["synops"].item() == torch.count_nonzero(spikes_of(block, x)).item() * D
    assert metrics["macs"].item() == 2 * 7 * D * 4 * D


@pytest.mark.parametrize("neuron", ["lif", "gif"])
@pytest.mark.parametrize("numel", [1001, 2**23 + 1])  # the float32 sum, then the float64 one
def test_the_spike_total_is_exact_on_both_sides_of_the_float32_bound(neuron: str,
                                                                      numel: int) -> None:
    block, _ = ffn(neuron=neuron)
    peak = block.steps * getattr(block.neuron, "max_level", 1)
    counts = torch.full((numel,), float(peak))
    counts[::3] = peak - 1  # the large total is odd: float32 past 2**24 would lose its last unit
    expected = peak * numel - len(range(0, numel, 3))
    assert block._spike_total(counts).item() == expected
    assert block._spike_total(counts.bfloat16()).item() == expected


def test_metrics_before_forward_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="forward"):
        SNNFeedForward(D).metrics()


# --- the gpt with ffn=snn -------------------------------------------------------------------


def test_snn_gpt_trains_and_logs_its_firing_rate() -> None:
    model = snn_gpt().train()
    x, y = tokens(4, 16), tokens(4, 16, seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = model(x, y)
        assert out.loss is not None
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    rate = out.aux["firing_rate"]
    assert not rate.requires_grad and 0 <= rate.item() <= 1
    per_layer = [out.aux[f"firing_rate_{i}"] for i in range(len(model.blocks))]  # each layer's
    for block, r in zip(model.blocks, per_layer, strict=True):
        assert r == block.mlp.metrics()["firing_rate"]
    torch.testing.assert_close(rate, torch.stack(per_layer).mean())


def test_snn_proj_gets_the_residual_init() -> None:
    model = snn_gpt()
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.01, rel=0.1)


@pytest.mark.parametrize("t", [0, 7, BLOCK - 2])
def test_snn_gpt_is_causal(t: int) -> None:
    a, b = assert_causal(snn_gpt().eval(), tokens(2, BLOCK), t, V, exact=True)
    assert not torch.equal(a[:, t + 1], b[:, t + 1])


def test_snn_gpt_cached_decoding_matches_the_full_forward() -> None:
    model = snn_gpt().eval()
    x = tokens(2, 12)
    full = model(x).logits
    cache = model.new_cache(batch_size=2, max_len=BLOCK)
    pieces = [model(x[:, s:e], cache=cache).logits for s, e in [(0, 5), (5, 6), (6, 9), (9, 12)]]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


# --- config ---------------------------------------------------------------------------------


def test_ffn_is_set_from_the_command_line() -> None:
    cfg = load_config(overrides=["model.ffn=snn", "model.snn_steps=8"])
    assert cfg.model.ffn == "snn" and cfg.model.snn_steps == 8
    assert load_config().model.ffn == "mlp"
    with pytest.raises(ConfigError, match=r"model\.ffn must be one of mlp, snn"):
        load_config(overrides=["model.ffn=foo"])
    with pytest.raises(ConfigError, match=r"model\.snn_steps must be > 0"):
        load_config(overrides=["model.snn_steps=0"])
