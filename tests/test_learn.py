"""`aura learn`: each new or changed text learned exactly once, also across kill -9; bad files
skipped with a reason; warmup sweeps; a model's memories and gradient steps kept in the state
directory, never in the user's run."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import select
import shutil
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from tqdm import tqdm

from aura.cli import main
from aura.data.tokenizers import ByteTokenizer
from aura.learn import LearnOptions, LearnService, classify
from aura.learn import state as learn_state
from aura.learn.learner import LEARNER_FILE, MODEL_FILE
from aura.learn.ledger import Ledger
from aura.learn.state import CURRENT, LEDGER, StateDir
from aura.memory.store import EpisodicStore
from aura.memory.writer import MemoryWriter
from aura.models import build_model, register_model
from aura.models.gpt import GPT
from aura.train.checkpoint import TrainState, save_checkpoint
from conftest import CliResult, assert_usage_error, make_docs, tiny_config, write_dir


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The service's work is many small ops: one thread is faster on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def service(watch: Path, **kw: object) -> LearnService:
    opts = LearnOptions(watch, once=True, progress=False, **kw)  # type: ignore[arg-type]
    return LearnService(opts, log=lambda _m: None)


def current_gen(state: Path) -> Path:
    return state / json.loads((state / CURRENT).read_text())["generation"]


def learned_tensors(state: Path) -> dict[str, torch.Tensor]:
    return load_file(str(current_gen(state) / LEARNER_FILE))


def all_tensors(state: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the committed generation: the learner's, STDP, whitener, Oja, model."""
    gen = current_gen(state)
    return {f"{f.relative_to(gen).as_posix()}:{name}": t
            for f in sorted(gen.rglob("*.safetensors")) for name, t in load_file(str(f)).items()}


def ledger_rows(state: Path, status: str = "applied") -> list[tuple[str, str]]:
    with sqlite3.connect(state / LEDGER) as db:
        return db.execute("SELECT sha256, path FROM texts WHERE status=? ORDER BY seq",
                          (status,)).fetchall()


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def watch(tmp_path: Path) -> Path:
    root = tmp_path / "inbox"
    write_dir(root, make_docs(6, seed=5, words=(40, 80)))
    return root


# --- one pass, changes, bad files --------------------------------------------------------------


def test_once_learns_each_text_then_nothing(run_cli: Callable[..., CliResult],
                                            watch: Path) -> None:
    first = run_cli("learn", "--watch", watch, "--once", "--json")
    assert first.code == 0, first.err
    s = first.json()
    size = sum(p.stat().st_size for p in watch.rglob("*.txt"))
    assert (s["learned"], s["tokens"], s["skipped"]) == (6, size, {})
    assert s["total"]["texts"] == 6
    state = watch / ".aura-learn"
    assert learned_tensors(state)["position"].item() == size  # bytes = tokens, learned once
    again = run_cli("learn", "--watch", watch, "--once", "--json").json()
    assert (again["learned"], again["unchanged"]) == (0, 6)
    assert learned_tensors(state)["position"].item() == size
    text = run_cli("learn", "--watch", watch, "--once")
    assert text.code == 0 and "learned 0 files" in text.out and "6 texts learned in all" in text.out


def test_changed_file_is_relearned_renamed_or_copied_is_not(watch: Path) -> None:
    service(watch).run()
    (watch / "doc00.txt").write_text("A new version of the first document.\n")
    (watch / "doc01.txt").rename(watch / "moved.txt")
    shutil.copy(watch / "doc03.txt", watch / "part" / "copy.txt")
    s = service(watch).run()
    assert (s.learned, s.duplicates) == (1, 2)
    rows = ledger_rows(watch / ".aura-learn")
    assert len(rows) == 7 and len({sha for sha, _ in rows}) == 7
    assert rows[-1][1] == "doc00.txt"
    with sqlite3.connect(watch / ".aura-learn" / LEDGER) as db:
        stats = json.loads(db.execute("SELECT stats FROM texts ORDER BY seq DESC").fetchone()[0])
    assert stats["tokens"] == len("A new version of the first document.\n")
    assert 0 < stats["spike_rate"] <= 1 and stats["surprise_bits"] > 0


