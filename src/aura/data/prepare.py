"""`aura data prepare`: sources -> tokenizer -> train/val split by document -> memmap shards.

Pass one scans every source (content hashes, bad files); the hashes, the tokenizer and the split
settings make the cache key, and a directory whose manifest has that key is reused as it is.
Otherwise the text streams through the tokenizer into fresh shard files, the manifest is replaced
atomically, and only then are the old shards deleted: a crash at any moment leaves the previous
good dataset usable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from aura.atomic import atomic_write_text, check_writable_dir, fsync_dir
from aura.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    PreparedData,
    Shard,
    read_manifest,
    token_dtype,
)
from aura.data.sources import (
    DocBoundary,
    OnInvalid,
    Source,
    TextFiles,
    check_glob,
    id_bytes,
    open_source,
)
from aura.data.tokenizers import (
    BUILTIN_TOKENIZERS,
    DEFAULT_BPE_VOCAB,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    check_bpe_vocab_size,
    describe_tokenizer_spec,
    gpt2_tokenizer,
    load_tokenizer,
    train_bpe,
)
from aura.errors import DataError

BATCH_CHARS = 4 << 20  # text per tokenizer batch: large enough for HF's threads to pay off
FLUSH_TOKENS = 1 << 21


@dataclass
class PrepareOptions:
    """What `aura data prepare` builds; each field is also its command-line flag
    (``--val-fraction``; ``sources`` positional), with this docstring as its help."""

    sources: Sequence[str] = field(metadata={"positional": True, "metavar": "SOURCE"})
    """What to tokenize: text files, directories, .jsonl files, hf:NAME_OR_PATH or
    builtin:shakespeare."""
    tokenizer: str = field(metadata={"metavar": "{byte,char,bpe,gpt2,PATH}"})
    """bpe is trained on the sources; PATH: a tokenizer.json, or a prepared data / run directory
    to reuse its tokenizer."""
    vocab_size: int | None = None
    """Vocabulary size of a bpe tokenizer, 257..1048576 (default 8192)."""
    weights: Sequence[float] | None = field(default=None, metadata={"metavar": "W"})
    """Sampling weight per SOURCE (default: proportional to token count)."""
    val_fraction: float = 0.1
    """Fraction of the documents held out for validation, in [0, 1)."""
    seed: int = 1337
    """Seed of the train/val document split."""
    glob: str = "*.txt"
    """File pattern inside directories (recursive)."""
    text_field: str = "text"
    """Field holding the text in JSONL / HF rows."""
    doc_boundary: DocBoundary = "auto"
    """What one document of a text file is; auto: blank-line for a lone file, else file."""
    on_invalid: OnInvalid = "skip"
    """Invalid UTF-8: skip the document holding it (a file of a directory, a paragraph of a
    lone file, a JSONL line) and count it, or keep it with U+FFFD replacements."""
    shard_tokens: int = 1 << 27
    """Tokens per shard file."""
    hf_split: str = "train"
    """Split of a hub dataset."""
    hf_config: str | None = None
    """Configuration name of a hub dataset."""
    hf_streaming: bool = False
    """Stream a hub dataset instead of downloading it first."""

    def check(self) -> None:
        if not self.sources:
            raise DataError("give at least one SOURCE")
        if self.weights is not None:
            if len(self.weights) != len(self.sources):
                raise DataError(
                    f"--weights has {len(self.weights)} values for {len(self.sources)} sources"
                )
            if any(not math.isfinite(w) or w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise DataError("--weights must be non-negative numbers with a positive sum")
        if self.vocab_size is not None:  # now, not after scanning every source
            if self.tokenizer != "bpe":
                raise DataError(f"--vocab-size applies to bpe only, not {self.tokenizer}")
            check_bpe_vocab_size(self.vocab_size)
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_tokens < 1024:
            raise DataError(f"--shard-tokens must be at least 1024, got {self.shard_tokens}")
        check_glob(self.glob)


@dataclass
class PrepareResult:
    data: PreparedData
    cached: bool
    seconds: float
    skipped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        stats = self.data.stats()
        n_bytes = sum(s["n_text_bytes"] for s in stats["splits"].values())
        stats.update(
            cached=self.cached,
            seconds=round(self.seconds, 3),
            mb_per_s=None if self.cached else round(n_bytes / 1e6 / max(self.seconds, 1e-9), 2),
            skipped=self.skipped,
        )
        return stats

    def describe(self) -> str:
        head = "reused the cache" if self.cached else f"prepared in {self.seconds:.1f}s"
        lines = [f"{head}: {self.data.root}", self.data.describe()]
        if self.skipped:
            what = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(self.skipped.items()))
            lines.append(f"skipped: {what}")
            if "invalid_utf8" in self.skipped:
                lines.append("  (keep invalid UTF-8 text with --on-invalid replace)")
        return "\n".join(lines)


def _unit_interval(seed: int, source: int, doc_id: str) -> float:
    digest = hashlib.blake2b(id_bytes(f"{seed}:{source}:{doc_id}"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


class _Splitter:
    """Sends each whole document to train or val from a seeded hash of its id.

    Hashing the id (not drawing in order) keeps a document's split stable when others are added.
    Sources whose documents are known up front (files) get at least one document in each split.
    """

    def __init__(self, seed: int, val_fraction: float, sources: Sequence[Source]):
        self.seed, self.frac = seed, val_fraction
        self.forced: dict[tuple[int, str], str] = {}
        if val_fraction <= 0:
            return
        for i, src in enumerate(sources):
            if isinstance(src, TextFiles) and src.boundary == "file":
                ids = [src.doc_id(p) for p in src.usable_files()]
                if len(ids) < 2:
                    continue
                u = {d: _unit_interval(seed, i, d) for d in ids}
                if all(v >= val_fraction for v in u.values()):
                    self.forced[(i, min(u, key=u.__getitem__))] = "val"
                elif all(v < val_fraction for v in u.values()):
                    self.forced[(i, max(u, key=u.__getitem__))] = "train"

    def __call__(self, source: int, doc_id: str) -> str:
        if (source, doc_id) in self.forced:
            return self.forced[(source, doc_id)]
        if self.frac <= 0:
            return "train"
        return "val" if _unit_interval(self.seed, source, doc_id) < self.frac else "train"


class _ShardWriter:
    """Appends one (split, source) token stream to shard files of at most ``shard_tokens``."""

    def __init__(self, root: Path, prefix: str, split: str, source: int, dtype: np.dtype,
                 shard_tokens: int):
        self.root, self.prefix, self.split, self.source = root, prefix, split, source
        self.dtype, self.shard_tokens = dtype, shard_tokens
        self.shards: list[Shard] = []
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.n_docs = 0
        self.n_text_bytes = 0
        self._file: BinaryIO | None = None
        self._tmp: Path | None = None
        self._hash = hashlib.sha256()
        self._in_shard = 0

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids)
        self.n_pending += len(ids)
        if self.n_pending >= FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        tokens = np.concatenate(self.pending).astype(self.dtype, copy=False)
        self.pending, self.n_pending = [], 0
        while len(tokens):
            if self._file is None:
                self._open()
            take = min(len(tokens), self.shard_tokens - self._in_shard)
            chunk = tokens[:take].tobytes()
            assert self._file is not None
            self._file.write(chunk)
            self._hash.update(chunk)
            self._in_shard += take
            tokens = tokens[take:]
            if self._in_shard == self.shard_tokens:
                self._close_shard()

    def _name(self) -> str:
        return f"{self.split}-s{self.source:02d}-{len(self.shards):04d}-{self.prefix}.bin"

    def _open(self) -> None:
        self._tmp = self.root / f".{self._name()}.tmp"
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in _close_shard
        self._hash, self._in_shard = hashlib.sha256(), 0

    def _close_shard(self) -> None:
        assert self._file is not None and self._tmp is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = self._name()
        os.replace(self._tmp, self.root / name)
        self.shards.append(Shard(name, self.source, self._in_shard, self._hash.hexdigest()))
        self._file = self._tmp = None

    def close(self) -> list[Shard]:
        self.flush()
        if self._file is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)  # type: ignore[arg-type]


def _open_sources(opts: PrepareOptions) -> list[Source]:
    return [
        open_source(
            spec, glob=opts.glob, text_field=opts.text_field, doc_boundary=opts.doc_boundary,
            hf_split=opts.hf_split, hf_config=opts.hf_config, hf_streaming=opts.hf_streaming,
        )
        for spec in opts.sources
    ]


def _build_tokenizer(opts: PrepareOptions, docs: _DocStream) -> Tokenizer:
    if opts.tokenizer == "byte":
        return ByteTokenizer()
    if opts.tokenizer == "char":
        return CharTokenizer.from_texts(text for _, _, text, _ in docs.iter_pieces())
    if opts.tokenizer == "bpe":
        train_text = (text for _, split, text, _ in docs.iter_pieces() if split == "train")
        vocab_size = DEFAULT_BPE_VOCAB if opts.vocab_size is None else opts.vocab_size
        return train_bpe(train_text, vocab_size)
    if opts.tokenizer == "gpt2":
        return gpt2_tokenizer()
    return load_tokenizer(opts.tokenizer)


class _DocStream:
    """Every source's pieces tagged with (source index, split); restartable for extra passes."""

    def __init__(self, sources: list[Source], splitter: _Splitter, on_invalid: OnInvalid):
        self.sources, self.splitter, self.on_invalid = sources, splitter, on_invalid

    def iter_pieces(self, skipped: list[Counter[str]] | None = None
                    ) -> Iterator[tuple[int, str, str, bool]]:
        """(source index, split, text, whether the text starts a document)."""
        for i, src in enumerate(self.sources):
            sink = skipped[i] if skipped is not None else Counter[str]()
            split = "train"
            for text, doc_id in src.pieces(self.on_invalid, sink):
                if doc_id is not None:
                    split = self.splitter(i, doc_id)
                yield i, split, text, doc_id is not None


