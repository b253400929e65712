"""Kill -9 anywhere: `aura data prepare`, `aura train` (checkpoint and memory-store writes
included), `aura memory build` and `aura learn` die by SIGKILL at a chosen point, and then every
command that reads what they were writing either works on the last good state or refuses in one
line with exit 2, never with a traceback; and the killed command, run again, ends exactly where
an uninterrupted run ends (same data, same weights bit for bit, same learned state).

The points are the durable-write operations tests/killpoints.py counts (renames, fsyncs,
directory changes, deletions, safetensors saves, metrics and ledger rows), found by running each
scenario once without a kill; that run is also the reference. A point may be ``torn``: the file
being written is left half written, as a kill during the write leaves it. The default suite
kills a few points per scenario chosen by a seed (``AURA_FAULT_SEED``, default 0), one of them
inside the scenario's ``focus``, and the points that once did harm; ``make test-slow`` kills at
every point, clean and torn. Every assertion names the scenario, the seed and the point.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

import aura
import killpoints
from aura.data.shards import MANIFEST
from aura.errors import DataError
from aura.learn.state import CURRENT
from aura.train.checkpoint import list_checkpoints, read_best, verify_checkpoint
from conftest import TINY_TRAIN, assert_answered, losses, make_docs, write_dir

SEED = int(os.environ.get("AURA_FAULT_SEED", "0"))
DEFAULT_POINTS = 2  # random points per scenario in the default suite, besides one in its focus
STEPS = 4
TRAIN_SETS = (*TINY_TRAIN, "train.eval_interval=2")
SNN_RAG = ("model.name=snn_rag", "model.memory_layers=[1]", "model.memory_capacity=64",
           "model.memory_chunk=8")


@dataclass
class Outcome:
    code: int  # the exit code, or minus the signal that killed the process
    out: str
    err: str
    ops: list[str]  # "N KIND PATH" for each operation it reached


class Children:
    """Commands run as children of one killpoints server (a ``python -c`` process)."""

    def __init__(self, scratch: Path):
        self.scratch, self.n = scratch, 0
        paths = (Path(aura.__file__).parents[1], Path(killpoints.__file__).parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, paths))}
        self.server = subprocess.Popen([sys.executable, "-c", killpoints.SERVE], env=env,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, argv: list[Any], root: Path, kill_at: int | None = None,
            torn: bool = False) -> Outcome:
        self.n += 1
        files = {k: self.scratch / f"{self.n}.{k}" for k in ("stdout", "stderr", "trace")}
        request = {"argv": [str(a) for a in argv], "root": str(root), "kill_at": kill_at,
                   "torn": torn, **{k: str(v) for k, v in files.items()}}
        assert self.server.stdin is not None and self.server.stdout is not None
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        reply = self.server.stdout.readline()
        assert reply, "the kill-point server died"
        out, err, trace = (files[k].read_text(errors="replace")
                           for k in ("stdout", "stderr", "trace"))
        for f in files.values():
            f.unlink()
        return Outcome(json.loads(reply)["code"], out, err, trace.splitlines())

    def close(self) -> None:
        assert self.server.stdin is not None
        self.server.stdin.close()
        self.server.wait(timeout=60)


def same_op(a: str, b: str) -> bool:
    """The same operation in two runs: temporary names and nonces differ, nothing else may."""
    return re.sub(r"[0-9a-f]{6,}", "#", a) == re.sub(r"[0-9a-f]{6,}", "#", b)


@dataclass(frozen=True)
class Scenario:
    """``argv`` killed on the state ``start`` makes in a fresh root; ``check`` after each kill.
    ``focus``: a path fragment of the operations the default suite always kills one of."""

    name: str
    start: Callable[[Lab, Path], None]
    argv: Callable[[Lab, Path], list[Any]]
    check: Callable[[Killed], None]
    focus: str


@dataclass
class Killed:
    """A root after a kill, what to compare it with, and how to say where it was killed."""

    lab: Lab
    root: Path
    reference: Path
    argv: list[Any]
    where: str

    def cli(self, *argv: Any) -> Outcome:
        """``aura ARGV``, held to the CLI's contract (``assert_answered``)."""
        res = self.lab.children.run(list(argv), self.root)
        assert_answered(res.code, res.err, f"{self.where}\n`aura {' '.join(map(str, argv))}`")
        return res

    def must(self, res: Outcome, ok: bool, what: str) -> None:
        assert ok, f"{self.where}: {what}\nexit {res.code}, stderr:\n{res.err}"


