"""BDH: parity with the reference equations, recurrent generation, options, sparsity, config."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aura.config import config_from_dict, config_to_dict, load_config
from aura.errors import ConfigError
from aura.models import build_model
from aura.models.bdh import BDH, BDHConfig
from conftest import assert_causal, read_metrics

SMALL = ["model.name=bdh", "model.n_embd=32", "model.n_head=2", "model.mlp_multiplier=8",
         "model.n_layer=3", "model.block_size=16", "model.dropout=0.0", "model.vocab_size=256"]


def small(*extra: str) -> BDH:
    torch.manual_seed(0)
    model = build_model(load_config(overrides=[*SMALL, *extra]).model)
    assert isinstance(model, BDH)
    return model


def reference_forward(enc: torch.Tensor, enc_v: torch.Tensor, dec: torch.Tensor,
                      embed: torch.Tensor, lm_head: torch.Tensor, idx: torch.Tensor,
                      n_layer: int) -> torch.Tensor:
    """pathwaycom/bdh's BDH.forward transcribed (dropout 0): the equations we must match."""
    B, T = idx.shape
    nh, D, N = enc.shape

    def ln(t: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(t, (D,))

    def rope(phases: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        v_rot = torch.stack((-v[..., 1::2], v[..., ::2]), dim=-1).view(*v.size())
        phases = (phases % 1) * (2 * math.pi)
        return v * torch.cos(phases) + v_rot * torch.sin(phases)

    theta = 2.0**16
    freqs = 1.0 / (theta ** ((torch.arange(0, N).float() / 2).floor() * 2 / N)) / (2 * math.pi)
    x = ln(F.embedding(idx, embed).unsqueeze(1))
    for _ in range(n_layer):
        x_sparse = F.relu(x @ enc)
        r_phases = torch.arange(0, T).float().view(1, 1, -1, 1) * freqs.view(1, 1, 1, N)
        qr = rope(r_phases, x_sparse)
        y_kv = ln((qr @ qr.mT).tril(diagonal=-1) @ x)
        xy = x_sparse * F.relu(y_kv @ enc_v)
        y = ln(xy.transpose(1, 2).reshape(B, 1, T, N * nh) @ dec)
        x = ln(x + y)
    return x.view(B, T, D) @ lm_head


def test_forward_and_gradients_match_the_reference_equations() -> None:
    model = small()
    idx = torch.randint(0, 256, (2, 12))
    enc = model.encoder[0].view(32, 2, 128).transpose(0, 1)  # ours: (D, heads * N)
    params = [enc, model.encoder_v[0], model.decoder[0], model.embed.weight, model.lm_head]
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    ref = reference_forward(*leaves, idx, n_layer=3)
    ours = model(idx).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    (ref**2).sum().backward()
    (ours**2).sum().backward()
    for ours_p, ref_p in zip([model.encoder[0], model.encoder_v[0], model.decoder[0],
                              model.embed.weight, model.lm_head], leaves, strict=True):
        grad = ours_p.grad
        if ours_p is model.encoder[0]:
            grad = grad.view(32, 2, 128).transpose(0, 1)
        torch.testing.assert_close(grad.reshape(ref_p.grad.shape), ref_p.grad,
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("extra", [(), ("model.shared_weights=false",), ("model.score_norm=true",)])
def test_recurrent_state_equals_the_parallel_form_token_by_token(extra: tuple[str, ...]) -> None:
    model = small(*extra).eval()
    idx = torch.randint(0, 256, (2, 40))  # 40 > block_size 16: RoPE tables past the cache
    full = model(idx).logits
    state = model.new_cache(2, 0)
    pieces = [model(idx[:, :7], cache=state).logits]
    pieces += [model(idx[:, t:t + 1], cache=state).logits for t in range(7, 40)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-4)
    assert state.kv.shape == (3, 2, 2, 128, 32)  # layers, batch, heads, N, D: fixed size


def test_per_layer_weights_have_one_set_per_layer() -> None:
    shared, per_layer = small(), small("model.shared_weights=false")
    assert len(shared.encoder) == 1 and len(per_layer.encoder) == 3
    one_set = sum(p[0].numel() for p in (shared.encoder, shared.encoder_v, shared.decoder))
    assert per_layer.num_params() - shared.num_params() == 2 * one_set


def test_layers_differ_only_with_per_layer_weights() -> None:
    model = small("model.shared_weights=false")
    with torch.no_grad():
        model.encoder[1].mul_(3.0)
    assert not torch.equal(model._weights(0)[0], model._weights(1)[0])


def test_score_norm_divides_the_attention_by_n() -> None:
    plain, normed = small(), small("model.score_norm=true")
    normed.load_state_dict(plain.state_dict())
    x = torch.randint(0, 256, (1, 10))
    assert not torch.allclose(plain(x).logits, normed(x).logits)


def test_score_norm_keeps_fp16_attention_finite_and_bf16_needs_none() -> None:
    """score_norm divides the scores by N before they are summed over positions. In fp16
    (largest value 65504) that sum overflows once the weights have grown; a scaled encoder
    stands in for the growth (the LayerNorms leave the loss nearly unchanged). bf16 has fp32's
    exponent range: the same weights stay finite there without score_norm."""
    plain, normed = small(), small("model.score_norm=true")
    normed.load_state_dict(plain.state_dict())
    for model in (plain, normed):
        with torch.no_grad():
            model.encoder[0].mul_(200.0)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))

    def loss(model: BDH, dtype: torch.dtype) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            return model(x, x).loss

    assert not torch.isfinite(loss(plain, torch.float16))  # the control: overflow
    with torch.no_grad():
        fp32 = normed(x, x).loss
    torch.testing.assert_close(loss(normed, torch.float16), fp32, atol=1e-3, rtol=0)
    assert torch.isfinite(loss(plain, torch.bfloat16))


@pytest.mark.slow
@pytest.mark.parametrize("score_norm", [False, True])
def test_bf16_training_stays_finite_for_200_steps_with_or_without_score_norm(
        score_norm: bool) -> None:
    """200 bf16 steps at a high learning rate stay finite and learn whether or not the scores
    are normalised: in bf16 it is not score_norm that keeps training finite."""
    torch.manual_seed(0)
    model = small(f"model.score_norm={str(score_norm).lower()}", "model.mlp_multiplier=32")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 256, (4, 33))
    for _ in range(200):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(data[:, :-1], data[:, 1:]).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < math.log(256)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradient_checkpointing_gives_the_same_gradients(dropout: float) -> None:
    """With dropout too: the recomputed forward draws the same masks."""
    idx = torch.randint(0, 256, (2, 12))
    grads = []
    for flag in (False, True):
        model = small("model.shared_weights=false", f"model.dropout={dropout}").train()
        model.grad_checkpoint = flag
        model(idx, idx).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_sparsity_metrics_per_layer_and_mean() -> None:
    out = small()(torch.randint(0, 256, (2, 12)), torch.randint(0, 256, (2, 12)))
    for kind in ("x_active", "y_active"):
        per_layer = [float(out.aux[f"{kind}/{i}"]) for i in range(3)]
        assert all(0.0 < v < 1.0 for v in per_layer)
        assert float(out.aux[kind]) == pytest.approx(sum(per_layer) / 3, rel=1e-5)
    assert float(out.aux["y_active"]) <= float(out.aux["x_active"])  # y gates x


