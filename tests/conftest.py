"""Shared fixtures: tiny generated corpora, a CLI runner, a hypothesis profile; the policy for
tests of optional extras; the note on slow tests left out.

Corpora are generated (seeded) English-like text small enough that a prepare takes milliseconds;
the embedded Shakespeare is used by one or two tests only.
"""

from __future__ import annotations

import importlib
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hypothesis import HealthCheck, settings

from aura.cli import main
from aura.config import AuraConfig, load_config
from aura.data.shards import PreparedData

settings.register_profile(
    "aura",
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("aura")

# --- optional extras and slow tests ------------------------------------------------------------

REQUIRE_EXTRAS = "AURA_REQUIRE_EXTRAS"


def requires_extra(module: str, extra: str) -> ModuleType:
    """``module``, which Aura's optional extra ``extra`` installs; without it the test is skipped
    with a reason naming the extra. ``make test`` installs every extra and sets
    AURA_REQUIRE_EXTRAS=1, which turns the skip into a failure: CI never skips one silently."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get(REQUIRE_EXTRAS) == "1":
            pytest.fail(f"{module} is missing though {REQUIRE_EXTRAS}=1: pip install "
                        f"'aura[{extra}]'", pytrace=False)
        pytest.skip(f"needs the {extra} extra: pip install 'aura[{extra}]'",
                    allow_module_level=True)


_slow_left_out: list[pytest.Item] = []


def pytest_deselected(items: Sequence[pytest.Item]) -> None:
    _slow_left_out.extend(item for item in items if item.get_closest_marker("slow"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say how many slow tests the default ``-m 'not slow'`` left out, so a green run does not
    read as everything having run."""
    if _slow_left_out:
        terminalreporter.write_line(f"slow tests left out: {len(_slow_left_out)} (`make test-slow` "
                                    "or `pytest -m slow` runs them)")

_VOCABULARY = (
    "the of and to in is was he for it with as his on be at by had are but from or have an they "
    "which one you were her all she there would their we him been has when who will more no if "
    "out so said what up its about into than them can only other new some could time these two "
    "may then do first any my now such like our over man me even most made after also did many "
    "before must through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might great old year "
    "off come since against go came right used take three river stone garden winter lantern"
)
WORDS = _VOCABULARY.split()


def english(rng: random.Random, n_words: int) -> str:
    """Seeded English-like prose: capitalised sentences, commas, a line break now and then."""
    out: list[str] = []
    sentence = 0
    for _ in range(n_words):
        w = rng.choice(WORDS)
        if sentence == 0:
            w = w.capitalize()
        sentence += 1
        if sentence > rng.randint(6, 14):
            w += "."
            sentence = 0
        elif rng.random() < 0.08:
            w += ","
        out.append(w)
        if sentence == 0 and rng.random() < 0.3:
            out.append("\n")
    text = " ".join(out).replace(" \n ", "\n")
    return text.rstrip(" ,") + ".\n"


def make_docs(n: int, seed: int = 0, words: tuple[int, int] = (120, 260)) -> list[str]:
    """``n`` distinct documents, each opening with a title line that names it."""
    rng = random.Random(seed)
    return [f"Document {i} of the test corpus.\n" + english(rng, rng.randint(*words))
            for i in range(n)]


def write_dir(root: Path, docs: Sequence[str], nested: bool = True) -> list[Path]:
    """One .txt file per document, every third one in a subdirectory (sources recurse)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(docs):
        sub = root / "part" if nested and i % 3 == 2 else root
        sub.mkdir(exist_ok=True)
        path = sub / f"doc{i:02d}.txt"
        path.write_text(doc, encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture
def docs() -> list[str]:
    return make_docs(12)


@pytest.fixture
def corpus_dir(tmp_path: Path, docs: list[str]) -> Path:
    """A dozen small documents as files of one directory tree."""
    root = tmp_path / "corpus"
    write_dir(root, docs)
    return root


@pytest.fixture
def corpus_file(tmp_path: Path, docs: list[str]) -> Path:
    """The same dozen documents as blank-line separated paragraphs of one text file."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(d.strip() + "\n" for d in docs), encoding="utf-8")
    return path


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> dict:
        return json.loads(self.out)


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """``aura`` in process: exit code, stdout, stderr (argparse exits are caught too)."""

    def run(*argv: str | Path) -> CliResult:
        capsys.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def assert_usage_error(res: CliResult, *needles: str) -> str:
    """Exit 2 with exactly one line on stderr, no traceback, naming each of ``needles``."""
    assert res.code == 2, (res.code, res.err)
    assert "Traceback" not in res.err
    lines = res.err.splitlines()
    assert len(lines) == 1, res.err
    assert lines[0].startswith("aura: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_answered(code: int, err: str, context: str) -> None:
    """What every command ends with, whatever it was given: exit 0, or 2 with one
    ``aura: error:`` line, the last on stderr (warnings may come before it); never a traceback,
    never exit 1 (a bug)."""
    said = f"{context}\nexit {code}, stderr:\n{err}"
    assert code in (0, 2) and "Traceback" not in err, said
    if code == 2:
        lines = err.splitlines()
        errors = [line for line in lines if line.startswith("aura: error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], said


# --- training ----------------------------------------------------------------------------------

# A model small enough that a step takes milliseconds on a CPU; every test adds its own settings.
TINY_TRAIN = (
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
    "train.batch_size=4", "train.device=cpu", "train.precision=fp32", "train.warmup_steps=2",
    "train.eval_iters=2", "train.log_interval=1",
)


def tiny_config(*overrides: str) -> AuraConfig:
    """The demo preset shrunk to ``TINY_TRAIN``, then ``overrides``."""
    return load_config(preset="demo", overrides=[*TINY_TRAIN, *overrides])


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """``{step: value}`` of the metrics rows that carry ``key``; a repeated step is an error."""
    out: dict[int, float] = {}
    for row in read_metrics(run_dir):
        if key in row:
            assert row["step"] not in out, f"step {row['step']} logged twice"
            out[row["step"]] = row[key]
    return out


@pytest.fixture(scope="session")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A char-level dataset of ~12k tokens (60 symbols) with a val split, prepared once."""
    from aura.data.prepare import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("train-data")
    write_dir(root / "corpus", make_docs(12, seed=3))
    opts = PrepareOptions([str(root / "corpus")], "char", val_fraction=0.2)
    prepare(opts, root / "data", progress=False)
    return root / "data"


def prepared_bytes(root: Path, n_docs: int, seed: int, shard_tokens: int,
                   val_fraction: float) -> PreparedData:
    """Byte tokens of ``n_docs`` generated documents, in shards of ``shard_tokens``."""
    from aura.data.prepare import PrepareOptions, prepare

    write_dir(root / "corpus", make_docs(n_docs, seed=seed))
    opts = PrepareOptions([str(root / "corpus")], "byte", shard_tokens=shard_tokens,
                          val_fraction=val_fraction)
    return prepare(opts, root / "out", progress=False).data



def assert_causal(model: torch.nn.Module, x: torch.Tensor, t: int, vocab: int, *,
                  exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Changing token t+1 leaves every logit at positions <= t unchanged; returns both logits."""
    changed = x.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % vocab
    a, b = model(x).logits, model(changed).logits
    if exact:
        assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    else:
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-6, rtol=1e-5)
    return a, b
