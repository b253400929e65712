"""Checkpoints: atomic safetensors + JSON, sha256-verified, pruned to the newest N plus the best,
never unpickled; a corrupt newest checkpoint falls back to the previous one. (What a run does
when none is usable, histories, the lock: test_run_integrity.py.)"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from aura.config import ModelConfig
from aura.data.tokenizers import ByteTokenizer, CharTokenizer
from aura.errors import AuraError, DataError
from aura.models import build_model
from aura.train import checkpoint as ck
from aura.train.checkpoint import (
    TrainState,
    latest_good,
    list_checkpoints,
    load_for_inference,
    load_train_state,
    mark_best,
    prune,
    read_best,
    resolve_checkpoint,
    save_checkpoint,
    step_dir,
    verify_checkpoint,
)
from aura.train.optim import build_optimizers
from aura.train.trainer import Trainer, TrainResult
from conftest import losses, tiny_config

BASE = ("train.max_steps=12", "train.eval_interval=4", "train.checkpoint_interval=4")


def train(cfg: Any, data: Path, run: Path, resume: bool = False) -> tuple[TrainResult, list[str]]:
    log: list[str] = []
    return Trainer(cfg, data, run, resume=resume, progress=False, log=log.append).run(), log


@pytest.fixture(scope="module")
def reference(train_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 12-step run with checkpoints at 4, 8 and 12."""
    run = tmp_path_factory.mktemp("ckpt-ref") / "run"
    train(tiny_config(*BASE), train_data, run)
    return run


def no_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: Any, **_kw: Any) -> Any:
        raise AssertionError("a checkpoint was unpickled")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, refuse)


