"""Energy accounting: hand-computed MACs of a tiny gpt, spike-driven ACs of the SNN FFN, raw
matmuls and attention masks, the ``energy_ops`` protocol, and ``aura eval --energy``."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aura.config import ModelConfig
from aura.eval.energy import AC_PJ, MAC_PJ, EnergyReport, count_energy
from aura.models import build_model
from aura.train.trainer import Trainer
from conftest import CliResult, assert_usage_error, tiny_config

B, T, C, H, V, L = 2, 8, 16, 2, 20, 2


def ops(report: EnergyReport) -> dict[tuple[str, str], int]:
    return {(r.name, r.kind): r.ops for r in report.layers}


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_tiny_gpt_counts_equal_hand_computed_macs() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=V, block_size=16, n_layer=L, n_head=H, n_embd=C))
    report = count_energy(model, tokens())
    n = B * T
    causal_pairs = B * H * T * (T + 1) // 2  # each query sees itself and the keys before it
    want = {("wte", "embedding"): 0, ("wpe", "embedding"): 0, ("lm_head", "linear"): n * C * V}
    for i in range(L):
        want |= {(f"blocks.{i}.attn.qkv", "linear"): n * C * 3 * C,
                 (f"blocks.{i}.attn", "attention_scores"): causal_pairs * (C // H),
                 (f"blocks.{i}.attn", "attention_values"): causal_pairs * (C // H),
                 (f"blocks.{i}.attn.proj", "linear"): n * C * C,
                 (f"blocks.{i}.mlp.fc", "linear"): n * C * 4 * C,
                 (f"blocks.{i}.mlp.proj", "linear"): n * 4 * C * C}
    assert ops(report) == want
    total = sum(want.values())
    d = report.to_dict()
    assert d["macs"] == total and d["acs"] == 0 and d["tokens"] == n
    assert d["energy_pj"] == pytest.approx(total * MAC_PJ)
    assert d["energy_per_token_nj"] == pytest.approx(total * MAC_PJ / n / 1e3)
    assert not any(r["spike_input"] for r in d["layers"])
    assert model.training  # restored after the eval-mode count


def test_snn_ffn_acs_are_spikes_times_fan_out() -> None:
    torch.manual_seed(1)
    model = build_model(ModelConfig(vocab_size=V, block_size=16, n_layer=L, n_head=H, n_embd=C,
                                    ffn="snn", snn_steps=4))
    currents = []
    for block in model.blocks:
        nn.init.normal_(block.mlp.fc.weight, std=0.6)  # strong enough to fire at init
        block.mlp.fc.register_forward_hook(lambda _m, _i, out: currents.append(out))
    report = count_energy(model, tokens())
    rows = {(r.name, r.kind): r for r in report.layers}
    n = B * T
    total_acs = 0
    for i, (block, current) in enumerate(zip(model.blocks, currents, strict=True)):
        mem, spikes = None, 0
        for _ in range(4):  # the definition, one unfused step at a time
            s, mem = block.mlp.neuron.forward_step(current, mem)
            spikes += int(torch.count_nonzero(s))
        proj, fc = rows[(f"blocks.{i}.mlp.proj", "linear")], rows[(f"blocks.{i}.mlp.fc", "linear")]
        assert spikes > 0
        assert proj.spike_input and proj.ops == spikes * C  # fan-out of a hidden neuron: C outputs
        assert proj.dense_macs == n * 4 * C * C
        assert proj.energy_pj == pytest.approx(proj.ops * AC_PJ)
        assert not fc.spike_input and fc.ops == n * C * 4 * C
        total_acs += proj.ops
    d = report.to_dict()
    assert d["acs"] == total_acs
    assert d["spike_layers"] == [f"blocks.{i}.mlp.proj" for i in range(L)]
    all_dense = (report.macs + L * n * 4 * C * C) * MAC_PJ
    assert d["dense_energy_per_token_nj"] == pytest.approx(all_dense / n / 1e3)


class Probe(nn.Module):
    """Raw matmuls, einsum, masked attention and a spike-fed linear, outside any gpt; its input
    is fixed (``count_energy`` passes token ids, which it ignores)."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.x = x
        self.w = nn.Parameter(torch.randn(C, 5))
        self.fc = nn.Linear(C, 7, bias=False)

    def forward(self, _idx: torch.Tensor) -> torch.Tensor:
        x = self.x
        a = x @ self.w  # (B, T, 5)
        b = torch.einsum("btc,cn->btn", x, self.w)
        q = x.view(B, T, H, C // H).transpose(1, 2)
        mask = torch.ones(T, T, dtype=torch.bool).tril(-1)  # strictly causal: T(T-1)/2 pairs
        y = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        spikes = (x > 0.5).float()
        return a.sum() + b.sum() + y.sum() + self.fc(spikes).sum()


def test_raw_matmuls_masks_and_spike_inputs_are_counted_from_shapes() -> None:
    x = torch.randn(B, T, C, generator=torch.Generator().manual_seed(2))
    report = count_energy(Probe(x), tokens())
    got = ops(report)
    pairs = B * H * T * (T - 1) // 2
    assert got[("(model)", "matmul")] == 2 * B * T * C * 5  # @ and einsum
    assert got[("(model)", "attention_scores")] == pairs * (C // H)
    assert got[("(model)", "attention_values")] == pairs * (C // H)
    fc = next(r for r in report.layers if r.name == "fc")
    assert fc.spike_input and fc.ops == int((x > 0.5).sum()) * 7 and fc.dense_macs == B * T * C * 7
    assert report.macs == got[("(model)", "matmul")] + 2 * pairs * (C // H)


class Reporting(nn.Module):
    """A layer that knows better than the generic counter (e.g. a spiking memory read)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def energy_ops(self) -> list[dict]:
        return [{"name": "read", "ops": 11, "spike_input": True, "dense_macs": 40},
                {"name": "", "kind": "gate", "ops": 3, "spike_input": False}]


class TwoCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, C)
        self.mem = Reporting()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        return self.mem(self.mem(x))


def test_energy_ops_protocol_replaces_the_subtree_and_accumulates_calls() -> None:
    report = count_energy(TwoCalls(), tokens())
    rows = {(r.name, r.kind): r for r in report.layers}
    assert set(rows) == {("emb", "embedding"), ("mem.read", "custom"), ("mem", "gate")}
    assert rows[("mem.read", "custom")].ops == 22 and rows[("mem.read", "custom")].calls == 2
    assert rows[("mem.read", "custom")].dense_macs == 80
    assert report.acs == 22 and report.macs == 6


def test_a_malformed_energy_report_is_a_type_error() -> None:
    model = TwoCalls()
    model.mem.energy_ops = lambda: [{"name": "x", "ops": 1}]  # type: ignore[method-assign]
    with pytest.raises(TypeError, match="spike_input"):
        count_energy(model, tokens())


# --- aura eval --energy ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def snn_run(train_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("energy") / "run"
    cfg = tiny_config("model.ffn=snn", "train.max_steps=2", "train.checkpoint_interval=2")
    Trainer(cfg, train_data, run, progress=False, log=lambda _m: None).run()
    return run


def test_eval_energy_json(run_cli: Callable[..., CliResult], snn_run: Path,
                          train_data: Path) -> None:
    res = run_cli("eval", snn_run, "--data", train_data, "--device", "cpu", "--batch-size", 2,
                  "--max-tokens", 200, "--energy", "--json")
    assert res.code == 0, res.err
    report = res.json()
    energy = report["energy"]
    assert math.isfinite(report["loss"])
    assert energy["batch"] == 2 and energy["seq_len"] == 32  # the tiny config's block size
    layers = {(r["name"], r["kind"]): r for r in energy["layers"]}
    assert layers[("blocks.0.mlp.proj", "linear")]["spike_input"] is True
    assert layers[("blocks.0.attn.qkv", "linear")]["ops"] == 2 * 32 * 32 * 96
    assert energy["macs"] == sum(r["ops"] for r in energy["layers"] if not r["spike_input"])
    assert energy["energy_pj"] == pytest.approx(energy["macs"] * MAC_PJ + energy["acs"] * AC_PJ)


def test_eval_energy_text_prints_a_table(run_cli: Callable[..., CliResult], snn_run: Path,
                                         corpus_file: Path) -> None:
    res = run_cli("eval", snn_run, "--text", corpus_file, "--device", "cpu", "--max-tokens", 100,
                  "--energy")
    assert res.code == 0, res.err
    assert "blocks.1.mlp.fc" in res.out and "nJ/token" in res.out


def test_eval_energy_bad_input_is_a_usage_error(run_cli: Callable[..., CliResult], snn_run: Path,
                                                tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    assert_usage_error(run_cli("eval", snn_run, "--text", empty, "--energy", "--json"), "empty")
    assert_usage_error(run_cli("eval", tmp_path / "nope", "--text", empty, "--energy"), "nope")
