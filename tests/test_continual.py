"""Continual learning: EWC's penalty and Fisher, the replay reservoir and its priorities, sleep
phases, and training runs that carry both across --init-from and resume bit-identically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call, grad, vmap

from aura.continual.ewc import EWC, diagonal_fisher, sequence_log_likelihood
from aura.continual.hook import STATE_JSON, STATE_TENSORS
from aura.continual.metrics import cl_metrics, markdown_table
from aura.continual.replay import ReplayBuffer, keyed_generator
from aura.errors import AuraError
from aura.train.checkpoint import list_checkpoints, step_dir
from aura.train.trainer import Trainer
from conftest import (
    TINY_TRAIN,
    assert_usage_error,
    losses,
    make_docs,
    read_metrics,
    tiny_config,
    write_dir,
)


class TinyLM(nn.Module):
    """Embedding -> tanh -> head: a language model small enough to differentiate by hand."""

    def __init__(self, vocab: int = 7, width: int = 5):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(x)))


# --- EWC -------------------------------------------------------------------------------------


def test_ewc_penalty_is_zero_at_the_anchor_and_its_gradient_is_lambda_f_delta() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    ewc = EWC(lam=0.4)
    fisher = {name: torch.rand_like(p) for name, p in model.named_parameters()}
    ewc.consolidate(model, fisher)
    assert ewc.penalty(model).item() == 0.0
    anchor = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.zero_grad()
    penalty = ewc.penalty(model)
    penalty.backward()
    expected_value = 0.0
    for name, p in model.named_parameters():
        delta = p.detach() - anchor[name]
        torch.testing.assert_close(p.grad, 0.4 * fisher[name] * delta)
        expected_value += 0.2 * (fisher[name] * delta**2).sum().item()
    assert penalty.item() == pytest.approx(expected_value, rel=1e-5)


def test_online_ewc_decays_the_old_fisher_and_moves_the_anchor() -> None:
    model = TinyLM()
    ewc = EWC(lam=1.0, decay=0.5)
    ones = {name: torch.ones_like(p) for name, p in model.named_parameters()}
    ewc.consolidate(model, ones)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    ewc.consolidate(model, {name: 2 * f for name, f in ones.items()})
    assert torch.equal(ewc.fisher["head.bias"], torch.full_like(model.head.bias, 2.5))
    assert torch.equal(ewc.anchor["head.bias"], model.head.bias.detach())
    assert ewc.penalty(model).item() == 0.0


@pytest.mark.parametrize("kind", ["empirical", "sampled"])
def test_fisher_equals_a_direct_per_sample_computation(kind: str) -> None:
    """The Fisher against per-sample gradients from torch.func (vmap over sequences), with the
    sampled targets drawn from the same generator stream."""
    torch.manual_seed(1)
    model = TinyLM()
    windows = [torch.randint(0, 7, (3, 6)), torch.randint(0, 7, (2, 6))]
    fisher = diagonal_fisher(model, model, windows, kind, torch.Generator().manual_seed(5))

    rows = torch.cat(windows)
    x, y = rows[:, :-1], rows[:, 1:]
    if kind == "sampled":
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            ys = []
            for xi in x:
                probs = torch.softmax(model(xi[None]).float(), -1)
                ys.append(torch.multinomial(probs.reshape(-1, 7), 1, generator=gen).reshape(1, -1))
            y = torch.cat(ys)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loglik(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, (xi[None],))
        return sequence_log_likelihood(logits, yi[None]).sum()

    per_sample = vmap(grad(loglik), in_dims=(None, 0, 0))(params, x, y)
    for name in params:
        torch.testing.assert_close(fisher[name], (per_sample[name] ** 2).mean(0))
    assert all(p.grad is None for p in model.parameters())  # gradients left as they were


# --- replay ----------------------------------------------------------------------------------


def test_reservoir_keeps_a_uniform_sample_of_everything_offered() -> None:
    """500 windows offered in batches of 10 to a 50-slot buffer, 200 times with different
    keys: each window is kept with probability 0.1 whatever its position (first or last
    domain), by a chi-square test at a fixed seed."""
    n, slots, trials = 500, 50, 200
    kept = torch.zeros(n)
    for trial in range(trials):
        buf = ReplayBuffer(slots * 4, 4)
        for start in range(0, n, 10):
            ids = torch.arange(start, start + 10)
            buf.offer(ids[:, None].repeat(1, 4), keyed_generator(trial, start))
        assert len(buf) == slots and buf.seen == n
        kept[buf.windows[:, 0]] += 1
    expected = trials * slots / n
    chi2 = ((kept - expected) ** 2 / expected).sum().item()
    # chi-square with 499 degrees of freedom: mean 499, sd ~32; 650 is p < 1e-5
    assert chi2 < 650, chi2
    quarters = kept.reshape(4, -1).sum(1) / (trials * slots)
    torch.testing.assert_close(quarters, torch.full((4,), 0.25), atol=0.02, rtol=0)
    assert kept.min() > 0


def test_the_reservoir_is_a_pure_function_of_its_keys() -> None:
    a, b = ReplayBuffer(40, 4), ReplayBuffer(40, 4)
    for buf in (a, b):
        for step in range(30):
            buf.offer(torch.arange(step * 3, step * 3 + 3)[:, None].repeat(1, 5),
                      keyed_generator(7, step))
    assert torch.equal(a.windows, b.windows)
    assert a.windows.size(1) == 4  # longer windows are cropped to the buffer's length


def test_priorities_follow_the_loss_with_importance_weights() -> None:
    buf = ReplayBuffer(4 * 3, 3, priority="loss", alpha=1.0, beta=1.0)
    buf.offer(torch.arange(4)[:, None].repeat(1, 3), keyed_generator(0))
    assert torch.equal(buf.priority, torch.ones(4, dtype=torch.float64))  # new: max priority
    buf.update(torch.arange(4), torch.tensor([0.5, 1.0, 2.0, 4.0]))
    idx, windows, weights = buf.sample(20000, keyed_generator(1))
    freq = torch.bincount(idx, minlength=4).double() / 20000
    share = (torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64) + 1e-3)
    torch.testing.assert_close(freq, share / share.sum(), atol=0.01, rtol=0)
    assert torch.equal(windows[:, 0], idx)
    # with beta = 1 the weights undo the sampling bias: w_i ~ 1 / P(i), normalised by the max
    expected = (share.sum() / share[idx]) / (share.sum() / share[idx]).max()
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=0)
    buf.update(torch.tensor([3]), torch.tensor([0.0]))  # a window now learned is replayed less
    assert buf.probabilities()[3] < buf.probabilities()[0]
    uniform = ReplayBuffer(12, 3)
    uniform.offer(torch.arange(4)[:, None].repeat(1, 3), keyed_generator(0))
    uniform.update(torch.arange(4), torch.tensor([0.5, 1.0, 2.0, 4.0]))
    assert torch.equal(uniform.sample(5, keyed_generator(2))[2], torch.ones(5))


# --- training runs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def domains(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two small byte-level datasets (one tokenizer, so one model can learn both)."""
    from aura.data.prepare import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("domains")
    out = []
    for i in range(2):
        write_dir(root / f"c{i}", make_docs(4, seed=20 + i, words=(60, 120)))
        prepare(PrepareOptions([str(root / f"c{i}")], "byte", val_fraction=0.2),
                root / f"d{i}", progress=False)
        out.append(root / f"d{i}")
    return out


