"""The kNN-LM read-out (aura.memory.knn_lm, aura.eval.knn) and its CLI."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aura.config import load_config
from aura.data.shards import PreparedData
from aura.data.tokenizers import CharTokenizer
from aura.errors import ConfigError
from aura.eval.knn import build_datastore
from aura.eval.stream import evaluate_stream, stream_steps
from aura.memory.knn_lm import KNNLM, KNNConfig, load_datastore, new_datastore
from aura.memory.store import EpisodicStore
from aura.models import build_model
from aura.models.base import AuraModel
from aura.train.checkpoint import TrainState, save_checkpoint
from conftest import TINY_TRAIN, assert_usage_error

ALPHABET = "abcdefghijklmnopqrstuvwxyz ,.\n"
TOK = CharTokenizer.from_texts([ALPHABET])
GPT = ("model.name=gpt", *TINY_TRAIN)


def gpt(vocab: int = TOK.vocab_size) -> AuraModel:
    torch.manual_seed(0)
    cfg = load_config(preset="demo", overrides=[*GPT, f"model.vocab_size={vocab}"])
    return build_model(cfg.model).eval()


def random_text(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def test_lambda_zero_is_the_plain_model_exactly() -> None:
    model = gpt()
    text = random_text(150)
    tokens = TOK.encode(text).astype(np.int64)
    knn = KNNLM(new_datastore(12 * 64, 1024), TOK.vocab_size, model.hidden_size,
                KNNConfig(lam=0.0, span=12, token_weight=1.0), learn=True)
    with torch.inference_mode():
        plain = [s.log_probs for s in stream_steps(model, tokens, memory="read")]
        mixed = [s.log_probs for s in stream_steps(model, tokens, memory="write",
                                                   readout=knn)]
    assert len(knn.store) == len(tokens) - 1  # it learned, and still changed nothing
    for a, b in zip(plain, mixed, strict=True):
        assert torch.equal(a, b)


def test_a_document_datastore_makes_a_repeat_cheap_and_never_reads_its_own_window() -> None:
    """An untrained model reading random text twice: with the stream's datastore the second
    copy costs far less than the first; the first window, with an empty store, is unchanged."""
    model = gpt()
    half = random_text(200, seed=1)
    text = half + half
    knn = KNNLM(new_datastore(12 * 64, 4096), TOK.vocab_size, model.hidden_size,
                KNNConfig(lam=0.5, span=12, token_weight=1.0), learn=True)
    plain = evaluate_stream(model, TOK, text, memory="read")
    mixed = evaluate_stream(model, TOK, text, memory="write", readout=knn)
    assert mixed.windows[0].loss == pytest.approx(plain.windows[0].loss, rel=1e-6)
    second = slice(len(half) // 32 + 1, None)  # windows wholly inside the repeat
    plain_repeat = np.mean([w.bits_per_byte for w in plain.windows[second]])
    mixed_repeat = np.mean([w.bits_per_byte for w in mixed.windows[second]])
    assert mixed_repeat < 0.5 * plain_repeat


def test_knn_causality_across_windows() -> None:
    """Perturbing token p changes no earlier position's mixed prediction."""
    model = gpt()
    tokens = TOK.encode(random_text(130, seed=2)).astype(np.int64)

    def run(ids: np.ndarray) -> torch.Tensor:
        knn = KNNLM(new_datastore(12 * 64, 1024), TOK.vocab_size, model.hidden_size,
                    KNNConfig(lam=0.5, span=12, token_weight=1.0), learn=True)
        with torch.inference_mode():
            return torch.cat([s.log_probs[0] for s in stream_steps(
                model, ids, memory="write", readout=knn)])

    base = run(tokens)
    p = 70
    changed = tokens.copy()
    changed[p] = (changed[p] + 1) % TOK.vocab_size
    other = run(changed)
    torch.testing.assert_close(base[:p], other[:p])
    assert not torch.allclose(base[p:], other[p:])


def test_settings_are_checked() -> None:
    for bad in ({"lam": 1.5}, {"temperature": 0.0}, {"k": 0}, {"span": 0},
                {"token_weight": -1.0}):
        with pytest.raises(ConfigError):
            KNNConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="wide keys"):
        KNNLM(new_datastore(7, 8), TOK.vocab_size, 32, KNNConfig())


@pytest.fixture
def run_dir(tmp_path: Path, train_data: Path) -> Path:
    data = PreparedData.open(train_data)
    model = gpt(data.vocab_size)
    cfg = load_config(preset="demo", overrides=[*GPT, f"model.vocab_size={data.vocab_size}"])
    save_checkpoint(tmp_path / "run", model, data.tokenizer, cfg, TrainState(step=1), None)
    return tmp_path / "run"


def test_a_built_datastore_persists_and_reads_back_the_same_neighbours(
        train_data: Path, tmp_path: Path) -> None:
    data = PreparedData.open(train_data)
    model = gpt(data.vocab_size)
    store = build_datastore(model, data.split("train"), data.tokenizer, capacity=256)
    assert len(store) == 256 and store.dim_key == model.hidden_size
    assert set(store.values[:, 0].long().tolist()) <= set(range(data.vocab_size))
    store.save(tmp_path / "knn")
    again = EpisodicStore.load(tmp_path / "knn")
    queries = torch.randn(5, model.hidden_size, generator=torch.Generator().manual_seed(0))
    a, b = store.read(queries, 8, touch=False), again.read(queries, 8, touch=False)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.values, b.values)
    torch.testing.assert_close(a.scores, b.scores)


