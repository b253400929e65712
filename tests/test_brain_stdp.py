"""Token STDP in natural_brain's attention: off = not built, the rule's weights scale the keys,
a forward never reads its own update, and checkpoints carry the weights."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from aura.models import build_model
from aura.models.natural_brain import NaturalBrain, NaturalBrainConfig
from aura.plasticity import TokenSTDP
from aura.train.checkpoint import newest_checkpoint
from aura.train.trainer import Trainer
from conftest import assert_causal, read_metrics, tiny_config

V, BLOCK = 50, 24
SMALL = {"vocab_size": V, "block_size": BLOCK, "n_layer": 2, "n_head": 2, "n_embd": 32,
         "pfc_dim": 16, "pfc_heads": 2, "moe_hidden": 16, "memory_capacity": 64,
         "memory_dim": 8, "memory_writes": 8, "broca_dim": 48, "limbic": False,
         "hippocampus": False}


def brain(**kw: object) -> NaturalBrain:
    torch.manual_seed(0)
    model = build_model(NaturalBrainConfig(**{**SMALL, **kw}))  # type: ignore[arg-type]
    assert isinstance(model, NaturalBrain)
    return model


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def salient(model: NaturalBrain) -> NaturalBrain:
    """Random STDP weights in [-1, 1] (on the rule's grid)."""
    assert model.stdp is not None
    g = torch.Generator().manual_seed(5)
    model.stdp.weights_q.copy_(torch.randint(-2**24, 2**24 + 1, (V,), generator=g))
    return model


def test_off_is_not_built_and_on_is_one_buffer() -> None:
    off, on = brain(), brain(use_stdp=True)
    assert off.stdp is None and not any("stdp" in k for k in off.state_dict())
    assert [k for k in on.state_dict() if "stdp" in k] == ["stdp.weights_q"]
    assert on.num_params() == off.num_params()  # a rule's state, not parameters
    assert "model.use_stdp needs model.wernicke" in " ".join(
        NaturalBrainConfig(**{**SMALL, "use_stdp": True, "wernicke": False}).problems())


def sharp(model: NaturalBrain) -> NaturalBrain:
    """Queries and keys 10x longer than at init, so attention is far from uniform and a key's
    scale matters."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(10)  # type: ignore[union-attr, operator]
    return model.eval()


def test_the_weights_scale_the_attention() -> None:
    """Zero weights (or alpha 0): exactly the model without STDP; other weights change the
    attention and the logits."""
    x = tokens(1, 16)
    plain = sharp(brain())
    on = sharp(brain(use_stdp=True))
    torch.testing.assert_close(on(x).logits, plain(x).logits, rtol=0, atol=0)
    attention = on.brain_state(x)["attention/0"]
    salient(on)
    assert (on.brain_state(x)["attention/0"] - attention).abs().max() > 0.05
    assert (on(x).logits - plain(x).logits).abs().max() > 1e-2
    no_alpha = salient(sharp(brain(use_stdp=True, stdp_alpha=0.0)))
    torch.testing.assert_close(no_alpha(x).logits, plain(x).logits, rtol=0, atol=0)


def test_a_training_forward_applies_the_exact_rule_after_reading() -> None:
    """The weights move by TokenSTDP's rule on the targets' spikes (cross-entropy above the
    forward's mean), and the forward's own logits do not depend on its targets."""
    x = tokens(2, 16)
    targets = [tokens(2, 16, seed=s) for s in (2, 3)]
    outs = []
    for y in targets:
        model = salient(brain(use_stdp=True)).train()
        assert model.stdp is not None
        before = model.stdp.weights_q.clone()
        out = model(x, y)
        outs.append(out.logits.detach())
        ce = F.cross_entropy(out.logits.detach().reshape(-1, V), y.reshape(-1),
                             reduction="none")
        reference = TokenSTDP(V, lr_plus=0.01, lr_minus=0.005)
        reference.q.copy_(before)
        reference.update(y.reshape(-1), (ce > ce.mean()).to(torch.int8))
        assert torch.equal(model.stdp.weights_q, reference.q)
        assert not torch.equal(model.stdp.weights_q, before)
        assert 0 < float(out.aux["stdp_spike_rate"]) < 1
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    model = salient(brain(use_stdp=True)).eval()
    assert model.stdp is not None
    before = model.stdp.weights_q.clone()
    model(x, targets[0])
    assert torch.equal(model.stdp.weights_q, before)  # evaluation never moves them


def test_causal_and_cached_decoding_matches_with_stdp() -> None:
    model = salient(brain(use_stdp=True)).eval()
    assert_causal(model, tokens(1, 16), 9, V)
    x = tokens(2, 12)
    full = model(x).logits
    cache = model.new_cache(2, BLOCK)
    pieces = [model(x[:, :5], cache=cache).logits]
    pieces += [model(x[:, t:t + 1], cache=cache).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-4)


STDP_TRAIN = ("model.name=natural_brain", "model.pfc_dim=16", "model.pfc_heads=2",
              "model.moe_hidden=16", "model.memory_capacity=64", "model.memory_dim=8",
              "model.memory_writes=8", "model.broca_dim=48", "model.limbic_warmup=0",
              "model.use_stdp=true", "train.schedule=constant")


def test_checkpoints_carry_the_weights(train_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(*STDP_TRAIN, "train.max_steps=2", "train.checkpoint_interval=2",
                      "train.eval_interval=2")
    Trainer(cfg, train_data, tmp_path / "run", progress=False, log=lambda _m: None).run()
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert all(0 < r["aux/stdp_spike_rate"] < 1 for r in rows)
    path, _meta = newest_checkpoint(tmp_path / "run")
    saved = load_file(str(path / "model.safetensors"))
    assert saved["stdp.weights_q"].abs().sum() > 0  # trained, and saved


def test_resume_is_bit_exact_with_stdp(train_data: Path, tmp_path: Path) -> None:
    common = (*STDP_TRAIN, "train.checkpoint_interval=2", "train.eval_interval=2")

    def run(steps: int, where: Path, resume: bool = False) -> None:
        Trainer(tiny_config(*common, f"train.max_steps={steps}"), train_data, where,
                resume=resume, progress=False, log=lambda _m: None).run()

    run(4, tmp_path / "a")
    run(2, tmp_path / "b")
    run(4, tmp_path / "b", resume=True)
    rows = {d: [r for r in read_metrics(tmp_path / d) if "loss" in r] for d in "ab"}
    assert [r["loss"] for r in rows["a"]] == [r["loss"] for r in rows["b"]]
    assert all(math.isfinite(r["aux/stdp_weight_mean"]) for r in rows["a"])
    assert ([r["aux/stdp_weight_mean"] for r in rows["a"]]
            == [r["aux/stdp_weight_mean"] for r in rows["b"]])

