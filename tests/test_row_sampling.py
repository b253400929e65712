"""One sampling call for a whole batch: the same distribution, per-row seeds, O(1) ops."""

from __future__ import annotations

import collections
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from aura.data.tokenizers import ByteTokenizer, load_tokenizer
from aura.infer.generate import TextStream
from aura.infer.row_sampling import RowSettings, _Uses, sample_rows, uniforms
from aura.infer.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    top_k_filter,
    top_p_filter,
    typical_filter,
)
from aura.infer.worker import Job, Worker
from aura.models.base import build_model
from conftest import tiny_config

CONFIGS = [SamplingConfig(), SamplingConfig(temperature=0.7, top_k=3),
           SamplingConfig(temperature=1.3, top_p=0.6), SamplingConfig(typical_p=0.5),
           SamplingConfig(repetition_penalty=1.8, top_k=5, top_p=0.9),
           SamplingConfig(temperature=0)]


def expected(logits: torch.Tensor, seen: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The probabilities ``sampling.sample_next`` draws from, built from its own filters."""
    x = apply_repetition_penalty(logits[None], seen.nonzero().T, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return torch.nn.functional.one_hot(x.argmax(-1), x.size(-1))[0].double()
    x = (x - x.amax(-1, keepdim=True)) / cfg.temperature
    x = top_k_filter(x, cfg.top_k) if cfg.top_k else x
    x = top_p_filter(x, cfg.top_p) if cfg.top_p else x
    x = typical_filter(x, cfg.typical_p) if cfg.typical_p else x
    return x.softmax(-1)[0].double()


def test_each_row_samples_its_own_settings_distribution() -> None:
    torch.manual_seed(0)
    logits = torch.randn(12) * 2
    seen = torch.zeros(12, dtype=torch.bool)
    seen[[0, 3, 4]] = True
    n = 6000  # draws per config, each a row with its own seed
    cfgs = [SamplingConfig(**{**c.__dict__, "seed": i * len(CONFIGS) + j})
            for i in range(n) for j, c in enumerate(CONFIGS)]
    s = RowSettings.of(cfgs, 12, "cpu")
    drawn = sample_rows(logits.expand(len(cfgs), 12), seen.expand(len(cfgs), 12), s,
                        _Uses.of(cfgs), torch.full((len(cfgs),), 5))
    for j, cfg in enumerate(CONFIGS):
        freq = torch.bincount(drawn[j::len(CONFIGS)], minlength=12).double() / n
        want = expected(logits, seen, cfg)
        assert (freq - want).abs().max() < 0.025, (cfg, freq, want)
        assert (freq[want == 0] == 0).all()  # filtered tokens never come up


def test_a_rows_draw_depends_on_its_seed_and_position_only() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 50)
    cfgs = [SamplingConfig(seed=7, top_p=0.9), SamplingConfig(seed=8, temperature=0.5),
            SamplingConfig(temperature=0), SamplingConfig(seed=7, top_k=10)]
    s, uses = RowSettings.of(cfgs, 50, "cpu"), _Uses.of(cfgs)
    together = sample_rows(logits, None, s, uses, torch.tensor([3, 9, 4, 3]))
    for r, cfg in enumerate(cfgs):
        alone = sample_rows(logits[r:r + 1], None, RowSettings.of([cfg], 50, "cpu"),
                            _Uses.of([cfg]), torch.tensor([[3, 9, 4, 3][r]]))
        assert alone.item() == together[r].item()
    u = uniforms(torch.tensor([7, 7, 8, -5]), torch.tensor([0, 1, 0, 0]))
    assert len(set(u.tolist())) == 4 and ((u >= 0) & (u < 1)).all()
    many = uniforms(torch.full((20000,), 123), torch.arange(20000))
    assert abs(many.mean().item() - 0.5) < 0.01 and abs(many.var().item() - 1 / 12) < 0.003


class _CountOps(TorchFunctionMode):
    """Counts the torch calls made from Python (functions, methods, indexing)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = collections.Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        self.n[getattr(func, "__name__", str(func))] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("name", "extra"), [
    ("gpt", ()), ("hippocampal", ()), ("natural_brain", ("model.liquid_moe=false",))])
def test_a_rounds_tensor_work_does_not_grow_with_the_sequences(name: str,
                                                              extra: tuple[str, ...]) -> None:
    """The torch calls made for a round of 1 sequence and of 8 are the same: sampling, the
    forward and the cache bookkeeping are batched, not per sequence (hippocampal: its prosody
    features and time-cell state too; natural_brain: its PFC state and limbic prosody too).
    natural_brain's LiquidMoE runs each expert some token chose once per forward, so its calls
    follow which experts are chosen (at most model.moe_experts, whatever the rows): it is off
    here."""
    torch.manual_seed(0)
    model = build_model(tiny_config(f"model.name={name}", "model.vocab_size=256",
                                    "model.block_size=128", *extra).model)
    counts = []
    for n in (1, 8):
        worker = Worker(model, ByteTokenizer())
        worker.stop()  # rounds are driven here, on this thread
        with torch.inference_mode():
            for i in range(n):
                worker._start(Job("Hello" * (i + 1), 50, SamplingConfig(
                    seed=i, top_k=40, top_p=0.9, repetition_penalty=1.1, temperature=0.8),
                    (), lambda e: None))
            worker._admit()
            worker._round()
            ops = _CountOps()
            with ops:
                for _ in range(4):
                    worker._round()
        assert worker.stats.active == n and worker.batch is not None
        counts.append(ops.n)
    assert sum(counts[0].values()) > 100  # the forward is in it
    assert counts[0] == counts[1]


def _naive(tok: Any, ids: list[int], stop: list[str]) -> str:
    text = tok.decode(ids)
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[:min(found)] if found else text


@pytest.mark.parametrize("stop", [[], ["ab"], ["\u00e9x", "zz"]])
def test_incremental_text_equals_decoding_the_whole(stop: list[str]) -> None:
    tok, rng = ByteTokenizer(), random.Random(0)
    alphabet = [*"abxz é€".encode(), 0xFF, 0x80]  # split characters, invalid bytes
    for _ in range(200):
        ids = [rng.choice(alphabet) for _ in range(rng.randint(1, 30))]
        pieces: list[str] = []
        ts = TextStream(tok, stop, pieces.append)
        for i in ids:
            if ts.push_id(i):
                break
        whole = ts.finish()
        assert whole == _naive(tok, ts.ids, stop)
        assert "".join(pieces) == whole


def test_incremental_text_keeps_the_spaces_a_metaspace_tokenizer_adds(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"[UNK]": 0, "\u2581hello": 1, "\u2581world": 2, "!": 3, "\u2581": 4}
    hf = HFTok(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    (tmp_path / "tokenizer.json").write_text(hf.to_str(), encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    ids = [1, 2, 3, 1, 1, 2]
    pieces: list[str] = []
    ts = TextStream(tok, [], pieces.append)
    for i in ids:
        ts.push_id(i)
    assert ts.finish() == tok.decode(ids) == "hello world! hello hello world"
    assert "".join(pieces) == tok.decode(ids)
    assert collections.Counter(pieces)["world"] == 0  # the space came with it
