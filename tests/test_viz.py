"""`aura viz` and `--viz-interval`: every picture's data is what the model computed (a raster's
points are exactly the spikes, the place map's active fraction is the model's, attention weights
reproduce the layer's output, memory reads are the store's), and the commands write them."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aura.cli import main
from aura.data.prosody import N_FEATURES
from aura.eval.viz import bdh_data, place_data, raster_data, render
from aura.models import build_model
from aura.models.base import model_config_class
from aura.models.inspect import attention_weights
from conftest import TINY_TRAIN, assert_usage_error, requires_extra

VOCAB, T = 40, 24


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread computes them without waiting on a second."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(name: str, **kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = model_config_class(name)(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2,
                                   n_embd=16, **kw)
    return build_model(cfg)


def probe(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    idx = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(1))
    inputs = {"prosody": torch.zeros(1, T, N_FEATURES)} if model.token_features else {}
    return idx, inputs


def test_raster_points_are_exactly_the_spikes_and_rates_the_models() -> None:
    model = tiny("gpt", ffn="snn").eval()
    with torch.no_grad():  # a larger drive, so the neurons fire at all
        for block in model.blocks:
            block.mlp.fc.weight.mul_(40)
    state = model.brain_state(*probe(model)[:1])
    for layer in (0, 1):
        spikes = state[f"spikes/{layer}"].numpy()
        assert spikes.shape == (4, T, 64)
        rate = state[f"metric/firing_rate_{layer}"].item()
        assert 0.01 < rate < 0.99
        assert spikes.mean() == pytest.approx(rate, abs=1e-6)  # the model's own firing rate
        d = raster_data(spikes, shown=32)
        s, t, n = np.nonzero(spikes[:, :, :32])
        assert sorted(zip(d["time"], d["neuron"], strict=True)) == sorted(
            zip(t * 4 + s, n, strict=True))
        assert len(d["time"]) == int((spikes[:, :, :32] > 0).sum())
        np.testing.assert_allclose(d["rates"], spikes.mean((0, 1)))


def test_attention_weights_reproduce_the_layers_output() -> None:
    model = tiny("gpt").eval()
    x = torch.randn(1, T, 16)
    attn = model.blocks[0].attn
    w = attention_weights(attn, x, None)
    np.testing.assert_allclose(w.sum(-1).detach(), 1.0, atol=1e-5)
    assert torch.all(w.triu(1) == 0)
    _, _, v = attn.qkv(x).view(1, T, 3, 2, 8).permute(2, 0, 3, 1, 4)
    y = attn.proj((w @ v).transpose(1, 2).reshape(1, T, 16))
    torch.testing.assert_close(y, attn(x), atol=1e-5, rtol=1e-4)


def trained_hippocampal() -> torch.nn.Module:
    model = tiny("hippocampal", n_place_cells=200, memory_capacity=64, memory_writes=16)
    model.train()
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):  # form memories
        x = torch.randint(0, VOCAB, (2, 32), generator=gen)
        model(x, x, prosody=torch.zeros(2, 32, N_FEATURES))
    return model.eval()


def test_place_grid_time_theta_gamma_and_memory_data_are_the_models(tmp_path: Path) -> None:
    requires_extra("matplotlib", "plot")
    model = trained_hippocampal()
    idx, inputs = probe(model)
    state = model.brain_state(idx, **inputs)
    code = state["place/code"].numpy()
    assert code.shape == (T, 200)
    assert ((code != 0).sum(1) <= 6).all()  # the top 3% of 200 cells
    measured = state["metric/place_active"].item()
    assert state["place/active_fraction"].item() == pytest.approx(measured)
    assert place_data(code)["active_fraction"] == pytest.approx(measured)
    # memory: ids of stored memories, best first, and the gate the model logs
    ids, scores = state["memory/hippocampus/ids"].numpy(), state["memory/hippocampus/scores"]
    size = len(model.memory.store)
    assert size > 0 and ((ids >= 0) & (ids < model.memory.store.capacity)).all()
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    assert state["memory/hippocampus/gate"].mean().item() == pytest.approx(
        state["metric/memory_gate"].item(), rel=1e-5)
    assert state["time/rates"].shape == (T, 32) and state["grid/field"].shape == (4, 64, 64)
    assert torch.all(state["theta_gamma/theta_phase"].diff() > 0)  # theta_period 64 > T
    place_only = {k: v for k, v in state.items() if k.startswith(("place/", "metric/"))}
    pics = render(place_only, [str(i) for i in range(T)], tmp_path / "viz", "probe")
    assert [p.png.name for p in pics] == ["place.png"]
    with np.load(tmp_path / "viz" / "place.npz") as saved:
        assert saved["active_fraction"] == pytest.approx(measured)
    page = (tmp_path / "viz" / "index.html").read_text()
    assert all(p.png.name in page and p.data.name in page for p in pics)
    assert all(p.png.read_bytes().startswith(b"\x89PNG") for p in pics)
    metrics = json.loads((tmp_path / "viz" / "metrics.json").read_text())
    assert metrics["metrics"]["place_active"] == pytest.approx(measured)


@pytest.mark.slow
def test_every_picture_of_a_hippocampal_model(tmp_path: Path) -> None:
    requires_extra("matplotlib", "plot")
    model = trained_hippocampal()
    state = model.brain_state(*probe(model)[:1], prosody=torch.zeros(1, T, N_FEATURES))
    pics = render(state, [str(i) for i in range(T)], tmp_path, "probe")
    assert {p.png.name for p in pics} == {
        "place.png", "grid.png", "time.png", "theta-gamma.png", "memory-hippocampus.png",
        "attention-0.png", "attention-1.png"}
    for p in pics:
        with np.load(p.data) as saved:
            assert saved.files
    with np.load(tmp_path / "grid.npz") as saved:
        np.testing.assert_array_equal(saved["position"], state["grid/position"].numpy())


def test_bdh_sparsity_is_the_models() -> None:
    model = tiny("bdh", mlp_multiplier=4).eval()
    state = model.brain_state(probe(model)[0])
    for layer in (0, 1):
        d = bdh_data(state[f"bdh_x/{layer}"].numpy(), state[f"bdh_y/{layer}"].numpy())
        assert d["x_active"] == pytest.approx(state[f"metric/x_active/{layer}"].item())
        assert d["y_active"] == pytest.approx(state[f"metric/y_active/{layer}"].item())
    assert model._probe is None  # recording stops with the probe


def test_snn_rag_memory_reads(tmp_path: Path) -> None:
    model = tiny("snn_rag", memory_capacity=64, memory_chunk=4)
    model.train()
    for _ in range(2):
        x = torch.randint(0, VOCAB, (2, 32))
        model(x, x)
    model.eval()
    state = model.brain_state(probe(model)[0])
    ids = state["memory/layer0/ids"].numpy()
    assert ids.shape == (T, 4) and (ids >= 0).all()
    assert state["memory/layer0/gate"].mean().item() == pytest.approx(
        state["metric/mem_gate"].item(), rel=1e-5)


# --- the commands ---------------------------------------------------------------------------

def _quiet(*argv: object) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main([str(a) for a in argv])


SETS = [a for s in TINY_TRAIN for a in ("--set", s)]


def test_train_viz_interval_and_aura_viz(train_data: Path, tmp_path: Path, run_cli) -> None:
    requires_extra("matplotlib", "plot")
    run = tmp_path / "run"
    assert _quiet("train", "--preset", "demo", *SETS, "--set", "model.ffn=snn",
                  "--set", "model.n_layer=1", "--data", train_data, "--out", run,
                  "--max-steps", 2, "--viz-interval", 2) == 0
    snaps = sorted(p.name for p in (run / "viz").iterdir())
    assert snaps == ["step-0000002"]
    for snap in snaps:
        made = {p.name for p in (run / "viz" / snap).iterdir()}
        assert {"index.html", "spikes-0.png", "spikes-0.npz", "attention-0.png"} <= made
    tokens = json.loads((run / "viz" / snaps[0] / "metrics.json").read_text())["tokens"]
    assert len(tokens) == 32  # the probe: the val split's start, cut to the context

    res = run_cli("viz", run, "--text", "To be, or not to be", "--out", tmp_path / "v", "--json")
    assert res.code == 0, res.err
    shown = res.json()
    assert Path(shown["out"], "index.html").is_file()
    assert len(shown["pictures"]) == 2  # the layer's spikes and attention
    labels = json.loads((tmp_path / "v" / "metrics.json").read_text())["tokens"]
    assert "".join(labels) == "To be, or not to be"

    assert_usage_error(run_cli("viz", run, "--text", ""), "empty")
    assert_usage_error(run_cli("viz", tmp_path / "nothing", "--text", "a"), "nothing")
    ckpt = next(p for p in run.rglob("meta.json")).parent
    assert_usage_error(run_cli("viz", ckpt, "--text", "a"), "--out")


def test_no_viz_directory_when_off(train_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _quiet("train", "--preset", "demo", *SETS, "--data", train_data, "--out", run,
                  "--max-steps", 2) == 0
    assert not (run / "viz").exists()


def test_brain_routing_pictures_are_the_routers_probabilities(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = model_config_class("natural_brain")(
        vocab_size=VOCAB, block_size=32, n_layer=1, n_head=2, n_embd=16, pfc_dim=8, pfc_heads=2,
        moe_experts=4, moe_top_k=2, moe_hidden=8, memory_capacity=16, memory_dim=8,
        memory_writes=4, broca_dim=24, limbic=False)
    model = build_model(cfg).eval()
    with torch.no_grad():  # routers start uniform: give them something to route
        for m in (model.thalamus.router, model.moe.router, model.basal_ganglia.select):
            m.weight.normal_(0, 1.0)
    idx = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(3))
    state = model.brain_state(idx)
    names = {"thalamus": len(model.regions), "moe": 4, "basal_ganglia": len(model.regions) + 1}
    for name, options in names.items():
        probs = state[f"routing/{name}"]
        assert probs.shape == (T, options)
        assert torch.allclose(probs.sum(-1), torch.ones(T), atol=1e-5)
    # the picture's data is what the forward measured: the basal ganglia's no-go share and
    # each expert's share of the top-2 slots
    bg = state["routing/basal_ganglia"]
    nogo = next(v for k, v in state.items() if k.startswith("metric/") and k.endswith("bg_nogo"))
    assert float(bg[:, -1].mean()) == pytest.approx(float(nogo), abs=1e-5)
    top = state["routing/moe"].topk(2, dim=-1).indices
    for e in range(4):
        usage = next(v for k, v in state.items() if k.endswith(f"moe_usage/{e}"))
        assert float((top == e).float().mean()) == pytest.approx(float(usage), abs=1e-6)
    pics = render(state, [str(i) for i in idx[0].tolist()], tmp_path)
    stems = {p.png.stem for p in pics}
    assert {"routing-thalamus", "routing-moe", "routing-basal_ganglia"} <= stems
    with np.load(tmp_path / "routing-moe.npz") as saved:
        assert np.array_equal(saved["probs"], state["routing/moe"].numpy())


def test_a_bypassed_thalamus_draws_no_routing() -> None:
    cfg = model_config_class("natural_brain")(
        vocab_size=VOCAB, block_size=32, n_layer=1, n_head=2, n_embd=16, pfc_dim=8, pfc_heads=2,
        moe_hidden=8, memory_capacity=16, memory_dim=8, memory_writes=4, broca_dim=24,
        limbic=False, thalamus_mode="bypass")
    model = build_model(cfg).eval()
    state = model.brain_state(torch.zeros(1, 8, dtype=torch.long))
    assert "routing/thalamus" not in state and "routing/moe" in state
