"""Sharded checkpoints (``train.checkpoint_format=sharded``): each rank writes its own
safetensors shard plus a JSON index, never a pickle; resume on the same world size bit-exact,
on another world size correct; ``aura export`` consolidates. 2-rank jobs are real torchruns
over gloo (``tests/test_distributed.py``'s harness)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import losses
from test_distributed import TOL, assert_close, torchrun, train_args

SHARDED = ("--set", "train.checkpoint_format=sharded")
FSDP = ("--set", "train.parallel=fsdp")


def files(ckpt: Path) -> list[str]:
    return sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())


def assert_no_pickle(ckpt: Path) -> None:
    """Every file of the checkpoint parses as JSON or as safetensors (no .metadata pickle)."""
    from safetensors import safe_open

    for name in files(ckpt):
        assert name.endswith((".json", ".safetensors")), name
        if name.endswith(".json"):
            json.loads((ckpt / name).read_text())
        else:
            with safe_open(str(ckpt / name), "pt") as f:
                assert list(f.keys())


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Bit for bit: every shard's tensors, and every other file by its sha256 (a shard file's
    bytes are not compared: safetensors writes its JSON header's metadata in hash order)."""
    from safetensors import safe_open

    digests = [json.loads((c / "meta.json").read_text())["files"] for c in (a, b)]
    assert digests[0].keys() == digests[1].keys()
    for name, digest in digests[0].items():
        if not name.startswith("shards/shard-"):
            assert digest == digests[1][name], name
            continue
        with safe_open(str(a / name), "pt") as x, safe_open(str(b / name), "pt") as y:
            keys = sorted(x.keys())
            assert keys == sorted(y.keys()) and x.metadata() == y.metadata()
            for key in keys:
                assert torch.equal(x.get_tensor(key), y.get_tensor(key)), (name, key)


def test_one_process_sharded_run_resumes_bit_exact_and_exports(
        tmp_path: Path, train_data: Path, run_cli: Any) -> None:
    from aura.train.checkpoint import load_for_inference, verify_checkpoint

    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert run_cli("train", *train_args(train_data, whole, 6, *SHARDED)).code == 0
    assert run_cli("train", *train_args(train_data, halves, 3, *SHARDED)).code == 0
    ckpt = halves / "checkpoints/step-00000003"
    assert "model.safetensors" not in files(ckpt)
    assert {"shards/index.json", "train_state.json", "meta.json"} <= set(files(ckpt))
    index = json.loads((ckpt / "shards/index.json").read_text())
    assert index["world"] == 1 and "model.wte.weight" in index["tensors"]
    assert_no_pickle(ckpt)
    verify_checkpoint(ckpt, need_train_state=True)
    got = run_cli("train", "--out", str(halves), "--data", str(train_data), "--resume",
                  "--max-steps", "6")
    assert got.code == 0, got.err
    assert losses(halves) == losses(whole)
    step6 = "checkpoints/step-00000006"
    assert_same_checkpoint(halves / step6, whole / step6)  # weights, optimizer, RNG

    # generate/eval read a sharded run directly; export writes the consolidated form
    out = tmp_path / "exported"
    assert run_cli("export", str(whole), "--out", str(out)).code == 0
    assert sorted(verify_checkpoint(out)["files"]) == ["model.safetensors",
                                                       "tokenizer.aura.json"]
    exported, direct = load_for_inference(out), load_for_inference(whole)
    for (name, a), b in zip(exported.model.state_dict().items(),
                            direct.model.state_dict().values(), strict=True):
        assert a.equal(b), name
    assert not torch.equal(exported.model.state_dict()["lm_head.weight"],
                           torch.zeros_like(exported.model.state_dict()["lm_head.weight"]))


def test_learn_from_a_sharded_run_asks_for_an_export(tmp_path: Path, train_data: Path,
                                                     run_cli: Any) -> None:
    from aura.errors import DataError
    from aura.learn.learner import LearnerConfig, build_learner

    run = tmp_path / "run"
    assert run_cli("train", *train_args(train_data, run, 3, *SHARDED)).code == 0
    with pytest.raises(DataError, match="sharded checkpoint; consolidate it first"):
        build_learner(run, "cpu", LearnerConfig())


def test_a_damaged_shard_is_an_unusable_checkpoint(tmp_path: Path, train_data: Path,
                                                   run_cli: Any) -> None:
    run = tmp_path / "run"
    assert run_cli("train", *train_args(train_data, run, 3, *SHARDED)).code == 0
    shard = next((run / "checkpoints/step-00000003/shards").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-8])
    got = run_cli("generate", str(run), "--prompt", "a", "--max-new-tokens", "2")
    assert got.code == 2 and "corrupt" in got.err and "Traceback" not in got.err


@pytest.mark.slow
def test_two_ranks_write_their_own_shards_and_resume_on_one(
        tmp_path: Path, train_data: Path, run_cli: Any) -> None:
    single = tmp_path / "single"
    assert run_cli("train", *train_args(train_data, single, 6)).code == 0
    run = tmp_path / "run"
    out, reports = torchrun(tmp_path, train_args(train_data, run, 3, *SHARDED), run)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = run / "checkpoints/step-00000003"
    shards = sorted(p.name for p in (ckpt / "shards").glob("*.safetensors"))
    assert len(shards) == 2
    assert_no_pickle(ckpt)
    index = json.loads((ckpt / "shards/index.json").read_text())
    assert index["world"] == 2  # DDP's replicas: each tensor written once, by one rank or other
    assert {c["file"] for t in index["tensors"].values() for c in t["chunks"]} == set(shards)
    rank1 = next(r for r in reports if r["rank"] == 1)
    assert any("shard-00002" in w for w in rank1["writes"])
    assert all(".shards.tmp" in w for w in rank1["writes"]), rank1["writes"]  # its shard only
    got = run_cli("train", "--out", str(run), "--data", str(train_data), "--resume",
                  "--max-steps", "6")
    assert got.code == 0, got.err
    assert_close(losses(run), losses(single), TOL)


@pytest.mark.slow
def test_two_rank_sharded_resume_is_bit_exact_and_one_rank_shards_resume_on_two(
        tmp_path: Path, train_data: Path, run_cli: Any) -> None:
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    for run, steps in ((whole, 6), (halves, 3)):
        out, _ = torchrun(tmp_path, train_args(train_data, run, steps, *SHARDED, *FSDP), run)
        assert out.returncode == 0, out.stderr[-3000:]
    index = json.loads((halves / "checkpoints/step-00000003/shards/index.json").read_text())
    chunks = index["tensors"]["model.wte.weight"]["chunks"]
    assert len({c["file"] for c in chunks}) == 2  # FSDP2: each rank wrote its half
    out, _ = torchrun(tmp_path, ["--out", str(halves), "--data", str(train_data), "--resume",
                                 "--max-steps", "6"], halves)
    assert out.returncode == 0, out.stderr[-3000:]
    assert losses(halves) == losses(whole)
    step6 = "checkpoints/step-00000006"
    assert_same_checkpoint(halves / step6, whole / step6)

    one = tmp_path / "one"
    assert run_cli("train", *train_args(train_data, one, 3, *SHARDED)).code == 0
    out, _ = torchrun(tmp_path, ["--out", str(one), "--data", str(train_data), "--resume",
                                 "--max-steps", "6", *FSDP], one)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_close(losses(one), losses(whole), TOL)
