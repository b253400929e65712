"""aura.plasticity.affect and `aura analyze`: lexicon labels as documented, deterministic
features, a model that tracks the lexicon on held-out text, persistence, the CLI's contract."""

from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aura.errors import DataError
from aura.plasticity import affect
from aura.plasticity.affect import AffectModel, HashedNgrams, lexicon_labels, sentences
from conftest import WORDS, assert_usage_error

POSITIVE = ["wonderful", "happy", "love", "great", "joy", "delight", "beautiful", "excellent",
            "glad", "kind", "sweet"]
NEGATIVE = ["terrible", "sad", "hate", "awful", "grief", "horrible", "ugly", "cruel", "angry",
            "bitter", "wicked"]


def generated_sentences(n: int, seed: int) -> list[str]:
    """Filler prose with zero to two sentiment words, sometimes shouted or exclaimed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS[:60]) for _ in range(rng.randint(2, 6))]
        for _ in range(rng.choice([0, 1, 1, 2])):
            word = rng.choice(POSITIVE if rng.random() < 0.5 else NEGATIVE)
            words.insert(rng.randrange(len(words) + 1), word.upper() if rng.random() < 0.1
                         else word)
        out.append(" ".join(words).capitalize() + ("!" if rng.random() < 0.2 else "."))
    return out


@pytest.fixture(scope="module")
def model() -> AffectModel:
    return AffectModel.fit(generated_sentences(1200, seed=0), dim=256, max_components=48,
                           batch=64)


@pytest.fixture(scope="module")
def model_dir(model: AffectModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model.save(tmp_path_factory.mktemp("affect") / "model")


def test_lexicon_labels_follow_the_documented_definitions() -> None:
    y = lexicon_labels(["What a wonderful day.", "What a wonderful day!!!",
                        "What a WONDERFUL day.", "The table is in the room.", "I hate this."])
    assert y[0, 0] > 0.05 and y[0, 2] == 2
    assert y[0, 1] == pytest.approx(abs(y[0, 0].item()))
    assert y[1, 1] == pytest.approx(min(1.0, abs(y[1, 0].item()) + 0.5))
    assert y[2, 1] == pytest.approx(min(1.0, 1.5 * abs(y[2, 0].item())))
    assert y[3].tolist() == [0.0, 0.0, 1.0]
    assert y[4, 0] < -0.05 and y[4, 2] == 0


@given(st.lists(st.text(max_size=80), min_size=1, max_size=5))
def test_features_are_deterministic_and_normalised(texts: list[str]) -> None:
    a, b = HashedNgrams(64)(texts), HashedNgrams(64)(texts)
    assert torch.equal(a, b) and a.shape == (len(texts), 64)
    norms = a.norm(dim=1)
    assert bool(((norms - 1).abs() < 1e-5).logical_or(norms == 0).all())


def test_the_model_tracks_the_lexicon_on_held_out_text(model: AffectModel) -> None:
    report = model.evaluate(generated_sentences(400, seed=1))
    assert report["valence_r"] > 0.6, report
    assert report["arousal_r"] > 0.15, report
    assert report["tone_accuracy"] > report["tone_majority_baseline"] + 0.15, report
    assert 2 <= report["components"] <= 48
    happy, sad = model.predict(["What a wonderful happy day.", "A terrible and cruel grief."])
    assert happy.valence > sad.valence and happy.tone == "positive" and sad.tone == "negative"


@given(st.lists(st.text(max_size=200), min_size=1, max_size=4))
def test_predictions_stay_in_range_for_any_text(model: AffectModel, texts: list[str]) -> None:
    for result in model.predict(texts):
        assert -1.0 <= result.valence <= 1.0 and 0.0 <= result.arousal <= 1.0
        assert result.tone in affect.TONES and set(result.tone_scores) == set(affect.TONES)


def test_save_load_roundtrip_and_corruption(model: AffectModel, model_dir: Path,
                                            tmp_path: Path) -> None:
    texts = generated_sentences(20, seed=2)
    back = AffectModel.load(model_dir)
    torch.testing.assert_close(back.outputs(texts), model.outputs(texts))
    assert back.whitener._refreshed_at is not None  # no eigendecomposition needed to predict
    broken = tmp_path / "broken"
    model.save(broken)
    meta = json.loads((broken / "state.json").read_text())
    meta["config"]["oja"]["max_components"] = 2
    (broken / "state.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="broken"):
        AffectModel.load(broken)
    with pytest.raises(DataError, match="not a saved AffectModel"):
        AffectModel.load(tmp_path / "missing")


def test_play_text_splits_into_spoken_sentences() -> None:
    play = ("ACT I.\n\nHAMLET.\nTo be, or not to be, that is the question. Whether 'tis "
            "nobler\nin the mind to suffer!\n\n[Exit.]\n\nOPHELIA.\nGood my lord.")
    assert sentences(play) == ["To be, or not to be, that is the question.",
                               "Whether 'tis nobler in the mind to suffer!",
                               "Good my lord."]


def test_default_model_is_trained_once_then_loaded(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def corpus() -> list[str]:
        calls.append(1)
        return generated_sentences(300, seed=3)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(affect, "default_training_sentences", corpus)
    monkeypatch.setattr(affect, "DEFAULT_FIT", {"dim": 64, "max_components": 4})
    first = affect.default_model()
    assert affect.default_model_dir().parent == tmp_path / "aura" and len(calls) == 1
    second = affect.default_model()
    assert len(calls) == 1
    texts = ["A wonderful day."]
    torch.testing.assert_close(second.outputs(texts), first.outputs(texts))
    (affect.default_model_dir() / "state.safetensors").write_bytes(b"corrupt")
    affect.default_model()
    assert len(calls) == 2  # a corrupt cache is retrained, not an error


# --- aura analyze --------------------------------------------------------------------------------


def test_analyze_prints_valence_arousal_and_tone(run_cli, model_dir: Path) -> None:
    res = run_cli("analyze", "What a wonderful happy day!", "--model", model_dir)
    assert res.code == 0, res.err
    assert res.out.startswith("valence +") and "tone positive" in res.out
    res = run_cli("analyze", "A terrible cruel grief.", "--model", model_dir, "--json")
    assert res.code == 0, res.err
    out = res.json()
    assert out["tone"] == "negative" and out["valence"] < 0
    assert out["lexicon"]["tone"] == "negative" and out["model"] == str(model_dir)


def test_analyze_bad_input_is_one_line_exit_2(run_cli, model_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    assert_usage_error(run_cli("analyze", "  \n", "--model", model_dir), "TEXT is empty")
    assert_usage_error(run_cli("analyze", "hi", "--model", tmp_path / "nope"), "nope")
    assert_usage_error(run_cli("analyze", "hi", "--model", model_dir / "state.json"))
    assert_usage_error(run_cli("analyze"), "TEXT")

    class Stdin:
        buffer = type("B", (), {"read": staticmethod(lambda: b"\xff\xfe bad")})()

    monkeypatch.setattr("sys.stdin", Stdin())
    assert_usage_error(run_cli("analyze", "-", "--model", model_dir), "UTF-8")


def test_analyze_decodes_the_argument_and_stdin_by_one_rule(
        run_cli, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Strict UTF-8 for both: the argument's bytes (which Python keeps as surrogate escapes)
    and stdin's bytes are refused alike when invalid, and read alike when valid."""

    def analyze(raw: bytes, via_stdin: bool):
        if via_stdin:
            monkeypatch.setattr("sys.stdin", type("Stdin", (), {"buffer": io.BytesIO(raw)})())
            return run_cli("analyze", "-", "--model", model_dir, "--json")
        return run_cli("analyze", raw.decode("utf-8", "surrogateescape"), "--model", model_dir,
                       "--json")

    latin1 = "Caf\u00e9 cr\u00e8me, lovely.".encode("latin-1")
    arg = assert_usage_error(analyze(latin1, via_stdin=False), "TEXT is not UTF-8")
    piped = assert_usage_error(analyze(latin1, via_stdin=True), "standard input is not UTF-8")
    assert "byte 0xe9 at offset 3" in arg
    assert arg.replace("TEXT", "IN") == piped.replace("standard input", "IN")
    utf8 = "Caf\u00e9 cr\u00e8me, lovely.".encode()
    assert analyze(utf8, via_stdin=False).json() == analyze(utf8, via_stdin=True).json()


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=100).filter(lambda t: t.strip() and t != "-"))
def test_analyze_accepts_any_text(run_cli, model_dir: Path, text: str) -> None:
    """A result for any text; one that looks like an option (not a negative number) is
    argparse's one-line error (``aura analyze -- -TEXT`` passes it)."""
    res = run_cli("analyze", text, "--model", model_dir, "--json")
    # argparse reads a negative number ("-0", "-.5") as a positional, anything else after "-"
    # as an option
    if text.startswith("-") and not re.fullmatch(r"-\d+|-\d*\.\d+", text):
        assert res.code == 2 and len(res.err.splitlines()) == 1, res.err
        res = run_cli("analyze", "--model", model_dir, "--json", "--", text)
    assert res.code == 0, res.err
    assert set(res.json()) >= {"valence", "arousal", "tone", "tone_scores", "lexicon"}


@pytest.mark.slow
def test_default_size_model_on_held_out_shakespeare() -> None:
    """The figure docs/architecture.md quotes: held-out works, default training size."""
    model = AffectModel.fit(affect.default_training_sentences())
    report = model.evaluate(affect.shakespeare_sentences(held_out=True))
    assert report["valence_r"] > 0.35 and report["arousal_r"] > 0.45, report
