"""The kNN-LM read-out while generating (``aura generate --knn``) and its neighbours shown by
``--show-memory`` (aura.infer.generate, aura.infer.memory_trace)."""

from __future__ import annotations

from pathlib import Path

import torch

from aura.data.shards import PreparedData
from aura.infer.generate import generate_text
from aura.infer.memory_trace import MemoryTrace, format_spans
from aura.infer.sampling import SamplingConfig
from aura.memory.knn_lm import KNNLM, KNNConfig, new_datastore
from aura.models.base import AuraModel
from conftest import assert_usage_error
from test_knn_lm import TOK, gpt, run_dir  # noqa: F401  (run_dir is a fixture)

SAMPLED = SamplingConfig(temperature=0.8, seed=7)
GREEDY = SamplingConfig(temperature=0.0)


def z_datastore(model: AuraModel, lam: float) -> KNNLM:
    """A datastore of 32 random keys that all vote for 'z', each remembering the context
    'context' it was formed from."""
    knn = KNNLM(new_datastore(model.hidden_size, 64), TOK.vocab_size, model.hidden_size,
                KNNConfig(lam=lam))
    keys = torch.randn(32, model.hidden_size, generator=torch.Generator().manual_seed(1))
    z = int(TOK.encode("z")[0])
    source = torch.as_tensor(TOK.encode("context").astype("int64")).expand(32, -1)
    knn.add(keys, torch.full((32,), z), source_pos=torch.arange(32), source_tokens=source)
    return knn


def test_lambda_zero_generates_the_plain_models_tokens_and_lambda_one_the_neighbours() -> None:
    model = gpt()
    plain = generate_text(model, TOK, "the cat", 16, SAMPLED)
    zero = z_datastore(model, 0.0)
    assert generate_text(model, TOK, "the cat", 16, SAMPLED, knn=zero) == plain
    trace = MemoryTrace(model, TOK, span=8, knn=zero)
    with trace.recording():  # watched, lambda 0 still reads the neighbours and changes nothing
        assert generate_text(model, TOK, "the cat", 16, SAMPLED, knn=zero,
                             on_token=trace.push) == plain
    assert all(r["store"] == "knn" for s in trace.spans() for r in s["reads"])
    assert trace.spans()[0]["reads"] and zero.observer is None
    assert plain != "z" * 16
    assert generate_text(model, TOK, "the cat", 16, GREEDY, knn=z_datastore(model, 1.0)) == "z" * 16


def test_show_memory_lists_the_neighbours_each_span_read() -> None:
    model = gpt()
    knn = z_datastore(model, 0.5)
    trace = MemoryTrace(model, TOK, span=4, top=2, knn=knn)
    assert trace.active and not trace.parts  # a gpt: the datastore is all there is to show
    with trace.recording():
        generate_text(model, TOK, "abc", 10, GREEDY, knn=knn, on_token=trace.push)
    spans = trace.spans()
    assert [s["end"] for s in spans] == [4, 8, 10]
    for s in spans:
        assert len(s["reads"]) == 2
        best, second = s["reads"]
        assert best["similarity"] >= second["similarity"]
        assert best["source"] == "context" and best["next"] == "z" and best["lambda"] == 0.5
        assert 0 < best["weight"] <= 1 and 1 <= best["tokens"] <= 4
        assert 0 <= best["source_pos"] < 32
    lines = "\n".join(format_spans(spans))
    assert "knn #" in lines and "-> 'z'" in lines and "(lambda 0.5)" in lines


def test_cli_generate_knn(run_cli, run_dir: Path, train_data: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    base = ("generate", run_dir, "--prompt", "the ", "--max-new-tokens", "12", "--seed", "3")
    assert_usage_error(run_cli(*base, "--knn", "0.5"), "no kNN datastore", "aura memory build")
    built = run_cli("memory", "build", run_dir, "--data", train_data, "--knn",
                    "--max-chunks", "256", "--json")
    assert built.code == 0, built.err
    plain = run_cli(*base, "--json")
    zero = run_cli(*base, "--knn", "0", "--json")
    assert plain.code == zero.code == 0, zero.err
    assert zero.json()["text"] == plain.json()["text"]
    shown = run_cli(*base, "--knn", "0.5", "--show-memory", "--memory-span", "6", "--json")
    assert shown.code == 0, shown.err
    spans = shown.json()["memory_reads"]
    assert [s["end"] for s in spans] == [6, 12]
    data = PreparedData.open(train_data)
    train_text = data.tokenizer.decode(data.split("train").maps[0][:].tolist())
    for s in spans:
        assert s["reads"] and all(r["store"] == "knn" and r["lambda"] == 0.5 for r in s["reads"])
        assert all(r["source"] and r["next"] is not None for r in s["reads"])
    assert any(r["source"] in train_text for s in spans for r in s["reads"])
    assert_usage_error(run_cli(*base, "--knn", "1.5"), "lambda")
