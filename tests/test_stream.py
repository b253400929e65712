"""Streamed evaluation and inference-time memory writes (aura.eval.stream, memory_mode)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from aura.config import load_config
from aura.data.tokenizers import CharTokenizer
from aura.errors import ConfigError
from aura.eval.perplexity import _features, evaluate_text
from aura.eval.stream import evaluate_stream, stream_steps, window_buckets
from aura.infer.generate import generate
from aura.infer.sampling import SamplingConfig
from aura.models import build_model
from aura.models.base import AuraModel
from aura.models.memory_mode import memory_kwargs
from conftest import TINY_TRAIN, assert_usage_error

TEXT = ("First Citizen: We are accounted poor citizens, the patricians good! What authority "
        "surfeits on would relieve us? If they would yield us but the superfluity, while it "
        "were wholesome, we might guess they relieved us humanely.\n\nSecond Citizen: Would "
        "you proceed especially against Caius Marcius? He's a very dog to the commonalty.\n")
TOK = CharTokenizer.from_texts([TEXT])
BLOCK = 32
HIPPO = ("model.name=hippocampal", *TINY_TRAIN, "model.n_place_cells=200",
         "model.memory_capacity=256", "model.memory_dim=16", "model.memory_writes=16",
         "model.grid_modules=2", "model.grid_cells_per_module=4", "model.n_time_cells=8")
SNN_RAG = ("model.name=snn_rag", *TINY_TRAIN, "model.memory_layers=[1]",
           "model.memory_capacity=256", "model.memory_chunk=8", "model.memory_top_k=3")
GPT = ("model.name=gpt", *TINY_TRAIN)


def build(overrides: tuple[str, ...]) -> AuraModel:
    torch.manual_seed(0)
    cfg = load_config(preset="demo", overrides=[*overrides, f"model.vocab_size={TOK.vocab_size}"])
    model = build_model(cfg.model)
    if model.writers:  # open the memory's gate wide so reads visibly move the logits
        for name, p in model.named_parameters():
            if name.endswith("gate.bias"):
                p.data.fill_(3.0)
    return model.eval()


def populate(model: AuraModel) -> None:
    """A few training forwards, so the store holds memories before the stream starts."""
    model.train()
    ids = torch.from_numpy(TOK.encode(TEXT[:4 * BLOCK]).astype(np.int64)).view(4, BLOCK)
    for _ in range(2):
        model(ids, **{k: torch.from_numpy(v(ids.numpy())) for k, v in
                      _features(model, TOK).items()})
    model.flush_memory()
    model.eval()
    assert sum(len(s) for s in model.memory_stores().values()) > 0


def stream_log_probs(model: AuraModel, tokens: np.ndarray, memory: str) -> torch.Tensor:
    """Every scored position's log-probabilities, in stream order, on a copy of the model."""
    model = copy.deepcopy(model)
    with torch.inference_mode():
        return torch.cat([s.log_probs[0] for s in stream_steps(
            model, tokens, memory=memory, features=_features(model, TOK))])


@pytest.mark.parametrize("overrides", [HIPPO, SNN_RAG], ids=["hippocampal", "snn_rag"])
def test_streamed_writes_never_let_a_later_token_change_an_earlier_logit(
        overrides: tuple[str, ...]) -> None:
    """With a populated store and memories written window by window, perturbing token p (in
    the third window) leaves every earlier position's prediction unchanged, while the writes
    themselves do change later windows (so the test can see a leak)."""
    model = build(overrides)
    populate(model)
    tokens = TOK.encode(TEXT * 2).astype(np.int64)[:4 * BLOCK + 1]
    before = len(next(iter(model.memory_stores().values())))
    written = stream_log_probs(model, tokens, "write")
    read_only = stream_log_probs(model, tokens, "read")
    torch.testing.assert_close(written[:BLOCK], read_only[:BLOCK])  # window 0: nothing new yet
    assert not torch.allclose(written[BLOCK:], read_only[BLOCK:], atol=1e-4)
    for p in (2 * BLOCK + 5, 3 * BLOCK):
        changed = tokens.copy()
        changed[p] = (changed[p] + 1) % TOK.vocab_size
        other = stream_log_probs(model, changed, "write")
        # position i predicts token i + 1 from tokens <= i
        torch.testing.assert_close(written[:p], other[:p], atol=1e-6, rtol=1e-5)
        assert not torch.allclose(written[p:], other[p:], atol=1e-4)
    # the stream ran on copies: the model's own store is as it was
    assert len(next(iter(model.memory_stores().values()))) == before


@pytest.mark.parametrize("overrides", [HIPPO, SNN_RAG, GPT], ids=["hippocampal", "snn_rag",
                                                                     "gpt"])
