"""Sentence embeddings from an OpenAI-compatible HTTP endpoint, with a persistent cache.

``POST {base_url}/embeddings`` with ``{"model": ..., "input": [texts]}`` and a bearer key, as
OpenAI, OpenRouter and local servers (vLLM, llama.cpp, Ollama's OpenAI API) accept it. The
base URL and model come from the model config or the environment (``AURA_EMBEDDINGS_URL``,
``AURA_EMBEDDINGS_MODEL``); the key only from the environment (``AURA_EMBEDDINGS_KEY``, else
``OPENAI_API_KEY``), so it is never written into a run's saved config.

Texts go in batches; a connection error, a timeout, 429 or a 5xx is retried with exponential
backoff (``AURA_EMBEDDINGS_RETRIES`` times, default 4, from ``AURA_EMBEDDINGS_BACKOFF`` seconds,
default 0.5); anything else fails at once. Every vector is cached on disk in SQLite keyed by
(provider, model, sha256 of the text), so rebuilding a bank over the same text makes no
request. Failures are one-line ``AuraError``s naming the URL and what went wrong (unreachable,
key refused, not the expected JSON), which the CLI prints and exits 2 on.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aura.errors import AuraError, ConfigError

PROVIDER = "openai-compatible"
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def _env(name: str, default: float) -> float:
    value = os.environ.get(name)
    try:
        return default if value is None else float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {value!r}") from None


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "aura" / "embeddings"


class EmbeddingCache:
    """(provider, model, text sha256) -> float32 vector, in one SQLite file."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(directory / "embeddings.sqlite")
        self.db.execute("CREATE TABLE IF NOT EXISTS vectors (provider TEXT, model TEXT, "
                        "text_sha256 TEXT, vector BLOB, PRIMARY KEY (provider, model, "
                        "text_sha256))")

    def get(self, provider: str, model: str, digests: list[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for i in range(0, len(digests), 500):
            part = digests[i:i + 500]
            rows = self.db.execute(
                f"SELECT text_sha256, vector FROM vectors WHERE provider = ? AND model = ? "
                f"AND text_sha256 IN ({','.join('?' * len(part))})", [provider, model, *part])
            out.update({d: np.frombuffer(v, dtype=np.float32) for d, v in rows})
        return out

    def put(self, provider: str, model: str, items: dict[str, np.ndarray]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?, ?)",
                                [(provider, model, d, v.astype(np.float32).tobytes())
                                 for d, v in items.items()])


class HTTPEncoder:
    """``encode(texts) -> (N, dim)`` unit vectors from an OpenAI-compatible endpoint;
    ``requests`` counts the HTTP requests made (a cached text makes none)."""

    def __init__(self, dim: int, base_url: str | None = None, model: str | None = None, *,
                 api_key: str | None = None, batch_size: int = 64, retries: int | None = None,
                 backoff: float | None = None, timeout: float = 60.0,
                 cache_dir: Path | None = None):
        self.base_url = (base_url or os.environ.get("AURA_EMBEDDINGS_URL") or "").rstrip("/")
        self.model = model or os.environ.get("AURA_EMBEDDINGS_MODEL") or ""
        if not self.base_url or not self.model:
            raise ConfigError("the http memory encoder needs a base URL and a model: set "
                              "model.memory_encoder_url / model.memory_encoder_model or "
                              "AURA_EMBEDDINGS_URL / AURA_EMBEDDINGS_MODEL")
        self.api_key = (api_key or os.environ.get("AURA_EMBEDDINGS_KEY")
                        or os.environ.get("OPENAI_API_KEY") or "")
        self.dim, self.batch_size, self.timeout = dim, batch_size, timeout
        self.retries = int(_env("AURA_EMBEDDINGS_RETRIES", 4) if retries is None else retries)
        self.backoff = float(_env("AURA_EMBEDDINGS_BACKOFF", 0.5) if backoff is None
                             else backoff)
        self.cache = EmbeddingCache(cache_dir or default_cache_dir())
        self.requests = 0

    def encode(self, texts: list[str]) -> torch.Tensor:
        digests = [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]
        found = self.cache.get(PROVIDER, self.model, sorted(set(digests)))
        todo = list(dict.fromkeys(d for d in digests if d not in found))
        by_digest = dict(zip(digests, texts, strict=True))
        for i in range(0, len(todo), self.batch_size):
            part = todo[i:i + self.batch_size]
            vectors = self._request([by_digest[d] for d in part])
            fresh = dict(zip(part, vectors, strict=True))
            self.cache.put(PROVIDER, self.model, fresh)
            found.update(fresh)
        if not texts:
            return torch.zeros(0, self.dim)
        out = torch.from_numpy(np.stack([found[d] for d in digests]).astype(np.float32))
        return torch.nn.functional.normalize(out, dim=-1)

    def _request(self, texts: list[str]) -> list[np.ndarray]:
        url = f"{self.base_url}/embeddings"
        body = json.dumps({"model": self.model, "input": texts}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            self.requests += 1
            try:
                req = urllib.request.Request(url, body, headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as exc:
                if exc.code in (401, 403):
                    raise AuraError(f"{url}: the embeddings server refused the key "
                                    f"(HTTP {exc.code}); set AURA_EMBEDDINGS_KEY") from None
                if exc.code not in _RETRY_STATUS or last:
                    raise AuraError(f"{url}: HTTP {exc.code} {exc.reason}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                if last:
                    reason = getattr(exc, "reason", exc)
                    raise AuraError(f"{url}: embeddings server unreachable after "
                                    f"{self.retries + 1} attempts ({reason})") from None
            time.sleep(self.backoff * 2 ** attempt)
        return self._parse(url, raw, len(texts))

    def _parse(self, url: str, raw: bytes, n: int) -> list[np.ndarray]:
        try:
            data: Any = json.loads(raw)
            rows = sorted(data["data"], key=lambda r: r["index"])
            vectors = [np.asarray(r["embedding"], dtype=np.float32) for r in rows]
        except (ValueError, KeyError, TypeError) as exc:
            raise AuraError(f"{url}: the response is not OpenAI embeddings JSON "
                            f"({type(exc).__name__}: {exc})") from None
        if len(vectors) != n or any(v.shape != (self.dim,) for v in vectors):
            shapes = sorted({v.shape[0] if v.ndim == 1 else -1 for v in vectors})
            raise AuraError(f"{url}: expected {n} embeddings of {self.dim} numbers, got "
                            f"{len(vectors)} of {shapes}")
        return vectors
