"""`aura serve` against the official `openai` client and raw HTTP: one live server per module."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import requires_extra
from serving import KEY, Server, request, tiny_run

openai = requires_extra("openai", "dev")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("serve")
    srv = Server(tiny_run(root), "--api-key", KEY, "--max-tokens-limit", "5000",
                 "--cors-origin", "http://page.example",
                 log=root / "log")
    yield srv
    code = srv.stop(signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, (code, (root / "log").read_text())  # says why it ended


@pytest.fixture(scope="module")
def client(server: Server) -> object:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0)


def chat(client: object, seed: int, max_tokens: int = 12, **kw: object) -> str:
    reply = client.chat.completions.create(  # type: ignore[attr-defined]
        model="aura", messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=max_tokens, seed=seed, **kw)
    return reply.choices[0].message.content


def streamed(client: object, seed: int, max_tokens: int = 12) -> str:
    stream = client.chat.completions.create(  # type: ignore[attr-defined]
        model="aura", messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=max_tokens, seed=seed, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_models_chat_and_usage(client: object) -> None:
    assert [m.id for m in client.models.list()] == ["aura"]  # type: ignore[attr-defined]
    reply = client.chat.completions.create(  # type: ignore[attr-defined]
        model="aura", messages=[{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Hi"}], max_tokens=7, seed=3,
        temperature=0.7, top_p=0.9, extra_body={"top_k": 20})
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 7
    assert reply.usage.prompt_tokens == len(b"Be brief.\nUser: Hi\nAssistant:")
    assert reply.choices[0].message.role == "assistant"


def test_streaming_matches_the_whole_reply_and_reports_usage(client: object) -> None:
    whole = chat(client, seed=5, max_tokens=15)
    chunks = list(client.chat.completions.create(  # type: ignore[attr-defined]
        model="aura", messages=[{"role": "user", "content": "Hello there"}], max_tokens=15,
        seed=5, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0


def test_completions_honour_a_stop_string_across_token_boundaries(client: object) -> None:
    # Greedy, so the text is fixed; every 3 characters of a byte model span 3 tokens.
    base = client.completions.create(  # type: ignore[attr-defined]
        model="aura", prompt="Once upon", max_tokens=40, temperature=0)
    text = base.choices[0].text
    assert base.choices[0].finish_reason == "length"
    stop = next(text[i:i + 3] for i in range(4, len(text) - 3)
                if "\ufffd" not in text[:i + 3])
    cut = client.completions.create(  # type: ignore[attr-defined]
        model="aura", prompt="Once upon", max_tokens=40, temperature=0, stop=[stop, "\x00zz"])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    pieces = client.completions.create(  # type: ignore[attr-defined]
        model="aura", prompt="Once upon", max_tokens=40, temperature=0, stop=stop, stream=True)
    assert "".join(p.choices[0].text for p in pieces if p.choices) == text[:text.index(stop)]


def test_a_wrong_or_missing_key_is_401_and_health_is_open(server: Server) -> None:
    bad = openai.OpenAI(base_url=f"{server.base}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    status, body = request(server.port, "GET", "/v1/models", key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert request(server.port, "GET", "/health", key=None)[0] == 200


@pytest.mark.parametrize(("body", "param"), [
    (None, None),  # malformed JSON (raw below)
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, None),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ""}, "stop"),
])
def test_bad_requests_are_400_in_openai_format(server: Server, body: object,
                                                param: str | None) -> None:
    raw = b'{"messages": [' if body is None else None
    status, reply = request(server.port, "POST", "/v1/chat/completions", body, raw=raw)
    assert status == 400, reply
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["message"]
    if param is not None:
        assert reply["error"]["param"].startswith(param)


def test_the_openai_client_sees_400_and_404(client: object) -> None:
    with pytest.raises(openai.BadRequestError):
        chat(client, seed=1, max_tokens=100_000)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(  # type: ignore[attr-defined]
            model="gpt-4", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_a_body_over_the_limit_is_413_declared_or_chunked(server: Server) -> None:
    status, reply = request(server.port, "POST", "/v1/completions",
                            {"prompt": "x" * (2 << 20), "max_tokens": 1})
    assert status == 413 and "body" in reply["error"]["message"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = json.dumps({"prompt": "x" * (2 << 20), "max_tokens": 1}).encode()
    conn.request("POST", "/v1/completions", body=iter([body[i:i + 65536] for i in
                                                      range(0, len(body), 65536)]),
                 headers={"Content-Type": "application/json",
                          "Authorization": f"Bearer {KEY}"}, encode_chunked=True)
    resp = conn.getresponse()
    answer = resp.read()
    assert resp.status == 413 and b"body" in answer, answer
    conn.close()


def test_a_prompt_the_tokenizer_cannot_start_from_is_400(server: Server) -> None:
    status, reply = request(server.port, "POST", "/v1/completions",
                            {"prompt": "", "max_tokens": 3, "stream": True})
    assert status == 400 and reply["error"]["param"] == "prompt"


def test_a_prompt_longer_than_the_context_is_cut_from_the_left(client: object) -> None:
    long = "word " * 100  # 500 tokens; the model attends over 32
    reply = client.completions.create(model="aura", prompt=long, max_tokens=3,  # type: ignore
                                      temperature=0)
    assert reply.usage.prompt_tokens == 500 and reply.usage.completion_tokens == 3
    tail = client.completions.create(model="aura", prompt=long[-32:], max_tokens=3,  # type: ignore
                                     temperature=0)
    assert reply.choices[0].text == tail.choices[0].text


def test_concurrent_streams_return_what_sequential_runs_return(client: object) -> None:
    seeds = [11, 12, 13, 14]
    alone = {s: streamed(client, s, max_tokens=20) for s in seeds}
    together: dict[int, str] = {}
    threads = [threading.Thread(target=lambda s=s: together.__setitem__(
        s, streamed(client, s, max_tokens=20))) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone
    assert len(set(alone.values())) > 1  # the seeds matter, so the check means something


def test_a_client_that_disconnects_cancels_its_generation(server: Server) -> None:
    before = request(server.port, "GET", "/health")[1]["cancelled"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(
        {"prompt": "Hi", "max_tokens": 5000, "stream": True}).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.read(5) == b"data:"  # generation has started
    conn.sock.close()
    conn.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        health = request(server.port, "GET", "/health")[1]
        if health["cancelled"] > before and health["active"] == 0:
            break
        time.sleep(0.1)
    assert health["cancelled"] == before + 1 and health["active"] == 0
    assert health["completed"] >= 1  # and the earlier requests were not counted as cancelled


def test_embeddings_are_unit_vectors_of_the_hidden_width(client: object) -> None:
    out = client.embeddings.create(model="aura", input=["the cat", "a dog"])  # type: ignore
    assert [len(d.embedding) for d in out.data] == [32, 32]
    norms = [sum(x * x for x in d.embedding) ** 0.5 for d in out.data]
    assert norms == pytest.approx([1.0, 1.0], abs=1e-5)
    assert out.data[0].embedding != out.data[1].embedding


def test_cors_lets_the_configured_origin_in_only(server: Server) -> None:
    def preflight(origin: str) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp

    ok = preflight("http://page.example")
    assert ok.status == 200
    assert ok.getheader("access-control-allow-origin") == "http://page.example"
    assert preflight("http://evil.example").getheader("access-control-allow-origin") is None


def test_the_chat_page_is_served_without_a_key(server: Server) -> None:
    status, page = request(server.port, "GET", "/", key=None)
    assert status == 200 and "<title>aura" in page


def test_serve_leaves_a_core_to_the_http_loop_unless_told(monkeypatch) -> None:
    import os

    import torch

    from aura.cli import _serve_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: 4)
        assert _serve_threads(None, "thread") == 3 == torch.get_num_threads()
        assert _serve_threads(2, "thread") == 2 == torch.get_num_threads()
        # the model's process gets them; this one stays at one until it forks
        assert _serve_threads(None, "process") == 3 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(4)
        assert _serve_threads(None, "thread") == 4  # the environment decides
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


def test_default_bind_is_loopback(tmp_path: Path) -> None:
    from aura.infer.server import ServeOptions

    assert ServeOptions().host == "127.0.0.1"


@pytest.mark.parametrize(("argv", "needle"), [
    (["serve", "@missing"], "missing"),
    (["serve", "@run", "--port", "70000"], "--port"),
    (["serve", "@run", "--api-key-file", "@empty"], "is empty"),
    (["serve", "@run", "--api-key-file", "@missing"], "cannot read --api-key-file"),
    (["serve", "@run", "--api-key", "a", "--api-key-file", "@empty"], "not allowed with"),
    (["serve", "@run", "--quantize", "int4"], "invalid choice"),
    (["serve", "@run", "--api-key", "caf\udcff"], "not UTF-8"),
    (["serve", "@run", "--api-key", "日本"], "printable ASCII"),
    (["serve", "@run", "--max-tokens-limit", "0"], "--max-tokens-limit"),
    (["serve", "@run", "--save-interval", "nan"], "--save-interval"),
    (["serve", "@run", "--threads", "0"], "--threads must be >= 1"),
    (["serve", "@run", "--host", "no.such.host.invalid"], "cannot listen on"),
    (["serve", "@run", "--port", "@busy"], "cannot listen on"),
    (["serve", "@run", "--user-prefix", " "], "must not be empty"),
    (["serve", "@run", "--memory", "@missing"], "is --memory-dir DIR"),  # the old spelling
    (["chat", "@run", "--memory", "mem/"], "is --memory-dir DIR"),
    (["serve", "@run", "--memory", "off", "--memory-dir", "@missing"], "drop --memory-dir"),
    (["chat", "@run", "--memory-dir", "@empty"], "File exists"),  # a file, not a directory
])
def test_bad_serve_arguments_are_one_line_exit_2(run_cli: object, tmp_path: Path,
                                                argv: list[str], needle: str) -> None:
    import socket

    from conftest import assert_usage_error

    paths = {"@run": tiny_run(tmp_path), "@missing": tmp_path / "missing",
             "@empty": tmp_path / "empty"}
    (tmp_path / "empty").write_text("\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        paths["@busy"] = str(busy.getsockname()[1])
        assert_usage_error(run_cli(*[paths.get(a, a) for a in argv]), needle)  # type: ignore
