"""`natural_brain`: causality through every region, switches, hormones, the PFC's cache, and a
trainer run that logs every region's activity."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from aura.config import load_config
from aura.data.prosody import FEATURES, N_FEATURES
from aura.models import build_model
from aura.models.natural_brain import PHASES, SWITCHES, NaturalBrain, NaturalBrainConfig
from aura.nn.brain import liquid_moe
from aura.nn.brain.limbic import MODULATED, NEUTRAL, LimbicSystem
from aura.nn.brain.pfc import PrefrontalCortex
from aura.train.resources import estimate_training_memory
from aura.train.trainer import Trainer
from conftest import CliResult, assert_causal, assert_usage_error, read_metrics, tiny_config

Run = Callable[..., CliResult]
V, BLOCK = 50, 24
SMALL = {"vocab_size": V, "block_size": BLOCK, "n_layer": 2, "n_head": 2, "n_embd": 32,
         "pfc_dim": 16, "pfc_heads": 2, "moe_hidden": 16, "memory_capacity": 64,
         "memory_dim": 8, "memory_writes": 8, "broca_dim": 48, "limbic_warmup": 0}


def brain(seed: int = 0, **kw: object) -> NaturalBrain:
    torch.manual_seed(seed)
    model = build_model(NaturalBrainConfig(**{**SMALL, **kw}))  # type: ignore[arg-type]
    assert isinstance(model, NaturalBrain)
    return model


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def prosody(batch: int, length: int, seed: int = 2) -> torch.Tensor:
    return torch.rand(batch, length, N_FEATURES, generator=torch.Generator().manual_seed(seed))


def with_memories(model: NaturalBrain) -> NaturalBrain:
    """Three training forwards, so the hippocampus holds memories the checks then read."""
    model.train()
    for i in range(3):
        model(tokens(2, BLOCK, seed=10 + i), tokens(2, BLOCK, seed=20 + i),
              prosody=prosody(2, BLOCK), corpus_pos=torch.tensor([0, 1000]))
    model.flush_memory()
    assert len(model.writers["hippocampus"].store) > 0
    return model.eval()


class WithProsody(torch.nn.Module):
    """The model with fixed prosody, for ``assert_causal`` (which passes tokens only)."""

    def __init__(self, model: NaturalBrain, feats: torch.Tensor):
        super().__init__()
        self.model, self.feats = model, feats

    def forward(self, x: torch.Tensor):
        return self.model(x, prosody=self.feats)


_REMEMBERING: dict[str, NaturalBrain] = {}


def remembering(mode: str) -> NaturalBrain:
    """A brain in eval mode whose hippocampus holds memories, built once per thalamus mode
    (reads in eval change nothing)."""
    if mode not in _REMEMBERING:
        _REMEMBERING[mode] = with_memories(brain(thalamus_mode=mode, thalamus_top_k=2,
                                                 moe_top_k=1))
    return _REMEMBERING[mode]


@pytest.mark.parametrize("mode", ["soft", "topk", "bypass"])
@pytest.mark.parametrize("t", [0, BLOCK - 2])
def test_no_future_leaks_through_any_region(mode: str, t: int) -> None:
    """Thalamus, PFC state, MoE routing, hippocampal recall and selection are all per token or
    strictly causal: changing token t+1 leaves every logit <= t as it was."""
    model = remembering(mode)
    a, b = assert_causal(WithProsody(model, prosody(2, BLOCK)), tokens(2, BLOCK), t, V)
    assert not torch.allclose(a[:, t + 1], b[:, t + 1], atol=1e-4)


def test_no_future_leaks_without_attention() -> None:
    """With Wernicke off the PFC is the only carrier of context: it must carry it forward only,
    and must carry it (a later logit changes when an earlier token does)."""
    model = brain(wernicke=False, hippocampus=False).eval()
    x = tokens(2, BLOCK)
    a, b = assert_causal(WithProsody(model, prosody(2, BLOCK)), x, 5, V)
    assert not torch.allclose(a[:, 12], b[:, 12], atol=1e-6)


MODULES = {"limbic": ["limbic."], "thalamus": ["thalamus."], "wernicke": ["blocks."],
           "pfc": ["pfc.", "norms.pfc."], "liquid_moe": ["moe.", "norms.liquid_moe."],
           "hippocampus": ["hippocampus.", "norms.hippocampus."],
           "basal_ganglia": ["basal_ganglia."], "broca": ["broca."]}


@pytest.mark.parametrize("switch", SWITCHES)
def test_every_switch_removes_its_module(switch: str) -> None:
    on, off = brain(), brain(**{switch: False})
    on_state = set(on.state_dict())
    off_state = set(off.state_dict())
    for prefix in MODULES[switch]:
        assert any(k.startswith(prefix) for k in on_state), prefix
        assert not any(k.startswith(prefix) for k in off_state), prefix
    if switch != "limbic":  # the limbic system is state only: hormones, no weights
        assert off.num_params() < on.num_params()
    assert getattr(off, {"wernicke": "blocks", "liquid_moe": "moe"}.get(switch, switch)) in (
        None, *([off.blocks] if switch == "wernicke" else []))
    if switch == "hippocampus":
        assert off.writers == {} and not off.has_memory_switch
    if switch == "limbic":
        assert off.token_features == ()
    x = tokens(2, 8)
    out = off(x, x, **({"prosody": prosody(2, 8)} if off.token_features else {}))
    assert math.isfinite(float(out.loss.detach()))
    assert not any(k.startswith(MODULES[switch][0].split(".")[0]) for k in out.aux
                   if switch in ("thalamus", "limbic", "broca"))


def test_bypass_builds_no_router_and_relays_everything() -> None:
    assert brain(thalamus_mode="bypass").thalamus is None
    assert brain(thalamus_mode="soft").thalamus is not None


def test_no_regions_means_no_thalamus_or_selection() -> None:
    model = brain(pfc=False, liquid_moe=False, hippocampus=False)
    assert model.thalamus is None and model.basal_ganglia is None and model.regions == ()


def test_every_region_reports_its_activity() -> None:
    model = remembering("soft")
    out = model(tokens(2, BLOCK), tokens(2, BLOCK), prosody=prosody(2, BLOCK))
    for key in ("limbic_arousal", "thalamus_entropy", "pfc_retention", "moe_balance_loss",
                "moe_usage/0", "memory_gate", "bg_entropy", "bg_nogo", "broca_active"):
        assert key in out.aux, key
    usage = sum(float(out.aux[f"moe_usage/{e}"]) for e in range(4))
    assert usage == pytest.approx(1.0)
    assert 0 <= float(out.aux["bg_entropy"]) <= math.log(4) + 1e-6


def test_basal_ganglia_no_go_withholds_every_proposal() -> None:
    """All selection mass on no-go: the stream reaches Broca unchanged by any region."""
    model = brain().eval()
    x, feats = tokens(2, 8), prosody(2, 8)
    with torch.no_grad():
        assert model.basal_ganglia is not None
        model.basal_ganglia.select.bias.copy_(torch.tensor([-1e4, -1e4, -1e4, 1e4]))
        no_go = model(x, prosody=feats).logits
        for r in model.regions:  # the regions' outputs no longer matter
            for p in getattr(model, {"liquid_moe": "moe"}.get(r, r)).parameters():
                p.add_(torch.randn_like(p))
        again = model(x, prosody=feats).logits
    torch.testing.assert_close(no_go, again)
    assert float(model.basal_ganglia.metrics()["bg_nogo"]) == pytest.approx(1.0)


def test_moe_balance_loss_is_in_the_training_loss() -> None:
    x = tokens(2, 8)
    feats = prosody(2, 8)
    out = brain(moe_balance=1.0).train()(x, x, prosody=feats)
    assert float(out.loss.detach()) == pytest.approx(float(out.aux["ce"]) + float(
        out.aux["moe_balance_loss"]), rel=1e-5)


@pytest.mark.parametrize("bf16", [False, True])
def test_moe_pads_expert_batches_to_buckets_only_under_cpu_bf16(bf16: bool) -> None:
    """oneDNN builds a bf16 kernel per GEMM shape, so under CPU bf16 each expert sees a multiple
    of ROW_BUCKET rows; the padding changes no token's output and no gradient."""
    torch.manual_seed(0)
    moe = liquid_moe.LiquidMoE(n_embd=16, n_experts=3, top_k=2, hidden=8)
    seen: list[int] = []
    for expert in moe.experts:
        expert.register_forward_pre_hook(lambda _, args: seen.append(args[0].size(0)))
    x = torch.randn(2, 37, 16, requires_grad=True)

    def run(bucket: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        moe.zero_grad()
        x.grad = None
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(liquid_moe, "ROW_BUCKET", bucket)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out, _ = moe(x)
        out.float().square().sum().backward()
        return out.detach(), [x.grad.clone(), *(p.grad.clone() for p in moe.parameters())]

    padded, padded_grads = run(liquid_moe.ROW_BUCKET)
    assert all(n % liquid_moe.ROW_BUCKET == 0 for n in seen) is bf16
    seen.clear()
    plain, plain_grads = run(1)
    assert sum(seen) == 2 * 37 * 2  # every token's top-2 slots, nothing else
    tol = {"atol": 2e-2, "rtol": 2e-2} if bf16 else {"atol": 1e-6, "rtol": 1e-5}
    torch.testing.assert_close(padded, plain, **tol)
    for a, b in zip(padded_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, **tol)


# --- limbic -----------------------------------------------------------------------------------


RANGES = {"lr": 0.2, "memory_write": 0.5, "dropout": 0.5, "temperature": 0.3,
          "top_k": 0.25}


def extreme_prosody(sign: float) -> torch.Tensor:
    p = torch.zeros(2, 8, N_FEATURES)
    p[..., FEATURES.index("arousal")] = 1.0 if sign > 0 else 0.0
    p[..., FEATURES.index("valence")] = sign
    return p


def test_hormones_are_neutral_and_modulations_one_during_warmup() -> None:
    limbic = LimbicSystem(RANGES, warmup=50, rate=1.0)
    g = torch.Generator().manual_seed(0)
    for step in range(50):
        limbic.set_step(step)
        ce = torch.rand((), generator=g) * 20  # wildly varying surprise
        limbic.update(ce, extreme_prosody(1.0 if step % 2 else -1.0))
        assert limbic.hormones.tolist() == list(NEUTRAL)
        assert all(limbic.multiplier(name) == 1.0 for name in MODULATED)
    limbic.set_step(50)
    limbic.update(torch.tensor(40.0), extreme_prosody(1.0))
    assert limbic.hormones.tolist() != list(NEUTRAL)
    assert limbic.multiplier("lr") != 1.0


def test_modulations_stay_in_their_bounds() -> None:
    limbic = LimbicSystem(RANGES, warmup=0, rate=0.7)
    g = torch.Generator().manual_seed(1)
    seen = {name: set() for name in MODULATED}
    for step in range(300):
        ce = torch.rand((), generator=g) * (100 if step % 7 == 0 else 2) + 1e-3
        limbic.update(ce, extreme_prosody(float(torch.randn((), generator=g).sign())))
        h = limbic.hormones
        assert 0 <= h[0] <= 1 and -1 <= h[1] <= 1 and 0 <= h[2] <= 1
        for name, r in RANGES.items():
            m = limbic.multiplier(name)
            assert 1 - r - 1e-6 <= m <= 1 + r + 1e-6, (name, m)
            seen[name].add(round(m, 3))
    assert all(len(values) > 5 for values in seen.values())  # they do move


def test_a_zero_range_switches_that_modulation_off() -> None:
    limbic = LimbicSystem({"lr": 0.0, "dropout": 0.5}, warmup=0, rate=1.0)
    limbic.update(torch.tensor(1.0), None)
    limbic.update(torch.tensor(9.0), extreme_prosody(1.0))
    assert limbic.multiplier("lr") == 1.0 and limbic.multiplier("dropout") != 1.0


def test_the_model_s_warmup_follows_the_trainer_s_step() -> None:
    model = brain(limbic_warmup=3).train()
    x = tokens(2, 8)
    for step in range(3):
        model.on_step(step)
        model(x, x, prosody=extreme_prosody(1.0))
        assert model.lr_scale() == 1.0 and model.sampling_temperature() == 1.0
    assert model.limbic is not None and model.limbic.hormones.tolist() == list(NEUTRAL)
    model.on_step(3)
    model(x, x, prosody=extreme_prosody(1.0))
    assert model.lr_scale() != 1.0 and 0.8 <= model.lr_scale() <= 1.2


# --- PFC --------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 1, 3, 2], [12]])
def test_cached_decoding_matches_the_full_forward(chunks: list[int]) -> None:
    """The PFC's state (and Wernicke's keys) carried in the cache give the same logits as one
    uncached forward."""
    model = remembering("soft")
    x, feats = tokens(2, sum(chunks)), prosody(2, sum(chunks))
    full = model(x, prosody=feats).logits
    cache = model.new_cache(2, BLOCK)
    start, pieces = 0, []
    for n in chunks:
        pieces.append(model(x[:, start:start + n], cache=cache,
                            prosody=feats[:, start:start + n]).logits)
        start += n
    assert cache.pfc_state is not None
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-4)


