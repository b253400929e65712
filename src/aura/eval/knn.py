"""The kNN-LM read-out for a loaded model: a corpus datastore built into a checkpoint
(``aura memory build RUN --data D --knn``) and the read-out ``aura eval --knn LAMBDA`` uses.

The corpus datastore holds kNN-LM's published keys (a position's final hidden state, ``span``
1) with the next token, for windows of ``block_size + 1`` tokens in corpus order (spread evenly
when the store cannot hold them all); every entry's ``source_pos`` is its token's offset in the
split and its ``source_tokens`` the context it was formed from (the window's tokens ending at
it), which ``aura generate --knn --show-memory`` prints. It is saved as the checkpoint's
``memory/knn`` store, verified like every other file.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from aura.data.sampler import compute_features
from aura.data.shards import SplitData
from aura.data.tokenizers import Tokenizer
from aura.errors import AuraError, ConfigError
from aura.eval.perplexity import _device, _features
from aura.memory.build import corpus_windows
from aura.memory.knn_lm import (
    KNNLM,
    STREAM_KEYS,
    KNNConfig,
    KNNMixture,
    load_datastore,
    new_datastore,
)
from aura.memory.store import SNIPPET_TOKENS, EpisodicStore
from aura.models.base import AuraModel

# Positions a corpus datastore holds by default: all of a split up to 2^20. kNN-LM's gain grows
# with the datastore (Khandelwal et al., fig. 2); measured on char-level Shakespeare with
# snn_rag, corpus-only bits per byte fell 1.0-1.7% at 65,536 positions, 1.7-2.3% at 262,144
# (docs/BENCHMARKS.md). Past IVF_MIN_CAPACITY the store searches with FAISS when installed.
KNN_CORPUS_CAPACITY = 1 << 20


@torch.no_grad()
def build_datastore(model: AuraModel, split: SplitData, tokenizer: Tokenizer, *,
                    capacity: int = KNN_CORPUS_CAPACITY, batch_size: int = 8,
                    exclude: tuple[int, int] | None = None) -> EpisodicStore:
    """A plain kNN-LM datastore of ``split``: (hidden state, next token) for every position of
    up to ``capacity`` tokens' worth of windows, in corpus order, none from the split offsets
    ``exclude`` (text kept out to tune lambda on). Large stores search with FAISS ("auto")."""
    if capacity < 1 or batch_size < 1:
        raise AuraError(f"capacity and batch_size must be >= 1, got {capacity}, {batch_size}")
    block = model.max_context or 1024
    windows = corpus_windows(split, block + 1, max(1, capacity // block), exclude)
    store = new_datastore(model.hidden_size, min(capacity, len(windows) * block), index="auto")
    knn = KNNLM(store, int(model.config.vocab_size or 0), model.hidden_size, KNNConfig())
    device, features = _device(model), _features(model, tokenizer)
    memory = {"use_memory": True} if model.has_memory_switch else {}
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(windows), batch_size):
            batch = windows[i:i + batch_size]
            ids = torch.from_numpy(np.stack([split.maps[s][off:off + block + 1]
                                             for s, off, _ in batch]).astype(np.int64))
            x, y = ids[:, :-1].to(device), ids[:, 1:].to(device)
            hidden = model(x, **memory, **compute_features(features, x)).hidden
            if hidden is None:
                raise AuraError(f"model {model.config.name!r} returns no hidden states to key "
                                "a kNN datastore by")
            pos = torch.tensor([g for _, _, g in batch], device=device)[:, None] + \
                torch.arange(1, block + 1, device=device)
            context = F.pad(x, (SNIPPET_TOKENS - 1, 0), value=-1).unfold(1, SNIPPET_TOKENS, 1)
            knn.add(knn.keys(hidden, x), y, source_pos=pos, source_tokens=context)
    finally:
        model.train(was_training)
    return store


def knn_readout(model: AuraModel, checkpoint: Path, *, lam: float, temperature: float, k: int,
                span: int | None, stream: bool, learn: bool, capacity: int = 65536
                ) -> KNNLM | KNNMixture:
    """The read-out ``aura eval --knn`` uses: the checkpoint's corpus datastore (plain keys),
    or, reading a stream, a datastore of the document itself (``span`` > 1 keys by default,
    see knn_lm.STREAM_KEYS) that ``learn`` fills window by window, mixed with the corpus
    datastore when the checkpoint has one (each at weight ``lam``); a stream with ``span`` 1
    adds the document to a copy of the corpus datastore instead."""
    vocab, width = int(model.config.vocab_size or 0), model.hidden_size
    corpus = load_datastore(checkpoint, _device(model))
    config = KNNConfig(lam=lam, temperature=temperature, k=k)
    if not stream:
        if corpus is None:
            raise ConfigError(f"{checkpoint} has no kNN datastore: run `aura memory build RUN "
                              "--data DIR --knn` first, or read a document with --stream")
        if span not in (None, 1):
            raise ConfigError("--knn-span applies to a --stream's own datastore; the corpus "
                              "datastore is keyed by hidden states (span 1)")
        return KNNLM(corpus, vocab, width, config)
    span = STREAM_KEYS["span"] if span is None else span
    if span > 1:
        config = replace(config, span=span, token_weight=STREAM_KEYS["token_weight"])
    if span == 1 and corpus is not None:
        return KNNLM(corpus, vocab, width, config, learn=learn)
    document = KNNLM(new_datastore(config.key_dim(width), capacity), vocab, width, config,
                     learn=learn)
    if corpus is None:
        return document
    if 2 * lam > 1:
        raise ConfigError(f"--knn {lam} with a corpus datastore and the document's: each gets "
                          "lambda, so it must be at most 0.5")
    return KNNMixture([KNNLM(corpus, vocab, width, KNNConfig(lam=lam, temperature=temperature,
                                                             k=k)), document])