def test_bad_files_are_logged_and_skipped_with_their_reason(
        watch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (watch / "image.txt").write_bytes(b"GIF89a\0\0\1")
    (watch / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (watch / "blank.txt").write_text(" \n\t\n")
    (watch / "locked.txt").write_text("you cannot read me\n")
    (watch / ".hidden.txt").write_text("hidden files are never watched\n")
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    lines: list[str] = []
    svc = LearnService(LearnOptions(watch, once=True, progress=False), log=lines.append)
    s = svc.run()
    assert s.learned == 6
    assert s.skipped == {"binary": 1, "invalid_utf8": 1, "empty": 1, "unreadable": 1}
    for name, reason in (("image", "binary"), ("latin1", "invalid utf8"), ("blank", "empty"),
                         ("locked", "unreadable")):
        assert sum(f"{name}.txt" in line and reason in line for line in lines) == 1, lines
    log = (watch / ".aura-learn" / "learn.log").read_text()
    assert "skipped locked.txt: unreadable" in log
    again = service(watch).run()  # an unreadable file is not retried until it changes
    assert again.skipped == {} and again.learned == 0


def test_any_bytes_are_learned_or_skipped_never_a_crash(tmp_path: Path) -> None:
    """Whatever a file holds, the service records it as learned or skipped for the reason
    ``classify`` gives, and keeps going."""
    watch = tmp_path / "in"
    watch.mkdir()
    path = watch / "f.txt"
    svc = service(watch)

    @settings(max_examples=60)
    @given(st.one_of(st.binary(max_size=300),
                     st.text(max_size=200).map(lambda t: t.encode("utf-8")),
                     st.text(max_size=50).map(lambda t: t.encode("utf-8") + b"\0")))
    def check(data: bytes) -> None:
        path.write_bytes(data)
        what = svc.process(path)
        reason = classify(data)
        row = svc.ledger.text(hashlib.sha256(data).hexdigest())
        assert row is not None and what != "vanished"
        if reason == "ok":
            assert row.status == "applied" and row.reason is None
            assert what in ("learned", "unchanged", "duplicate")
        else:
            assert reason in ("binary", "invalid_utf8", "empty")
            assert row.status == "skipped" and row.reason == reason
            assert what in (f"skipped:{reason}", "unchanged", "duplicate")

    try:
        check()
    finally:
        svc.run()
    state = watch / ".aura-learn"
    with sqlite3.connect(state / LEDGER) as db:
        learned = db.execute("SELECT SUM(bytes), SUM(tokens) FROM texts "
                             "WHERE status='applied'").fetchone()
    assert learned[0] == learned[1] == learned_tensors(state)["position"].item()


def test_a_failed_whitening_skips_that_oja_step_not_the_file(
        watch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aura.plasticity import OnlineWhitener

    def fail(*_a: object, **_kw: object) -> torch.Tensor:
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(OnlineWhitener, "transform", fail)
    svc = service(watch)
    stats = svc.learner.apply("A text whose Oja step cannot run.", "key")
    assert stats["oja_skipped"] == 1 and stats["tokens"] == 33
    assert "oja_residual" not in svc.learner.evaluate(["held out"])
    assert svc.run().learned == 6


# --- exactly once under kill -9 ----------------------------------------------------------------


# Where a child service stops to report, each a moment a crash must survive: the learner has
# taken a text but the ledger not yet ("applied"); the ledger committed it but nothing is saved
# ("recorded"); a save has written the learner's files but no state.json ("writing"); a complete
# generation is not yet named by CURRENT ("before_commit"); CURRENT names it but the previous
# generation is still on disk ("after_commit").
PHASES = ("applied", "recorded", "writing", "before_commit", "after_commit")
GO_ON = b"g"  # the parent's answer to one report: exactly the one byte the child waits for


def report_phases(report: Callable[[str], None]) -> None:
    """Make this process call ``report(phase)`` at each of PHASES. It patches classes and a
    module for good, so only a forked child may call it."""
    record_text = Ledger.record_text

    def recording(self: Ledger, sha256: str, status: str, *args: Any) -> int:
        if status == "applied":
            report("applied")
        seq = record_text(self, sha256, status, *args)
        if status == "applied":
            report("recorded")
        return seq

    commit = StateDir.commit

    def committing(self: StateDir, meta: dict[str, Any], write: Callable[[Path], None]) -> Path:
        def writing(directory: Path) -> None:
            write(directory)
            report("writing")

        return commit(self, meta, writing)

    write_text = learn_state.atomic_write_text

    def pointing(path: Path, text: str) -> None:
        pointer = Path(path).name == CURRENT
        if pointer:
            report("before_commit")
        write_text(path, text)
        if pointer:
            report("after_commit")

    Ledger.record_text = recording  # type: ignore[method-assign]
    StateDir.commit = committing  # type: ignore[method-assign]
    learn_state.atomic_write_text = pointing  # type: ignore[assignment]


def run_child_until(argv: list[str], stop: Callable[[str, int], bool],
                    kill_after: float | None = None) -> tuple[str | None, int]:
    """``aura ARGV`` in a forked child (Aura is already imported: no start-up cost) that pauses at
    each of PHASES until the parent answers. The parent SIGKILLs it at the first phase where
    ``stop(phase, times this run reached it)`` holds, so the kill lands exactly there, or, with
    ``kill_after``, once that many seconds have passed wherever it is. Returns the phase it was
    killed at (None: killed by the clock, or it finished) and its wait status."""
    reports, child_reports = os.pipe()
    child_answers, answers = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one thread, as DataLoader workers do after a fork
        code = 1
        try:
            os.close(reports)
            os.close(answers)

            def report(phase: str) -> None:
                os.write(child_reports, phase.encode() + b"\n")
                os.read(child_answers, len(GO_ON))

            report_phases(report)
            # tqdm's write lock holds a semaphore shared with this process's parent: killed
            # while drawing a bar, the child would leave it taken and the parent's next bar
            # would wait forever. The child draws under a lock of its own.
            tqdm.set_lock(threading.RLock())
            torch.set_num_threads(1)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            code = main(argv)
        finally:
            os._exit(code)
    os.close(child_reports)
    os.close(child_answers)
    deadline = None if kill_after is None else time.monotonic() + kill_after
    reached: Counter[str] = Counter()
    try:
        with os.fdopen(reports, "rb") as lines:  # one line at most in flight: the child waits
            while True:
                wait = 60.0 if deadline is None else max(0.0, deadline - time.monotonic())
                if not select.select([lines], [], [], wait)[0]:
                    assert deadline is not None, "the service reported nothing for 60 s"
                    return None, kill_and_reap(pid)
                line = lines.readline()
                if not line:  # the child exited
                    return None, os.waitpid(pid, 0)[1]
                phase = line.decode().strip()
                reached[phase] += 1
                if stop(phase, reached[phase]):
                    return phase, kill_and_reap(pid)
                os.write(answers, GO_ON)
    finally:
        os.close(answers)
        with contextlib.suppress(ChildProcessError):  # an assertion above left it running
            kill_and_reap(pid)


def kill_and_reap(pid: int) -> int:
    """SIGKILL the child unless it has exited; its wait status. Only its parent reaps it, so
    the pid cannot name another process yet."""
    done, status = os.waitpid(pid, os.WNOHANG)
    if not done:
        os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
    return status


def test_kill9_at_every_moment_of_a_step_and_a_save_loses_and_doubles_nothing(
        tmp_path: Path) -> None:
    """Kill the service with SIGKILL exactly inside a file's step and at each moment of a save,
    then at random times, restarting it each time: every kill leaves the state it should, and the
    final state equals an uninterrupted run's, bit for bit."""
    watch = tmp_path / "inbox"
    write_dir(watch, make_docs(40, seed=9, words=(20, 40)))
    reference = tmp_path / "reference"
    assert service(watch, state=reference).run().learned == 40

    state = tmp_path / "state"
    argv = ["learn", "--watch", str(watch), "--state", str(state), "--once", "--save-every", "4"]

    def kill_at(phase: str, times: int) -> None:
        killed, status = run_child_until(argv, lambda p, n: (p, n) == (phase, times))
        assert killed == phase and os.WIFSIGNALED(status), (phase, status)
        assert os.WTERMSIG(status) == signal.SIGKILL

    def generation() -> str | None:
        with contextlib.suppress(OSError):
            return json.loads((state / CURRENT).read_text())["generation"]
        return None

    kill_at("applied", 2)  # the second file is learned but not in the ledger, nothing saved
    assert generation() is None and len(ledger_rows(state)) == 1
    kill_at("before_commit", 2)  # starts over from nothing: saves after files 4 and 8
    assert generation() == "gen-00000001" and (state / "gen-00000002" / "state.json").is_file()
    assert len(ledger_rows(state)) == 8
    kill_at("after_commit", 1)  # back to file 4: files 5-8 learned again and saved
    assert generation() == "gen-00000002" and (state / "gen-00000001").is_dir()
    kill_at("writing", 1)  # files 9-12, and a generation half written
    assert generation() == "gen-00000002" and (state / "gen-00000003").is_dir()
    assert not (state / "gen-00000003" / "state.json").exists()
    kill_at("recorded", 3)  # back to file 8: files 9-11 in the ledger, not saved
    assert generation() == "gen-00000002" and not (state / "gen-00000003").exists()
    assert len(ledger_rows(state)) == 11

    rng = random.Random(7)
    for _ in range(3):  # and anywhere: starting, rolling back, between the phases above
        killed, status = run_child_until(argv, lambda p, n: False, rng.uniform(0.0, 0.5))
        assert killed is None
        if not os.WIFSIGNALED(status):  # it finished first
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
            break

    before = len(ledger_rows(state))
    s = service(watch, state=state).run()
    rows = ledger_rows(state)
    assert before + s.learned - s.relearned == len(rows) == 40
    assert len({sha for sha, _ in rows}) == 40
    assert [p for _, p in rows] == [p for _, p in ledger_rows(reference)]
    got, want = all_tensors(state), all_tensors(reference)
    assert {"learner.safetensors:counts", "stdp/state.safetensors:weights_q",
            "oja/state.safetensors:weight", "whitener/state.safetensors:cov"} <= want.keys()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


# --- the loop, signals, warmup -----------------------------------------------------------------


def test_watch_mode_picks_up_new_files_and_stops_cleanly_on_sigterm(watch: Path) -> None:
    svc = LearnService(LearnOptions(watch, interval=0.05, settle=0.0, progress=False),
                       log=lambda _m: None)
    state = watch / ".aura-learn"

    def feed() -> None:
        deadline = time.monotonic() + 10
        while len(ledger_rows(state)) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        (watch / "late.txt").write_text("A file that arrives while the service watches.\n")
        while len(ledger_rows(state)) < 7 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    def sentinel(_signum: int, _frame: object) -> None:
        """The caller's own handler, which the service must put back when it stops."""

    feeder = threading.Thread(target=feed)
    previous = {sig: signal.signal(sig, sentinel) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        feeder.start()
        s = svc.run()
        feeder.join()
        restored = {sig: signal.getsignal(sig) for sig in previous}
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert s.stopped == "SIGTERM" and s.learned == 7 and s.passes >= 2
    assert json.loads((current_gen(state) / "state.json").read_text())["learned"]["texts"] == 7
    assert restored == {signal.SIGINT: sentinel, signal.SIGTERM: sentinel}


def test_warmup_sweeps_are_validated_saved_and_not_repeated(
        run_cli: Callable[..., CliResult], watch: Path) -> None:
    res = run_cli("learn", "--watch", watch, "--once", "--warmup-sweeps", "3",
                  "--warmup-samples", "40")
    assert res.code == 0, res.err
    sweeps = [line for line in res.err.splitlines() if line.startswith("warmup sweep")]
    assert [line.split(":")[0] for line in sweeps] == [f"warmup sweep {k}/3" for k in range(4)]
    state = watch / ".aura-learn"
    meta = json.loads((current_gen(state) / "state.json").read_text())
    assert [w["sweep"] for w in meta["warmup"]] == [1, 2, 3]
    assert all(w["unigram_bits"] > 0 and w["drift"] > 0 for w in meta["warmup"])
    assert meta["warmup"][-1]["drift"] < meta["warmup"][0]["drift"]  # the weights settle
    again = run_cli("learn", "--watch", watch, "--once", "--warmup-sweeps", "3", "--json")
    assert again.json()["warmup"] == meta["warmup"] and "warmup sweep" not in again.err


# --- bad input ---------------------------------------------------------------------------------


def test_bad_input_is_one_line_exit_2(run_cli: Callable[..., CliResult], watch: Path,
                                      tmp_path: Path) -> None:
    assert_usage_error(run_cli("learn", "--watch", tmp_path / "nope", "--once"), "does not exist")
    assert_usage_error(run_cli("learn", "--watch", watch / "doc00.txt", "--once"),
                       "not a directory")
    assert_usage_error(run_cli("learn", "--watch", watch, "--once", "--train-steps", "2"),
                       "--model")
    assert_usage_error(run_cli("learn", "--watch", watch, "--once", "--save-every", "0"),
                       "--save-every")
    assert run_cli("learn", "--watch", watch, "--once", "--step-delay", "1").code == 2  # tests'
    (tmp_path / "file").write_text("x")
    assert_usage_error(run_cli("learn", "--watch", watch, "--state", tmp_path / "file"),
                       "is a file")
    state = tmp_path / "state"
    assert run_cli("learn", "--watch", watch, "--state", state, "--once").code == 0
    (state / CURRENT).write_text("{not json")
    assert_usage_error(run_cli("learn", "--watch", watch, "--state", state, "--once"), "corrupt")
    shutil.rmtree(state)
    assert run_cli("learn", "--watch", watch, "--state", state, "--once").code == 0
    with open(current_gen(state) / LEARNER_FILE, "r+b") as f:
        f.seek(20)
        f.write(b"\xff\xff")
    assert_usage_error(run_cli("learn", "--watch", watch, "--state", state, "--once"),
                       LEARNER_FILE, "corrupt")
    shutil.rmtree(state)
    state.mkdir()
    (state / LEDGER).write_bytes(b"this is not a database" * 100)
    assert_usage_error(run_cli("learn", "--watch", watch, "--state", state, "--once"),
                       "SQLite")


def test_a_second_service_on_the_same_state_is_refused(
        run_cli: Callable[..., CliResult], watch: Path) -> None:
    first = service(watch)
    try:
        assert_usage_error(run_cli("learn", "--watch", watch, "--once"), "another `aura learn`")
    finally:
        first.run()


# --- with a model ------------------------------------------------------------------------------


@register_model("gpt_learn_test")
class MemoryGPT(GPT):
    """gpt with one episodic store over its hidden states, as the memory models keep."""

    def __init__(self, config: object):
        super().__init__(config)  # type: ignore[arg-type]
        store = EpisodicStore(self.config.n_embd, self.config.n_embd, capacity=64)
        self.writers = {"episodic": MemoryWriter(store)}


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of a tiny byte-level gpt with an episodic store."""
    run = tmp_path_factory.mktemp("learn-model") / "run"
    cfg = tiny_config("model.name=gpt_learn_test", "model.vocab_size=256")
    torch.manual_seed(0)
    save_checkpoint(run, MemoryGPT(cfg.model), ByteTokenizer(), cfg, TrainState(step=5), None)
    return run


def test_model_memories_and_gradient_steps_live_in_the_state_dir(
        run_cli: Callable[..., CliResult], watch: Path, memory_run: Path, tmp_path: Path) -> None:
    before = tree_digest(memory_run)
    state = tmp_path / "state"
    res = run_cli("learn", "--watch", watch, "--state", state, "--model", memory_run, "--once",
                  "--train-steps", "2", "--json")
    assert res.code == 0, res.err
    assert res.json()["learned"] == 6
    assert tree_digest(memory_run) == before  # the user's run is never written
    gen = current_gen(state)
    store = EpisodicStore.load(gen / "memory" / "episodic")
    assert len(store) == 64  # more surprising positions than its capacity were written
    texts = [p.read_bytes() for p in watch.rglob("*.txt")]
    sources = store.sources(store.ids[store.ids >= 0].tolist())
    assert all(src and src[1] and any(bytes(src[1]) in t for t in texts) for src in sources)
    weights = load_file(str(gen / MODEL_FILE))
    original = load_file(str(next(memory_run.rglob("model.safetensors"))))
    assert weights.keys() == original.keys()
    assert any(not torch.equal(weights[k], original[k]) for k in weights)
    again = run_cli("learn", "--watch", watch, "--state", state, "--model", memory_run, "--once",
                    "--json")
    assert again.json()["learned"] == 0
    assert_usage_error(run_cli("learn", "--watch", watch, "--state", state, "--once"),
                       "use another --state")


def own_writer_run(root: Path, name: str, *overrides: str) -> Path:
    cfg = tiny_config(f"model.name={name}", "model.vocab_size=256", "model.memory_capacity=64",
                      *overrides)
    torch.manual_seed(0)
    run = root / name
    save_checkpoint(run, build_model(cfg.model), ByteTokenizer(), cfg, TrainState(step=1), None)
    return run


def test_a_model_that_writes_its_own_memories_gets_them_at_token_positions(
        watch: Path, tmp_path: Path) -> None:
    """snn_rag queues its own chunk encodings when asked to remember: the service asks during
    the surprise pass and passes each window's service-wide token offset."""
    run = own_writer_run(tmp_path, "snn_rag", "model.memory_chunk=8")
    state = tmp_path / "state"
    s = service(watch, state=state, model=run, train_steps=1).run()
    assert s.learned == 6
    store = EpisodicStore.load(current_gen(state) / "memory" / "layer0")
    sizes = [p.stat().st_size for p in sorted(watch.rglob("*.txt"))]
    assert store.next_id == sum(n // 8 for n in sizes)  # every 8-token chunk once, no more
    live = store.source_pos[store.ids >= 0]
    assert len(store) == 64 and len(set(live.tolist())) == 64
    assert int(live.min()) >= 7 and int(live.max()) < s.tokens  # chunk ends, in tokens


def test_natural_brains_hippocampus_is_written_by_the_service(watch: Path,
                                                             tmp_path: Path) -> None:
    """natural_brain's hippocampus is told what to remember (``remembers_by_salience``, as
    hippocampal's: test_continual_store.py): no note, and the saved store holds each window's
    most salient tokens, at service positions."""
    run = own_writer_run(tmp_path, "natural_brain", "model.memory_dim=16",
                         "model.liquid_moe=false")
    lines: list[str] = []
    state = tmp_path / "state"
    s = LearnService(LearnOptions(watch, state=state, model=run, once=True, progress=False),
                     log=lines.append).run()
    assert not [line for line in lines if "hippocampus" in line]
    store = EpisodicStore.load(current_gen(state) / "memory" / "hippocampus")
    sizes = [p.stat().st_size for p in sorted(watch.rglob("*.txt"))]
    assert store.next_id == sum(min(4, n - off) for n in sizes for off in range(0, n, 32))
    live = store.source_pos[store.ids >= 0]
    assert len(store) == 64 and int(live.max()) < s.tokens


def test_a_store_the_learner_cannot_write_is_named_once(tmp_path: Path) -> None:
    """A store keyed by its own projection in a model that cannot be told what to remember is
    named once: the learner cannot write it."""
    from aura.learn.learner import PlasticLearner

    cfg = tiny_config("model.name=natural_brain", "model.vocab_size=256",
                      "model.memory_dim=16", "model.liquid_moe=false")
    model = build_model(cfg.model)
    model.remembers_by_salience = False
    assert PlasticLearner(ByteTokenizer(), model).notes == [
        "memory store 'hippocampus' (16-d keys) is written only by the model itself (its "
        "training forwards: --train-steps)"]


def test_service_positions_start_after_a_trained_bank(watch: Path, tmp_path: Path) -> None:
    """snn_rag reads only entries from text before each token; the service counts its text from
    just past the newest entry the model came with, so a trained bank stays readable."""
    cfg = tiny_config("model.name=snn_rag", "model.vocab_size=256", "model.memory_capacity=64",
                      "model.memory_chunk=8")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    (store,) = model.memory_stores().values()
    keys = torch.randn(10, store.dim_key)
    store.write(keys, keys, source_pos=torch.arange(10) * 100 + 4000)  # up to 4900
    run = tmp_path / "trained"
    save_checkpoint(run, model, ByteTokenizer(), cfg, TrainState(step=1), None)
    s = service(watch, state=tmp_path / "state", model=run).run()
    saved = EpisodicStore.load(current_gen(tmp_path / "state") / "memory" / "layer0")
    new = saved.source_pos[(saved.ids >= 10)]
    assert len(new) > 0 and int(new.min()) >= 4901 + 7 and int(new.max()) < 4901 + s.tokens