# --- resume past a damaged checkpoint -------------------------------------------------------


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "flipped weights": lambda d: _flip(d / "model.safetensors"),
    "truncated optimizer state": lambda d: _truncate(d / "train_state.safetensors"),
    "flipped train state json": lambda d: _flip(d / "train_state.json"),
    "missing tokenizer": lambda d: (d / "tokenizer.aura.json").unlink(),
    "torn meta.json": lambda d: _truncate(d / "meta.json"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_skips_a_damaged_newest_checkpoint(damage: str, reference: Path,
                                                  train_data: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    DAMAGE[damage](step_dir(run, 12))
    with pytest.raises(DataError):
        verify_checkpoint(step_dir(run, 12), need_train_state=True)
    no_pickle(monkeypatch)
    result, log = train(tiny_config(*BASE), train_data, run, resume=True)
    warnings = [m for m in log if m.startswith("warning:") and "falling back" in m]
    assert len(warnings) == 1 and "step-00000012" in warnings[0], log
    assert warnings[0].endswith(f"falling back to {step_dir(run, 8)}"), warnings
    assert any(f"resumed from {step_dir(run, 8)} at step 8" in m for m in log), log
    assert result.step == 12
    verify_checkpoint(step_dir(run, 12), need_train_state=True)  # written again, whole
    assert losses(run) == losses(reference)  # steps 9-12 re-run exactly
    assert losses(run, "val_loss") == losses(reference, "val_loss")


# --- pruning, best, inference loading --------------------------------------------------------


def test_keeps_newest_n_plus_best_and_loads_best_for_inference(
        train_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Val losses 3, 1, 2, 2.5, 2.7 at steps 2..10: step 4 is best and survives pruning."""
    values = iter([3.0, 1.0, 2.0, 2.5, 2.7, 2.8])
    weights: dict[int, dict[str, torch.Tensor]] = {}

    def fake_evaluate(self: Trainer) -> float:
        # evaluate runs right before the checkpoint of the same step, on the same weights
        weights[self.state.step] = {k: v.detach().clone()
                                    for k, v in self.model.state_dict().items()}
        return next(values)

    monkeypatch.setattr(Trainer, "evaluate", fake_evaluate)
    run = tmp_path / "run"
    cfg = tiny_config("train.max_steps=10", "train.eval_interval=2",
                      "train.checkpoint_interval=2", "train.keep_checkpoints=2")
    result, _ = train(cfg, train_data, run)
    assert result.best_val_loss == 1.0
    assert [p.name for p in list_checkpoints(run)] == [
        "step-00000004", "step-00000008", "step-00000010"]
    assert read_best(run) == {"step": 4, "val_loss": 1.0}
    assert not list(run.rglob("*.tmp"))

    no_pickle(monkeypatch)
    loaded = load_for_inference(run)
    assert loaded.path == step_dir(run, 4)
    assert not loaded.model.training
    assert loaded.meta["step"] == 4 and loaded.meta["val_loss"] == 1.0
    assert loaded.config.model.n_embd == 32 and loaded.config.model.vocab_size == 60
    assert isinstance(loaded.tokenizer, CharTokenizer) and loaded.tokenizer.vocab_size == 60
    state = loaded.model.state_dict()
    assert state.keys() == weights[4].keys()
    for name, value in weights[4].items():
        assert torch.equal(state[name], value), name
    assert not torch.equal(state["wte.weight"], weights[10]["wte.weight"])
    assert loaded.model.lm_head.weight is loaded.model.wte.weight  # still tied after loading

    # A specific checkpoint directory loads as itself.
    assert load_for_inference(step_dir(run, 10)).path == step_dir(run, 10)
    # Resuming reads the optimizer and RNG state without unpickling either.
    resumed, _ = train(tiny_config("train.max_steps=12", "train.eval_interval=2",
                                   "train.checkpoint_interval=2", "train.keep_checkpoints=2"),
                       train_data, run, resume=True)
    assert resumed.step == 12


def test_best_pruned_or_missing_falls_back_to_newest_good(reference: Path, tmp_path: Path
                                                         ) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    assert resolve_checkpoint(run) == step_dir(run, read_best(run)["step"])
    mark_best(run, 2, 0.5)  # names a checkpoint that is not on disk
    assert resolve_checkpoint(run) == step_dir(run, 12)
    (run / "best.json").unlink()
    _flip(step_dir(run, 12) / "model.safetensors")
    assert resolve_checkpoint(run) == step_dir(run, 8)
    with pytest.raises(DataError, match="no usable checkpoint"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(DataError, match="no run or checkpoint"):
        resolve_checkpoint(tmp_path / "missing")


def test_load_for_inference_rejects_a_swapped_tokenizer(reference: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(step_dir(reference, 12), ckpt)
    ByteTokenizer().save(ckpt / "tokenizer.aura.json")
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"]["tokenizer.aura.json"] = ck.file_sha256(ckpt / "tokenizer.aura.json")
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="tokenizer does not match"):
        load_for_inference(ckpt)


# --- the format itself ----------------------------------------------------------------------


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16))


def _stepped(model: torch.nn.Module, cfg: Any) -> Any:
    opt = build_optimizers(model, cfg.train, torch.device("cpu"))
    for _ in range(2):
        x = torch.randint(0, 256, (2, 8))
        model(x, x).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_round_trip_restores_weights_optimizer_and_rng(optimizer: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(f"train.optimizer={optimizer}")
    model = _tiny_model()
    opt = _stepped(model, cfg)
    state = TrainState(step=7, tokens_seen=99, micro_split=2, fault_lr_scale=0.5,
                       nonfinite_skipped=3, rollbacks=1, plateau={"best": 1.5},
                       best_val_loss=1.25)
    torch.manual_seed(42)
    path = save_checkpoint(tmp_path, model, ByteTokenizer(), cfg, state, opt.state_dict(), 2.0)
    expected_draw = torch.rand(3)
    assert path == step_dir(tmp_path, 7)
    meta = verify_checkpoint(path, need_train_state=True)
    assert meta["step"] == 7 and meta["val_loss"] == 2.0
    assert set(meta["files"]) == {"model.safetensors", "tokenizer.aura.json",
                                  "train_state.safetensors", "train_state.json"}

    no_pickle(monkeypatch)
    fresh = _tiny_model(seed=1)
    torch.manual_seed(0)
    loaded_state, opt_states = load_train_state(path, fresh)
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG is where it was at saving
    assert loaded_state == state
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    fresh_opt = build_optimizers(fresh, cfg.train, torch.device("cpu"))
    fresh_opt.load_state_dict(opt_states)
    for orig, back in zip(opt.state_dict(), fresh_opt.state_dict(), strict=True):
        assert orig["state"] and orig["state"].keys() == back["state"].keys()
        for pid, pstate in orig["state"].items():
            assert pstate.keys() == back["state"][pid].keys()
            for key, value in pstate.items():
                if torch.is_tensor(value):
                    assert torch.equal(value, back["state"][pid][key]), (pid, key)
                else:
                    assert value == back["state"][pid][key]
        assert [g["lr"] for g in orig["param_groups"]] == [
            g["lr"] for g in back["param_groups"]]


def test_weights_only_checkpoint_cannot_resume(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, _tiny_model(), ByteTokenizer(), tiny_config(),
                           TrainState(step=3), None)
    assert verify_checkpoint(path)["step"] == 3
    with pytest.raises(DataError, match="has no train_state"):
        verify_checkpoint(path, need_train_state=True)
    with pytest.raises(DataError, match=r"no usable checkpoint.*has no train_state"):
        latest_good(tmp_path, lambda _m: None)
    assert latest_good(tmp_path, lambda _m: None, need_train_state=False) is not None


def test_unknown_format_is_rejected(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, _tiny_model(), ByteTokenizer(), tiny_config(),
                           TrainState(step=1), None)
    meta = json.loads((path / "meta.json").read_text())
    meta["format"] = 99
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="unknown format"):
        verify_checkpoint(path)


def test_a_crash_while_saving_leaves_no_trace(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok, cfg = _tiny_model(), ByteTokenizer(), tiny_config()
    save_checkpoint(tmp_path, model, tok, cfg, TrainState(step=1), None)

    def crash(*_a: Any, **_kw: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "file_sha256", crash)  # dies while building meta.json
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model, tok, cfg, TrainState(step=2), None)
    with pytest.raises(KeyboardInterrupt):  # the same step again: the old one survives
        save_checkpoint(tmp_path, model, tok, cfg, TrainState(step=1), None)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]
    assert not list(tmp_path.rglob("*.tmp"))
    verify_checkpoint(step_dir(tmp_path, 1))


def test_prune_keeps_newest_and_best_and_clears_stale_temporaries(tmp_path: Path) -> None:
    model, tok, cfg = _tiny_model(), ByteTokenizer(), tiny_config()
    for step in (5, 10, 15, 20, 100):
        save_checkpoint(tmp_path, model, tok, cfg, TrainState(step=step), None)
    stale = tmp_path / "checkpoints" / ".step-00000200.abc.tmp"
    stale.mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)][-1] == "step-00000100"  # numeric order
    mark_best(tmp_path, 10, 1.0)
    prune(tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step-00000010", "step-00000020", "step-00000100"]
    assert not stale.exists()


def test_existing_checkpoints_need_resume(reference: Path, train_data: Path) -> None:
    with pytest.raises(AuraError, match="already holds checkpoints"):
        Trainer(tiny_config(*BASE), train_data, reference, progress=False)
