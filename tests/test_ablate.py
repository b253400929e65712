"""`aura ablate`: every variant x seed once, resumable without re-running finished runs, deltas
paired by seed, a table and a chart; a bad switch is one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aura.config import load_config
from aura.errors import ConfigError
from aura.eval.ablate import FULL, AblationPlan, markdown_table, run_ablation
from conftest import TINY_TRAIN, assert_usage_error, requires_extra

HIPPO = ["model.name=hippocampal", "model.n_place_cells=64", "model.memory_capacity=64",
         "model.memory_writes=8", "model.memory=false", "model.prosody=false"]


def plan(tmp_path: Path, seeds: int = 2) -> AblationPlan:
    full = load_config(preset="demo", overrides=[*TINY_TRAIN, *HIPPO, "train.max_steps=3"])
    return AblationPlan(full, tmp_path / "data", ["model.place_cells", "model.grid_cells"],
                        [7 + i for i in range(seeds)], tmp_path / "ablation")


class FakeRunner:
    """Scores each run by its switches and seed; optionally fails on its n-th call."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[tuple[bool, bool, int]] = []
        self.fail_at = fail_at

    def __call__(self, cfg, data, run_dir):
        m = cfg.model
        self.calls.append((m.place_cells, m.grid_cells, cfg.train.seed))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt
        loss = 2.0 + 0.1 * (not m.place_cells) + 0.01 * cfg.train.seed
        return {"val_loss": loss, "val_bpb": loss / 2, "tokens_per_s": 100.0, "step": 3.0}


def test_resumes_without_rerunning_finished_runs_and_pairs_by_seed(tmp_path: Path) -> None:
    requires_extra("matplotlib", "plot")
    first = FakeRunner(fail_at=4)
    with pytest.raises(KeyboardInterrupt):
        run_ablation(plan(tmp_path), first, log=lambda s: None)
    assert len(first.calls) == 4  # seed 7's three variants, then seed 8's full, interrupted
    again = FakeRunner()
    summaries = run_ablation(plan(tmp_path), again, log=lambda s: None)
    assert again.calls == [(True, True, 8), (False, True, 8), (True, False, 8)]
    assert [v.name for v in summaries] == [FULL, "no-place_cells", "no-grid_cells"]
    no_place = summaries[1]
    assert no_place.delta_loss == pytest.approx([0.1, 0.1])  # paired: the seed term cancels
    assert summaries[2].delta_loss == pytest.approx([0.0, 0.0])
    table = markdown_table(summaries)
    assert "| no-place_cells | 2 | 2.1750 ± 0.0071 | +0.1000 ± 0.0000 |" in table
    out = tmp_path / "ablation"
    assert (out / "ablation.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((out / "ablation.json").read_text())["seeds"] == [7, 8]
    assert "+0.1000" in (out / "ablation.md").read_text()
    nothing = FakeRunner()
    run_ablation(plan(tmp_path), nothing, log=lambda s: None)
    assert nothing.calls == []  # all finished: nothing runs again


def test_a_changed_plan_does_not_reuse_other_results(tmp_path: Path) -> None:
    run_ablation(plan(tmp_path, seeds=1), FakeRunner(), log=lambda s: None)
    changed = plan(tmp_path, seeds=1)
    changed.full.train.lr = 5e-3
    with pytest.raises(ConfigError, match="another config"):
        run_ablation(changed, FakeRunner(), log=lambda s: None)


@pytest.mark.parametrize(("switch", "needle"), [
    ("model.nope", "no such config key"), ("model.n_layer", "not a boolean"),
    ("nope", "no such config key"), ("model.bias", "already false")])
def test_a_bad_switch_is_one_line_exit_2(run_cli, tmp_path: Path, switch: str,
                                          needle: str) -> None:
    res = run_cli("ablate", "--preset", "hippocampal-cpu", "--data", tmp_path, "--switch",
                  "model.place_cells", "--switch", switch, "--steps", 2, "--out", tmp_path / "a")
    assert_usage_error(res, switch, needle)
    assert not (tmp_path / "a").exists()


def test_key_value_switches(tmp_path: Path) -> None:
    full = load_config(preset="snn-rag-cpu", overrides=["train.max_steps=3"])
    p = AblationPlan(full, tmp_path, ["model.ffn=mlp", "model.memory_layers=[]"], [1], tmp_path)
    (_, f), (ffn, mlp), (mem, none) = p.variants()
    assert (ffn, mlp.model.ffn, f.model.ffn) == ("ffn=mlp", "mlp", "snn")
    assert (mem, none.model.memory_layers) == ("memory_layers=[]", [])
    assert [r[3].parent.name for r in p.runs()] == ["full", "ffn=mlp", "memory_layers=__"]
    with pytest.raises(ConfigError, match="already has"):
        AblationPlan(full, tmp_path, ["model.ffn=snn"], [1], tmp_path)
    with pytest.raises(ConfigError, match=r"model\.ffn"):
        AblationPlan(full, tmp_path, ["model.ffn=lstm"], [1], tmp_path)


def test_a_yaml_plan_with_a_bad_value_is_one_line(run_cli, tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text("preset: demo\nsteps: many\ndata: d\nout: o\nswitch: [train.compile]\n")
    assert_usage_error(run_cli("ablate", "--plan", path), "steps must be an integer")
    path.write_text("preset: demo\nsteps: 2\nwhat: 1\n")
    assert_usage_error(run_cli("ablate", "--plan", path), "unknown plan keys")


@pytest.mark.slow
def test_ablate_trains_and_reports(run_cli, train_data: Path, tmp_path: Path) -> None:
    requires_extra("matplotlib", "plot")
    sets = [a for s in (*TINY_TRAIN, *HIPPO) for a in ("--set", s)]
    argv = ["ablate", "--preset", "demo", *sets, "--data", train_data, "--switch",
            "model.place_cells", "--steps", 2, "--seeds", 1, "--eval-tokens", 200,
            "--out", tmp_path / "abl", "--json"]
    res = run_cli(*argv)
    assert res.code == 0, res.err
    variants = res.json()["variants"]
    assert [v["name"] for v in variants] == [FULL, "no-place_cells"]
    assert all(len(v["val_loss"]) == 1 and 0 < v["val_loss"][0] < 10 for v in variants)
    saved = json.loads((tmp_path / "abl" / "no-place_cells" / "seed-1337" / "result.json")
                       .read_text())
    assert saved["config"]["model"]["place_cells"] is False and saved["step"] == 2
    again = run_cli(*argv)
    assert again.code == 0 and again.err.count("done before") == 2
