"""Batched decoding: rows at their own positions give each sequence what it gets alone."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest
import torch

from aura.data.tokenizers import ByteTokenizer
from aura.infer.batching import DecodeBatch, RaggedKVCache
from aura.infer.generate import generate_text
from aura.infer.sampling import SamplingConfig
from aura.infer.worker import Job, Worker
from aura.models.base import build_model
from conftest import tiny_config

MODELS = {"gpt": (), "snn_rag": ("model.memory_capacity=64", "model.memory_chunk=8"),
          "hippocampal": (),
          "natural_brain": ("model.time_cells=true", "model.pfc_dim=32", "model.broca_dim=64",
                            "model.moe_hidden=16", "model.memory_capacity=64",
                            "model.memory_writes=8"),
          "bdh": ("model.mlp_multiplier=8",)}


def model_of(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(tiny_config(f"model.name={name}", "model.vocab_size=256",
                                    *MODELS[name]).model).eval()
    if name == "hippocampal":  # prosody and time cells start silent: make them matter
        with torch.no_grad():
            for m in model.prosody:
                m.proj.weight.normal_(0.0, 1.0)
            model.time.out.weight.normal_(0.0, 1.0)
    if name == "natural_brain":  # a PFC state or boundary from another row must show, and
        with torch.no_grad():    # hormones past their warmup modulate sampling (x1.16)
            model.pfc.out.weight.normal_(0.0, 0.5)
            model.pfc.candidate.weight.normal_(0.0, 0.5)
            model.time.out.weight.normal_(0.0, 1.0)
            model.limbic.clock.fill_(model.limbic.warmup)
            model.limbic.hormones[0] = 0.9
        assert model.sampling_modulation() == pytest.approx({"temperature": 1.16,
                                                             "top_k": 1.16})
    return model



def assert_steps_agree(together: DecodeBatch, alone: list[DecodeBatch], rows: list,
                       steps: int) -> None:
    """``steps`` more rounds of the batch and of each request alone give the same ids."""
    for _ in range(steps):
        for batch in (together, *alone):
            batch.step()
            batch.advance()
    assert [r.ids for r in rows] == [a.seqs[0].ids for a in alone]

def test_hippocampal_prosody_and_time_cells_change_its_logits() -> None:
    """What the concurrency test below relies on to catch a row fed another's features."""
    from aura.data.prosody import token_features
    from aura.data.sampler import compute_features

    model = model_of("hippocampal")
    x = torch.tensor([list(b"Hi. Oh no!\n\nGood day, said he.")])
    feats = compute_features(token_features(("prosody",), ByteTokenizer()), x)["prosody"]
    with torch.inference_mode():
        real = model(x, prosody=feats).logits
        moved = model(x, prosody=feats.roll(1, dims=1)).logits
    assert (real - moved).abs().amax() > 1e-2


def test_a_ragged_step_equals_each_row_alone() -> None:
    model = model_of("gpt")
    prompts = [torch.randint(0, 256, (1, n)) for n in (3, 11, 7)]
    nxt = torch.randint(0, 256, (3, 1))
    with torch.inference_mode():
        alone = []
        for p, x in zip(prompts, nxt, strict=True):
            cache = model.new_cache(1, 32)
            model(p, cache=cache)
            alone.append(model(x[None], cache=cache, last_only=True).logits[0, -1])
        k = model.new_cache(1, 32).k[0]
        ragged = RaggedKVCache(2, 4, k.size(1), 32, k.size(3), k.device, k.dtype)
        for row, p in enumerate(prompts):
            cache = model.new_cache(1, 32)
            model(p, cache=cache)
            ragged.rows += 1
            ragged.put([row], cache)
        batched = model(nxt, cache=ragged, last_only=True).logits[:, -1]
    assert ragged.lengths[:3].tolist() == [4, 12, 8]
    torch.testing.assert_close(batched, torch.stack(alone), atol=1e-5, rtol=1e-5)


