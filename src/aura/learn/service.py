"""`aura learn`: watch a directory and learn every new or changed text in it exactly once.

Each pass lists the watched files (sorted, hidden ones left out), and for each file whose stat
signature changed reads its bytes once: the sha256 of those bytes is the file's identity in the
ledger, and the very same bytes are classified (binary, invalid UTF-8, empty: skipped with the
reason) and learned. Then one SQLite transaction records the outcome.

Exactly once under kill -9: the learner changes only in memory until a save, and a save is one
generation of the state directory that records ``ledger_seq``, the newest ledger row it contains
(see state.py for how a generation is committed). At start the service loads the committed
generation and rolls the ledger back to its ``ledger_seq``, so a text learned after the last
save but before the crash is forgotten by both and learned again, once. A crash between the
learner's update and the ledger's commit loses both, and a crash during a save leaves the
previous generation: no state ever holds a text twice or a text the ledger does not know.

Identity is content: a text is learned once whatever its path, so a renamed or copied file is
recorded under its new path and not learned again; a changed file (new content) is learned.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from aura.data.sources import BINARY_SNIFF, check_glob
from aura.errors import AuraError, DataError
from aura.learn.learner import Learner, LearnerConfig, build_learner
from aura.learn.ledger import Ledger, PathRow
from aura.learn.state import LEDGER, LOG, StateDir
from aura.learn.warmup import WarmupPool, drift, sweep

STATE_DEFAULT = ".aura-learn"  # inside the watched directory; hidden, so never watched itself
RACY_NS = 2_000_000_000  # a file modified this close to when it was read is read again


def classify(data: bytes) -> str:
    """'ok', or why the bytes are no text: the rules of ``aura.data.sources`` (a NUL in the
    first 8 KiB is binary, then strict UTF-8, then whitespace only is empty)."""
    if b"\0" in data[:BINARY_SNIFF]:
        return "binary"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    return "ok" if text.strip() else "empty"


@dataclass
class LearnOptions:
    """What `aura learn` does; each field is also its command-line flag (``--save-every``), with
    this docstring as its help."""

    watch: Path = field(metadata={"metavar": "DIR"})
    """The directory whose text files are learned."""
    state: Path | None = field(default=None, metadata={"metavar": "STATE_DIR"})
    """Where the learned state, the ledger and the log live; default: DIR/.aura-learn."""
    model: Path | None = field(default=None, metadata={"metavar": "RUN_DIR"})
    """A run or checkpoint whose model learns too: its memories, and --train-steps. Never
    written to: the learned copy lives in the state."""
    once: bool = False
    """One pass over DIR, then exit."""
    interval: float = 5.0
    """Seconds between passes."""
    settle: float = 2.0
    """Seconds a file must be unmodified before a watching pass reads it."""
    glob: str = "*.txt"
    """File pattern (recursive; hidden files never)."""
    save_every: int = 100
    """Files learned between saves."""
    save_seconds: float = 60.0
    """Or seconds between saves, whichever comes first."""
    max_file_mb: float = 256.0
    """Larger files are skipped."""
    warmup_sweeps: int = 0
    """Sweeps over random samples of the files present at start, before the first pass, to
    settle the plastic weights; each is validated on held-out text and saved. 0: none."""
    warmup_samples: int = 2000
    """Samples per warmup sweep."""
    train_steps: int = 0
    """Gradient steps on each file (needs --model)."""
    lr: float = 1e-4
    """AdamW learning rate of those steps."""
    replay_tokens: int = 65536
    """Replay buffer of those steps, in tokens: a share of each step's windows come from texts
    learned before (reservoir-sampled, replayed by priority: first their plasticity salience,
    then their loss), so new files do not wipe out old ones; 0: no replay."""
    replay_fraction: float = 0.25
    """Share of each gradient step's windows replayed from the buffer, in [0, 1)."""
    ewc_lambda: float = 0.0
    """EWC strength toward the --model run's weights, weighted by the Fisher that run saved
    (trained with continual.ewc=true); 0: off."""
    device: str = "cpu"
    """Torch device of the model."""
    seed: int = 1337
    """Seed of the warmup samples and of the gradient steps."""
    progress: bool = True
    """A progress bar and pass reports on stderr."""