def test_a_datastore_keeps_out_the_excluded_text_and_by_default_holds_the_whole_split(
        train_data: Path) -> None:
    from aura.memory.build import corpus_windows

    data = PreparedData.open(train_data)
    split, tokenizer = data.split("train"), data.tokenizer
    model = gpt(data.vocab_size)
    block = model.max_context
    assert block is not None
    every = corpus_windows(split, block + 1, 10**9)
    lo, hi = every[1][2], every[2][2] + 5  # window 1 whole, window 2 in part
    kept = corpus_windows(split, block + 1, 10**9, exclude=(lo, hi))
    assert len(kept) == len(every) - 2
    assert all(w[2] + block + 1 <= lo or w[2] >= hi for w in kept)
    whole = build_datastore(model, split, tokenizer)  # the default: all of a small split
    assert len(whole) == len(every) * block
    held_out = build_datastore(model, split, tokenizer, exclude=(lo, hi))
    assert len(held_out) == len(kept) * block
    sources = set(held_out.source_pos[held_out.ids >= 0].tolist())
    assert not sources & set(range(lo, hi))


def test_cli_memory_build_knn_then_eval_knn(run_cli, run_dir: Path, train_data: Path,  # type: ignore[no-untyped-def]
                                            tmp_path: Path) -> None:
    doc = tmp_path / "doc.txt"
    data = PreparedData.open(train_data)
    val = data.split("val")
    doc.write_text(data.tokenizer.decode(np.asarray(val.maps[0][:300]).tolist()),
                   encoding="utf-8")
    missing = run_cli("eval", run_dir, "--text", doc, "--knn", "0.3")
    assert_usage_error(missing, "no kNN datastore", "aura memory build")
    built = run_cli("memory", "build", run_dir, "--data", train_data, "--knn",
                    "--max-chunks", "512", "--json")
    assert built.code == 0, built.err
    assert built.json()["entries"] == 512 and "knn" in built.json()["banks"]
    ckpt = next((run_dir / "checkpoints").iterdir())
    store = load_datastore(ckpt)
    assert store is not None and len(store) == 512
    plain = run_cli("eval", run_dir, "--text", doc, "--batch-size", "1", "--json").json()
    zero = run_cli("eval", run_dir, "--text", doc, "--knn", "0", "--json").json()
    mixed = run_cli("eval", run_dir, "--text", doc, "--knn", "0.3", "--json").json()
    assert zero["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert mixed["loss"] != pytest.approx(plain["loss"], rel=1e-4)
    streamed = run_cli("eval", run_dir, "--text", doc, "--stream", "--knn", "0.3", "--json")
    assert streamed.code == 0 and streamed.json()["memory"] == "write"
    bad = run_cli("eval", run_dir, "--text", doc, "--knn", "0.3", "--knn-span", "4")
    assert_usage_error(bad, "--knn-span")


def test_a_mixture_of_one_datastore_is_that_datastore_and_shares_are_bounded() -> None:
    from aura.memory.knn_lm import KNNMixture

    model = gpt()
    tokens = TOK.encode(random_text(33, seed=3)).astype(np.int64)
    x = torch.from_numpy(tokens[:-1])[None]
    part = KNNLM(new_datastore(12 * 64, 1024), TOK.vocab_size, model.hidden_size,
                 KNNConfig(lam=0.4, span=12, token_weight=1.0), learn=True)
    with torch.inference_mode():
        out = model(x)
        part.observe(out.hidden, x, torch.from_numpy(tokens[1:])[None])
        single = part.log_probs(out.logits, out.hidden, x)
        mixed = KNNMixture([part]).log_probs(out.logits, out.hidden, x)
    torch.testing.assert_close(mixed, single, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(single, torch.log_softmax(out.logits, -1), atol=1e-3)
    with pytest.raises(ConfigError, match="sum to at most 1"):
        KNNMixture([part, part, part])


def test_stream_keys_rank_the_same_twelve_tokens_above_closer_states() -> None:
    """The recall failure the stream default fixes: context A repeats the query's last 12
    tokens with states only half alike; context B has the query's very states but 3 of its 12
    tokens differ (another room number). A must rank first."""
    from aura.memory.knn_lm import STREAM_KEYS

    torch.manual_seed(0)
    width, span = 64, STREAM_KEYS["span"]
    config = KNNConfig(span=span, token_weight=STREAM_KEYS["token_weight"])
    knn = KNNLM(new_datastore(config.key_dim(width), 8), TOK.vocab_size, width, config)
    x = torch.from_numpy(TOK.encode("the key of rqrs is ").astype(np.int64))[None, -span:]
    other = x.clone()
    other[0, 4:7] = torch.from_numpy(TOK.encode("abc").astype(np.int64))
    h = torch.randn(1, span, width)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, span, width, generator=g)
    half = 0.5 * F.normalize(h, dim=-1) + 0.75 ** 0.5 * F.normalize(noise, dim=-1)
    q, a, b = (knn.keys(s, t)[-1] for s, t in ((h, x), (half, x), (h, other)))
    assert float(q @ a) > float(q @ b)
