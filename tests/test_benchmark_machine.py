"""Every benchmark figure carries the machine it was measured on (benchmarks/machine.py).

CPUs of one machine class differ by 10x in bf16, so a JSON without its CPU kind cannot be
compared with another: these tests fail when a script or a field goes missing.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aura import cpu
from conftest import requires_extra

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import machine as bench_machine

BENCHMARKS = Path(bench_machine.__file__).parent

FIELDS = {"commit", "cpu", "cpu_capability", "native_bf16", "amx", "keeps_freed_memory", "torch",
          "threads"}


@pytest.mark.parametrize("native", [True, False])
def test_the_record_says_what_the_probes_say(monkeypatch: pytest.MonkeyPatch,
                                             native: bool) -> None:
    monkeypatch.setattr(cpu, "native_bf16", lambda: native)
    monkeypatch.setattr(cpu, "capability", lambda: "AVX512" if native else "AVX2")
    for name in bench_machine.AVX2_RESTRICTION:
        monkeypatch.delenv(name, raising=False)
    record = bench_machine.machine()
    assert set(record) == FIELDS
    assert record["native_bf16"] is native
    assert record["cpu_capability"] == ("AVX512" if native else "AVX2")
    assert isinstance(record["threads"], int) and record["threads"] >= 1
    assert record["cpu"] and record["torch"]
    assert record["keeps_freed_memory"] is (sys.platform.startswith("linux")
                                            and os.environ.get("AURA_KEEP_FREED_MEMORY") != "0")
    json.dumps(record)


def test_a_restricted_run_names_its_restriction(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in bench_machine.AVX2_RESTRICTION.items():
        monkeypatch.setenv(name, value)
    record = bench_machine.machine()
    assert record["restricted_by"] == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                       "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                                       "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "+avx2"}
    assert "restriction_missing" not in record
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("unset", "value"), [
    ("ONEDNN_MAX_CPU_ISA", "AVX2"), ("MKL_ENABLE_INSTRUCTIONS", "AVX2"),
    ("NUMBA_CPU_NAME", "haswell"), ("NUMBA_CPU_FEATURES", "+avx2")])
def test_a_partial_avx2_restriction_is_named(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str],
                                             unset: str, value: str) -> None:
    """Without MKL's cap its fp32 products stay on AVX-512, without numba's its compiled loops
    target the host: either way the run is not an AVX2 CPU's."""
    for name, v in bench_machine.AVX2_RESTRICTION.items():
        monkeypatch.setenv(name, v)
    monkeypatch.delenv(unset)
    record = bench_machine.machine()
    assert record["restriction_missing"] == [f"{unset}={value}"]
    assert capsys.readouterr().err.strip().endswith(f"add {unset}={value}")


def test_hiding_amx_alone_is_not_a_partial_avx2_restriction(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in bench_machine.AVX2_RESTRICTION:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    record = bench_machine.machine()
    assert record["restricted_by"] == {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
    assert "restriction_missing" not in record


@pytest.mark.parametrize(("tiles", "native", "isa", "amx"), [
    (True, True, None, True), (True, True, "AVX10_1_512_AMX", True), (True, True, "ALL", True),
    (True, True, "AVX512_CORE_BF16", False), (True, False, "AVX2", False),
    (False, True, None, False)])
def test_amx_is_reported_where_onednn_may_use_it(monkeypatch: pytest.MonkeyPatch, tiles: bool,
                                                 native: bool, isa: str | None, amx: bool) -> None:
    """AMX tiles count only where oneDNN may use them: a cap below AMX hides them."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: tiles)
    monkeypatch.setattr(cpu, "native_bf16", lambda: native)
    if isa is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    assert bench_machine.machine()["amx"] is amx


def _prints_json(tree: ast.Module) -> bool:
    return any(isinstance(node, ast.Attribute) and node.attr == "dumps"
               and isinstance(node.value, ast.Name) and node.value.id == "json"
               for node in ast.walk(tree))


def _calls_machine(tree: ast.Module) -> bool:
    return any(isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
               and node.func.id == "machine" for node in ast.walk(tree))


def test_every_benchmark_that_prints_json_records_the_machine() -> None:
    # both_kinds.py prints the JSON of two other benchmarks, each with its own machine record
    trees = {p.name: ast.parse(p.read_text()) for p in sorted(BENCHMARKS.glob("*.py"))
             if p.name not in ("machine.py", "both_kinds.py")}
    printing = [name for name, tree in trees.items() if _prints_json(tree)]
    assert len(printing) >= 20  # the check looks at the scripts, not at an empty folder
    assert [name for name in printing if not _calls_machine(trees[name])] == []


def test_a_real_benchmark_json_carries_the_fields_and_the_restriction() -> None:
    env = {**os.environ, **bench_machine.AVX2_RESTRICTION}
    res = subprocess.run([sys.executable, str(BENCHMARKS / "plasticity_bench.py"), "--quick"],
                         capture_output=True, text=True, env=env, timeout=300, check=True)
    record = json.loads(res.stdout)["machine"]
    assert set(record) >= FIELDS
    assert record["restricted_by"] == bench_machine.AVX2_RESTRICTION
    assert record["native_bf16"] is False  # oneDNN restricted to AVX2 has no native bf16
    assert record["amx"] is False


def test_a_benchmark_with_progress_rows_prints_one_json_object() -> None:
    """both_kinds.py reads a run's stdout as one JSON object; a progress row there breaks it."""
    res = subprocess.run([sys.executable, str(BENCHMARKS / "precision_bench.py"), "--presets",
                          "demo", "--steps", "4", "--rounds", "1"],
                         capture_output=True, text=True, timeout=300, check=True)
    out = json.loads(res.stdout)
    assert [row["preset"] for row in out["rows"]] == ["demo"]
    progress = [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]
    assert [row["preset"] for row in progress] == ["demo"]


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="PyTorch built without MKL")
def test_the_restriction_puts_mkl_on_avx2() -> None:
    """MKL names the code path its fp32 product takes; restricted, that must be AVX2's."""
    env = {**os.environ, **bench_machine.AVX2_RESTRICTION, "MKL_VERBOSE": "1"}
    code = "import torch; a = torch.ones(64, 64); a @ a"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, check=True)
    banner = next(line for line in res.stdout.splitlines() if line.startswith("MKL_VERBOSE oneMKL"))
    assert "(Intel(R) AVX2)" in banner and "AVX-512" not in banner