class Lab:
    """The server, the inputs scenarios share, and each scenario's reference run."""

    def __init__(self, root: Path, train_data: Path):
        self.root, self.train_data = root, train_data
        (root / "scratch").mkdir()
        self.children = Children(root / "scratch")
        self.corpus = {name: root / f"corpus-{name}" for name in ("a", "b")}
        write_dir(self.corpus["a"], make_docs(8, seed=21, words=(40, 90)))
        write_dir(self.corpus["b"], make_docs(9, seed=22, words=(40, 90)))
        self.inbox = root / "inbox"
        write_dir(self.inbox, make_docs(6, seed=5, words=(20, 50)))
        self._references: dict[str, tuple[Path, list[str]]] = {}
        self._roots = 0

    def fresh(self, name: str) -> Path:
        self._roots += 1
        root = self.root / f"{name}-{self._roots}"
        root.mkdir()
        return root

    def reference(self, scenario: Scenario) -> tuple[Path, list[str]]:
        """The scenario run once without a kill: its root and the operations it reached."""
        if scenario.name not in self._references:
            root = self.fresh(scenario.name)
            scenario.start(self, root)
            res = self.children.run(scenario.argv(self, root), root)
            assert res.code == 0 and res.ops, f"{scenario.name} without a kill:\n{res.err}"
            self._references[scenario.name] = root, res.ops
        return self._references[scenario.name]

    def kill_and_check(self, scenario: Scenario, point: int, torn: bool, once: str = "") -> None:
        """Kill ``scenario`` at ``point`` and check what it left; ``once``: the harm a kill
        there did before, for the message."""
        reference, ops = self.reference(scenario)
        root = self.fresh(scenario.name)
        scenario.start(self, root)
        argv = scenario.argv(self, root)
        where = (f"{scenario.name}, AURA_FAULT_SEED={SEED}: killed before operation {point} of "
                 f"{len(ops)}{' (torn)' if torn else ''}, `{ops[point - 1]}`"
                 f"{f' (where once {once})' if once else ''}")
        res = self.children.run(argv, root, kill_at=point, torn=torn)
        landed = res.code == -signal.SIGKILL and res.ops and same_op(res.ops[-1], ops[point - 1])
        assert landed, (f"{where}: the kill did not land there (exit {res.code}, last operation "
                        f"{res.ops[-1:]}): the operations are not deterministic\n{res.err}")
        scenario.check(Killed(self, root, reference, argv, where))
        shutil.rmtree(root)


def points(scenario: Scenario, ops: list[str], every: bool) -> list[tuple[int, bool]]:
    """Kill points as (operation number, torn): all of them, or DEFAULT_POINTS chosen by the
    seed plus one in the scenario's focus."""
    all_points = [(n, torn) for n, op in enumerate(ops, 1)
                  for torn in (False, True) if not torn or op.split()[1] in killpoints.TORN_KINDS]
    if every:
        return all_points
    rng = random.Random(f"{SEED}/{scenario.name}")
    chosen = rng.sample(all_points, DEFAULT_POINTS)
    focused = [p for p in all_points if scenario.focus in ops[p[0] - 1] and p not in chosen]
    return sorted([*chosen, *rng.sample(focused, 1)])


# --- data ---------------------------------------------------------------------------------------


def prepare_argv(corpus: str) -> Callable[[Lab, Path], list[Any]]:
    return lambda lab, root: ["data", "prepare", lab.corpus[corpus], "--tokenizer", "char",
                              "--val-fraction", "0.2", "--out", root / "data", "--json"]


def cache_key(data: Path) -> str:
    return json.loads((data / MANIFEST).read_text())["cache_key"]


def check_data(k: Killed, before: str | None) -> None:
    """`data stats` verifies the old dataset, the new one or (with none before) refuses; a new
    prepare then builds the reference's and leaves no file the manifest does not name."""
    data, want = k.root / "data", cache_key(k.reference / "data")
    stats = k.cli("data", "stats", data, "--json")
    if stats.code == 0:
        k.must(stats, json.loads(stats.out)["cache_key"] in (before, want), "a third dataset")
    else:
        k.must(stats, before is None, "the previous dataset is no longer usable")
    again = k.cli(*k.argv)
    k.must(again, again.code == 0 and cache_key(data) == want, "prepare again did not finish")
    manifest = json.loads((data / MANIFEST).read_text())
    named = {MANIFEST, manifest["tokenizer"]["file"]} | {
        s["file"] for split in manifest["splits"].values() for s in split["shards"]}
    left = sorted(p.name for p in data.iterdir() if p.name not in named)
    k.must(again, not left, f"files no manifest names are left behind: {left}")


