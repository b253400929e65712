"""Does memory help where it must: past the context window? Prints JSON.

    python benchmarks/memory_quality_bench.py recall RUN [RUN ...] [--episodes 60] [--facts 4]
        [--distractor 5] [--lam 0.5] [--temperature 0.05] [--k 16]
    python benchmarks/memory_quality_bench.py stream RUN [RUN ...] [--max-chars N]
        [--lam 0.25] [--temperature 0.05] [--works W,...] [--corpus-knn N
        --corpus-exclude WORK --corpus-cache DIR]
    python benchmarks/memory_quality_bench.py cost RUN [RUN ...] [--max-chars 20000]
    python benchmarks/memory_quality_bench.py retrieval RUN [RUN ...] [--passages 500]
        [--chars 64] [--typo-rate 0.1] [--word-rate 0.15] [--shift 8]

recall: text-like synthetic episodes. Each states ``--facts`` facts once ("The key of room 417
is amber."), then ``--distractor`` x block_size characters of held-out Shakespeare (distinct
works from training, different slice per episode), then the query "The key of room 417 is ".
The answer is outside the context window by construction. Per condition: exact match of the
greedy continuation with the answer, and choice accuracy (the answer's log-likelihood beats the
other colours'; chance is 1 / colours). Conditions: ``none`` (memory off), ``model`` (the
model's own episodic memory written while reading, ``--memory write``), ``knn`` (a kNN-LM
datastore of the episode filled while reading, the model's memory off), ``both``.

stream: each held-out work of builtin:shakespeare read with ``aura eval --stream`` semantics,
bits per byte per window for memory off, the model's memory written, and the kNN datastore of
the document; the mean past the first window is what the issue's 3% target is about. The
condition ``fresh`` (not in the default list) empties the model's stores before each work and
then writes them while reading: the memory holds only the document's earlier windows, as in
training with ``train.memory_stream``. With ``--corpus-knn N`` two more conditions: ``corpus``
(kNN-LM over a datastore of N train positions, what ``aura memory build --knn`` builds) and
``corpus+doc`` (that and the document's own datastore, each at ``--lam``: ``aura eval --stream
--knn LAM`` on a checkpoint with a corpus datastore). ``--corpus-exclude WORK`` keeps a train
work out of the corpus datastore so lambda can be chosen on it (``--works WORK``) without
touching the reported works.

retrieval: seed 002's in-model retrieval accuracy (">95% top-5"). ``--passages`` passages of
``--chars`` characters of the held-out works become one memory each, keyed by the model's own
key of that text: per memory layer, the layer's input states (the hippocampus's, or snn_rag's
normalised block state its chunk entries are made of) through the layer's key (hippocampal:
``key``; snn_rag: the state itself, as its entries are), pooled over the passage (``mean``, what
an snn_rag chunk entry is; or the ``last`` token's). Queries are the same passages altered:
``typos`` (a share of the letters replaced by random letters), ``words`` (a share of the words
dropped and one pair of neighbours swapped), ``shift`` (the passage's window moved by a few
characters: the same text, seen from a different start). Per alteration the top-1 and top-5
recall of the passage's own memory among all of them (chance 5 / passages), for the model's
key of the altered text (``key``, what the seed's number asks), for the same with the stored
keys' mean removed from keys and queries (``key_centred``), and for the query the layer
actually reads with (``query``: hippocampal ``query``, snn_rag ``retrieve``).

cost: tokens per second of the stream per condition over the first ``--max-chars`` of the
held-out works (a timing: run it on an idle machine); with ``--corpus-knn N`` also ``corpus``
and ``corpus+doc`` (FAISS searches the corpus datastore past 32,768 positions).

Each run is a checkpoint trained on char-level builtin Shakespeare (e.g. `aura train --preset
hippocampal-cpu`); the held-out works are those its data split put in val (found by content).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from aura.data.sources import shakespeare_files
from aura.data.tokenizers import Tokenizer
from aura.eval.perplexity import _features
from aura.eval.stream import evaluate_stream, stream_steps
from aura.memory.knn_lm import KNNLM, STREAM_KEYS, KNNConfig, KNNMixture, new_datastore
from aura.memory.store import EpisodicStore
from aura.models.base import AuraModel
from aura.models.memory_mode import memory_kwargs
from aura.train.checkpoint import load_for_inference
from aura.train.key_fit import alter
from machine import machine

# five letters each, so no answer is likelier for being short
COLOURS = ("amber", "azure", "coral", "ivory", "olive", "umber", "slate", "sable", "mauve",
           "khaki", "lilac", "peach")
CONDITIONS = ("none", "model", "knn", "both")


def held_out_works(val_text: str | None = None) -> dict[str, str]:
    """The works of builtin:shakespeare the run never trained on: given its prepared val text,
    the works found in it; else the last three works."""
    works = {f.stem: f.read_text(encoding="utf-8") for f in shakespeare_files()}
    if val_text is not None:
        return {k: v for k, v in works.items() if v[:2000] in val_text}
    return dict(list(works.items())[-3:])


def _val_text(data: str | None) -> str | None:
    if data is None:
        return None
    from aura.data.shards import PreparedData

    d = PreparedData.open(data)
    s = d.split("val")
    return d.tokenizer.decode(np.concatenate([np.asarray(m) for m in s.maps]).tolist())


def episode(rng: random.Random, distractor_text: str, n_facts: int, distractor_chars: int
            ) -> tuple[str, str, int]:
    """(prompt, answer, index of the asked fact): facts, distractor, query."""
    rooms = rng.sample(range(100, 1000), n_facts)
    colours = rng.sample(COLOURS, n_facts)
    facts = " ".join(f"The key of room {r} is {c}." for r, c in zip(rooms, colours, strict=True))
    start = rng.randrange(0, len(distractor_text) - distractor_chars)
    distractor = distractor_text[start:start + distractor_chars]
    asked = rng.randrange(n_facts)
    prompt = f"{facts}\n\n{distractor}\n\nThe key of room {rooms[asked]} is "
    return prompt, colours[asked], asked


class Reader:
    """A model reading one episode: its memory (per condition) filled by streaming the prompt,
    then scoring continuations with at most ``block_size`` tokens of context."""

    def __init__(self, model: AuraModel, tokenizer: Tokenizer, condition: str, knn: KNNConfig,
                 capacity: int):
        self.model = copy.deepcopy(model)  # the model's own memory is written per episode
        self.tok, self.condition = tokenizer, condition
        self.features = _features(model, tokenizer)
        own = condition in ("model", "both") and model.remembers_at_inference
        self.mode = "write" if own else "off"
        self.read_mode = "read" if own else "off"
        self.knn = (KNNLM(new_datastore(knn.key_dim(model.hidden_size), capacity),
                          model.config.vocab_size, model.hidden_size, knn, learn=True)
                    if condition in ("knn", "both") else None)
        self.block = model.max_context or 1024

    def read(self, prompt: str) -> None:
        tokens = self.tok.encode(prompt).astype(np.int64)
        for _ in stream_steps(self.model, tokens, memory=self.mode, features=self.features,
                              readout=self.knn):
            pass

    def log_probs(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor(ids[-self.block:], dtype=torch.long)[None]
        feats = {k: torch.from_numpy(f(x.numpy())) for k, f in self.features.items()}
        out = self.model(x, **memory_kwargs(self.model, self.read_mode), **feats)
        if self.knn is None or out.hidden is None:
            return F.log_softmax(out.logits.float(), -1)[0]
        return self.knn.log_probs(out.logits, out.hidden, x)[0]

    def greedy(self, prompt: str, n: int) -> str:
        ids = self.tok.encode(prompt).tolist()
        for _ in range(n):
            ids.append(int(self.log_probs(ids)[-1].argmax()))
        return self.tok.decode(ids[-n:])

    def score(self, prompt: str, answer: str) -> float:
        p = self.tok.encode(prompt).tolist()
        a = self.tok.encode(answer).tolist()
        lp = self.log_probs(p + a)
        t = lp.size(0)
        return float(sum(lp[t - len(a) - 1 + i, tok] for i, tok in enumerate(a)))


def recall(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    knn = KNNConfig(args.lam, args.temperature, args.k, args.span, args.token_weight)
    for run in args.runs:
        loaded = load_for_inference(run)
        model, tok = loaded.model, loaded.tokenizer
        block = model.max_context or 1024
        works = held_out_works(_val_text(args.data))
        distractor = "\n".join(works.values())
        rng = random.Random(args.seed)
        episodes = [episode(rng, distractor, args.facts, args.distractor * block)
                    for _ in range(args.episodes)]
        rows: dict[str, Any] = {}
        for condition in args.conditions.split(","):
            if condition in ("model", "both") and not model.remembers_at_inference:
                continue
            exact = choice = 0
            for prompt, answer, _ in episodes:
                with torch.inference_mode():
                    reader = Reader(model, tok, condition, knn, args.capacity)
                    reader.read(prompt)
                    exact += reader.greedy(prompt, len(answer)) == answer
                    scores = {c: reader.score(prompt, c) for c in COLOURS}
                    choice += max(scores, key=scores.__getitem__) == answer
            rows[condition] = {"exact_match": exact / len(episodes),
                               "choice_accuracy": choice / len(episodes)}
            print(f"{run} {condition}: {rows[condition]}", file=sys.stderr)
        out[str(loaded.path)] = {"model": model.config.name, "block_size": block,
                                 "episodes": len(episodes), "chance": 1 / len(COLOURS),
                                 "distractor_chars": args.distractor * block,
                                 "conditions": rows}
    return out


def work_span(split: Any, tok: Tokenizer, text: str) -> tuple[int, int]:
    """[start, end) of ``text`` in the prepared split's tokens (found by its first 256)."""
    tokens = np.concatenate([np.asarray(m, dtype=np.int64) for m in split.maps])
    head = tok.encode(text[:256]).astype(np.int64)
    at = tokens.tobytes().find(head.tobytes())
    if at < 0 or at % 8:
        raise SystemExit("the work to keep out of the corpus datastore is not in the train split")
    return at // 8, at // 8 + len(tok.encode(text))