def test_a_ragged_bdh_step_equals_each_row_alone() -> None:
    """Each row's recurrent state and RoPE position are its own, on both sides of the
    precomputed tables' ``block_size`` (32): a row prefilled past it reads computed ones."""
    from aura.models.bdh import RaggedBDHState

    model = model_of("bdh")
    prompts = [torch.randint(0, 256, (1, n)) for n in (3, 40, 7)]
    nxt = torch.randint(0, 256, (3, 1))
    with torch.inference_mode():
        alone, states = [], []
        for p, x in zip(prompts, nxt, strict=True):
            state = model.new_cache(1, 0)
            model(p, cache=state)
            alone.append(model(x[None], cache=state, last_only=True).logits[0, -1])
            states.append(state.kv[:, 0])
        ragged = model.new_cache(1, 0).ragged(2)
        for row, p in enumerate(prompts):
            state = model.new_cache(1, 0)
            model(p, cache=state)
            if row == ragged.capacity:
                ragged = ragged.grown(4)
            ragged.rows += 1
            ragged.put([row], state)
        batched = model(nxt, cache=ragged, last_only=True).logits[:, -1]
        assert isinstance(ragged, RaggedBDHState)
        assert ragged.lengths[:3].tolist() == [4, 41, 8]
        torch.testing.assert_close(batched, torch.stack(alone), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ragged.kv[:, :3], torch.stack(states, 1), atol=1e-5,
                                   rtol=1e-5)
        ragged.move(2, 0)
    assert ragged.sizes[0] == 8 and torch.equal(ragged.kv[:, 0], ragged.kv[:, 2])


@pytest.mark.parametrize(("name", "batched"), [
    ("gpt", True), ("snn_rag", True), ("gpt", False), ("hippocampal", True), ("bdh", True),
    pytest.param("natural_brain", True, marks=pytest.mark.slow)])
def test_concurrent_jobs_return_what_each_returns_alone(name: str, batched: bool) -> None:
    """Prompts of different lengths, sampled and greedy, a stop string, and 60 new tokens
    through a context of 32 (so the windows refill at different moments)."""
    model, tok = model_of(name), ByteTokenizer()
    jobs = [("Hi", SamplingConfig(seed=1), ()),
            ("Once upon a time. Then!\n\nNo", SamplingConfig(seed=2), ()),
            ("x" * 40, SamplingConfig(temperature=0), ()),
            ("The sea", SamplingConfig(seed=4, top_k=20), ("e",)),
            ("A", SamplingConfig(seed=5, top_p=0.9), ())]
    alone = [generate_text(model, tok, p, 60, s, stop=stop) for p, s, stop in jobs]
    worker = Worker(model, tok, batched=batched)
    assert (worker.batch is not None) == batched  # prosody and recurrent state too, per row
    done: dict[int, str] = {}
    finished = threading.Event()

    def emit_for(i: int) -> Callable[[dict], None]:
        def emit(event: dict) -> None:
            if "done" in event or "error" in event:
                done[i] = event.get("text", event.get("error"))
                if len(done) == len(jobs):
                    finished.set()
        return emit

    for i, (p, s, stop) in enumerate(jobs):
        worker.submit(Job(p, 60, s, stop, emit_for(i)))
    assert finished.wait(120)
    worker.stop()
    assert [done[i] for i in range(len(jobs))] == alone
    assert len(set(alone)) == len(alone)
    assert np.mean([len(t) for t in alone]) > 20  # most ran through a window refill


def test_requests_arriving_together_are_prefilled_as_each_alone() -> None:
    """add_many's two forwards (padded prompts but the last token, then every last token)
    give each row the logits and cache its own prefill gives, whatever the lengths."""

    model = model_of("gpt")
    prompts = [[5], list(range(1, 12)), list(range(40, 47)), list(range(60, 100))]  # 40 > ctx
    cfg = SamplingConfig(seed=1)
    with torch.inference_mode():
        together = DecodeBatch(model)
        rows = together.add_many([(p, 10, cfg) for p in prompts])
        alone = []
        for p in prompts:
            one = DecodeBatch(model)
            one.add(p, 10, cfg)
            alone.append(one)
        assert [r.row for r in rows] == [0, 1, 2, 3]
        assert together.cache.sizes[:4] == [1, 11, 7, 32]
        torch.testing.assert_close(together.logits[:4], torch.cat([a.logits[:1] for a in alone]),
                                   atol=1e-5, rtol=1e-5)
        assert_steps_agree(together, alone, rows, 3)  # the next steps agree too