def _cache_key(opts: PrepareOptions, sources: list[Source], scans: list[Any]) -> str:
    key = {
        "format_version": FORMAT_VERSION,
        "sources": [
            {**src.identity(), "content": scan.content_hash}
            for src, scan in zip(sources, scans, strict=True)
        ],
        "tokenizer": describe_tokenizer_spec(opts.tokenizer, opts.vocab_size),
        "val_fraction": opts.val_fraction,
        "seed": opts.seed,
        "on_invalid": opts.on_invalid,
        "shard_tokens": opts.shard_tokens,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _weights(opts: PrepareOptions, train_tokens: list[int]) -> list[float]:
    raw = list(opts.weights) if opts.weights is not None else [float(n) for n in train_tokens]
    raw = [w if n > 0 else 0.0 for w, n in zip(raw, train_tokens, strict=True)]
    total = sum(raw)
    if total <= 0:
        raise DataError("every source with a positive weight is empty after the split")
    return [w / total for w in raw]


def _try_reuse(out: Path, key: str, opts: PrepareOptions, skipped: dict[str, int]
               ) -> PreparedData | None:
    if not (out / MANIFEST).is_file():
        return None
    try:
        manifest = read_manifest(out)
        if manifest.get("cache_key") != key:
            return None
        data = PreparedData.open(out, verify="full")
    except DataError as exc:
        # stderr: with --json, stdout must hold nothing but the one JSON object
        tqdm.write(f"aura: rebuilding {out}: the cached data is unusable ({exc})", file=sys.stderr)
        return None
    train_tokens = [s["n_tokens"]["train"] for s in manifest["sources"]]
    weights = _weights(opts, train_tokens)
    given = [None] * len(weights) if opts.weights is None else list(opts.weights)
    now = [(s["weight"], s.get("weight_given")) for s in manifest["sources"]]
    if now != list(zip(weights, given, strict=True)):
        for src, w, g in zip(manifest["sources"], weights, given, strict=True):
            src["weight"], src["weight_given"] = w, g
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
        data = PreparedData.open(out, verify="size")
    skipped.update(manifest.get("skipped", {}))
    return data


def prepare(opts: PrepareOptions, out: str | Path, force: bool = False,
            progress: bool = True) -> PrepareResult:
    t0 = time.perf_counter()
    opts.check()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    check_writable_dir(out)  # now, not after scanning and tokenizing everything
    if opts.tokenizer not in BUILTIN_TOKENIZERS and not Path(opts.tokenizer).exists():
        raise DataError(
            f"unknown tokenizer {opts.tokenizer!r}: use byte, char, bpe, gpt2 or a path to a "
            "tokenizer.json / prepared data directory"
        )
    sources = _open_sources(opts)
    scans = [src.scan(opts.on_invalid) for src in sources]
    skipped_total: Counter[str] = Counter()
    for src, scan in zip(sources, scans, strict=True):
        skipped_total.update(scan.skipped)
        if scan.n_docs == 0:
            bad = ", ".join(f"{n} {k}" for k, n in sorted(scan.skipped.items())) or "no files"
            raise DataError(f"{src.spec}: no usable text ({bad})")
    key = _cache_key(opts, sources, scans)

    if not force:
        skipped: dict[str, int] = {}
        reused = _try_reuse(out, key, opts, skipped)
        if reused is not None:  # a crash after a build's manifest left its old files behind
            _remove_unreferenced(out, keep=_referenced(out))
            return PrepareResult(reused, True, time.perf_counter() - t0, skipped)

    splitter = _Splitter(opts.seed, opts.val_fraction, sources)
    docs = _DocStream(sources, splitter, opts.on_invalid)
    tokenizer = _build_tokenizer(opts, docs)
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"{key[:12]}-{secrets.token_hex(3)}"
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {
        (split, i): _ShardWriter(out, prefix, split, i, dtype, opts.shard_tokens)
        for split in SPLITS
        for i in range(len(sources))
    }
    per_source_skips = [Counter[str]() for _ in sources]
    try:
        _tokenize_all(docs, tokenizer, writers, per_source_skips, scans, progress)
        shards = {k: w.close() for k, w in writers.items()}
        for c in per_source_skips:
            skipped_total.update(c)
        manifest = _manifest(opts, key, tokenizer, sources, scans, writers, shards,
                             per_source_skips, skipped_total, out, prefix)
        fsync_dir(out)
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    except BaseException:
        for w in writers.values():
            w.abort()
        _remove_unreferenced(out, keep=_referenced(out))
        raise
    _remove_unreferenced(out, keep=_referenced(out))
    data = PreparedData.open(out, verify="size")
    return PrepareResult(data, False, time.perf_counter() - t0, dict(skipped_total))


def _tokenize_all(docs: _DocStream, tokenizer: Tokenizer,
                  writers: dict[tuple[str, int], _ShardWriter],
                  skips: list[Counter[str]], scans: list[Any], progress: bool) -> None:
    total = sum(s.n_bytes for s in scans) or None
    # disable=None: a bar on a terminal only; in a log it would garble the one-line error
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing",
               disable=None if progress else True, leave=False)
    eot = tokenizer.eot_id
    batch: list[tuple[int, str, str, bool]] = []
    chars = 0

    def flush() -> None:
        ids_list = tokenizer.encode_batch([text for _, _, text, _ in batch])
        for (i, split, text, starts), ids in zip(batch, ids_list, strict=True):
            w = writers[(split, i)]
            if starts:
                if eot is not None and w.n_docs:
                    w.add(np.array([eot], dtype=np.uint32))
                w.n_docs += 1
            n_bytes = len(text.encode("utf-8"))
            w.n_text_bytes += n_bytes
            w.add(ids)
            bar.update(n_bytes)
        batch.clear()

    try:
        for item in docs.iter_pieces(skips):
            batch.append(item)
            chars += len(item[2])
            if chars >= BATCH_CHARS:
                flush()
                chars = 0
        if batch:
            flush()
    finally:
        bar.close()


