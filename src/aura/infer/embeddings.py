"""What `aura serve`'s ``/v1/embeddings`` embeds with (``--embeddings``).

- ``hidden`` (the default): the served model's mean final hidden state, unit norm — what the
  language model makes of the text;
- ``encoder``: the text encoder the model is configured with for its memory
  (``model.memory_encoder`` ``minilm`` or ``http``: snn_rag), so the vectors a client gets are
  the ones the model's memory bank is keyed by;
- ``encoder:minilm``: all-MiniLM-L6-v2 (aura.memory.text_encoder, offline, the minilm extra)
  whatever the model; ``encoder:http``: the model's configured HTTP endpoint (it needs one).

With an encoder, this server is an OpenAI-compatible embeddings endpoint another Aura's
``memory_encoder=http`` can point at. Encoders run on a thread of their own, one request at a
time, not on the model worker: an HTTP encoder's wait never stalls generation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from aura.errors import ConfigError
from aura.models.base import AuraModel

ENCODERS = ("minilm", "http")


def check_spec(spec: str) -> str | None:
    """The encoder a spec names (None for ``hidden``, ``""`` for the configured one)."""
    if spec == "hidden":
        return None
    kind, _, name = spec.partition(":")
    if kind != "encoder" or (name and name not in ENCODERS):
        raise ConfigError(f"--embeddings takes hidden, encoder or encoder:NAME (NAME one of "
                          f"{', '.join(ENCODERS)}), got {spec!r}")
    return name


class TextEmbedder:
    """``encode(texts)`` -> (N, dim) unit vectors from a text encoder, serialised."""

    def __init__(self, name: str, encode: Callable[[list[str]], torch.Tensor]):
        self.name, self._encode = name, encode
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> list[list[float]]:
        with self._lock:
            out = self._encode(texts)
        return torch.nn.functional.normalize(out.float(), dim=-1).tolist()


def text_embedder(spec: str, model: AuraModel) -> TextEmbedder | None:
    """The embedder ``spec`` asks for (None: hidden states), built now so a missing extra or
    an encoder the model lacks is a one-line error before the server listens."""
    name = check_spec(spec)
    if name is None:
        return None
    cfg = model.config
    configured = getattr(cfg, "memory_encoder", None)
    if not name:
        if configured not in ENCODERS:
            raise ConfigError(f"model {cfg.name!r} has no configured text encoder "
                              f"(model.memory_encoder: {configured or 'none'}): name one, "
                              "e.g. --embeddings encoder:minilm")
        name = configured
    if name == "minilm":
        from aura.memory.text_encoder import MiniLMEncoder

        return TextEmbedder("minilm", MiniLMEncoder().encode)
    if configured != "http":
        raise ConfigError(f"--embeddings encoder:http uses the model's configured endpoint, and "
                          f"model {cfg.name!r} has none (model.memory_encoder=http)")
    from aura.memory.http_encoder import HTTPEncoder

    http = HTTPEncoder(cfg.memory_encoder_dim, cfg.memory_encoder_url or None,
                       cfg.memory_encoder_model or None)
    return TextEmbedder("http", http.encode)