CL = ("continual.ewc=true", "continual.replay_tokens=1000", "continual.replay_priority=loss",
      "continual.fisher_samples=3", "continual.sleep_interval=3", "continual.sleep_steps=2",
      "continual.sleep_distill=0.5", "model.block_size=16", "train.eval_interval=3",
      "train.checkpoint_interval=3", "model.dropout=0.1")


def run(data: Path, out: Path, *extra: str, **kw: object) -> list[str]:
    log: list[str] = []
    Trainer(tiny_config(*CL, *extra), data, out, progress=False, log=log.append,
            **kw).run()  # type: ignore[arg-type]
    return log


def test_init_from_carries_weights_fisher_and_replay_and_resume_is_bit_identical(
        domains: list[Path], tmp_path: Path) -> None:
    """Domain 0, then domain 1 --init-from it with its continual state: the EWC penalty is on
    from the first step, replay from the first micro-batch. The second run stopped after its
    step-3 checkpoint (right after a sleep phase) and resumed ends bit-identical."""
    first = tmp_path / "first"
    run(domains[0], first, "train.max_steps=3")
    last = step_dir(first, 3)
    info = json.loads((last / STATE_JSON).read_text())
    assert info["consolidated_at"] == 3 and info["replay"]["filled"] > 0
    assert STATE_TENSORS in json.loads((last / "meta.json").read_text())["files"]

    full = tmp_path / "full"
    log = run(domains[1], full, "train.max_steps=6", init_from=first, init_continual=True)
    assert any("initialised from" in m for m in log)
    rows = read_metrics(full)
    assert [r["step"] for r in rows if r.get("phase") == "sleep"] == [3, 6]
    ewc = [r["aux/ewc"] for r in rows if "aux/ewc" in r]
    assert ewc[0] == 0.0 and ewc[-1] > 0  # starts at the anchor, then moves off it

    part = tmp_path / "part"
    shutil.copytree(full, part)
    for ckpt in list_checkpoints(part):
        if ckpt.name != "step-00000003":
            shutil.rmtree(ckpt)
    (part / "best.json").unlink()
    run(domains[1], part, "train.max_steps=6", resume=True)
    assert losses(full) == losses(part)
    assert losses(full, "val_loss") == losses(part, "val_loss")
    a, b = step_dir(full, 6), step_dir(part, 6)
    for name in ("model.safetensors", STATE_TENSORS, STATE_JSON):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_init_from_another_tokenizer_or_model_is_one_error(domains: list[Path], train_data: Path,
                                                          tmp_path: Path) -> None:
    first = tmp_path / "first"
    run(domains[0], first, "train.max_steps=1")
    with pytest.raises(AuraError, match="another tokenizer"):
        run(train_data, tmp_path / "x", "train.max_steps=1", init_from=first)
    with pytest.raises(AuraError, match="different model"):
        run(domains[1], tmp_path / "y", "train.max_steps=1", "model.n_layer=1", init_from=first)