def corpus_datastore(model: AuraModel, tok: Tokenizer, args: argparse.Namespace
                     ) -> EpisodicStore:
    """kNN-LM's corpus datastore (``aura memory build --knn``) of ``--corpus-knn`` train
    positions, none from the ``--corpus-exclude`` work (lambda is chosen on it); cached in
    ``--corpus-cache`` when given."""
    from pathlib import Path

    from aura.data.shards import PreparedData
    from aura.eval.knn import build_datastore

    cache = Path(args.corpus_cache) if args.corpus_cache else None
    if cache is not None and cache.exists():
        return EpisodicStore.load(cache)
    split = PreparedData.open(args.data).split("train")
    works = {f.stem: f.read_text(encoding="utf-8") for f in shakespeare_files()}
    exclude = work_span(split, tok, works[args.corpus_exclude]) if args.corpus_exclude else None
    with torch.inference_mode():
        store = build_datastore(model, split, tok, capacity=args.corpus_knn, exclude=exclude)
    if cache is not None:
        store.save(cache)
    return store


def stream_readout(model: AuraModel, condition: str, knn: KNNConfig, capacity: int,
                   corpus: EpisodicStore | None) -> Any:
    """The kNN read-out of a stream condition: ``knn`` the document's own datastore,
    ``corpus`` the corpus datastore (plain keys), ``corpus+doc`` both, each at ``lam``."""
    vocab, width = model.config.vocab_size, model.hidden_size
    doc = (KNNLM(new_datastore(knn.key_dim(width), capacity), vocab, width, knn, learn=True)
           if condition in ("knn", "both", "corpus+doc") else None)
    if condition not in ("corpus", "corpus+doc"):
        return doc
    if corpus is None:
        raise SystemExit(f"condition {condition!r} needs --corpus-knn N")
    plain = KNNLM(corpus, vocab, width, KNNConfig(knn.lam, knn.temperature, knn.k))
    return plain if doc is None else KNNMixture([plain, doc])