def copy_reference(name: str, what: str) -> Callable[[Lab, Path], None]:
    """Start from scenario ``name``'s finished reference: its ``what`` (a run or a dataset)."""
    def start(lab: Lab, root: Path) -> None:
        shutil.copytree(lab.reference(SCENARIOS[name])[0] / what, root / what)

    return start


# --- runs ---------------------------------------------------------------------------------------


def train_argv(*sets: str, steps: int = STEPS, resume: bool = False
               ) -> Callable[[Lab, Path], list[Any]]:
    flags = [a for s in (*TRAIN_SETS, *sets) for a in ("--set", s)]
    return lambda lab, root: [
        "train", "--preset", "demo", *flags, "--data", lab.train_data, "--out", root / "run",
        "--max-steps", steps, "--checkpoint-interval", 2, "--keep-checkpoints", 1,
        *(["--resume"] if resume else []), "--json"]


def usable(run: Path, need_train_state: bool) -> list[Path]:
    """The run's checkpoints that verify, oldest first."""
    good = []
    for path in list_checkpoints(run):
        try:
            verify_checkpoint(path, need_train_state)
        except DataError:
            continue
        good.append(path)
    return good


def final_files(run: Path) -> dict[str, str]:
    """sha256 of every file of the run's newest checkpoint, as its meta.json lists them."""
    return json.loads((list_checkpoints(run)[-1] / "meta.json").read_text())["files"]


def readers(k: Killed, run: Path) -> list[list[Any]]:
    """The commands that only read a run: sampling and evaluation."""
    return [["generate", run, "--prompt", "The ", "--max-new-tokens", 2, "--device", "cpu",
             "--json"],
            ["eval", run, "--data", k.lab.train_data, "--max-tokens", 64, "--device", "cpu",
             "--json"]]


def check_run(k: Killed) -> None:
    """generate and eval work whenever a checkpoint verifies; --resume continues from the newest
    one that verifies (or starts afresh when none was saved) and ends bit-identical to the
    uninterrupted run: weights, optimizer, memories, losses and best.json."""
    run, ref = k.root / "run", k.reference / "run"
    readable = bool(usable(run, need_train_state=False))
    resumable = usable(run, need_train_state=True)
    for argv in readers(k, run):
        res = k.cli(*argv)
        k.must(res, res.code == 0 or not readable, f"{argv[0]} refused a run that verifies")
    res = k.cli(*k.argv, *([] if "--resume" in k.argv else ["--resume"]))
    k.must(res, res.code == 0, "--resume failed")
    said = "\n".join(line for line in res.err.splitlines() if line.startswith("resumed from "))
    want = f"resumed from {resumable[-1]} at step " if resumable else ""
    k.must(res, said.startswith(want) and bool(said) == bool(want),
           f"did not resume from the newest checkpoint that verifies ({want or 'none'})")
    k.must(res, final_files(run) == final_files(ref), "the resumed run ends elsewhere")
    k.must(res, losses(run) == losses(ref) and losses(run, "val_loss") == losses(ref, "val_loss"),
           "metrics.jsonl differs from the uninterrupted run's")
    k.must(res, read_best(run) == read_best(ref), "best.json differs")
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    k.must(res, left == sorted(p.name for p in (ref / "checkpoints").iterdir()),
           f"checkpoints/ holds other entries than the uninterrupted run's: {left}")


def check_memory_run(k: Killed) -> None:
    check_run(k)
    res = k.cli("memory", "build", k.root / "run", "--data", k.lab.train_data, "--json")
    k.must(res, res.code == 0, "memory build failed")


def check_memory_build(k: Killed) -> None:
    """The checkpoint holds the old bank or the new one, nothing between, so every reader
    works; building again ends where the uninterrupted build ended (when the kill came first:
    a second build numbers its entries on from the first's)."""
    run = k.root / "run"
    old = final_files(k.lab.reference(SCENARIOS["train-snn_rag"])[0] / "run")
    new = final_files(k.reference / "run")
    now = final_files(run)
    for argv in readers(k, run):
        res = k.cli(*argv)
        k.must(res, res.code == 0, f"{argv[0]} refused the run")
    k.must(res, now in (old, new), "the checkpoint is neither the old one nor the rebuilt one")
    res = k.cli(*k.argv)
    k.must(res, res.code == 0 and (now == new or final_files(run) == new),
           "memory build again did not end as the uninterrupted one")


# --- learn --------------------------------------------------------------------------------------


def learn_argv(*extra: Any) -> Callable[[Lab, Path], list[Any]]:
    return lambda lab, root: ["learn", "--watch", lab.inbox, "--state", root / "state", "--once",
                              "--save-every", 2, "--json", *extra]