def test_a_sleep_phase_leaves_the_main_optimizer_alone(domains: list[Path],
                                                       tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(*CL, "train.max_steps=3"), domains[0], tmp_path / "r",
                      progress=False, log=lambda _m: None)
    for step in range(3):
        trainer._step(step)
    before_opt = {k: v.clone() for k, v in trainer.opt.optimizers[0].state[
        next(iter(trainer.model.parameters()))].items()}
    before_w = [p.detach().clone() for p in trainer.model.parameters()]
    row = trainer.continual.sleep(3, 1e-3, None, {})
    after = trainer.opt.optimizers[0].state[next(iter(trainer.model.parameters()))]
    assert all(torch.equal(before_opt[k], after[k]) for k in before_opt)
    assert any(not torch.equal(a, p) for a, p in zip(before_w, trainer.model.parameters(),
                                                     strict=True))
    assert row["sleep_loss"] > 0
    trainer.lock.release()


def test_a_plain_run_writes_no_continual_state(train_data: Path, tmp_path: Path) -> None:
    Trainer(tiny_config("train.max_steps=2"), train_data, tmp_path / "r", progress=False,
            log=lambda _m: None).run()
    assert not (step_dir(tmp_path / "r", 2) / STATE_JSON).exists()


# --- metrics and `aura cl` ---------------------------------------------------------------------


def test_cl_metrics_against_a_hand_computed_matrix() -> None:
    initial = [5.0, 6.0, 7.0]
    matrix = [[2.0, 5.0, 6.5],
              [3.0, 2.5, 6.0],
              [3.5, 3.0, 1.0]]
    m = cl_metrics(matrix, initial)
    assert m["acc"] == pytest.approx((3.5 + 3.0 + 1.0) / 3)
    assert m["forgetting_per_domain"] == pytest.approx([1.5, 0.5])  # 3.5-2.0, 3.0-2.5
    assert m["forgetting"] == pytest.approx(1.0)
    assert m["bwt"] == pytest.approx(-1.0)
    assert m["fwt"] == pytest.approx(((6.0 - 5.0) + (7.0 - 6.0)) / 2)  # b_j - L[j-1][j]
    assert m["relative_forgetting_per_domain"] == pytest.approx([1.5 / 3.0, 0.5 / 3.5])
    table = markdown_table(["a", "b", "c"], matrix, initial, m, "naive")
    assert "| untrained | 5.0000 | 6.0000 | 7.0000 |" in table
    assert "| b | 3.0000 | 2.5000 | 6.0000 |" in table
    with pytest.raises(ValueError):
        cl_metrics([[1.0, 2.0]], [1.0])