@dataclass
class LearnSummary:
    state_dir: str
    stopped: str  # "once", "SIGINT" or "SIGTERM"
    passes: int
    learned: int  # texts learned by this session
    tokens: int
    megabytes: float
    seconds: float
    busy_seconds: float  # reading, learning and saving: what the throughput is measured over
    mb_per_minute: float
    skipped: dict[str, int]  # this session, by reason
    unchanged: int  # in the last pass
    duplicates: int
    relearned: int  # texts rolled back at start (learned after the last save of a crashed run)
    saves: int
    warmup: list[dict[str, float]]
    total: dict[str, Any] = field(default_factory=dict)  # the state's whole history

    def describe(self) -> str:
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (f"learned {self.learned} files ({self.megabytes:.2f} MB, {self.tokens:,} tokens) "
                f"in {self.busy_seconds:.1f} s of work ({self.mb_per_minute:.2f} MB/min); "
                f"skipped: {skipped}; "
                f"{self.unchanged} unchanged, {self.duplicates} duplicate content; "
                f"{self.total.get('texts', 0)} texts learned in all; state in {self.state_dir}")


def _stderr(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def _check(opts: LearnOptions) -> None:
    if not opts.watch.is_dir():
        what = "is not a directory" if opts.watch.exists() else "does not exist"
        raise DataError(f"watched directory {opts.watch} {what}")
    for name in ("interval", "settle", "save_seconds", "lr"):
        if getattr(opts, name) < 0:
            raise AuraError(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("save_every", "warmup_samples", "max_file_mb"):
        if getattr(opts, name) <= 0:
            raise AuraError(f"--{name.replace('_', '-')} must be positive")
    if not 0 <= opts.replay_fraction < 1:
        raise AuraError(f"--replay-fraction must be in [0, 1), got {opts.replay_fraction}")
    for name in ("warmup_sweeps", "train_steps", "replay_tokens", "ewc_lambda"):
        if getattr(opts, name) < 0:
            raise AuraError(f"--{name.replace('_', '-')} must be >= 0")
    check_glob(opts.glob)
    if not 0 <= opts.seed < 2**64:  # what a torch generator takes, as `aura generate --seed`
        raise AuraError(f"--seed must be in [0, 2**64), got {opts.seed}")


class LearnService:
    """One state directory's service; ``run()`` until ``--once`` is done or a signal arrives."""

    def __init__(self, opts: LearnOptions, learner: Learner | None = None,
                 log: Callable[[str], None] = _stderr):
        _check(opts)
        self.opts, self._log = opts, log
        self.root = opts.watch.resolve()
        self.state = StateDir(opts.state or opts.watch / STATE_DEFAULT)
        self._logfile: TextIO | None = None
        try:
            self._logfile = open(self.state.root / LOG, "a", encoding="utf-8")  # noqa: SIM115
            self.ledger = Ledger(self.state.root / LEDGER)
            cfg = LearnerConfig(train_steps=opts.train_steps, lr=opts.lr, seed=opts.seed,
                                replay_tokens=opts.replay_tokens,
                                replay_fraction=opts.replay_fraction,
                                ewc_lambda=opts.ewc_lambda)
            self.learner = learner or build_learner(opts.model, opts.device, cfg)
            for note in self.learner.notes:
                self.log(f"note: {note}")
            self.relearned = self._restore()
        except BaseException:
            self._close()
            raise
        self._stop: str | None = None
        self._wake = threading.Event()
        self.session: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self._dirty, self._since_save, self._saved_at = False, 0, time.monotonic()
        self.busy = 0.0  # seconds spent reading, learning and saving (not waiting)

    def log(self, message: str, quiet: bool = False) -> None:
        """One line to learn.log, and to stderr unless ``quiet``."""
        if self._logfile is not None:
            self._logfile.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")
            self._logfile.flush()
        if not quiet:
            self._log(message)

    def _close(self) -> None:
        with contextlib.suppress(AttributeError):
            self.ledger.close()
        if self._logfile is not None:
            self._logfile.close()
        self.state.close()

    # --- state ---------------------------------------------------------------------------------

    def _restore(self) -> int:
        """Load the committed generation and roll the ledger back to it; returns the number of
        texts that will be learned again."""
        found = self.state.current()
        self.state.collect_garbage(keep=found[0].name if found else None)
        identity = json.loads(json.dumps(self.learner.identity()))
        if found is None:
            self.meta: dict[str, Any] = {"saves": 0, "ledger_seq": 0, "warmup": [],
                                         "learned": {"texts": 0, "tokens": 0, "bytes": 0}}
        else:
            gen, self.meta = found
            if self.meta.get("identity") != identity:
                raise DataError(f"state {self.state.root} was learned with "
                                f"{self.meta.get('identity')}, not {identity}; "
                                "use another --state (or the same --model)")
            self.learner.load(gen)
        relearn = self.ledger.rollback_to(self.meta["ledger_seq"])
        if relearn:
            self.log(f"{len(relearn)} file(s) learned after the last save will be learned again")
        return len(relearn)

    def save(self) -> None:
        start = time.monotonic()
        meta = {**self.meta, "saves": self.meta["saves"] + 1, "ledger_seq": self.ledger.last_seq(),
                "identity": self.learner.identity(), "saved_at": time.time()}
        gen = self.state.commit(meta, self.learner.save)
        self.meta = meta
        self._dirty, self._since_save, self._saved_at = False, 0, time.monotonic()
        self.session["saves"] += 1
        self.log(f"saved {gen.name} (ledger seq {meta['ledger_seq']})", quiet=True)
        self.busy += time.monotonic() - start

    # --- files ---------------------------------------------------------------------------------

    def files(self) -> list[Path]:
        """Watched files, sorted: matching the glob, none hidden, none in the state directory."""
        state = self.state.root.resolve()
        out = []
        for p in self.root.rglob(self.opts.glob):
            rel = p.relative_to(self.root)
            if any(part.startswith(".") for part in rel.parts) or p.is_relative_to(state):
                continue
            with contextlib.suppress(OSError):
                if p.is_file():
                    out.append(p)
        return sorted(out)

    def process(self, path: Path) -> str:
        """Learn or skip one file; returns what happened (for counting)."""
        # A name that is no UTF-8 reaches Python with its bytes as surrogates, which neither
        # SQLite nor the log can store: the ledger and the log name it with them escaped (\xe9).
        rel = path.relative_to(self.root).as_posix().encode("utf-8", "surrogateescape").decode(
            "utf-8", "backslashreplace")
        try:
            st = path.stat()
        except OSError:
            return "vanished"
        if not self.opts.once and time.time_ns() - st.st_mtime_ns < self.opts.settle * 1e9:
            return "settling"
        sig = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"
        row = self.ledger.path_row(rel)
        if self._unchanged(row, sig, st.st_mtime_ns):
            return "unchanged"
        if st.st_size > self.opts.max_file_mb * 2**20:
            return self._unusable(rel, sig, row, "too_large")
        try:
            data = path.read_bytes()
        except OSError:
            return self._unusable(rel, sig, row, "unreadable")
        sha = hashlib.sha256(data).hexdigest()
        known = self.ledger.text(sha)
        if known is not None:
            self.ledger.record_path(rel, sig, sha, None)
            if row is not None and row.sha256 == sha:
                return "unchanged"
            self.log(f"{rel}: same content as {known.path} ({known.status}); not learned again")
            return "duplicate"
        reason, detail = classify(data), ""
        if reason == "ok":
            try:
                stats = self.learner.apply(data.decode("utf-8"), sha)
            except DataError as exc:  # raised before the learner changes (e.g. unknown chars)
                reason, detail = "untokenizable", f": {exc}"
        if reason != "ok":
            self.ledger.record_text(sha, "skipped", reason, rel, sig, len(data))
            self.log(f"skipped {rel}: {reason.replace('_', ' ')}{detail}")
            return f"skipped:{reason}"
        tokens = int(stats["tokens"])
        self.ledger.record_text(sha, "applied", None, rel, sig, len(data), stats)
        if stats.get("oja_grew"):
            self.log(f"oja: {int(stats['oja_components'])} components after {rel}", quiet=True)
        learned = self.meta["learned"]
        learned["texts"] += 1
        learned["tokens"] += tokens
        learned["bytes"] += len(data)
        self.session["tokens"] += tokens
        self.session["bytes"] += len(data)
        self._dirty = True
        self._since_save += 1
        return "learned"

    def _unchanged(self, row: PathRow | None, sig: str, mtime_ns: int) -> bool:
        """Same stat signature as when last read, and not modified so close to that read that
        a same-size write within the clock's tick could hide behind it (git's racy clean)."""
        if row is None or row.signature != sig:
            return False
        if row.sha256 is None:  # unreadable or too large: retried when its signature changes
            return True
        return mtime_ns + RACY_NS < row.seen_ns and self.ledger.text(row.sha256) is not None

    def _unusable(self, rel: str, sig: str, row: PathRow | None, reason: str) -> str:
        """A file whose content cannot be read: remembered by its signature, logged once."""
        self.ledger.record_path(rel, sig, None, reason)
        if row is None or row.reason != reason or row.signature != sig:
            self.log(f"skipped {rel}: {reason.replace('_', ' ')}")
        return f"skipped:{reason}"

    # --- the loop ------------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop = signal.Signals(signum).name
        self._wake.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: now
        self.log(f"{self._stop}: saving after this file, then stopping")

    def _due(self) -> bool:
        return self._dirty and (self._since_save >= self.opts.save_every
                                or time.monotonic() - self._saved_at >= self.opts.save_seconds)

    def one_pass(self) -> Counter[str]:
        files = self.files()
        outcome: Counter[str] = Counter()
        first = self.session["passes"] == 0  # later passes report in one line, when busy
        bar = tqdm(files, desc="learn", unit="file", file=sys.stderr, leave=False,
                   disable=not self.opts.progress or not files or not first)
        with bar:
            for path in bar:
                if self._stop:
                    break
                t = time.monotonic()
                what = self.process(path)
                self.busy += time.monotonic() - t
                outcome[what] += 1
                if what.startswith("skipped:"):
                    self.skipped[what.removeprefix("skipped:")] += 1
                if self._due():
                    self.save()
                bar.set_postfix(learned=outcome["learned"],
                                mb=f"{self.session['bytes'] / 2**20:.1f}", refresh=False)
        self.session["passes"] += 1
        self.session["unchanged"] = outcome["unchanged"]
        self.session["duplicates"] += outcome["duplicate"]
        self.session["learned"] += outcome["learned"]
        skipped = sum(v for k, v in outcome.items() if k.startswith("skipped:"))
        if outcome["learned"] or outcome["duplicate"] or skipped:
            self.log(f"pass {self.session['passes']}: {outcome['learned']} learned, "
                     f"{skipped} skipped, {outcome['duplicate']} duplicate, "
                     f"{outcome['unchanged']} unchanged",
                     quiet=not self.opts.progress or self.opts.once)
        return outcome

    def warmup(self) -> None:
        """The remaining warmup sweeps, each saved when done, validated before and after."""
        done = len(self.meta["warmup"])
        if self.opts.warmup_sweeps <= done:
            return
        pool = WarmupPool([(p, size) for p in self.files() if (size := _text_size(p))],
                          self.opts.seed)
        if not pool:
            self.log("warmup: no usable text yet; sweeps postponed to the next start")
            return
        val = pool.validation(self.opts.warmup_samples // 10)
        if done == 0:
            metrics = self.learner.evaluate(val)
            self.log(f"warmup sweep 0/{self.opts.warmup_sweeps}: {_fmt(metrics)}")
        for k in range(done, self.opts.warmup_sweeps):
            if self._stop:
                return
            before = {n: t.clone() for n, t in self.learner.plastic_weights().items()}
            tokens = sweep(self.learner, pool, k, self.opts.warmup_samples)
            metrics = {"sweep": k + 1, "tokens": tokens, **self.learner.evaluate(val),
                       "drift": drift(before, self.learner.plastic_weights())}
            self.meta["warmup"] = [*self.meta["warmup"], metrics]
            self.log(f"warmup sweep {k + 1}/{self.opts.warmup_sweeps}: {_fmt(metrics)}")
            self.save()

    def run(self) -> LearnSummary:
        handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: the caller handles them
                handlers[sig] = signal.signal(sig, self._on_signal)
        start = time.monotonic()
        try:
            self.warmup()
            while not self._stop:
                self.one_pass()
                if self._dirty:
                    self.save()
                if self.opts.once:
                    break
                self._wake.wait(self.opts.interval)
            if self._dirty:
                self.save()
            return self._summary(time.monotonic() - start)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            self._close()

    def _summary(self, seconds: float) -> LearnSummary:
        mb = self.session["bytes"] / 2**20
        return LearnSummary(
            state_dir=str(self.state.root), stopped=self._stop or "once",
            passes=self.session["passes"], learned=self.session["learned"],
            tokens=self.session["tokens"], megabytes=round(mb, 4), seconds=round(seconds, 3),
            busy_seconds=round(self.busy, 3),
            mb_per_minute=round(mb / self.busy * 60, 3) if self.busy > 0 else 0.0,
            skipped=dict(self.skipped), unchanged=self.session["unchanged"],
            duplicates=self.session["duplicates"], relearned=self.relearned,
            saves=self.session["saves"], warmup=list(self.meta["warmup"]),
            total={**self.meta["learned"], "saves": self.meta["saves"],
                   "skipped": self.ledger.skipped()})


def _text_size(path: Path) -> int:
    """The size of a file whose first 64 KiB look like text (warmup samples it), else 0."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        size = path.stat().st_size
    except OSError:
        return 0
    if b"\0" in head[:BINARY_SNIFF]:
        return 0
    try:  # an incremental decoder accepts a character cut by the 64 KiB edge
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return 0
    return size if text.strip() else 0


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in metrics.items())


def learn(opts: LearnOptions, learner: Learner | None = None) -> LearnSummary:
    return LearnService(opts, learner).run()


def summary_dict(summary: LearnSummary) -> dict[str, Any]:
    return asdict(summary)