def stream(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    knn = KNNConfig(args.lam, args.temperature, args.k, args.span, args.token_weight)
    for run in args.runs:
        loaded = load_for_inference(run)
        model, tok = loaded.model, loaded.tokenizer
        works = held_out_works(_val_text(args.data))
        if args.works:
            every = {f.stem: f.read_text(encoding="utf-8") for f in shakespeare_files()}
            works = {w: every[w] for w in args.works.split(",")}
        corpus = corpus_datastore(model, tok, args) if args.corpus_knn else None
        per_work: dict[str, Any] = {}
        for name, text in works.items():
            text = text[:args.max_chars] if args.max_chars else text
            rows: dict[str, Any] = {}
            for condition in args.conditions.split(","):
                if (condition in ("model", "both", "fresh")
                        and not model.remembers_at_inference):
                    continue
                m = copy.deepcopy(model)
                own = condition in ("model", "both", "fresh")
                if condition == "fresh":
                    for writer in m.writers.values():
                        writer.discard()
                        writer.store.clear()
                readout = stream_readout(m, condition, knn, args.capacity, corpus)
                r = evaluate_stream(m, tok, text, memory="write" if own else "off",
                                    readout=readout)
                rows[condition] = {"bits_per_byte": r.bits_per_byte,
                                   "first_window_bpb": r.first_window_bpb,
                                   "later_windows_bpb": r.later_windows_bpb,
                                   "windows": len(r.windows),
                                   "per_window_bpb": [round(w.bits_per_byte, 4)
                                                      for w in r.windows]}
                print(f"{run} {name} {condition}: later {r.later_windows_bpb:.4f}",
                      file=sys.stderr)
            base = rows["none"]["later_windows_bpb"]
            for row in rows.values():
                row["later_vs_none"] = row["later_windows_bpb"] / base - 1
            per_work[name] = rows
        out[str(loaded.path)] = {"model": model.config.name, "works": per_work}
    return out


def cost(args: argparse.Namespace) -> dict[str, Any]:
    """Tokens per second of a stream per condition (the lead's machine measures this)."""
    import time

    out: dict[str, Any] = {}
    knn = KNNConfig(args.lam, args.temperature, args.k, args.span, args.token_weight)
    for run in args.runs:
        loaded = load_for_inference(run)
        model, tok = loaded.model, loaded.tokenizer
        text = "\n".join(held_out_works(_val_text(args.data)).values())[:args.max_chars]
        corpus = corpus_datastore(model, tok, args) if args.corpus_knn else None
        rows: dict[str, Any] = {}
        for condition in args.conditions.split(","):
            if condition in ("model", "both") and not model.remembers_at_inference:
                continue
            m = copy.deepcopy(model)
            readout = stream_readout(m, condition, knn, args.capacity, corpus)
            start = time.perf_counter()
            r = evaluate_stream(m, tok, text, memory="write" if condition in ("model", "both")
                                else "off", readout=readout)
            rows[condition] = {"tokens_per_s": r.n_tokens / (time.perf_counter() - start),
                               "tokens": r.n_tokens}
        out[str(loaded.path)] = rows
    return out


class LayerStates:
    """The input states of each memory layer of ``model`` on a batch, by store name: the
    hippocampus's input, or the normalised block state a snn_rag bank's entries are made of."""

    def __init__(self, model: AuraModel):
        from aura.nn.hippocampus import HippocampalMemory
        from aura.nn.memory_attention import MemoryCrossAttention

        self.model = model
        self.layers: dict[str, torch.nn.Module] = {}
        self.watch: dict[str, torch.nn.Module] = {}
        for name, writer in model.writers.items():
            for m in model.modules():
                if isinstance(m, HippocampalMemory) and m.writer is writer:
                    self.layers[name] = self.watch[name] = m
                elif isinstance(m, MemoryCrossAttention) and m.writer is writer:
                    block = next(b for b in model.blocks if b.memory is m)  # type: ignore[attr-defined]
                    self.layers[name], self.watch[name] = m, block.ln_m

    def __call__(self, x: torch.Tensor, features: dict[str, Any]) -> dict[str, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}
        handles = []
        for name, module in self.watch.items():
            if module is self.layers[name]:  # the hippocampus: its input
                def pre(_m: Any, args: tuple[Any, ...], name: str = name) -> None:
                    seen[name] = args[0]
                handles.append(module.register_forward_pre_hook(pre))
            else:  # a chunk bank: what its block's ln_m hands it
                def post(_m: Any, _a: Any, out: torch.Tensor, name: str = name) -> None:
                    seen[name] = out
                handles.append(module.register_forward_hook(post))
        try:
            feats = {k: torch.from_numpy(f(x.numpy())) for k, f in features.items()}
            # snn_rag's block calls its bank only when reading; the hippocampus's input does not
            # depend on its own reads
            self.model(x, **memory_kwargs(self.model, "read" if self.model.writers else "off"),
                       **feats)
        finally:
            for h in handles:
                h.remove()
        return seen

    def keys_and_queries(self, name: str, h: torch.Tensor, pool: str
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's key and query of each sequence of h (B, T, C), pooled over T."""
        from aura.nn.hippocampus import HippocampalMemory

        layer = self.layers[name]
        if isinstance(layer, HippocampalMemory):
            keys = (layer.query if layer.key is None else layer.key)(h)  # tied: the query
            queries = layer.query(h)
        else:
            keys, queries = h, layer.retrieve(h)  # type: ignore[operator]
        if pool == "mean":
            return (F.normalize(keys.float(), dim=-1).mean(1),
                    F.normalize(queries.float(), dim=-1).mean(1))
        return keys[:, -1].float(), queries[:, -1].float()


def layer_states(states: LayerStates, tok: Tokenizer, features: dict[str, Any],
                 texts: list[str]) -> dict[str, list[torch.Tensor]]:
    """Each memory layer's states (1, T, C) of each text, one text at a time (their lengths
    differ)."""
    rows: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode():
        for t in texts:
            ids = torch.from_numpy(tok.encode(t).astype(np.int64))[None]
            for name, h in states(ids, features).items():
                rows.setdefault(name, []).append(h)
    return rows


def retrieval(args: argparse.Namespace) -> dict[str, Any]:
    from aura.memory.store import EpisodicStore

    out: dict[str, Any] = {}
    alterations = {"typos": args.typo_rate, "words": args.word_rate, "shift": args.shift}
    for run in args.runs:
        loaded = load_for_inference(run)
        model, tok = loaded.model, loaded.tokenizer
        model.eval()
        text = "\n".join(held_out_works(_val_text(args.data)).values())
        rng = random.Random(args.seed)
        span = args.chars + args.shift
        starts = sorted(rng.sample(range(0, len(text) - span, span), args.passages))
        originals = [text[s:s + args.chars] for s in starts]
        variants = {"typos": [alter(rng, t, "typos", args.typo_rate) for t in originals],
                    "words": [alter(rng, t, "words", args.word_rate) for t in originals],
                    "shift": [text[s + args.shift:s + args.shift + args.chars] for s in starts]}
        states = LayerStates(model)
        if not states.layers:
            raise SystemExit(f"{run}: model {model.config.name!r} has no memory layer")
        features = _features(model, tok)

        base = layer_states(states, tok, features, originals)
        altered = {how: layer_states(states, tok, features, v) for how, v in variants.items()}
        per_layer: dict[str, Any] = {}
        for name in states.layers:
            rows: dict[str, Any] = {}
            for pool in ("mean", "last"):
                with torch.inference_mode():
                    keys = torch.cat([states.keys_and_queries(name, h, pool)[0]
                                      for h in base[name]])
                    # centred: the stored keys' mean removed from keys and queries, since
                    # hidden states share a common direction that crowds every cosine
                    centre = keys.mean(0)
                    stores = {}
                    for kind, stored in (("plain", keys), ("centred", keys - centre)):
                        store = EpisodicStore(keys.size(1), 1, capacity=len(originals))
                        stores[kind] = store, store.write(stored, torch.zeros(len(originals), 1))
                    for how in alterations:
                        kq = [states.keys_and_queries(name, h, pool)
                              for h in altered[how][name]]
                        k_alt = torch.cat([k for k, _ in kq])
                        q_alt = torch.cat([qq for _, qq in kq])
                        for use, q, kind in (("key", k_alt, "plain"),
                                             ("key_centred", k_alt - centre, "centred"),
                                             ("query", q_alt, "plain")):
                            if q.size(1) != keys.size(1):
                                continue
                            store, ids = stores[kind]
                            got = store.read(q, 5, touch=False).ids
                            hit = got == ids[:, None]
                            rows[f"{pool}/{how}/{use}"] = {
                                "top1": round(float(hit[:, 0].float().mean()), 4),
                                "top5": round(float(hit.any(1).float().mean()), 4)}
                            print(f"{run} {name} {pool} {how} {use}: "
                                  f"{rows[f'{pool}/{how}/{use}']}", file=sys.stderr)
            per_layer[name] = rows
        out[str(loaded.path)] = {"model": model.config.name, "passages": len(originals),
                                 "chars": args.chars, "chance_top5": 5 / len(originals),
                                 "alterations": alterations, "layers": per_layer}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("recall", "stream", "cost", "retrieval"):
        s = sub.add_parser(name)
        s.add_argument("runs", nargs="+")
        s.add_argument("--data", help="the runs' prepared data (finds the held-out works)")
        s.add_argument("--lam", type=float, default=0.5 if name == "recall" else 0.25)
        s.add_argument("--temperature", type=float, default=0.05)
        s.add_argument("--k", type=int, default=16)
        s.add_argument("--capacity", type=int, default=32768)
        s.add_argument("--span", type=int, default=STREAM_KEYS["span"])
        s.add_argument("--token-weight", type=float, default=STREAM_KEYS["token_weight"])
    r = sub.choices["recall"]
    r.add_argument("--episodes", type=int, default=60)
    r.add_argument("--facts", type=int, default=4)
    r.add_argument("--distractor", type=int, default=5, help="x block_size characters")
    r.add_argument("--seed", type=int, default=0)
    st = sub.choices["stream"]
    st.add_argument("--max-chars", type=int, help="read only the first N characters of each work")
    st.add_argument("--works", help="comma-separated builtin:shakespeare works to read "
                    "(default: the held-out ones)")
    for name in ("stream", "cost"):
        c = sub.choices[name]
        c.add_argument("--corpus-knn", type=int, metavar="N",
                       help="a corpus datastore of N train positions, for the conditions "
                            "corpus and corpus+doc")
        c.add_argument("--corpus-exclude", metavar="WORK",
                       help="a train work kept out of the corpus datastore (to choose lambda on)")
        c.add_argument("--corpus-cache", metavar="DIR",
                       help="load/save the corpus datastore here")
    sub.choices["cost"].add_argument("--max-chars", type=int, default=20000)
    q = sub.choices["retrieval"]
    q.add_argument("--passages", type=int, default=500)
    q.add_argument("--chars", type=int, default=64)
    q.add_argument("--typo-rate", type=float, default=0.1)
    q.add_argument("--word-rate", type=float, default=0.15)
    q.add_argument("--shift", type=int, default=8)
    q.add_argument("--seed", type=int, default=0)
    for name in ("recall", "stream", "cost"):
        sub.choices[name].add_argument("--conditions", default=",".join(CONDITIONS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = {"recall": recall, "stream": stream, "cost": cost,
              "retrieval": retrieval}[args.cmd](args)
    settings = {k: v for k, v in vars(args).items() if k != "runs"}
    print(json.dumps({"machine": machine(), "settings": settings, "results": result},
                     indent=1))


if __name__ == "__main__":
    main()