def write_experiment(path: Path, domains: list[Path], strategy: str = "replay+ewc",
                     **extra: object) -> Path:
    spec = {"domains": [{"name": f"d{i}", "data": str(d)} for i, d in enumerate(domains)],
            "strategy": strategy, "steps": 2, "preset": "demo", "eval_tokens": 64,
            "set": [*TINY_TRAIN, "model.block_size=16", "model.n_layer=1",
                    "continual.fisher_samples=2", "continual.replay_tokens=500",
                    "continual.sleep_steps=2"], **extra}
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("change, needle", [
    ("strategy: [", "invalid YAML"),
    ("strategy: forget", "strategy must be one of"),
    ("steps: -1", "steps must be a positive integer"),
    ("colour: blue", "unknown key(s) colour"),
])
def test_cl_bad_experiment_is_one_line_exit_2(change: str, needle: str, domains: list[Path],
                                             tmp_path: Path, run_cli: Any) -> None:
    path = write_experiment(tmp_path / "exp.yaml", domains)
    key = change.split(":")[0]
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith(f"{key}:")]
    path.write_text("\n".join([*lines, change]) + "\n")
    assert_usage_error(run_cli("cl", path, "--out", tmp_path / "out"), needle)
    assert not (tmp_path / "out" / "stage-0-d0").exists()


def test_cl_missing_dataset_is_one_line_exit_2(domains: list[Path], tmp_path: Path,
                                               run_cli: Any) -> None:
    path = write_experiment(tmp_path / "exp.yaml", [domains[0], tmp_path / "nowhere"])
    assert_usage_error(run_cli("cl", path, "--out", tmp_path / "out"), "nowhere")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["sleep", "joint"])
def test_cl_runs_every_stage_and_writes_the_matrix(strategy: str, domains: list[Path],
                                                   tmp_path: Path, run_cli: Any) -> None:
    path = write_experiment(tmp_path / "exp.yaml", domains, strategy)
    res = run_cli("cl", path, "--out", tmp_path / "out", "--json")
    assert res.code == 0, res.err
    result = res.json()
    assert len(result["matrix"]) == 2 and all(len(r) == 2 for r in result["matrix"])
    assert result["metrics"] == cl_metrics(result["matrix"], result["initial"])
    out = tmp_path / "out"
    for name in ("cl.json", "cl.md", "cl.png"):
        assert (out / name).is_file()
    assert (out / "cl.png").read_bytes()[:4] == b"\x89PNG"
    again = run_cli("cl", path, "--out", out, "--json")  # continued: nothing retrained
    assert again.code == 0 and again.json()["matrix"] == result["matrix"]
    other = write_experiment(tmp_path / "other.yaml", domains, "naive")
    assert_usage_error(run_cli("cl", other, "--out", out), "another experiment")


# --- aura learn ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_learn_gradient_steps_replay_windows_prioritised_by_salience(tmp_path: Path) -> None:
    """`aura learn --train-steps` keeps a replay buffer in its state: the windows of learned
    texts enter with their mean plasticity salience as priority, replayed ones take their loss,
    and a later session continues the same buffer."""
    from aura.data.tokenizers import ByteTokenizer
    from aura.learn import LearnOptions, LearnService
    from aura.learn.learner import REPLAY_FILE, REPLAY_JSON
    from aura.learn.state import CURRENT
    from aura.models import build_model
    from aura.train.checkpoint import TrainState, save_checkpoint

    cfg = tiny_config("model.vocab_size=256", "model.block_size=16", "model.n_layer=1")
    torch.manual_seed(0)
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir, build_model(cfg.model), ByteTokenizer(), cfg, TrainState(step=1),
                    None)
    watch, state = tmp_path / "inbox", tmp_path / "state"
    write_dir(watch, make_docs(3, seed=5, words=(40, 80)))

    def learn() -> Path:
        LearnService(LearnOptions(watch, state=state, model=run_dir, once=True, progress=False,
                                  train_steps=2, replay_tokens=17 * 200),
                     log=lambda _m: None).run()
        return state / json.loads((state / CURRENT).read_text())["generation"]

    gen = learn()
    info = json.loads((gen / REPLAY_JSON).read_text())
    tensors = load_file(str(gen / REPLAY_FILE))
    assert info["filled"] == info["seen"] > 0 and info["length"] == 17
    priority = tensors["replay.priority"]
    assert len(set(priority.tolist())) > 3  # salience (and losses), not one default
    text = b"".join(p.read_bytes() for p in sorted(watch.rglob("*.txt")))
    first = bytes(tensors["replay.windows"][0].tolist())
    assert first in text
    write_dir(tmp_path / "more", make_docs(2, seed=9, words=(40, 80)))
    for i, p in enumerate(sorted((tmp_path / "more").rglob("*.txt"))):
        shutil.copy(p, watch / f"new{i}.txt")
    again = json.loads((learn() / REPLAY_JSON).read_text())
    assert again["seen"] > info["seen"]


