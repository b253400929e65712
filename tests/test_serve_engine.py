"""The model in a process of its own (`aura serve`'s default on Linux): the same text as in a
thread, errors that cross back as themselves, and no engine left behind when the server dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from aura.data.tokenizers import ByteTokenizer
from aura.errors import AuraError
from aura.infer.engine import Engine, EngineProcess, Generation
from aura.infer.sampling import SamplingConfig
from aura.models.base import build_model
from conftest import tiny_config
from serving import Server, env, free_port, request, tiny_run

SNN_RAG = ("model.name=snn_rag", "model.memory_capacity=64", "model.memory_chunk=8")


def make_engine(*overrides: str, **kw: Any) -> Engine:
    torch.manual_seed(0)
    model = build_model(tiny_config("model.vocab_size=256", *overrides).model)
    return Engine(model, ByteTokenizer(), "read", **kw)


def generate_all(engine: Engine | EngineProcess, n: int) -> list[str]:
    """``n`` seeded completions submitted together; each one's whole text."""
    done = [threading.Event() for _ in range(n)]
    texts: list[str] = [""] * n
    streamed: list[str] = [""] * n

    def emit_for(i: int):  # type: ignore[no-untyped-def]
        def emit(event: dict[str, Any]) -> None:
            if "error" in event:
                texts[i] = "error: " + event["error"]
                done[i].set()
            elif "done" in event:
                texts[i] = event["text"]
                done[i].set()
            else:
                streamed[i] += event["text"]
        return emit

    for i in range(n):
        engine.submit(Generation(f"Hello {i}", 20 + i, SamplingConfig(seed=i)), emit_for(i))
    for d in done:
        assert d.wait(60)
    assert streamed == texts  # the streamed pieces add up to the whole
    return texts


def test_a_process_engine_generates_what_a_thread_engine_does() -> None:
    here = make_engine()
    try:
        expected = generate_all(here, 5)
    finally:
        here.close()
    there = EngineProcess(make_engine)
    try:
        assert generate_all(there, 5) == expected
        deadline = time.monotonic() + 10  # the counters follow the round's last events
        while there.stats.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert there.stats.completed == 5 and there.stats.active == 0
        vectors, tokens = there.call("embed", ["hi", "you"]).result(30)
        assert tokens == 5 and len(vectors) == 2
        assert abs(sum(v * v for v in vectors[0]) - 1) < 1e-5
        with pytest.raises(AuraError, match="must not be empty"):  # crosses back as itself
            there.call("embed", [""]).result(30)
        assert there.call("memory_info").result(30) is None
        with pytest.raises(ValueError, match="unknown engine operation"):
            there.call("shutdown")
    finally:
        there.close()
    assert not there._proc.is_alive()


def test_the_conversation_memory_lives_in_the_engine_process(tmp_path: Path) -> None:
    memory = tmp_path / "memory"
    engine = EngineProcess(lambda: make_engine(*SNN_RAG, memory_dir=memory,
                                               conversation_memory=True))
    try:
        done = threading.Event()
        engine.submit(Generation("my name is Zed", 4, SamplingConfig(seed=0),
                                 remember="User: my name is Zed\nAssistant: "),
                      lambda e: done.set() if "done" in e else None)
        assert done.wait(60)
        info = engine.call("memory_info").result(30)
        assert info["available"] and "from conversations" in info["describe"]
        assert any("Zed" in r["text"] for r in engine.call("recall", "Zed").result(30))
    finally:
        engine.close()  # saves in the child
    assert "Zed" in (memory / "state" / "texts.json").read_text()


def test_a_dead_engine_fails_requests_instead_of_hanging() -> None:
    engine = EngineProcess(make_engine)
    try:
        events: list[dict[str, Any]] = []
        ended = threading.Event()

        def emit(event: dict[str, Any]) -> None:
            events.append(event)
            if "error" in event or "done" in event:
                ended.set()

        engine.submit(Generation("Hello", 100_000, SamplingConfig(seed=0)), emit)
        os.kill(engine._proc.pid, signal.SIGKILL)
        assert ended.wait(30)
        assert events[-1] == {"error": "the model process has exited"}
        with pytest.raises(AuraError, match="exited"):
            engine.submit(Generation("Hello", 4, SamplingConfig()), emit)
        with pytest.raises(AuraError, match="exited"):
            engine.call("memory_info").result(30)
    finally:
        engine.close()