def test_streamed_eval_with_memory_off_equals_the_windowed_eval(
        overrides: tuple[str, ...]) -> None:
    model = build(overrides)
    if model.writers:
        populate(model)
    text = TEXT * 2
    windowed = evaluate_text(model, TOK, text, batch_size=1, memory="off")
    streamed = evaluate_stream(model, TOK, text, memory="off")
    assert streamed.n_tokens == windowed.n_tokens == len(text) - 1
    assert streamed.loss == pytest.approx(windowed.loss, rel=1e-6)
    assert streamed.bits_per_byte == pytest.approx(windowed.bits_per_byte, rel=1e-6)
    assert len(streamed.windows) == -(-(len(text) - 1) // BLOCK)
    assert sum(w.n_tokens for w in streamed.windows) == streamed.n_tokens
    assert streamed.first_window_bpb == streamed.windows[0].bits_per_byte
    labels = [label for label, _, _ in window_buckets(streamed.windows)]
    assert labels[:3] == ["0", "1", "2-3"]


def test_memory_off_differs_from_read_for_a_model_with_memory() -> None:
    model = build(SNN_RAG)
    populate(model)
    off = evaluate_text(model, TOK, TEXT, batch_size=1, memory="off")
    read = evaluate_text(model, TOK, TEXT, batch_size=1, memory="read")
    assert off.loss != pytest.approx(read.loss, rel=1e-6)


def test_a_model_without_memory_cannot_write() -> None:
    model = build(GPT)
    assert memory_kwargs(model, "off") == {} and memory_kwargs(model, "read") == {}
    with pytest.raises(ConfigError, match="cannot write memories at inference"):
        memory_kwargs(model, "write")
    with pytest.raises(ConfigError, match="memory mode"):
        memory_kwargs(model, "sometimes")
    assert evaluate_stream(model, TOK, TEXT).memory == "read"
    assert evaluate_stream(build(HIPPO), TOK, TEXT).memory == "write"


def test_generation_with_writes_remembers_and_reading_alone_does_not() -> None:
    model = build(HIPPO)
    (store,) = model.memory_stores().values()
    prompt = torch.from_numpy(TOK.encode(TEXT[:20]).astype(np.int64))[None]
    features = _features(model, TOK)
    greedy = SamplingConfig(temperature=0.0)
    generate(model, prompt, 10, greedy, features=features, memory="read")
    assert len(store) == 0
    generate(model, prompt, 10, greedy, features=features, memory="write")
    model.flush_memory()
    assert len(store) > 0


def test_cli_stream_reports_every_window(run_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from aura.train.checkpoint import TrainState, save_checkpoint

    model = build(HIPPO)
    cfg = load_config(preset="demo", overrides=[*HIPPO, f"model.vocab_size={TOK.vocab_size}"])
    save_checkpoint(tmp_path / "run", model, TOK, cfg, TrainState(step=1), None)
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT * 2, encoding="utf-8")
    res = run_cli("eval", tmp_path / "run", "--text", doc, "--stream", "--json")
    assert res.code == 0, res.err
    report = res.json()
    assert report["memory"] == "write" and len(report["windows"]) == -(-(len(TEXT) * 2 - 1)
                                                                      // BLOCK)
    assert report["later_windows_bpb"] > 0
    text_out = run_cli("eval", tmp_path / "run", "--text", doc, "--stream", "--memory", "off")
    assert "windows 0:" in text_out.out and "memory off" in text_out.out
    bad = run_cli("eval", tmp_path / "run", "--data", tmp_path, "--stream")
    assert_usage_error(bad, "read one document")


@pytest.mark.parametrize("overrides", [HIPPO, SNN_RAG, GPT], ids=["hippocampal", "snn_rag",
                                                                     "gpt"])
def test_a_model_that_remembers_at_inference_takes_remember(overrides: tuple[str, ...]) -> None:
    import inspect

    model = build(overrides)
    takes = "remember" in inspect.signature(model.forward).parameters
    assert model.remembers_at_inference == bool(model.writers)
    assert takes or not model.remembers_at_inference


def test_a_faiss_hippocampal_store_streams_what_the_exact_one_streams() -> None:
    pytest.importorskip("faiss")
    exact, faiss = build(HIPPO), build((*HIPPO, "model.memory_index=faiss"))
    assert type(faiss.memory_stores()["hippocampus"].index).__name__ == "FaissIndex"
    populate(exact)
    populate(faiss)
    tokens = TOK.encode(TEXT * 2).astype(np.int64)[:3 * BLOCK + 1]

    def run(model: AuraModel) -> torch.Tensor:  # a FAISS index cannot be deep-copied
        with torch.inference_mode():
            return torch.cat([s.log_probs[0] for s in stream_steps(
                model, tokens, memory="write", features=_features(model, TOK))])

    torch.testing.assert_close(run(exact), run(faiss), atol=1e-5, rtol=1e-4)


def test_a_recurrent_model_streams_as_one_sequence() -> None:
    """BDH has no context limit: its state is carried across windows, so a stream in windows
    of 16 scores every token as one forward over the whole text does."""
    torch.manual_seed(0)
    cfg = load_config(overrides=["model.name=bdh", f"model.vocab_size={TOK.vocab_size}",
                                 "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
                                 "model.block_size=64", "model.mlp_multiplier=4",
                                 "model.dropout=0.0"])
    model = build_model(cfg.model).eval()
    tokens = TOK.encode(TEXT).astype(np.int64)[:61]
    with torch.inference_mode():
        streamed = torch.cat([s.log_probs[0] for s in stream_steps(model, tokens, memory="read",
                                                                     block_size=16)])
        whole = torch.log_softmax(model(torch.from_numpy(tokens[:-1])[None]).logits[0], -1)
        windowed = torch.log_softmax(model(torch.from_numpy(tokens[16:32])[None]).logits[0], -1)
    torch.testing.assert_close(streamed, whole, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(streamed[16:32], windowed, atol=1e-3)  # the state did carry
