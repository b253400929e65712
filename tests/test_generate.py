"""Decoding: the KV cache agrees with re-running the context, cropping past the block size,
stopping, mode handling, and text generation with stop strings and UTF-8-safe streaming."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aura.config import ModelConfig
from aura.data.tokenizers import ByteTokenizer, CharTokenizer
from aura.errors import AuraError
from aura.infer.generate import MAX_NEW_TOKENS, generate, generate_text
from aura.infer.sampling import SamplingConfig
from aura.models import AuraModel, ModelOutput, build_model

GREEDY = SamplingConfig(temperature=0)
BLOCK = 32


def tiny_gpt(vocab: int = 65, block: int = BLOCK, dropout: float = 0.0, seed: int = 0
             ) -> AuraModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=32,
                      dropout=dropout)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def gpt() -> AuraModel:
    return tiny_gpt()


@pytest.fixture(scope="module")
def positional_gpt() -> AuraModel:
    """Large position embeddings make greedy output depend on where each token sits (a random
    model otherwise soon repeats one id whatever its context), so a wrong crop shows."""
    model = tiny_gpt()
    with torch.no_grad():
        model.wpe.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    return model


def tokens(seed: int, batch: int, length: int, vocab: int = 65) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


class CountingModel(AuraModel):
    """Predicts (last token + 1) mod vocab; no cache, no context limit; records input lengths."""

    def __init__(self, vocab: int = 10):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab)
        self.lengths: list[int] = []

    @property
    def max_context(self) -> int | None:
        return None

    def forward(self, idx: torch.Tensor, targets: Any = None, **state: Any) -> ModelOutput:
        self.lengths.append(idx.size(1))
        nxt = (idx[:, -1] + 1) % self.config.vocab_size
        return ModelOutput(torch.nn.functional.one_hot(nxt, self.config.vocab_size)[:, None]
                           .float())


class ScriptModel(AuraModel):
    """Spells a fixed token script: after a T-token input it predicts ``script[T]``."""

    def __init__(self, script: list[int], vocab: int, after: int = ord(".")):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab)
        self.script, self.after, self.calls = script, after, 0

    @property
    def max_context(self) -> int | None:
        return None

    def forward(self, idx: torch.Tensor, targets: Any = None, **state: Any) -> ModelOutput:
        self.calls += 1
        t = idx.size(1)
        logits = torch.full((idx.size(0), 1, self.config.vocab_size), -10.0)
        logits[:, :, self.script[t] if t < len(self.script) else self.after] = 10.0
        return ModelOutput(logits)


class EotByteTokenizer(ByteTokenizer):
    """Bytes plus an end-of-text id 256, which ``decode`` refuses (it is never text)."""

    vocab_size = 257
    eot_id = 256


def script_model(text: str, vocab: int = 256, prefix: list[int] | None = None) -> ScriptModel:
    return ScriptModel((prefix or []) + list(text.encode("utf-8")), vocab)


# --- the cache agrees with re-running the context ---

@settings(max_examples=15)
@given(st.integers(0, 2**32 - 1), st.integers(1, BLOCK), st.integers(1, 3))
def test_cached_logits_equal_uncached_position_by_position(seed: int, prefill: int,
                                                            batch: int) -> None:
    model = tiny_gpt()
    ids = tokens(seed, batch, BLOCK)
    with torch.inference_mode():
        full = model(ids).logits
        cache = model.new_cache(batch, BLOCK)
        steps = [model(ids[:, :prefill], cache=cache, last_only=True).logits[:, -1]]
        for t in range(prefill, BLOCK):
            steps.append(model(ids[:, t:t + 1], cache=cache, last_only=True).logits[:, -1])
    assert torch.allclose(torch.stack(steps, 1), full[:, prefill - 1:], atol=1e-5, rtol=0)


def test_greedy_cached_equals_uncached_within_block(gpt: AuraModel) -> None:
    prompt = tokens(1, 3, 5)
    cached = generate(gpt, prompt, BLOCK - 5, GREEDY)
    uncached = generate(gpt, prompt, BLOCK - 5, GREEDY, use_cache=False)
    assert cached.shape == (3, BLOCK)
    assert torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, uncached)
    assert len(set(cached[:, 5:].flatten().tolist())) > 2  # a real sequence, not one repeated id


def test_seeded_sampling_cached_equals_uncached(gpt: AuraModel) -> None:
    prompt = tokens(2, 2, 4)
    cfg = SamplingConfig(temperature=1.0, top_k=30, seed=11)
    a = generate(gpt, prompt, BLOCK - 4, cfg)
    assert torch.equal(a, generate(gpt, prompt, BLOCK - 4, cfg, use_cache=False))
    other = SamplingConfig(temperature=1.0, top_k=30, seed=12)
    assert not torch.equal(a, generate(gpt, prompt, BLOCK - 4, other))


def cropped_reference(model: AuraModel, prompt: torch.Tensor, n: int, keep: int) -> torch.Tensor:
    """Greedy decoding by re-running the context; when it outgrows the block, restart the window
    at the last ``keep`` tokens (BLOCK: a sliding window; BLOCK // 2: the cache's re-prefill)."""
    ids = prompt
    start = max(0, ids.size(1) - BLOCK)
    with torch.inference_mode():
        for _ in range(n):
            if ids.size(1) - start > BLOCK:
                start = ids.size(1) - keep
            nxt = model(ids[:, start:]).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
    return ids


@pytest.mark.parametrize("prompt_len", [5, BLOCK + 8])
def test_past_block_size(positional_gpt: AuraModel, prompt_len: int) -> None:
    # Past the block the two paths see different contexts by design: uncached slides its window
    # one token per step, cached restarts it at the last BLOCK // 2 tokens (absolute positions
    # can't slide). Each must equal a plain re-running reference that crops its way.
    model, prompt, n = positional_gpt, tokens(3, 2, prompt_len), 3 * BLOCK
    cached = generate(model, prompt, n, GREEDY)
    uncached = generate(model, prompt, n, GREEDY, use_cache=False)
    assert cached.shape == uncached.shape == (2, prompt_len + n)
    assert torch.equal(cached, cropped_reference(model, prompt, n, BLOCK // 2))
    assert torch.equal(uncached, cropped_reference(model, prompt, n, BLOCK))
    assert len(set(cached[0, -BLOCK:].tolist())) > 5


def test_restores_training_mode_and_decodes_in_eval() -> None:
    model = tiny_gpt(dropout=0.5).train()
    prompt = tokens(4, 1, 3)
    a = generate(model, prompt, 20, GREEDY)
    assert model.training
    assert torch.equal(a, generate(model, prompt, 20, GREEDY))  # dropout was off
    assert not generate(model.eval(), prompt, 5, GREEDY).requires_grad
    assert not model.training
    a[0, 0] = 1  # an ordinary tensor, not an inference tensor


def test_model_without_cache_reruns_the_full_context() -> None:
    model = CountingModel()
    out = generate(model, torch.tensor([[3, 4]]), 6, GREEDY)  # use_cache, but new_cache is None
    assert out.tolist() == [[3, 4, 5, 6, 7, 8, 9, 0]]
    assert model.lengths == [2, 3, 4, 5, 6, 7]  # no context limit: nothing cropped


def test_stop_id_pads_finished_rows_and_ends_when_all_stopped() -> None:
    seen: list[list[int]] = []
    out = generate(CountingModel(), torch.tensor([[7], [5]]), 10, GREEDY, stop_ids=0,
                   on_token=lambda ids: seen.append(ids.tolist()))
    assert out.tolist() == [[7, 8, 9, 0, 0, 0], [5, 6, 7, 8, 9, 0]]
    assert seen == [[8, 6], [9, 7], [0, 8], [0, 9], [0, 0]]


def test_on_token_returning_true_stops() -> None:
    out = generate(CountingModel(), torch.tensor([[1]]), 10, GREEDY,
                   on_token=lambda ids: int(ids[0]) == 4)
    assert out.tolist() == [[1, 2, 3, 4]]


def test_bad_arguments(gpt: AuraModel) -> None:
    with pytest.raises(AuraError, match="empty prompt"):
        generate(gpt, torch.zeros(1, 0, dtype=torch.long), 5, GREEDY)
    for n in (-1, MAX_NEW_TOKENS + 1, 10**23):  # 10**23 would overflow an int64 size
        with pytest.raises(AuraError, match="max_new_tokens"):
            generate(gpt, tokens(0, 1, 3), n, GREEDY)
    assert torch.equal(generate(gpt, tokens(0, 1, 3), 0, GREEDY), tokens(0, 1, 3))


# --- text ---

def collect(model: AuraModel, tok: Any, prompt: str, n: int, **kw: Any) -> tuple[str, list[str]]:
    pieces: list[str] = []
    text = generate_text(model, tok, prompt, n, kw.pop("sampling", GREEDY), stream=pieces.append,
                         **kw)
    assert "".join(pieces) == text
    assert all(pieces)
    return text, pieces


def test_stop_string_cuts_output_and_generation() -> None:
    model = script_model("Q: hi\nA: hello there\n\nQ: more")
    text, pieces = collect(model, ByteTokenizer(), "Q: hi\nA:", 100, stop=["\n\n", "Q:"])
    assert text == " hello there"
    assert "\n" not in "".join(pieces)  # the first newline was held back, never streamed
    assert model.calls == len(" hello there\n\n")  # stopped as soon as the stop string completed
    text, _ = collect(script_model("abcdef"), ByteTokenizer(), "a", 100, stop=["cde", "d"])
    assert text == "bc"


def test_without_stop_runs_to_max_new_tokens() -> None:
    text, _ = collect(script_model("abc"), ByteTokenizer(), "a", 6)
    assert text == "bc...."


def test_multibyte_characters_stream_whole() -> None:
    text, pieces = collect(script_model("> café € 😀 ok"), ByteTokenizer(), ">", 100, stop=["ok"])
    assert text == " café € 😀 "
    assert not any("\ufffd" in p for p in pieces)


def test_random_byte_model_streams_exactly_the_result() -> None:
    # A random model samples arbitrary bytes, so invalid and split UTF-8 sequences are common;
    # 150 tokens after a 2-byte prompt also passes the 64-token block (re-prefill).
    model, tok = tiny_gpt(vocab=256, block=64, seed=5), ByteTokenizer()
    cfg = SamplingConfig(temperature=1.0, seed=3)
    text, pieces = collect(model, tok, "Hi", 150, sampling=cfg)
    ids = generate(model, torch.tensor([[72, 105]]), 150, cfg)[0, 2:]
    assert text == tok.decode(ids.tolist())
    assert (ids >= 0x80).sum() > 20 and "\ufffd" in text
    assert len(pieces) < 150  # some tokens were held back until their character completed


@settings(max_examples=40)
@given(st.text("ab\né😀", max_size=30), st.lists(st.text("ab\né😀", min_size=1, max_size=3),
                                                max_size=3))
def test_streaming_with_stop_strings(cont: str, stop: list[str]) -> None:
    expected = cont
    for end in range(1, len(cont) + 1):  # the first stop string to complete ends the text
        hits = [i for i in (cont[:end].find(s) for s in stop) if i >= 0]
        if hits:
            expected = cont[:min(hits)]
            break
    model = script_model(cont, vocab=257, prefix=[256])
    n = len(cont.encode("utf-8"))
    text, _ = collect(model, EotByteTokenizer(), "", n, stop=stop)
    assert text == expected


def test_eot_stops_and_is_not_text() -> None:
    model = ScriptModel([*b"Hi there", 256, *b"more"], vocab=257)
    text, _ = collect(model, EotByteTokenizer(), "Hi", 50)
    assert text == " there"


def test_empty_prompt_starts_from_eot_or_is_an_error() -> None:
    model = script_model("ok", vocab=257, prefix=[256])
    assert generate_text(model, EotByteTokenizer(), "", 2, GREEDY) == "ok"
    with pytest.raises(AuraError, match="empty prompt"):
        generate_text(model, ByteTokenizer(), "", 2, GREEDY)
    with pytest.raises(AuraError, match="stop strings"):
        generate_text(model, EotByteTokenizer(), "x", 2, GREEDY, stop=[""])


def test_text_with_cache_equals_without() -> None:
    model, tok = tiny_gpt(vocab=256, block=64, seed=6), ByteTokenizer()
    cfg = SamplingConfig(temperature=0.8, top_p=0.95, repetition_penalty=1.3, seed=1)
    a = generate_text(model, tok, "Once", 40, cfg)
    assert a
    assert a == generate_text(model, tok, "Once", 40, cfg, use_cache=False)


@settings(max_examples=40)
@given(n=st.one_of(st.integers(max_value=-1), st.integers(0, 5),
                   st.integers(min_value=MAX_NEW_TOKENS + 1)),
       stop=st.lists(st.text(max_size=3), max_size=2), prompt=st.text(max_size=4))
def test_on_ready_runs_only_after_every_argument_is_accepted(n: int, stop: list[str],
                                                             prompt: str) -> None:
    """Whatever is refused (a token count out of range, an empty stop string, a prompt the
    tokenizer cannot encode) is refused before ``on_ready``: a caller echoing the prompt there
    prints nothing for bad input."""
    model, tok = ScriptModel([1, 2, 3], vocab=4, after=0), CharTokenizer("abc ")
    valid = (0 <= n <= MAX_NEW_TOKENS and "" not in stop and prompt != ""
             and all(c in tok.chars for c in prompt))
    ready: list[bool] = []

    def run() -> str:
        return generate_text(model, tok, prompt, n, GREEDY, stop=stop,
                             on_ready=lambda: ready.append(True))

    if valid:
        run()
        assert ready == [True]
    else:
        with pytest.raises(AuraError):
            run()
        assert ready == []