def test_without_report_metrics_the_step_is_the_same_and_the_sparsity_is_skipped() -> None:
    idx = torch.randint(0, 256, (2, 12))
    runs = []
    for report in (True, False):
        model = small("model.dropout=0.1").train()
        model.report_metrics = report
        torch.manual_seed(5)  # the same dropout masks
        out = model(idx, idx)
        out.loss.backward()
        runs.append((out, [p.grad for p in model.parameters()]))
    (logged, grads), (quiet, quiet_grads) = runs
    assert "y_active" in logged.aux and not any("active" in k for k in quiet.aux)
    assert torch.equal(logged.loss, quiet.loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, quiet_grads, strict=True))


def test_the_trainer_counts_sparsity_on_logged_steps_only(train_data: Path,
                                                          tmp_path: Path) -> None:
    from aura.train.trainer import Trainer

    cfg = load_config(overrides=[
        "model.name=bdh", "model.n_embd=32", "model.n_head=2", "model.mlp_multiplier=8",
        "model.n_layer=2", "model.block_size=16", "train.batch_size=2", "train.max_steps=7",
        "train.log_interval=3", "train.eval_interval=2", "train.eval_iters=1",
        "train.precision=fp32"])
    trainer = Trainer(cfg, train_data, tmp_path / "run", progress=False, log=lambda _m: None)
    seen, at_eval = [], []
    trainer.model.on_step = lambda step, phase=None: seen.append(  # type: ignore[method-assign]
        (step, trainer.model.report_metrics))
    evaluate = trainer.evaluate

    def spy() -> float | None:
        at_eval.append(trainer.model.report_metrics)
        return evaluate()

    trainer.evaluate = spy  # type: ignore[method-assign]
    trainer.run()
    # logged: the first step, every third, and the last
    assert seen == [(s, s + 1 in (1, 3, 6, 7)) for s in range(7)]
    assert at_eval == [True] * 4 and trainer.model.report_metrics  # evaluation reports them
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 3, 6, 7]
    assert all(0 < r["aux/y_active"] <= r["aux/x_active"] < 1 for r in rows)


