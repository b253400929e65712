"""Retrieval you can see: source text kept with memories, ``aura generate --show-memory``,
chat's ``/memory`` (aura.infer.memory_trace)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from aura.config import load_config
from aura.infer.chat import Chat, ChatOptions
from aura.infer.generate import generate_text
from aura.infer.memory_trace import MemoryTrace, format_spans
from aura.infer.sampling import SamplingConfig
from aura.infer.template import ChatTemplate
from aura.memory.store import SNIPPET_TOKENS, EpisodicStore
from aura.models.base import AuraModel
from conftest import TINY_TRAIN, assert_usage_error
from test_stream import BLOCK, GPT, HIPPO, SNN_RAG, TEXT, TOK, build, populate

GREEDY = SamplingConfig(temperature=0.0)
BRAIN = ("model.name=natural_brain", *TINY_TRAIN, "model.pfc_dim=16", "model.pfc_heads=2",
         "model.moe_hidden=16", "model.memory_capacity=64", "model.memory_dim=8",
         "model.memory_writes=8", "model.broca_dim=48")


def test_a_store_keeps_each_memorys_source_tokens_through_save_and_load(tmp_path: Path) -> None:
    store = EpisodicStore(4, 2, capacity=8)
    tokens = torch.arange(40).view(2, 20)  # longer than a snippet: its last tokens are kept
    ids = store.write(torch.randn(2, 4), torch.randn(2, 2), source_pos=torch.tensor([7, 9]),
                      source_tokens=tokens)
    store.write(torch.randn(1, 4), torch.randn(1, 2), step=1, source_tokens=torch.tensor([[5, 6]]))
    store.write(torch.randn(1, 4), torch.randn(1, 2), step=2)  # none kept
    expected = [(7, list(range(20 - SNIPPET_TOKENS, 20))),
                (9, list(range(40 - SNIPPET_TOKENS, 40))), (1, [5, 6]), (2, [])]
    assert store.sources([*ids.tolist(), 2, 3]) == expected
    assert store.sources([99, -1]) == [None, None]
    loaded = EpisodicStore.load(store.save(tmp_path / "s"))
    assert loaded.sources([0, 1, 2, 3]) == expected


def test_a_store_saved_without_source_tokens_still_loads(tmp_path: Path) -> None:
    """Stores saved before snippets existed load with none kept."""
    import json

    from safetensors.torch import load_file, save_file

    from aura.data.shards import file_sha256

    store = EpisodicStore(4, 2, capacity=4)
    store.write(torch.randn(2, 4), torch.randn(2, 2), source_tokens=torch.ones(2, 3))
    path = store.save(tmp_path / "s")
    tensors = load_file(str(path / "memory.safetensors"))
    del tensors["source_tokens"]
    save_file(tensors, str(path / "memory.safetensors"))
    doc = json.loads((path / "memory.json").read_text())
    doc["sha256"] = file_sha256(path / "memory.safetensors")
    (path / "memory.json").write_text(json.dumps(doc))
    old = EpisodicStore.load(path)
    assert len(old) == 2 and old.sources([0, 1]) == [(0, []), (0, [])]


@pytest.mark.parametrize("overrides", [HIPPO, SNN_RAG, BRAIN],
                         ids=["hippocampal", "snn_rag", "natural_brain"])
def test_memories_formed_by_a_model_keep_the_text_they_came_from(
        overrides: tuple[str, ...]) -> None:
    """A training forward's memories keep the tokens ending where each was formed; decoded,
    that is a piece of the training text ending at the memory's position."""
    model = build(overrides)
    populate(model)
    store = next(iter(model.memory_stores().values()))
    live = (store.ids >= 0).nonzero().squeeze(1)
    for mid in store.ids[live][:20].tolist():
        found = store.sources([mid])[0]
        assert found is not None
        text = TOK.decode(found[1])
        assert 0 < len(text) <= SNIPPET_TOKENS and text in TEXT[:4 * BLOCK]


@pytest.mark.parametrize("overrides", [HIPPO, SNN_RAG, BRAIN],
                         ids=["hippocampal", "snn_rag", "natural_brain"])
