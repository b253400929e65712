"""Place and time cells in natural_brain's hippocampus: switches, causality (tokens and event
boundaries), the time code carried by the generation cache, and what brain_state shows."""

from __future__ import annotations

import torch

from aura.data.prosody import FEATURES, N_FEATURES
from aura.models import build_model
from aura.models.natural_brain import NaturalBrain, NaturalBrainConfig
from aura.nn.time_cells import elapsed_since
from conftest import assert_causal

V, BLOCK = 50, 24
SMALL = {"vocab_size": V, "block_size": BLOCK, "n_layer": 2, "n_head": 2, "n_embd": 32,
         "pfc_dim": 16, "pfc_heads": 2, "moe_hidden": 16, "memory_capacity": 64,
         "memory_dim": 8, "memory_writes": 8, "broca_dim": 48, "limbic": False,
         "n_place_cells": 64, "n_time_cells": 8}
END, PARAGRAPH = FEATURES.index("sentence_end"), FEATURES.index("paragraph")


def brain(**kw: object) -> NaturalBrain:
    torch.manual_seed(0)
    model = build_model(NaturalBrainConfig(**{**SMALL, **kw}))  # type: ignore[arg-type]
    assert isinstance(model, NaturalBrain)
    return model


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def prosody(batch: int, length: int, seed: int = 2) -> torch.Tensor:
    """Random features; sentence ends at about one token in five, no paragraph ends."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(batch, length, N_FEATURES, generator=g)
    p[..., END] = (torch.rand(batch, length, generator=g) < 0.2).float()
    p[..., PARAGRAPH] = 0.0
    return p


_CELLS: list[NaturalBrain] = []


def cells() -> NaturalBrain:
    """Both codes on, with memories stored (three training forwards), in eval mode; built
    once (eval forwards change nothing)."""
    if _CELLS:
        return _CELLS[0]
    model = brain(place_cells=True, time_cells=True).train()
    for i in range(3):
        model(tokens(2, BLOCK, 10 + i), tokens(2, BLOCK, 20 + i), prosody=prosody(2, BLOCK, i),
              corpus_pos=torch.tensor([0, 1000]))
    model.flush_memory()
    assert len(model.writers["hippocampus"].store) > 0
    _CELLS.append(model.eval())
    return model


class WithProsody(torch.nn.Module):
    def __init__(self, model: NaturalBrain, feats: torch.Tensor):
        super().__init__()
        self.model, self.feats = model, feats

    def forward(self, x: torch.Tensor):
        return self.model(x, prosody=self.feats)


def test_off_is_not_built_and_on_needs_the_hippocampus() -> None:
    off, on = brain(), brain(place_cells=True, time_cells=True)
    assert off.place is None and off.time is None
    assert not any(k.startswith(("place.", "time.")) for k in off.state_dict())
    assert off.token_features == ()  # no limbic, no time cells: no prosody asked for
    assert on.token_features == ("prosody",)
    added = on.num_params() - off.num_params()
    assert added == 2 * 64 * 32 + 8 * 32  # place in and out, the time cells' readout
    problems = " ".join(NaturalBrainConfig(**{**SMALL, "hippocampus": False,
                                              "place_cells": True}).problems())
    assert "model.place_cells needs model.hippocampus" in problems


def test_no_future_leaks_through_tokens_or_boundaries() -> None:
    model = cells()
    feats = prosody(2, BLOCK)
    t = 9
    a, b = assert_causal(WithProsody(model, feats), tokens(2, BLOCK), t, V)
    assert not torch.allclose(a[:, t + 1], b[:, t + 1], atol=1e-4)
    moved = feats.clone()
    moved[:, t + 1, END] = 1 - moved[:, t + 1, END]  # a boundary appears or vanishes at t+1
    x = tokens(2, BLOCK)
    first, second = model(x, prosody=feats).logits, model(x, prosody=moved).logits
    torch.testing.assert_close(first[:, :t + 1], second[:, :t + 1], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(first[:, t + 1:], second[:, t + 1:], atol=1e-5)


def test_cached_decoding_carries_the_time_code() -> None:
    model = cells()
    x, feats = tokens(2, 10), prosody(2, 10, seed=7)
    assert feats[..., END].sum() > 0
    full = model(x, prosody=feats).logits
    cache = model.new_cache(2, BLOCK)
    pieces = [model(x[:, :4], cache=cache, prosody=feats[:, :4]).logits]
    pieces += [model(x[:, t:t + 1], cache=cache, prosody=feats[:, t:t + 1]).logits
               for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-4)


def test_brain_state_and_metrics_show_the_codes() -> None:
    model = cells()
    x, feats = tokens(1, 16), prosody(1, 16, seed=3)
    state = model.brain_state(x, prosody=feats)
    boundary = feats[..., END] > 0.5
    assert torch.equal(state["time/elapsed"], elapsed_since(boundary)[0].float())
    code = state["place/code"]
    assert code.shape == (16, 64)
    assert ((code != 0).sum(-1) == 2).all()  # round(0.03 * 64) = 2 cells fire per token
    out = model(x, prosody=feats)
    assert float(out.aux["place_active"]) > 0
