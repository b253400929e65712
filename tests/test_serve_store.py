"""Stored chat completions (``store: true``) through the official client, kept across restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import requires_extra
from serving import tiny_run

openai = requires_extra("openai", "serve")


def client_for(run: Path, store: Path | None) -> tuple[object, object]:
    from fastapi.testclient import TestClient

    from aura.infer.server import ServeOptions, create_app
    from aura.train.checkpoint import load_for_inference

    loaded = load_for_inference(run)
    http = TestClient(create_app(loaded.model, loaded.tokenizer, ServeOptions(store_dir=store)))
    http.__enter__()
    return openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=http), http


def test_stored_completions_list_read_delete_and_survive_a_restart(tmp_path: Path) -> None:
    run, store = tiny_run(tmp_path), tmp_path / "store"
    client, http = client_for(run, store)
    try:
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        kept = client.chat.completions.create(model="aura", messages=msgs, max_tokens=5,
                                              seed=1, store=True, metadata={"user": "zed"})
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions
                           .create(model="aura", messages=msgs, max_tokens=5, seed=2,
                                   store=True, stream=True))
        client.chat.completions.create(model="aura", messages=msgs, max_tokens=5, seed=3)
        listed = client.chat.completions.list()
        assert len(listed.data) == 2 and listed.data[0].id == kept.id
        assert listed.data[1].choices[0].message.content == streamed
        assert [c.id for c in client.chat.completions.list(metadata={"user": "zed"}).data] == [
            kept.id]
        assert [c.id for c in client.chat.completions.list(order="desc", limit=1).data] == [
            listed.data[1].id]
    finally:
        http.__exit__(None, None, None)
    client, http = client_for(run, store)  # a new server over the same directory
    try:
        got = client.chat.completions.retrieve(kept.id)
        assert got.choices[0].message.content == kept.choices[0].message.content
        assert got.metadata == {"user": "zed"}
        assert [(m.role, m.content) for m in client.chat.completions.messages.list(kept.id)] == [
            ("system", "Be brief."), ("user", "Hi")]
        assert client.chat.completions.delete(kept.id).deleted
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.retrieve(kept.id)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.list(limit=1000)
        assert len(client.chat.completions.list().data) == 1
    finally:
        http.__exit__(None, None, None)
    assert len(list(store.glob("*.json"))) == 1