def learned(state: Path) -> dict[str, Any]:
    """Every tensor of the committed generation, by file and name."""
    gen = state / json.loads((state / CURRENT).read_text())["generation"]
    return {f"{f.relative_to(gen)}:{name}": t
            for f in sorted(gen.rglob("*.safetensors")) for name, t in load_file(f).items()}


def check_learn(k: Killed) -> None:
    """A restart learns what was not saved, once: the state ends bit-identical to the
    uninterrupted run's."""
    res = k.cli(*k.argv)
    k.must(res, res.code == 0, "learn after the kill failed")
    got, want = learned(k.root / "state"), learned(k.reference / "state")
    same = got.keys() == want.keys() and all(got[n].equal(want[n]) for n in want)
    k.must(res, same, "the learned state differs from the uninterrupted run's")


def empty(lab: Lab, root: Path) -> None:
    """Start from nothing."""


SCENARIOS = {s.name: s for s in (
    Scenario("prepare", empty, prepare_argv("a"),
             lambda k: check_data(k, None), "manifest"),
    Scenario("prepare-over", copy_reference("prepare", "data"), prepare_argv("b"),
             lambda k: check_data(k, cache_key(k.lab.reference(SCENARIOS["prepare"])[0]
                                               / "data")), ".bin"),
    Scenario("train", empty, train_argv(), check_run, "checkpoints/."),
    Scenario("train-resume", copy_reference("train", "run"), train_argv(steps=6, resume=True),
             check_run, "checkpoints/step-"),
    Scenario("train-snn_rag", empty, train_argv(*SNN_RAG), check_memory_run,
             "/memory/"),
    Scenario("memory-build", copy_reference("train-snn_rag", "run"),
             lambda lab, root: ["memory", "build", root / "run", "--data", lab.train_data,
                                "--json"], check_memory_build, "/memory/"),
    Scenario("learn", empty, learn_argv(), check_learn, "gen-"),
    Scenario("learn-model", empty,
             lambda lab, root: [*learn_argv()(lab, root), "--model",
                                lab.reference(SCENARIOS["train-snn_rag"])[0] / "run",
                                "--train-steps", 1], check_learn, "/memory/"),
)}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, train_data: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("faults"), train_data)
    yield lab
    lab.children.close()


@pytest.mark.parametrize("name", SCENARIOS)
def test_a_kill_at_chosen_points_leaves_what_every_reader_accepts(lab: Lab, name: str) -> None:
    scenario = SCENARIOS[name]
    _, ops = lab.reference(scenario)
    for point, torn in points(scenario, ops, every=False):
        lab.kill_and_check(scenario, point, torn)


# Kill points that once broke something: (scenario, the first operation matching PATTERN, plus
# OFFSET operations), and what went wrong there.
REGRESSIONS = [
    ("prepare-over", r"replace data/manifest\.json$", 1,
     "the new manifest was in place, the old shards not yet deleted: the next prepare was a "
     "cache hit that never deleted them"),
    ("train", r"replace run/checkpoints/step-00000004$", 1,
     "the last checkpoint was in place, best.json not yet naming it: a resume at the last step "
     "kept the stale best.json, and generate sampled from the older checkpoint"),
    ("train", r"rmdir run/checkpoints/\.?step-00000002", 0,
     "pruning deleted file by file: a checkpoint was left without meta.json, which no run "
     "prunes"),
    ("memory-build", r"unlink run/checkpoints/", 1,
     "the old checkpoint was half deleted before the rebuilt one was renamed into place: the "
     "run had no usable checkpoint"),
]


@pytest.mark.parametrize(("name", "pattern", "offset", "what"), REGRESSIONS,
                         ids=[f"{r[0]}:{r[1]}" for r in REGRESSIONS])
def test_a_kill_where_one_once_did_harm_leaves_what_every_reader_accepts(
        lab: Lab, name: str, pattern: str, offset: int, what: str) -> None:
    scenario = SCENARIOS[name]
    _, ops = lab.reference(scenario)
    first = next(n for n, op in enumerate(ops, 1) if re.search(pattern, op))
    lab.kill_and_check(scenario, first + offset, torn=False, once=what)


@pytest.mark.slow
@pytest.mark.parametrize("name", SCENARIOS)
def test_a_kill_at_every_point_leaves_what_every_reader_accepts(lab: Lab, name: str) -> None:
    scenario = SCENARIOS[name]
    _, ops = lab.reference(scenario)
    for point, torn in points(scenario, ops, every=True):
        lab.kill_and_check(scenario, point, torn)