def test_causality_the_future_never_changes_the_past() -> None:
    a, b = assert_causal(small().eval(), torch.randint(0, 256, (1, 12)), 7, 256)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_a_token_does_not_attend_to_itself() -> None:
    model = small().eval()
    a = model(torch.tensor([[5, 9]])).logits[:, 0]
    b = model(torch.tensor([[5]])).logits[:, 0]
    torch.testing.assert_close(a, b)


def test_bdh_config_switches_with_model_name_and_round_trips() -> None:
    cfg = load_config(preset="bdh-cpu")
    assert isinstance(cfg.model, BDHConfig) and cfg.model.mlp_multiplier == 16
    assert config_from_dict(config_to_dict(cfg)) == cfg
    ref = load_config(preset="bdh-ref").model
    assert (ref.n_embd, ref.n_head, ref.mlp_multiplier, ref.n_layer) == (256, 4, 128, 6)
    assert ref.mlp_multiplier * ref.n_embd // ref.n_head == 8192


def test_gpt_has_no_bdh_keys() -> None:
    with pytest.raises(ConfigError, match=r"model\.mlp_multiplier"):
        load_config(overrides=["model.mlp_multiplier=4"])


def test_eval_reports_the_models_sparsity() -> None:
    from aura.eval.perplexity import evaluate_tokens

    res = evaluate_tokens(small(), torch.randint(0, 256, (40,)), 40, block_size=16)
    assert 0.0 < res.metrics["y_active"] <= res.metrics["x_active"] < 1.0
    assert {f"x_active/{i}" for i in range(3)} <= set(res.metrics)


def test_bdh_trains_on_the_engine_with_curriculum_accumulation_and_muon(
        train_data: Path, tmp_path: Path) -> None:
    from aura.train.optim import build_optimizers
    from aura.train.trainer import Trainer

    cfg = load_config(overrides=[
        "model.name=bdh", "model.n_embd=32", "model.n_head=2", "model.mlp_multiplier=8",
        "model.n_layer=2", "model.block_size=32", "train.batch_size=4", "train.grad_accum=2",
        "train.optimizer=muon", "train.max_steps=12", "train.warmup_steps=2",
        "train.eval_interval=6", "train.eval_iters=2", "train.log_interval=1",
        "train.precision=fp32", "data.curriculum=[[0,8],[6,32]]", "train.lr=3e-3",
    ])
    trainer = Trainer(cfg, train_data, tmp_path / "run", progress=False, log=lambda _m: None)
    muon, _adamw = build_optimizers(trainer.model, cfg.train, torch.device("cpu")).optimizers
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    assert id(trainer.model.encoder[0]) in muon_ids and id(trainer.model.lm_head) not in muon_ids
    result = trainer.run()
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    tokens = [b["tokens"] - a["tokens"] for a, b in itertools.pairwise(rows)]
    assert tokens[0] == 4 * 2 * 8 and tokens[-1] == 4 * 2 * 32  # curriculum x accumulation
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert 0 < rows[-1]["aux/y_active"] <= rows[-1]["aux/x_active"] < 1
    assert result.val_loss is not None


def test_traces_whole_under_torch_compile_with_dropout() -> None:
    """The gate and its dropout mask trace without a graph break (dynamo; Inductor is slow)."""
    model = small("model.dropout=0.1").train()
    idx = torch.randint(0, 256, (2, 12))
    out = torch.compile(model, fullgraph=True, backend="eager")(idx, idx)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert 0.0 < float(out.aux["y_active"]) <= float(out.aux["x_active"])