def test_learn_export_makes_a_run_generate_and_eval_load(tmp_path: Path, run_cli: Any) -> None:
    from aura.data.tokenizers import ByteTokenizer
    from aura.models import build_model
    from aura.train.checkpoint import TrainState, load_for_inference, save_checkpoint

    cfg = tiny_config("model.vocab_size=256", "model.block_size=16", "model.n_layer=1")
    torch.manual_seed(0)
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir, build_model(cfg.model), ByteTokenizer(), cfg, TrainState(step=1),
                    None)
    watch, state = tmp_path / "inbox", tmp_path / "state"
    write_dir(watch, make_docs(2, seed=5, words=(40, 80)))
    res = run_cli("learn", "--watch", watch, "--state", state, "--model", run_dir, "--once",
                  "--train-steps", "1", "--json")
    assert res.code == 0, res.err
    assert_usage_error(run_cli("learn-export", tmp_path / "nothing", "--out", tmp_path / "x"),
                       "no saved learn state")
    assert not (tmp_path / "nothing").exists()
    res = run_cli("learn-export", state, "--out", tmp_path / "exported")
    assert res.code == 0, res.err
    exported = load_for_inference(tmp_path / "exported")
    original = load_for_inference(run_dir)
    changed = [k for k, v in exported.model.state_dict().items()
               if not torch.equal(v, original.model.state_dict()[k])]
    assert changed  # the gradient steps, not the run's weights
    gen = run_cli("generate", tmp_path / "exported", "--prompt", "The", "--max-new-tokens", "4")
    assert gen.code == 0, gen.err
    assert_usage_error(run_cli("learn-export", state, "--out", tmp_path / "exported"),
                       "already holds checkpoints")


@pytest.mark.slow
def test_train_init_from_on_the_command_line(domains: list[Path], tmp_path: Path,
                                             run_cli: Any) -> None:
    """--init-from without --preset takes the source run's config; --init-continual alone is
    refused in one line."""
    first = tmp_path / "first"
    run(domains[0], first, "train.max_steps=2")
    res = run_cli("train", "--init-from", first, "--data", domains[1], "--out", tmp_path / "next",
                  "--max-steps", "1", "--set", "continual.ewc=false", "--json")
    assert res.code == 0, res.err
    assert "initialised from" in res.err
    saved = json.loads((tmp_path / "next" / "config.json").read_text())
    assert saved["model"]["block_size"] == 16 and saved["continual"]["ewc"] is False
    assert_usage_error(run_cli("train", "--preset", "demo", "--init-continual", "--out",
                               tmp_path / "x"), "--init-continual needs --init-from")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt", "bdh", "hippocampal", "snn_rag"])
def test_every_model_trains_with_replay_ewc_and_sleep(model: str, domains: list[Path],
                                                      tmp_path: Path) -> None:
    """Replay, the EWC penalty, sleep and the Fisher through each registered model, with
    gradient accumulation; hippocampal's memory writes must not break the step's backward."""
    extra = (f"model.name={model}", "train.max_steps=2", "train.grad_accum=2",
             "continual.sleep_interval=1", "continual.sleep_steps=1")
    run(domains[0], tmp_path / "a", *extra)
    run(domains[1], tmp_path / "b", *extra, init_from=tmp_path / "a", init_continual=True)
    rows = read_metrics(tmp_path / "b")
    assert [r["aux/ewc"] for r in rows if "aux/ewc" in r][-1] > 0
    assert any(r.get("phase") == "sleep" for r in rows)
