"""`aura serve --memory-dir DIR`: conversations become episodic memories that survive kill -9."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from serving import Server, request, tiny_run

SNN_RAG = ("model.name=snn_rag", "model.memory_capacity=64", "model.memory_chunk=8")


def say(server: Server, text: str) -> dict:
    status, reply = request(server.port, "POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": text}], "max_tokens": 6, "seed": 1}, key=None)
    assert status == 200, reply
    return reply


def saved_texts(memory: Path) -> list[str]:
    try:
        return list(json.loads((memory / "state" / "texts.json").read_text())["texts"].values())
    except (OSError, ValueError):
        return []


@pytest.mark.slow
def test_memories_survive_kill_9_and_are_retrieved_after_a_restart(tmp_path: Path) -> None:
    run, memory = tiny_run(tmp_path, *SNN_RAG), tmp_path / "memory"
    first = Server(run, "--memory-dir", str(memory), "--save-interval", "0.2")
    try:
        say(first, "my name is Zed and I like green apples")
        described = request(first.port, "GET", "/v1/memory", key=None)[1]["describe"]
        assert "4 from conversations" in described  # 38 + 10 tokens: 4 chunks of 8 and more
        deadline = time.monotonic() + 20
        while not any("Zed" in t for t in saved_texts(memory)):
            assert time.monotonic() < deadline, "the timer never saved the memory"
            time.sleep(0.1)
    finally:
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    second = Server(run, "--memory-dir", str(memory), "--save-interval", "0.2")
    try:
        memories = request(second.port, "GET", "/v1/memory", key=None)[1]
        assert "4 from conversations" in memories["describe"]
        say(second, "what is my name? I like green apples")
        retrieved = request(second.port, "GET", "/v1/memory", key=None)[1]["retrieved"]
        assert retrieved and all("Zed" in r["text"] for r in retrieved)
    finally:
        assert second.stop(signal.SIGTERM) == 128 + signal.SIGTERM
    texts = saved_texts(memory)  # both exchanges' memories, saved at shutdown
    assert len(texts) == 8 and sum("Zed" in t for t in texts) == 4


@pytest.mark.slow
def test_sigterm_saves_what_the_timer_has_not(tmp_path: Path) -> None:
    run, memory = tiny_run(tmp_path, *SNN_RAG), tmp_path / "memory"
    server = Server(run, "--memory-dir", str(memory), "--save-interval", "3600")
    say(server, "remember the blue door")
    assert saved_texts(memory) == []
    assert server.stop(signal.SIGTERM) == 128 + signal.SIGTERM
    assert any("blue door" in t for t in saved_texts(memory))


def test_a_model_without_memory_says_so(tmp_path: Path) -> None:
    from aura.data.tokenizers import ByteTokenizer
    from aura.infer.conversation_memory import ConversationMemory
    from aura.train.checkpoint import load_for_inference

    loaded = load_for_inference(tiny_run(tmp_path))
    mem = ConversationMemory(loaded.model, ByteTokenizer(), tmp_path / "m")
    assert not mem.available and "has no episodic memory" in mem.describe()
    assert mem.remember("hello there") == 0 and not mem.save()


@pytest.mark.slow
def test_sigterm_with_a_stream_in_flight_ends_it_and_exits_143(tmp_path: Path) -> None:
    import http.client
    import threading

    server = Server(tiny_run(tmp_path), "--max-tokens-limit", "1000000")
    got: dict[str, object] = {}

    def stream() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps(
            {"prompt": "Hi", "max_tokens": 1000000, "stream": True}).encode(),
            {"Content-Type": "application/json"})
        resp = conn.getresponse()
        got["first"] = resp.read(5)
        got["rest"] = resp.read()  # returns once the server ends the stream
        conn.close()

    reader = threading.Thread(target=stream)
    reader.start()
    deadline = time.monotonic() + 20
    while "first" not in got and time.monotonic() < deadline:
        time.sleep(0.05)
    # stop() waits for the exit: a server that ran the million tokens out would not give one
    assert server.stop(signal.SIGTERM) == 128 + signal.SIGTERM
    reader.join(30)
    assert got["first"] == b"data:" and not reader.is_alive()
    assert got["rest"].count(b"data:") < 1_000_000  # the stream ended early: cancelled
