"""Fitting a memory's key projection so that altered text finds its memory (`aura memory
fit-keys`).

The hippocampus writes a memory under ``key(h)``, a projection of the state it stores; nothing
trains that projection (memories are written without gradient), so it keeps its random
initialisation, and a passage's keys change a lot when its words are misspelt, dropped or seen
from a shifted start. Seed 002 asks for > 95% top-5 retrieval of a memory from such altered
text. This fits the projection contrastively, as retrieval encoders are trained (InfoNCE with
in-batch negatives, cf. SimCSE / DPR), on the frozen model's states: for passages of the
training split, the pooled key of each passage (the mean of its tokens' unit keys) must pick out
the pooled key of its altered versions among the batch's other passages. Then every memory
already stored is keyed again from its stored state (``EpisodicStore.rekey``), so old and new
memories share one key space. Only the key projection changes: the model's reading query, its
other weights and its loss on text it reads without memory stay as they are.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aura.data.prosody import token_features
from aura.data.sampler import compute_features
from aura.data.shards import SplitData
from aura.data.tokenizers import Tokenizer
from aura.errors import AuraError
from aura.models.base import AuraModel
from aura.models.memory_mode import memory_kwargs
from aura.nn.hippocampus import HippocampalMemory

ALTERATIONS = ("typos", "words", "shift")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def alter(rng: random.Random, text: str, how: str, rate: float, letters: str = LETTERS) -> str:
    """``text`` with ``rate`` of its letters replaced by random ones of ``letters``
    (``typos``), or of its words dropped and one neighbouring pair swapped (``words``)."""
    if how == "typos":
        return "".join(rng.choice(letters) if c.isalpha() and rng.random() < rate else c
                       for c in text)
    if how != "words":
        raise ValueError(f"unknown alteration {how!r}")
    words = text.split(" ")
    kept = [w for w in words if rng.random() >= rate] or words[:1]
    if len(kept) > 2:
        i = rng.randrange(len(kept) - 1)
        kept[i], kept[i + 1] = kept[i + 1], kept[i]
    return " ".join(kept)


@dataclass
class KeyFitOptions:
    passages: int = 1500
    """Training passages drawn from the split."""
    chars: int = 64
    """Tokens per passage (characters for a char-level model)."""
    shift: int = 8
    """How far the shifted view's window moves."""
    typo_rate: float = 0.1
    word_rate: float = 0.15
    steps: int = 300
    batch: int = 256
    lr: float = 3e-3
    temperature: float = 0.05
    seed: int = 0


def key_layers(model: AuraModel) -> dict[str, HippocampalMemory]:
    """The model's memory layers that write under a key projection of their own, by store."""
    return {name: m for name, w in model.writers.items() for m in model.modules()
            if isinstance(m, HippocampalMemory) and m.writer is w and m.key is not None}


def passage_views(split: SplitData, tokenizer: Tokenizer, opts: KeyFitOptions
                  ) -> dict[str, list[str]]:
    """``opts.passages`` passages of the split (non-overlapping, spread over it) and their
    altered versions, by alteration (``orig`` the passages themselves)."""
    rng = random.Random(opts.seed)
    span = opts.chars + opts.shift
    tokens = np.concatenate([np.asarray(m) for m in split.maps])
    windows = range(0, len(tokens) - span + 1, span)
    if len(windows) < opts.passages:
        raise AuraError(f"the split holds {len(tokens):,} tokens: {len(windows)} passages of "
                        f"{span}, not {opts.passages}")
    starts = sorted(rng.sample(windows, opts.passages))
    orig = [tokenizer.decode(tokens[s:s + opts.chars].tolist()) for s in starts]
    # typos from the passages' own lower-case letters, which any tokenizer of them can encode
    letters = "".join(sorted({c for t in orig for c in t if c.isalpha() and c.islower()}))
    return {"orig": orig,
            "typos": [alter(rng, t, "typos", opts.typo_rate, letters or LETTERS) for t in orig],
            "words": [alter(rng, t, "words", opts.word_rate) for t in orig],
            "shift": [tokenizer.decode(tokens[s + opts.shift:s + opts.shift + opts.chars]
                                       .tolist()) for s in starts]}