def engine_pids(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def gone(pids: list[int], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{p}").exists() and "zombie" not in
              Path(f"/proc/{p}/status").read_text(errors="replace") for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the engine is a process on Linux")
def test_kill_9_of_the_server_takes_its_engine_with_it_and_keeps_the_memory(
        tmp_path: Path) -> None:
    run, memory = tiny_run(tmp_path, *SNN_RAG), tmp_path / "memory"
    server = Server(run, "--memory-dir", str(memory), "--save-interval", "3600")
    try:
        pids = engine_pids(server.proc.pid)
        assert len(pids) == 1
        status, _ = request(server.port, "POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "my name is Zed"}], "max_tokens": 4,
            "seed": 1}, key=None)
        assert status == 200
    finally:
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    assert gone(pids)  # its pipe closed: it saved and left
    assert "Zed" in (memory / "state" / "texts.json").read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the engine is a process on Linux")
def test_ctrl_c_reaches_the_whole_group_and_the_server_still_shuts_down_cleanly(
        tmp_path: Path) -> None:
    run, memory = tiny_run(tmp_path, *SNN_RAG), tmp_path / "memory"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "aura", "serve", str(run), "--port", str(port),
                             "--memory-dir", str(memory), "--save-interval", "3600"],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if request(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        pids = engine_pids(proc.pid)
        status, _ = request(port, "POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "my name is Zed"}], "max_tokens": 4,
            "seed": 1}, key=None)
        assert status == 200
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        assert proc.wait(60) == 128 + signal.SIGINT
        assert gone(pids)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.stderr is not None and b"Traceback" not in proc.stderr.read()
    assert "Zed" in (memory / "state" / "texts.json").read_text()


def test_auto_is_a_process_only_for_a_cpu_model_on_linux(monkeypatch) -> None:
    from aura.infer import engine

    monkeypatch.setattr(engine.sys, "platform", "linux")
    assert engine.resolve("auto", "cpu") == "process"
    assert engine.resolve("auto", "cuda") == "thread"  # CUDA does not survive a fork
    assert engine.resolve("thread", "cpu") == "thread"
    with pytest.raises(AuraError, match="--engine thread"):
        engine.resolve("process", "cuda")
    monkeypatch.setattr(engine.sys, "platform", "darwin")
    assert engine.resolve("auto", "cpu") == "thread"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the engine is a process on Linux")
def test_a_server_whose_engine_died_says_so_with_503s_and_still_shuts_down(
        tmp_path: Path) -> None:
    server = Server(tiny_run(tmp_path))
    try:
        (pid,) = engine_pids(server.proc.pid)
        os.kill(pid, signal.SIGKILL)
        assert gone([pid])
        deadline = time.monotonic() + 10
        while (status := request(server.port, "GET", "/health")[0]) == 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert status == 503
        status, body = request(server.port, "POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, key=None)
        assert status == 503 and "exited" in body["error"]["message"]
    finally:
        assert server.stop(signal.SIGTERM) == 128 + signal.SIGTERM


def test_the_engine_process_forgets_every_job_that_ended() -> None:
    from aura.infer.engine import _Host

    engine = make_engine()
    sent: list[tuple[Any, ...]] = []
    host = _Host(engine, sent.append)
    try:
        for jid in range(6):  # max_new_tokens=0 ends on the worker at once, often before
            host.handle(("submit", jid, Generation("Hi", 0, SamplingConfig())))  # submit returns
        host.handle(("submit", 6, Generation("Hi", 3, SamplingConfig(seed=0))))
        deadline = time.monotonic() + 30
        while sum(1 for m in sent for _, e in m[1] if "done" in e) < 7:
            assert time.monotonic() < deadline, sent
            time.sleep(0.01)
        assert host.jobs == {} and host._ended == set()
    finally:
        engine.close()
