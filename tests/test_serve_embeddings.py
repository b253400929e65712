"""`aura serve --embeddings`: /v1/embeddings from the model's hidden states or a text encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import assert_usage_error, requires_extra
from serving import KEY, Server, tiny_run


@pytest.mark.parametrize(("argv", "needle"), [
    (["--embeddings", "bogus"], "--embeddings takes hidden, encoder or encoder:NAME"),
    (["--embeddings", "encoder:word2vec"], "got 'encoder:word2vec'"),
    (["--embeddings", "encoder"], "no configured text encoder"),  # gpt has none
    (["--embeddings", "encoder:http"], "has none (model.memory_encoder=http)"),
])
def test_an_encoder_the_model_lacks_is_one_line_exit_2(run_cli: object, tmp_path: Path,
                                                      argv: list[str], needle: str) -> None:
    res = run_cli("serve", tiny_run(tmp_path), "--port", "0", *argv)  # type: ignore[operator]
    assert_usage_error(res, needle)


def test_the_configured_encoder_is_the_models_memory_encoder(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """``encoder`` follows model.memory_encoder (http here, its endpoint from the config)."""
    from aura.infer import embeddings
    from aura.models.base import build_model
    from conftest import tiny_config

    model = build_model(tiny_config(
        "model.name=snn_rag", "model.vocab_size=256", "model.memory_capacity=64",
        "model.memory_chunk=8", "model.memory_encoder=http", "model.memory_encoder_dim=3",
        "model.memory_encoder_url=http://127.0.0.1:9/v1",
        "model.memory_encoder_model=m").model)
    monkeypatch.setenv("AURA_EMBEDDINGS_RETRIES", "0")
    embedder = embeddings.text_embedder("encoder", model)
    assert embedder is not None and embedder.name == "http"
    assert embeddings.text_embedder("hidden", model) is None


def test_the_route_uses_the_encoder_and_reports_its_failures_as_502(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from aura.errors import AuraError
    from aura.infer.embeddings import TextEmbedder
    from aura.infer.server import ServeOptions, create_app
    from aura.train.checkpoint import load_for_inference

    loaded = load_for_inference(tiny_run(tmp_path))
    app = create_app(loaded.model, loaded.tokenizer, ServeOptions())
    calls: list[list[str]] = []

    def encode(texts: list[str]) -> torch.Tensor:
        calls.append(texts)
        if texts == ["fail"]:
            raise AuraError("http://x/v1/embeddings: unreachable")
        return torch.tensor([[3.0, 4.0]] * len(texts))

    with TestClient(app) as client:
        app.state.service.embedder = TextEmbedder("stub", encode)
        ok = client.post("/v1/embeddings", json={"input": ["ab", "c"]}).json()
        assert [x for d in ok["data"] for x in d["embedding"]] == pytest.approx([0.6, 0.8] * 2)
        assert ok["usage"]["prompt_tokens"] == 3  # bytes, by the served model's tokenizer
        empty = client.post("/v1/embeddings", json={"input": ["a", ""]})
        failed = client.post("/v1/embeddings", json={"input": "fail"})
    assert empty.status_code == 400 and failed.status_code == 502
    assert "unreachable" in failed.json()["error"]["message"]
    assert calls == [["ab", "c"], ["fail"]]


@pytest.mark.slow  # loads MiniLM in a server process
def test_another_aura_can_use_this_server_as_its_http_encoder(tmp_path: Path) -> None:
    """--embeddings encoder:minilm serves MiniLM's vectors; the http memory encoder pointed at
    this server gets exactly what MiniLM gives in process."""
    requires_extra("sentence_transformers", "minilm")
    from aura.memory.http_encoder import HTTPEncoder
    from aura.memory.text_encoder import MiniLMEncoder

    server = Server(tiny_run(tmp_path), "--api-key", KEY, "--embeddings", "encoder:minilm")
    try:
        texts = ["The cat sat on the mat.", "A cat was sitting on a rug.", "Stock prices fell."]
        client = HTTPEncoder(384, f"{server.base}/v1", "aura", api_key=KEY,
                             cache_dir=tmp_path / "cache")
        got = client.encode(texts)
        torch.testing.assert_close(got, MiniLMEncoder().encode(texts), atol=1e-5, rtol=1e-4)
        assert got[0] @ got[1] > got[0] @ got[2] + 0.2
        assert client.requests == 1
    finally:
        server.stop()