def test_the_trace_reports_what_each_span_read_without_changing_the_generation(
        overrides: tuple[str, ...]) -> None:
    model = build(overrides)
    populate(model)
    plain = generate_text(model, TOK, TEXT[:20], 12, GREEDY)
    trace = MemoryTrace(model, TOK, span=5)
    assert trace.active
    store = next(iter(model.memory_stores().values()))
    importance = store.importance.clone()
    with trace.recording():
        traced = generate_text(model, TOK, TEXT[:20], 12, GREEDY, on_token=trace.push)
    assert traced == plain  # watching changes nothing ...
    assert torch.equal(store.importance, importance)  # ... not even what eviction will do
    spans = trace.spans()
    assert [(s["start"], s["end"]) for s in spans] == [(0, 5), (5, 10), (10, 12)]
    assert "".join(s["text"] for s in spans) == traced
    for s in spans:
        assert 0 < len(s["reads"]) <= 3 * len(trace.parts)
        sims = [r["similarity"] for r in s["reads"]]
        assert sims == sorted(sims, reverse=True) and all(-1 <= x <= 1 for x in sims)
        for r in s["reads"]:
            assert 0 < r["gate"] < 1 and 1 <= r["tokens"] <= s["end"] - s["start"]
            assert r["source"] and r["source"] in TEXT[:4 * BLOCK]
    lines = format_spans(spans)
    assert lines[1].startswith("[0:5]") and "sim " in lines[2] and "gate " in lines[2]


def test_memory_off_reads_nothing() -> None:
    model = build(HIPPO)
    populate(model)
    trace = MemoryTrace(model, TOK, span=4)
    with trace.recording():
        generate_text(model, TOK, TEXT[:10], 8, GREEDY, on_token=trace.push, memory="off")
    assert all(not s["reads"] for s in trace.spans())
    assert "(no memory read)" in "\n".join(format_spans(trace.spans()))


def _save_run(tmp_path: Path, overrides: tuple[str, ...], model: AuraModel) -> Path:
    from aura.train.checkpoint import TrainState, save_checkpoint

    cfg = load_config(preset="demo", overrides=[*overrides, f"model.vocab_size={TOK.vocab_size}"])
    save_checkpoint(tmp_path / "run", model, TOK, cfg, TrainState(step=1), None)
    return tmp_path / "run"


def test_cli_show_memory_prints_and_json_carries_the_reads(run_cli, tmp_path: Path  # type: ignore[no-untyped-def]
                                                           ) -> None:
    model = build(HIPPO)
    populate(model)
    run = _save_run(tmp_path, HIPPO, model)
    args = ("generate", run, "--prompt", TEXT[:16], "--max-new-tokens", "10", "--temperature",
            "0", "--show-memory", "--memory-span", "4")
    res = run_cli(*args, "--json")
    assert res.code == 0, res.err
    spans = res.json()["memory_reads"]
    assert [s["end"] for s in spans] == [4, 8, 10]
    assert all(r["store"] == "hippocampus" and r["source"] for s in spans for r in s["reads"])
    text = run_cli(*args)
    assert text.code == 0 and "memory reads per span" in text.out
    assert "hippocampus #" in text.out and "[8:10]" in text.out
    assert_usage_error(run_cli(*args, "--memory-span", "0"), "--memory-span")


def test_cli_show_memory_on_a_model_without_memory_is_one_line(run_cli, tmp_path: Path  # type: ignore[no-untyped-def]
                                                               ) -> None:
    run = _save_run(tmp_path, GPT, build(GPT))
    res = run_cli("generate", run, "--max-new-tokens", "3", "--show-memory")
    assert_usage_error(res, "no episodic memory to show")


def test_chat_memory_command_shows_the_last_replys_reads() -> None:
    model = build(HIPPO)
    populate(model)
    out = io.StringIO()
    chat = Chat(model, TOK, ChatOptions(sampling=GREEDY, max_new_tokens=6,
                                        template=ChatTemplate(user="F:", assistant="S:")), out)
    chat.handle("/memory")
    assert "no reply yet" in out.getvalue()
    chat.handle("First Citizen")
    chat.handle("/memory")
    shown = out.getvalue()
    assert "memory reads per span" in shown and "hippocampus #" in shown
    assert np.any([line.startswith("[0:") for line in shown.splitlines()])
