"""The pre-run memory check for several ranks on one host: each rank's share (its rows of the
global batch; FSDP2's slice of the state) times the ranks on the host, one line when it cannot
fit."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from aura.config import load_config
from aura.errors import AuraError
from aura.train import resources
from aura.train.resources import Available, check_ranks_memory, check_training_memory

CPU = torch.device("cpu")
HUGE = Available(2**50, "test")


def config(**train: Any) -> Any:
    cfg = load_config(preset="demo")
    cfg.model.vocab_size = 65
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Any:
    def set_host(available: Available) -> None:
        monkeypatch.setattr(resources, "host_memory", lambda: available)

    set_host(HUGE)
    return set_host


def test_one_rank_is_the_single_process_check(host: Any) -> None:
    cfg = config()
    assert check_ranks_memory(cfg, CPU, "fp32", 1, 1) == check_training_memory(
        cfg, CPU, "fp32").total


def test_ranks_on_one_host_add_up_and_fsdp_and_sharded_saves_need_less(host: Any) -> None:
    ddp = config()
    one_host = check_ranks_memory(ddp, CPU, "fp32", 2, 2)
    one_each = check_ranks_memory(ddp, CPU, "fp32", 2, 1)
    assert one_each < one_host < 2 * one_each + check_training_memory(ddp, CPU, "fp32").total
    fsdp = config(parallel="fsdp")
    assert check_ranks_memory(fsdp, CPU, "fp32", 2, 2) < one_host
    sharded = config(parallel="fsdp", checkpoint_format="sharded")
    assert (check_ranks_memory(sharded, CPU, "fp32", 2, 2)
            <= check_ranks_memory(fsdp, CPU, "fp32", 2, 2))


def test_what_fits_one_rank_but_not_two_on_the_host_is_refused_in_one_line(host: Any) -> None:
    cfg = config()
    one, two = (check_ranks_memory(cfg, CPU, "fp32", 2, n) for n in (1, 2))
    host(Available((one + two) // 2, "MemAvailable in /proc/meminfo"))
    assert check_ranks_memory(cfg, CPU, "fp32", 2, 1) == one  # the other rank elsewhere
    with pytest.raises(AuraError) as exc:
        check_ranks_memory(cfg, CPU, "fp32", 2, 2)
    message = str(exc.value)
    assert "\n" not in message
    assert "the 2 ranks on this host need" in message
    assert "train.parallel=fsdp" in message and "train.memory_check=false" in message


def test_cuda_ranks_need_their_gpu_and_one_built_model_each_on_the_host(
        host: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config()
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(resources, "cuda_memory", lambda device: HUGE)
    est = resources.estimate_training_memory(cfg, "bf16", "cuda")
    host(Available(est.model_bytes * 3, "test host"))
    check_ranks_memory(cfg, gpu, "bf16", 4, 2)
    with pytest.raises(AuraError, match="4 ranks on this host build one model each"):
        check_ranks_memory(cfg, gpu, "bf16", 4, 4)
    monkeypatch.setattr(resources, "cuda_memory", lambda device: Available(1, "free on gpu"))
    with pytest.raises(AuraError, match="its GPU need"):
        check_ranks_memory(cfg, gpu, "bf16", 4, 2)
