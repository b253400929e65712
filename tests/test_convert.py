"""`aura convert`: copied tensors equal the source's, padded ones hold it in their leading block,
bad targets are one line, and `aura train --init-from` starts from the converted weights."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from aura.data.shards import PreparedData
from aura.data.tokenizers import ByteTokenizer
from aura.models import AuraModel, build_model
from aura.train.checkpoint import TrainState, load_for_inference, new_history, save_checkpoint
from aura.train.trainer import Trainer
from conftest import CliResult, assert_usage_error, tiny_config

Run = Callable[..., CliResult]
SMALL = {
    "gpt": (),
    "natural_brain": ("model.pfc_dim=16", "model.pfc_heads=2", "model.moe_hidden=16",
                      "model.memory_capacity=32", "model.memory_dim=8", "model.memory_writes=4",
                      "model.broca_dim=48"),
    "hippocampal": ("model.n_place_cells=40", "model.memory_capacity=32", "model.memory_dim=8",
                    "model.memory_writes=4"),
    "snn_rag": ("model.memory_capacity=32", "model.memory_chunk=4"),
    "bdh": ("model.mlp_multiplier=4",),
}


def source_run(tmp_path: Path, name: str, *sets: str) -> tuple[Path, AuraModel]:
    """A run holding one weights-only checkpoint of model ``name`` (random weights)."""
    cfg = tiny_config(f"model.name={name}", "model.vocab_size=256", *SMALL[name], *sets)
    torch.manual_seed(3)
    model = build_model(cfg.model)
    run = tmp_path / f"src-{name}"
    save_checkpoint(run, model, ByteTokenizer(), cfg, TrainState(step=5), None,
                    history=new_history())
    return run, model


@pytest.mark.parametrize("name", sorted(SMALL))
def test_copied_and_padded_tensors_hold_the_source_s_values(run_cli: Run, tmp_path: Path,
                                                            name: str) -> None:
    run, source = source_run(tmp_path, name)
    res = run_cli("convert", str(run), "--set", "model.n_embd=64", "--set", "model.n_head=4",
                  "--set", "model.n_layer=3", "--out", str(tmp_path / "big"), "--json")
    assert res.code == 0, res.err
    rows = {r["name"]: r for r in json.loads(res.out)["tensors"]}
    new = load_for_inference(tmp_path / "big").model
    assert new.config.n_embd == 64 and new.config.n_layer == 3
    old_sd, new_sd = source.state_dict(), new.state_dict()
    actions = {r["action"] for r in rows.values()}
    assert "padded" in actions  # wider tensors
    assert ("new" in actions) == (name != "bdh")  # a third layer (bdh shares one set)
    for key, row in rows.items():
        if row["action"] == "copied" and key in old_sd:
            assert torch.equal(new_sd[key], old_sd[key]), key
        elif row["action"] == "padded":
            block = tuple(slice(0, n) for n in old_sd[key].shape)
            if key.endswith(("qkv.weight", "heads.weight")):
                for a, b in zip(new_sd[key].chunk(3), old_sd[key].chunk(3), strict=True):
                    assert torch.equal(a[tuple(slice(0, n) for n in b.shape)], b), key
            else:
                assert torch.equal(new_sd[key][block], old_sd[key]), key
    # a layer the source had is at least partly its own; head size 16 -> 16 keeps attention
    assert rows["blocks.0.attn.qkv.weight" if name != "bdh" else "embed.weight"]["action"] in (
        "padded", "copied")


def test_a_changed_head_size_resets_attention_and_the_table_says_so(run_cli: Run,
                                                                    tmp_path: Path) -> None:
    run, _ = source_run(tmp_path, "gpt")
    res = run_cli("convert", str(run), "--set", "model.n_embd=64", "--out",
                  str(tmp_path / "big"))  # 2 heads of 16 -> 2 heads of 32
    assert res.code == 0, res.err
    line = next(x for x in res.out.splitlines() if x.startswith("blocks.0.attn.qkv.weight"))
    assert "reset" in line and "96x32 -> 192x64" in line
    assert "padded" in next(x for x in res.out.splitlines() if x.startswith("wte.weight"))
    assert "wrote" in res.out.splitlines()[-1]


@pytest.mark.parametrize(("sets", "says"), [
    (["model.n_embd=16"], "only grows a model: model.n_embd 32 -> 16"),
    (["model.n_embdd=64"], "n_embdd"),
    (["train.lr=1"], "model.* keys, not model.name"),
    (["model.name=bdh"], "model.* keys, not model.name"),
])
def test_bad_targets_are_one_line_and_write_nothing(run_cli: Run, tmp_path: Path,
                                                    sets: list[str], says: str) -> None:
    run, _ = source_run(tmp_path, "gpt")
    args = [a for s in sets for a in ("--set", s)]
    res = run_cli("convert", str(run), *args, "--out", str(tmp_path / "big"))
    assert_usage_error(res, says)
    assert not (tmp_path / "big").exists()


def test_train_init_from_starts_from_the_converted_weights(run_cli: Run, tmp_path: Path,
                                                           train_data: Path) -> None:
    tokenizer = PreparedData.open(train_data).tokenizer
    cfg = tiny_config(f"model.vocab_size={tokenizer.vocab_size}")
    torch.manual_seed(3)
    save_checkpoint(tmp_path / "small", build_model(cfg.model), tokenizer, cfg,
                    TrainState(step=5), None, history=new_history())
    assert run_cli("convert", str(tmp_path / "small"), "--set", "model.n_layer=3", "--out",
                   str(tmp_path / "big")).code == 0
    converted = load_for_inference(tmp_path / "big")
    trainer = Trainer(converted.config, train_data, tmp_path / "cont", progress=False,
                      log=lambda _m: None, init_from=tmp_path / "big")
    for key, value in converted.model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[key], value), key
    trainer.lock.release()
    res = run_cli("train", "--init-from", str(tmp_path / "big"), "--data", str(train_data),
                  "--out", str(tmp_path / "cli"), "--max-steps", "1", "--set",
                  "train.device=cpu")
    assert res.code == 0, res.err
    other = tmp_path / "other"  # a source saved with another tokenizer (bytes) is refused
    run, _ = source_run(tmp_path, "gpt", f"model.vocab_size={tokenizer.vocab_size}")
    res = run_cli("train", "--init-from", str(run), "--data", str(train_data), "--out",
                  str(other), "--max-steps", "1")
    assert_usage_error(res, "another tokenizer")