def _manifest(opts: PrepareOptions, key: str, tokenizer: Tokenizer, sources: list[Source],
              scans: list[Any], writers: dict[tuple[str, int], _ShardWriter],
              shards: dict[tuple[str, int], list[Shard]], skips: list[Counter[str]],
              skipped_total: Counter[str], out: Path, prefix: str) -> dict[str, Any]:
    n_src = len(sources)
    tokens = {
        split: [sum(s.n_tokens for s in shards[(split, i)]) for i in range(n_src)]
        for split in SPLITS
    }
    if sum(tokens["train"]) == 0:
        raise DataError("no text to train on after the split: every document went to val")
    if opts.val_fraction > 0 and sum(tokens["val"]) == 0:
        raise DataError(
            "the validation split is empty: too few documents for --val-fraction "
            f"{opts.val_fraction} (raise it, give more documents, or pass --val-fraction 0)"
        )
    weights = _weights(opts, tokens["train"])
    tok_file = f"tokenizer-{prefix}.aura.json"
    tokenizer.save(out / tok_file)
    return {
        "format_version": FORMAT_VERSION,
        "cache_key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "options": {k: v for k, v in asdict(opts).items() if k not in ("sources", "weights")},
        "tokenizer": {
            "file": tok_file,
            "type": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "hash": tokenizer.hash,
        },
        "dtype": np.dtype(token_dtype(tokenizer.vocab_size)).name,
        "sources": [
            {
                "spec": src.spec,
                **src.identity(),
                "content_hash": scan.content_hash,
                "n_bytes": scan.n_bytes,
                "weight": weights[i],
                "weight_given": None if opts.weights is None else opts.weights[i],
                "n_tokens": {split: tokens[split][i] for split in SPLITS},
                "skipped": dict(scan.skipped + skips[i]),
            }
            for i, (src, scan) in enumerate(zip(sources, scans, strict=True))
        ],
        "skipped": dict(skipped_total),
        "splits": {
            split: {
                "shards": [s.to_dict() for i in range(n_src) for s in shards[(split, i)]],
                "n_docs": sum(writers[(split, i)].n_docs for i in range(n_src)),
                "n_text_bytes": sum(writers[(split, i)].n_text_bytes for i in range(n_src)),
            }
            for split in SPLITS
        },
    }


def _referenced(out: Path) -> set[str]:
    try:
        m = read_manifest(out)
    except DataError:
        return set()
    files = {m["tokenizer"]["file"], MANIFEST}
    files.update(s["file"] for info in m["splits"].values() for s in info["shards"])
    return files


def _remove_unreferenced(out: Path, keep: set[str]) -> None:
    """Delete shards and tokenizers of older builds once the manifest no longer names them."""
    for path in out.iterdir():
        name = path.name
        ours = name.endswith((".bin", ".aura.json")) or name.endswith(".tmp")
        if path.is_file() and ours and name not in keep:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