@torch.no_grad()
def layer_inputs(model: AuraModel, tokenizer: Tokenizer, layer: nn.Module, texts: list[str]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each text's states at ``layer``'s input, right-padded: (N, T, C) and a (N, T) mask. Each
    text runs alone (a passage is keyed as it reads by itself)."""
    features = token_features(model.token_features, tokenizer)
    device = next(model.parameters()).device
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0].float()))
    try:
        for text in texts:
            tokens = tokenizer.encode(text).tolist()
            ids = torch.tensor([tokens[-model.max_context:] if model.max_context else tokens],
                               device=device)
            model(ids, **memory_kwargs(model, "off"), **compute_features(features, ids))
    finally:
        handle.remove()
    longest = max(h.size(0) for h in seen)
    states = torch.zeros(len(seen), longest, seen[0].size(1))
    mask = torch.zeros(len(seen), longest)
    for i, h in enumerate(seen):
        states[i, :h.size(0)], mask[i, :h.size(0)] = h.cpu(), 1.0
    return states, mask


def pooled_keys(weight: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each passage's key: the mean of its tokens' unit keys, unit-normalised (N, dim_key)."""
    keys = F.normalize(states @ weight.T, dim=-1) * mask[..., None]
    return F.normalize(keys.sum(1) / mask.sum(1, keepdim=True), dim=-1)


def fit_key(views: dict[str, tuple[torch.Tensor, torch.Tensor]], weight: torch.Tensor,
            opts: KeyFitOptions) -> tuple[torch.Tensor, list[float]]:
    """The key projection (dim_key, C), from ``weight``, fitted so each passage's pooled key and
    each of its altered versions' find each other among a batch (symmetric InfoNCE), and the
    loss every step."""
    gen = torch.Generator().manual_seed(opts.seed)
    w = nn.Parameter(weight.detach().float().clone())
    opt = torch.optim.Adam([w], lr=opts.lr)
    n = views["orig"][0].size(0)
    losses = []
    for _ in range(opts.steps):
        rows = torch.randperm(n, generator=gen)[:opts.batch]
        target = torch.arange(rows.numel())
        anchor = pooled_keys(w, *(v[rows] for v in views["orig"]))
        loss = torch.zeros(())
        for how in ALTERATIONS:
            logits = anchor @ pooled_keys(w, *(v[rows] for v in views[how])).T
            logits = logits / opts.temperature
            loss = loss + F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return w.detach(), losses


@torch.no_grad()
def top5_recall(weight: torch.Tensor, views: dict[str, tuple[torch.Tensor, torch.Tensor]]
                ) -> dict[str, float]:
    """Per alteration, the share of altered passages whose own passage is among the 5 nearest
    pooled keys."""
    keys = pooled_keys(weight, *views["orig"])
    out = {}
    for how in ALTERATIONS:
        top = (pooled_keys(weight, *views[how]) @ keys.T).topk(min(5, len(keys)), dim=1).indices
        out[how] = float((top == torch.arange(len(keys))[:, None]).any(1).float().mean())
    return out


def fit_memory_keys(model: AuraModel, tokenizer: Tokenizer, train: SplitData,
                    held_out: SplitData, opts: KeyFitOptions) -> dict[str, Any]:
    """Fit the key projection of every memory layer of ``model`` (in place) on passages of
    ``train``, key its stored memories again, and report top-5 recall of altered passages of
    ``held_out`` before and after (``passages`` of them, at most 500)."""
    layers = key_layers(model)
    if not layers:
        raise AuraError(f"model {model.config.name!r} has no memory with a key projection of its "
                        "own (hippocampal with model.memory_tied_key=false)")
    model.eval()
    train_texts = passage_views(train, tokenizer, opts)
    held_out_windows = held_out.n_tokens // (opts.chars + opts.shift)
    if held_out_windows < 1:
        raise AuraError(f"the val split holds {held_out.n_tokens} tokens, not one passage of "
                        f"{opts.chars + opts.shift} to measure the fit on")
    test_opts = KeyFitOptions(**{**opts.__dict__, "seed": opts.seed + 1,
                                 "passages": min(opts.passages, 500, held_out_windows)})
    test_texts = passage_views(held_out, tokenizer, test_opts)
    report: dict[str, Any] = {}
    for name, layer in layers.items():
        assert layer.key is not None
        fit_views = {how: layer_inputs(model, tokenizer, layer, t)
                     for how, t in train_texts.items()}
        test_views = {how: layer_inputs(model, tokenizer, layer, t)
                      for how, t in test_texts.items()}
        before = top5_recall(layer.key.weight.float(), test_views)
        weight, losses = fit_key(fit_views, layer.key.weight, opts)
        with torch.no_grad():
            layer.key.weight.copy_(weight.to(layer.key.weight))
        rekeyed = layer.store.rekey(lambda v, k=layer.key: k(v.to(k.weight.dtype)))
        report[name] = {"top5_before": before, "top5_after": top5_recall(weight, test_views),
                        "loss_first": losses[0], "loss_last": losses[-1],
                        "memories_rekeyed": rekeyed, "held_out_passages": test_opts.passages}
    return report