def test_the_restriction_makes_numba_compile_for_an_avx2_cpu() -> None:
    """numba targets the host's CPU name and features unless both are set."""
    requires_extra("numba", "jit")
    env = {**os.environ, **bench_machine.AVX2_RESTRICTION}
    code = ("from numba.core.registry import cpu_target as t; c = t.target_context.codegen(); "
            "print(c._get_host_cpu_name(), c._get_host_cpu_features())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, check=True)
    name, features = res.stdout.split()
    assert name == "haswell" and "avx512" not in features


FAKE_BENCHMARK = """
import json, sys
sys.path.insert(0, {benchmarks!r})
from machine import machine
if len(sys.argv) > 1:
    print("failing as asked", file=sys.stderr)
    raise SystemExit(int(sys.argv[1]))
print(json.dumps({{"machine": machine()}}))
"""


def _both_kinds(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """both_kinds.py on a stand-in benchmark that prints its machine record, or fails with the
    exit code it is given; a stray export must not leak into the native run."""
    script = tmp_path / "fake_bench.py"
    script.write_text(FAKE_BENCHMARK.format(benchmarks=str(BENCHMARKS)))
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    return subprocess.run([sys.executable, str(BENCHMARKS / "both_kinds.py"), "--", str(script)],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(cpu.capability() not in ("AVX2", "AVX512"), reason="an x86 CPU's kinds")
def test_both_kinds_runs_native_then_the_whole_restriction(tmp_path: Path) -> None:
    res = _both_kinds(tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert list(out) == ["native", "avx2"]
    native, avx2 = out["native"]["machine"], out["avx2"]["machine"]
    assert "restricted_by" not in native
    if not set(bench_machine.AVX2_RESTRICTION) & set(os.environ):  # else this process is capped
        assert native["cpu_capability"] == cpu.capability()
    assert avx2["restricted_by"] == bench_machine.AVX2_RESTRICTION
    assert avx2["cpu_capability"] == "AVX2" and avx2["native_bf16"] is False
    assert "restriction_missing" not in avx2


def test_both_kinds_stops_at_a_failed_run(tmp_path: Path) -> None:
    script = tmp_path / "fake_bench.py"
    script.write_text(FAKE_BENCHMARK.format(benchmarks=str(BENCHMARKS)))
    res = subprocess.run([sys.executable, str(BENCHMARKS / "both_kinds.py"), "--only", "avx2",
                          "--", str(script), "3"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 3
    assert res.stdout == ""
    assert "failing as asked" in res.stderr and "the avx2 run exited with 3" in res.stderr


def test_both_kinds_names_a_run_without_json(tmp_path: Path) -> None:
    script = tmp_path / "quiet.py"
    script.write_text("print('no json here')\n")
    res = subprocess.run([sys.executable, str(BENCHMARKS / "both_kinds.py"), "--only", "native",
                          "--", str(script)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().endswith("the native run printed no JSON object")
    assert "Traceback" not in res.stderr