def test_the_pfc_carries_its_state_across_windows() -> None:
    """Two windows with the state handed over equal one window of both, and the handed-over
    state changes the second window's output (it is used)."""
    torch.manual_seed(0)
    pfc = PrefrontalCortex(8, 12, 3)
    x = torch.randn(2, 20, 8)
    whole, end = pfc(x)
    first, mid = pfc(x[:, :9])
    second, end2 = pfc(x[:, 9:], mid)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(end2, end, atol=1e-6, rtol=1e-5)
    fresh, _ = pfc(x[:, 9:])
    assert not torch.allclose(fresh, second, atol=1e-7)


# --- with the trainer -------------------------------------------------------------------------


BRAIN_TRAIN = ("model.name=natural_brain", "model.pfc_dim=16", "model.pfc_heads=2",
               "model.moe_hidden=16", "model.memory_capacity=64", "model.memory_dim=8",
               "model.memory_writes=8", "model.broca_dim=48", "model.limbic_warmup=2")


def test_it_trains_and_logs_every_region(train_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(*BRAIN_TRAIN, "train.max_steps=4", "train.eval_interval=4",
                      "train.checkpoint_interval=4")
    result = Trainer(cfg, train_data, tmp_path / "run", progress=False, log=lambda _m: None).run()
    assert result.step == 4 and math.isfinite(result.val_loss or math.nan)
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(rows) == 4
    for key in ("limbic_stress", "thalamus_entropy", "pfc_retention", "moe_usage/0",
                "bg_nogo", "broca_active", "memory_size"):
        assert f"aux/{key}" in rows[-1], key
    assert rows[0]["aux/limbic_lr_x"] == 1.0  # neutral during the warmup


# --- presets and the estimate -----------------------------------------------------------------


def test_neurogen_preset_has_seed_003_s_numbers_and_an_estimate(run_cli: Run) -> None:
    res = run_cli("config", "show", "--preset", "neurogen-4gb", "--estimate", "--json")
    assert res.code == 0, res.err
    est = json.loads(res.out)
    cfg = load_config(preset="neurogen-4gb")
    assert (cfg.model.n_embd, cfg.model.broca_dim, cfg.model.vocab_size) == (1024, 8192, 32000)
    assert est["params"] == estimate_training_memory(cfg, "fp16", "cuda").params
    assert est["params"] > 32000 * 8192  # Broca's head alone
    assert not est["vocab_assumed"] and est["vocab_size"] == 32000
    # bf16 weights and gradients at least: 4 bytes a parameter; under seed 003's 4 GB
    assert 4 * est["params"] <= est["peak_gpu_bytes"] < 4 * 2**30
    text = run_cli("config", "show", "--preset", "neurogen-4gb", "--estimate")
    assert text.code == 0 and "parameters: " in text.out and "peak GPU memory" in text.out


def test_estimate_without_a_vocabulary_assumes_one_and_says_so(run_cli: Run) -> None:
    res = run_cli("config", "show", "--preset", "brain-cpu", "--estimate")
    assert res.code == 0 and "assumed" in res.out
    ok = run_cli("config", "show", "--preset", "brain-cpu", "--estimate",
                 "--set", "model.vocab_size=65")
    assert ok.code == 0 and "vocab 65" in ok.out


# --- training phases --------------------------------------------------------------------------


@pytest.mark.parametrize("phase", range(len(PHASES)))
def test_phases_freeze_and_bypass_exactly_what_they_say(phase: int) -> None:
    model = brain().train()
    model.on_step(0, phase)
    for switch in SWITCHES:
        module = model.module_of(switch)
        for p in (module.parameters() if module is not None else ()):
            assert p.requires_grad == (switch in PHASES[phase]), switch
    x = tokens(2, 8)
    out = model(x, x, prosody=prosody(2, 8))
    out.loss.backward()
    for name, p in model.named_parameters():
        switch = next((s for s in SWITCHES for prefix in MODULES[s] if name.startswith(prefix)),
                      None)
        if switch is None or switch in PHASES[phase]:
            assert p.requires_grad, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert model.wte.weight.grad is not None and model.wte.weight.grad.abs().sum() > 0
    assert float(out.aux["phase"]) == phase + 1
    assert ("moe_usage/0" in out.aux) == ("liquid_moe" in PHASES[phase])
    assert ("pfc_retention" in out.aux) == ("pfc" in PHASES[phase])


def test_a_bypassed_module_changes_nothing_and_the_phase_is_saved() -> None:
    model = brain().eval()
    model.on_step(0, 0)
    x, feats = tokens(2, 8), prosody(2, 8)
    with torch.no_grad():
        before = model(x, prosody=feats).logits
        assert model.moe is not None and model.pfc is not None
        for p in [*model.moe.parameters(), *model.pfc.parameters()]:
            p.add_(1.0)
        torch.testing.assert_close(model(x, prosody=feats).logits, before)
    other = brain()
    assert other.active("pfc")
    other.load_state_dict(model.state_dict())
    assert not other.active("pfc") and other.active("hippocampus")
    assert not any(p.requires_grad for p in other.pfc.parameters())  # type: ignore[union-attr]


@pytest.mark.parametrize(("name", "phases", "says"), [
    ("natural_brain", "[5]", "train.phases needs 2"),
    ("natural_brain", "[5, 5]", "increasing"),
    ("gpt", "[5]", "has no training phases"),
])
def test_bad_phases_are_one_line(run_cli: Run, name: str, phases: str, says: str) -> None:
    res = run_cli("config", "show", "--preset", "demo", "--set", f"model.name={name}",
                  "--set", f"train.phases={phases}")
    assert_usage_error(res, says)


@pytest.mark.slow
def test_resume_inside_a_phase_is_bit_exact(train_data: Path, tmp_path: Path) -> None:
    """Phases at steps 2 and 4; a run stopped at step 3 (inside phase 2) and resumed ends with
    every loss equal to the uninterrupted run's, and each step logs its phase."""
    common = (*BRAIN_TRAIN, "train.phases=[2, 4]", "train.schedule=constant",
              "train.checkpoint_interval=3", "train.eval_interval=3")

    def run(steps: int, where: Path, resume: bool = False) -> None:
        Trainer(tiny_config(*common, f"train.max_steps={steps}"), train_data, where,
                resume=resume, progress=False, log=lambda _m: None).run()

    run(6, tmp_path / "a")
    run(3, tmp_path / "b")
    run(6, tmp_path / "b", resume=True)
    rows = {d: [r for r in read_metrics(tmp_path / d) if "loss" in r] for d in "ab"}
    assert [r["loss"] for r in rows["a"]] == [r["loss"] for r in rows["b"]]
    assert [r["aux/phase"] for r in rows["a"]] == [1, 1, 2, 2, 3, 3]
    assert "aux/pfc_retention" not in rows["a"][1] and "aux/pfc_retention" in rows["a"][2]
    assert "aux/moe_usage/0" in rows["a"][5]
