"""natural_brain at generation: the limbic system's temperature and top-k factors reach the
sampler through the declared ``sampling_modulation`` capability, bounded and switchable."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from aura.data.prosody import N_FEATURES
from aura.infer.generate import MODULATION_BOUNDS, generate, modulated
from aura.infer.sampling import SamplingConfig
from aura.models import build_model
from aura.models.base import AuraModel
from aura.models.natural_brain import NaturalBrain, NaturalBrainConfig
from aura.train.trainer import Trainer
from conftest import CliResult, tiny_config

V = 50
SMALL = {"vocab_size": V, "block_size": 24, "n_layer": 2, "n_head": 2, "n_embd": 32,
         "pfc_dim": 16, "pfc_heads": 2, "moe_hidden": 16, "memory_capacity": 64,
         "memory_dim": 8, "memory_writes": 8, "broca_dim": 48, "limbic_warmup": 0}
FEATURES = {"prosody": lambda ids: np.full((*ids.shape, N_FEATURES), 0.25, np.float32)}


def aroused(arousal: float, **kw: object) -> NaturalBrain:
    """A small brain whose hormones are set by hand: arousal as given."""
    torch.manual_seed(0)
    model = build_model(NaturalBrainConfig(**{**SMALL, **kw}))  # type: ignore[arg-type]
    assert isinstance(model, NaturalBrain) and model.limbic is not None
    model.limbic.hormones[0] = arousal
    return model.eval()


def sample(model: AuraModel, cfg: SamplingConfig, n: int = 20) -> list[int]:
    prompt = torch.tensor([[1, 2, 3]])
    return generate(model, prompt, n, cfg, features=FEATURES)[0].tolist()


def test_the_factors_follow_arousal_within_their_ranges() -> None:
    assert aroused(1.0).sampling_modulation() == pytest.approx({"temperature": 1.2,
                                                                "top_k": 1.2})
    assert aroused(0.0).sampling_modulation() == pytest.approx({"temperature": 0.8,
                                                                "top_k": 0.8})
    assert aroused(0.5).sampling_modulation() == {"temperature": 1.0, "top_k": 1.0}
    assert aroused(1.0, limbic_sampling=False).sampling_modulation() == {}
    assert aroused(1.0, limbic_temperature_range=0.0).sampling_modulation()["temperature"] == 1


def test_warmup_keeps_sampling_as_asked() -> None:
    model = aroused(1.0, limbic_warmup=10)
    model.on_step(3)
    cfg = SamplingConfig(temperature=0.7, top_k=10)
    assert modulated(model, cfg)[0] == cfg


def test_the_generator_samples_with_the_modulated_settings() -> None:
    """On: the output is exactly what plain sampling at the modulated temperature and top-k
    gives (same seed), and differs from sampling as asked."""
    model = aroused(1.0)
    asked = SamplingConfig(temperature=1.0, top_k=10, seed=7)
    applied, factors = modulated(model, asked)
    assert (applied.temperature, applied.top_k) == (pytest.approx(1.2), 12)
    assert factors == pytest.approx({"temperature": 1.2, "top_k": 1.2})
    plain = SamplingConfig(temperature=applied.temperature, top_k=12, seed=7, modulation=False)
    on = sample(model, asked)
    assert on == sample(model, plain)
    assert on != sample(model, SamplingConfig(temperature=1.0, top_k=10, seed=7,
                                              modulation=False))


@pytest.mark.parametrize("off", ["sampling", "model"])
def test_off_is_plain_sampling(off: str) -> None:
    """The sampler's switch or the model's (limbic_sampling) gives exactly the tokens an
    unmodulated sampler gives for the same seed, however aroused the hormones."""
    asked = SamplingConfig(temperature=1.0, top_k=10, seed=7)
    if off == "sampling":
        model, cfg = aroused(1.0), SamplingConfig(temperature=1.0, top_k=10, seed=7,
                                                   modulation=False)
    else:
        model, cfg = aroused(1.0, limbic_sampling=False), asked
    assert modulated(model, cfg) == (cfg, {})
    reference = aroused(0.5)  # same weights (same seed), neutral hormones: factors exactly 1
    assert sample(model, cfg) == sample(reference, asked)


class Declares(torch.nn.Module):
    """Stands in for a model declaring arbitrary factors."""

    def __init__(self, factors: dict[str, float]):
        super().__init__()
        self.factors = factors
        self.config = NaturalBrainConfig()

    def sampling_modulation(self) -> dict[str, float]:
        return self.factors


def test_the_generator_bounds_and_checks_the_factors() -> None:
    lo, hi = MODULATION_BOUNDS
    cfg = SamplingConfig(temperature=1.0, top_k=8)
    applied, factors = modulated(Declares({"temperature": 50.0, "top_k": 0.01}), cfg)  # type: ignore[arg-type]
    assert factors == {"temperature": hi, "top_k": lo}
    assert (applied.temperature, applied.top_k) == (hi, 4)
    greedy = SamplingConfig(temperature=0.0)  # greedy stays greedy; no top-k: none to scale
    assert modulated(Declares({"temperature": 1.5, "top_k": 1.5}), greedy)[0] == greedy  # type: ignore[arg-type]
    assert modulated(Declares({"top_k": 0.6}), SamplingConfig(top_k=1))[0].top_k == 1  # type: ignore[arg-type]
    for bad in ({"top_p": 1.1}, {"temperature": float("nan")}):
        with pytest.raises(ValueError):
            modulated(Declares(bad), cfg)  # type: ignore[arg-type]


def test_generate_json_shows_the_applied_sampling(train_data: Path, tmp_path: Path,
                                                   run_cli: Callable[..., CliResult]) -> None:
    cfg = tiny_config("model.name=natural_brain", "model.pfc_dim=16", "model.pfc_heads=2",
                      "model.moe_hidden=16", "model.memory_capacity=64", "model.memory_dim=8",
                      "model.memory_writes=8", "model.broca_dim=48", "model.limbic_warmup=0",
                      "model.limbic_rate=1.0", "train.max_steps=2",
                      "train.checkpoint_interval=2", "train.eval_interval=2")
    run = tmp_path / "run"
    Trainer(cfg, train_data, run, progress=False, log=lambda _m: None).run()
    args = ("generate", run, "--prompt", "the", "--max-new-tokens", "5", "--seed", "1",
            "--temperature", "1.0", "--top-k", "10", "--json")
    res = run_cli(*args)
    assert res.code == 0, res.err
    shown = res.json()["sampling"]
    t, k = shown["modulation"]["temperature"], shown["modulation"]["top_k"]
    assert t != 1.0 and 0.8 <= t <= 1.2 and 0.8 <= k <= 1.2  # the trained hormones moved
    assert shown["temperature"] == pytest.approx(t)
    assert shown["top_k"] == max(1, round(10 * k))
    res = run_cli(*args, "--no-modulation")
    assert res.code == 0, res.err
    assert res.json()["sampling"] == {"temperature": 1.0, "top_k": 10, "modulation": {}}
