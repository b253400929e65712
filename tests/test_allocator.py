"""Freed tensors stay in the process (aura/allocator.py): a buffer allocated again after a free
is not faulted in page by page, which cost 15% of a large-vocabulary training step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import aura.cli
import aura.train.trainer
from aura import allocator

# a step that makes and frees two 64 MiB tensors, 16 times; prints the page faults of the last 8
# (glibc's heap takes a few steps to settle: aligned allocations fragment it at first)
FAULTS_OF_A_REPEATED_STEP = """
import resource, torch
from aura.allocator import keep_freed_memory
kept = keep_freed_memory()
for step in range(16):
    if step == 8:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 << 20) * 2
    del x
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = (64 << 20) // os.sysconf("SC_PAGE_SIZE")


def last_steps(env: dict[str, str]) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REPEATED_STEP], check=True,
                         capture_output=True, text=True, env={**os.environ, **env}).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_repeated_step_reuses_its_buffers_without_faulting_them_in() -> None:
    """Kept, the last 8 steps fault in at most two 64 MiB tensors' pages; opted out, 16. The
    heap usually settles by the 6th step, but in about one process in seven a tensor is faulted
    in again later (6 of 40 runs here), and a clean-clone CI run once saw three; so up to three
    processes are tried, and one must stay within two."""
    faults = []
    for _ in range(3):
        kept, n = last_steps({"AURA_KEEP_FREED_MEMORY": "1"})
        assert kept
        faults.append(n)
        if n <= 2 * PAGES:
            break
    assert min(faults) <= 2 * PAGES, [n / PAGES for n in faults]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("off", ["0", "false", "OFF"])
def test_the_environment_can_leave_glibcs_defaults(off: str) -> None:
    """Opted out, every step faults both tensors' pages in again: what the setting saves."""
    kept, faults = last_steps({"AURA_KEEP_FREED_MEMORY": off})
    assert not kept
    assert faults >= 8 * PAGES


def test_off_linux_nothing_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_kept", None)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False
    assert allocator.keeps_freed_memory() is False


def test_the_answer_is_settled_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[None] = []
    monkeypatch.setattr(allocator, "_kept", None)
    monkeypatch.setattr(allocator, "_apply", lambda: calls.append(None) or True)
    assert allocator.keep_freed_memory() and allocator.keep_freed_memory()
    assert len(calls) == 1 and allocator.keeps_freed_memory()


def test_the_cli_and_the_trainer_keep_freed_memory(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    called: list[str] = []
    monkeypatch.setattr(aura.cli, "keep_freed_memory", lambda: called.append("cli") or True)
    monkeypatch.setattr(aura.train.trainer, "keep_freed_memory",
                        lambda: called.append("trainer") or True)
    assert aura.cli.main(["config", "show", "--preset", "demo"]) == 0
    assert called == ["cli"]
    from aura.config import load_config
    from aura.data.prepare import PrepareOptions, prepare
    prepare(PrepareOptions(["builtin:shakespeare"], "char"), tmp_path / "data", progress=False)
    cfg = load_config(preset="demo", overrides=["model.n_layer=1", "train.max_steps=1"])
    aura.train.trainer.Trainer(cfg, tmp_path / "data", tmp_path / "run", progress=False,
                               log=lambda _m: None)
    assert called == ["cli", "trainer"]


def test_the_benchmark_runs_both_settings_in_their_own_processes() -> None:
    """Each child says whether the setting took; the script refuses a run where it did not."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "allocator_bench.py"
    res = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True,
                         text=True, timeout=300, check=True)
    report = json.loads(res.stdout)
    assert [row["workload"] for row in report["workloads"]] == ["demo", "lif"]
    for row in report["workloads"]:
        for side in ("glibc_default", "kept"):
            assert row[side]["ms"] > 0 and row[side]["peak_rss_mb"] > 0
            assert row[side]["faults_per_step"] >= 0
        assert row["speedup"] == pytest.approx(
            row["glibc_default"]["ms"] / row["kept"]["ms"], abs=0.01)
