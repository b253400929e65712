"""The OpenAI-compatible embeddings provider, against a stub server started here (never the
network)."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from aura.config import load_config
from aura.data.shards import PreparedData
from aura.errors import AuraError
from aura.memory.http_encoder import HTTPEncoder
from aura.models import build_model
from aura.train.checkpoint import TrainState, save_checkpoint
from conftest import TINY_TRAIN, assert_usage_error

DIM = 8


def vector(text: str) -> list[float]:
    seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).normal(size=DIM).tolist()


class Stub:
    """What the server answers: ``mode`` "ok", "401", "bad_json"; ``fail_first`` 503s first."""

    def __init__(self) -> None:
        self.mode, self.fail_first, self.hits, self.inputs = "ok", 0, 0, []  # type: ignore[var-annotated]


@pytest.fixture
def server() -> Iterator[tuple[str, Stub]]:
    stub = Stub()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            stub.hits += 1
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if stub.fail_first > 0:
                stub.fail_first -= 1
                self.send_response(503)
                self.end_headers()
                return
            if stub.mode == "401" or self.headers.get("Authorization") != "Bearer sekrit":
                self.send_response(401)
                self.end_headers()
                return
            stub.inputs.append(body["input"])
            payload = (b"{not json" if stub.mode == "bad_json" else json.dumps(
                {"data": [{"index": i, "embedding": vector(t)} for i, t in
                          reversed(list(enumerate(body["input"])))]}).encode())
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", stub
    httpd.shutdown()
    httpd.server_close()


def encoder(url: str, tmp_path: Path, **kw: Any) -> HTTPEncoder:
    return HTTPEncoder(DIM, url, "stub-embed", api_key=kw.pop("api_key", "sekrit"),
                       cache_dir=tmp_path / "cache", backoff=0.0, **kw)


def test_batches_in_order_and_the_cache_answers_the_second_time(
        server: tuple[str, Stub], tmp_path: Path) -> None:
    url, stub = server
    texts = [f"chunk {i}" for i in range(5)] + ["chunk 0"]
    enc = encoder(url, tmp_path, batch_size=2)
    out = enc.encode(texts)
    expected = torch.nn.functional.normalize(torch.tensor([vector(t) for t in texts]), dim=-1)
    torch.testing.assert_close(out, expected)
    assert stub.hits == 3 and [len(b) for b in stub.inputs] == [2, 2, 1]  # duplicates once
    again = encoder(url, tmp_path).encode(texts)  # a new process would find the same file
    torch.testing.assert_close(again, out)
    assert stub.hits == 3
    other_model = HTTPEncoder(DIM, url, "another-model", api_key="sekrit",
                              cache_dir=tmp_path / "cache", backoff=0.0)
    other_model.encode(texts[:1])
    assert stub.hits == 4  # the cache is keyed by model too


def test_retries_a_503_with_backoff_then_succeeds(server: tuple[str, Stub],
                                                  tmp_path: Path) -> None:
    url, stub = server
    stub.fail_first = 2
    enc = encoder(url, tmp_path, retries=2)
    assert enc.encode(["a"]).shape == (1, DIM)
    assert stub.hits == 3 and enc.requests == 3
    stub.fail_first = 5
    with pytest.raises(AuraError, match="HTTP 503"):
        encoder(url, tmp_path, retries=1).encode(["b"])


def test_errors_are_one_line(server: tuple[str, Stub], tmp_path: Path) -> None:
    url, stub = server
    with pytest.raises(AuraError, match="refused the key"):
        encoder(url, tmp_path, api_key="wrong").encode(["x"])
    stub.mode = "bad_json"
    with pytest.raises(AuraError, match="not OpenAI embeddings JSON"):
        encoder(url, tmp_path).encode(["x"])
    stub.mode = "ok"
    with pytest.raises(AuraError, match=r"expected 1 embeddings of 4 numbers"):
        HTTPEncoder(4, url, "m", api_key="sekrit", cache_dir=tmp_path / "c2").encode(["x"])
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(AuraError, match="unreachable after 2 attempts"):
        encoder(closed, tmp_path, retries=1).encode(["x"])


def test_memory_build_through_the_provider(run_cli, server: tuple[str, Stub],  # type: ignore[no-untyped-def]
                                           tmp_path: Path, train_data: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    url, stub = server
    data = PreparedData.open(train_data)
    overrides = ["model.name=snn_rag", *TINY_TRAIN, f"model.vocab_size={data.vocab_size}",
                 "model.memory_layers=[1]", "model.memory_capacity=64", "model.memory_chunk=8",
                 "model.memory_encoder=http", f"model.memory_encoder_url={url}",
                 "model.memory_encoder_model=stub-embed", f"model.memory_encoder_dim={DIM}"]
    cfg = load_config(preset="demo", overrides=overrides)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "run", build_model(cfg.model), data.tokenizer, cfg,
                    TrainState(step=1), None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("AURA_EMBEDDINGS_BACKOFF", "0")
    monkeypatch.setenv("AURA_EMBEDDINGS_KEY", "wrong")
    assert_usage_error(run_cli("memory", "build", tmp_path / "run", "--data", train_data),
                       "refused the key")
    monkeypatch.setenv("AURA_EMBEDDINGS_KEY", "sekrit")
    first = run_cli("memory", "build", tmp_path / "run", "--data", train_data, "--json")
    assert first.code == 0, first.err
    assert first.json()["entries"] == 64
    hits = stub.hits
    second = run_cli("memory", "build", tmp_path / "run", "--data", train_data, "--json")
    assert second.code == 0 and stub.hits == hits  # every chunk came from the cache
    saved = json.loads(next((tmp_path / "run" / "checkpoints").iterdir()).joinpath(
        "meta.json").read_text())
    assert "sekrit" not in json.dumps(saved)  # the key is never written into the run
    monkeypatch.setenv("AURA_EMBEDDINGS_RETRIES", "0")
    stub.mode = "bad_json"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    assert_usage_error(run_cli("memory", "build", tmp_path / "run", "--data", train_data),
                       "not OpenAI embeddings JSON")