def test_rows_of_a_prosody_model_are_fed_the_features_of_their_own_windows() -> None:
    """Each decode step's prosody, row by row, is what ``Prosody`` gives the newest token of the
    row's window (the window as ``generate`` has it, refills included)."""
    from aura.data.prosody import token_features
    from aura.data.sampler import compute_features

    model, tok = model_of("hippocampal"), ByteTokenizer()
    features = token_features(("prosody",), tok)
    fed: list[torch.Tensor] = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: fed.append(kwargs["prosody"]), with_kwargs=True)
    prompts = [list(b"Hi. Oh"), list(b"So sad!\n\nA good"), list(b"x" * 40), list(b"Yes.")]
    with torch.inference_mode():
        batch = DecodeBatch(model, features=features)
        rows = batch.add_many([(p, 50, SamplingConfig(seed=i)) for i, p in enumerate(prompts)])
        checked = 0
        for _ in range(45):
            starts = [r.start for r in rows]
            batch.step()
            batch.advance()
            step = fed[-1]
            if step.size(0) != len(rows):
                continue  # every row refilled in this round: no batched step
            for r in rows:
                window = torch.tensor([r.ids[r.start:]])
                want = compute_features(features, window)["prosody"][0, -1]
                if r.start == starts[r.row]:  # refilled rows' step was a throwaway
                    assert torch.equal(step[r.row, 0], want), (r.row, r.t)
                    checked += 1
    hook.remove()
    assert checked > 150
    assert any(r.start > 0 for r in rows)  # windows refilled (context 32)


def test_natural_brain_pfc_state_and_time_cells_change_its_next_logits() -> None:
    """What the concurrency test relies on to catch a row continuing another's PFC state or
    counting from another's boundary."""
    from aura.data.prosody import token_features
    from aura.data.sampler import compute_features

    model = model_of("natural_brain")
    x = torch.tensor([list(b"Hi. Oh no!\n\nGood day, said he")])
    feats = compute_features(token_features(("prosody",), ByteTokenizer()), x)["prosody"]
    with torch.inference_mode():
        def next_logits(forget: str | None) -> torch.Tensor:
            cache = model.new_cache(1, 64)
            model(x[:, :-1], cache=cache, prosody=feats[:, :-1])
            if forget is not None:
                getattr(cache, forget).zero_()
            return model(x[:, -1:], cache=cache, prosody=feats[:, -1:]).logits[0, -1]
        real = next_logits(None)
        for state in ("pfc_state", "last_boundary"):
            assert (real - next_logits(state)).abs().amax() > 1e-2, state


def test_natural_brain_rows_arriving_together_keep_their_own_pfc_state() -> None:
    """The PFC's recurrence would run through right-padding, so rows arriving together are
    prefilled each alone: every row's logits, PFC state and boundary are its own prefill's,
    and the next steps agree too."""
    from aura.data.prosody import token_features

    model = model_of("natural_brain")
    features = token_features(("prosody",), ByteTokenizer())
    prompts = [list(b"Hi"), list(b"So sad!\n\nA good"), list(b"Yes. No")]
    cfg = SamplingConfig(seed=3, top_k=20)
    with torch.inference_mode():
        together = DecodeBatch(model, features=features)
        rows = together.add_many([(p, 6, cfg) for p in prompts])
        alone = []
        for p in prompts:
            one = DecodeBatch(model, features=features)
            one.add(p, 6, cfg)
            alone.append(one)
        for name in ("pfc_state", "last_boundary"):
            torch.testing.assert_close(getattr(together.cache, name),
                                       torch.cat([getattr(a.cache, name) for a in alone]))
        assert together.settings.top_k[:3].tolist() == [23] * 3  # the hormones' x1.16
        assert_steps_agree(together, alone, rows, 5)
