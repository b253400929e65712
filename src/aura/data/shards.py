"""Prepared data on disk: uint16/uint32 memmap shards plus one JSON manifest.

The manifest is written last and atomically, so a directory always holds one complete, verified
dataset: shards are checked against the manifest's sizes and sha256 before anyone reads them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from aura.data.tokenizers import Tokenizer, load_tokenizer
from aura.errors import DataError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
Verify = Literal["size", "full"]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Shard:
    file: str
    source: int
    n_tokens: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "source": self.source, "n_tokens": self.n_tokens,
                "sha256": self.sha256}


class SplitData:
    """One split's shards. Memmaps open lazily, so the object pickles cheaply to workers."""

    def __init__(self, name: str, root: Path, shards: list[Shard], dtype: np.dtype,
                 source_weights: list[float], n_text_bytes: int, n_docs: int):
        self.name, self.root, self.shards, self.dtype = name, root, shards, dtype
        self.source_weights = source_weights
        self.n_text_bytes, self.n_docs = n_text_bytes, n_docs
        self.n_tokens = sum(s.n_tokens for s in shards)
        self._maps: list[np.memmap] | None = None

    @property
    def maps(self) -> list[np.memmap]:
        if self._maps is None:
            self._maps = [
                np.memmap(self.root / s.file, dtype=self.dtype, mode="r", shape=(s.n_tokens,))
                for s in self.shards
            ]
        return self._maps

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}

    @property
    def bytes_per_token(self) -> float:
        return self.n_text_bytes / self.n_tokens if self.n_tokens else math.nan

    def tokens(self) -> np.ndarray:
        """All tokens of the split in order (reads everything: for small data and tests)."""
        return np.concatenate([np.asarray(m) for m in self.maps]) if self.shards else np.array([])


class PreparedData:
    """A prepared dataset directory, verified against its manifest."""

    def __init__(self, root: Path, manifest: dict[str, Any], tokenizer: Tokenizer):
        self.root, self.manifest, self.tokenizer = root, manifest, tokenizer
        self.dtype = np.dtype(manifest["dtype"])
        weights = [s["weight"] for s in manifest["sources"]]
        self.splits = {
            name: SplitData(
                name, root, [Shard(**d) for d in info["shards"]], self.dtype, weights,
                info["n_text_bytes"], info["n_docs"],
            )
            for name, info in manifest["splits"].items()
        }

    @classmethod
    def open(cls, root: str | Path, verify: Verify = "full",
             expect_tokenizer_hash: str | None = None) -> PreparedData:
        root = Path(root)
        manifest = read_manifest(root)
        tok_info = manifest["tokenizer"]
        tok_path = root / tok_info["file"]
        if not tok_path.is_file():
            raise DataError(f"{root}: tokenizer file {tok_info['file']} is missing")
        tokenizer = load_tokenizer(tok_path)
        if tokenizer.hash != tok_info["hash"]:
            raise DataError(f"{root}: tokenizer file does not match the manifest (edited?)")
        if expect_tokenizer_hash is not None and expect_tokenizer_hash != tokenizer.hash:
            raise DataError(
                f"tokenizer does not match the prepared data in {root} (data: {tokenizer.kind} "
                f"{tokenizer.hash[:12]}, expected {expect_tokenizer_hash[:12]}); "
                "prepare the data again with the same tokenizer"
            )
        data = cls(root, manifest, tokenizer)
        data.verify(verify)
        return data

    def verify(self, level: Verify) -> None:
        """Size check always (catches truncation); 'full' also re-hashes (catches corruption)."""
        itemsize = self.dtype.itemsize
        for split in self.splits.values():
            for shard in split.shards:
                path = self.root / shard.file
                if not path.is_file():
                    raise DataError(f"{self.root}: shard {shard.file} is missing")
                size, want = path.stat().st_size, shard.n_tokens * itemsize
                if size != want:
                    raise DataError(
                        f"{self.root}: shard {shard.file} is truncated or padded "
                        f"({size} bytes, manifest says {want}); run `aura data prepare` again"
                    )
                if level == "full" and file_sha256(path) != shard.sha256:
                    raise DataError(
                        f"{self.root}: shard {shard.file} is corrupt (sha256 differs from the "
                        "manifest); run `aura data prepare` again"
                    )

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def split(self, name: str) -> SplitData:
        if name not in self.splits or not self.splits[name].n_tokens:
            raise DataError(f"{self.root}: no {name} split (prepared with --val-fraction 0?)")
        return self.splits[name]

    def stats(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "dir": str(self.root),
            "tokenizer": {k: m["tokenizer"][k] for k in ("type", "vocab_size", "hash")},
            "dtype": m["dtype"],
            "cache_key": m["cache_key"],
            "sources": m["sources"],
            "splits": {
                name: {
                    "n_tokens": s.n_tokens,
                    "n_docs": s.n_docs,
                    "n_text_bytes": s.n_text_bytes,
                    "bytes_per_token": round(s.bytes_per_token, 6) if s.n_tokens else None,
                    "n_shards": len(s.shards),
                }
                for name, s in self.splits.items()
            },
        }

    def describe(self) -> str:
        st = self.stats()
        tok = st["tokenizer"]
        lines = [
            f"{self.root}: tokenizer {tok['type']} (vocab {tok['vocab_size']}, "
            f"{tok['hash'][:12]}), {st['dtype']} shards"
        ]
        for name, s in st["splits"].items():
            bpt = f"{s['bytes_per_token']:.3f}" if s["bytes_per_token"] else "-"
            lines.append(
                f"  {name:<5} {s['n_tokens']:>12,} tokens  {s['n_docs']:>8,} docs  "
                f"{s['n_text_bytes']:>13,} bytes  {bpt} bytes/token  {s['n_shards']} shard(s)"
            )
        for src in st["sources"]:
            skipped = ", ".join(f"{v} {k}" for k, v in sorted(src["skipped"].items()))
            lines.append(
                f"  source {src['spec']} ({src['kind']}): weight {src['weight']:.3f}"
                + (f"; skipped {skipped}" if skipped else "")
            )
        return "\n".join(lines)


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not root.is_dir():
        raise DataError(f"no prepared data at {root} (run `aura data prepare ... --out {root}`)")
    if not path.is_file():
        raise DataError(f"{root}: {MANIFEST} is missing (run `aura data prepare ... --out {root}`)")
    try:
        raw = path.read_bytes()
    except OSError as exc:  # a permission problem is not a corrupt file: say which it is
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: corrupt or truncated manifest ({exc})") from None
    required = ("format_version", "cache_key", "tokenizer", "dtype", "sources", "splits")
    if not isinstance(manifest, dict) or any(k not in manifest for k in required):
        raise DataError(f"{path}: corrupt manifest (missing fields)")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DataError(
            f"{path}: format version {manifest['format_version']}, this Aura reads "
            f"{FORMAT_VERSION}; run `aura data prepare` again"
        )
    problem = _shape_problem(manifest)
    if problem:
        raise DataError(f"{path}: corrupt manifest ({problem}); run `aura data prepare` again")
    return manifest


def _shape_problem(m: dict[str, Any]) -> str | None:
    """What is malformed in the fields readers index, so an edited manifest is bad input."""

    def fields(d: Any, **kinds: type | tuple[type, ...]) -> bool:
        return isinstance(d, dict) and all(isinstance(d.get(k), t) for k, t in kinds.items())

    if not fields(m["tokenizer"], file=str, type=str, hash=str, vocab_size=int):
        return "bad tokenizer entry"
    try:
        np.dtype(m["dtype"])
    except TypeError:
        return f"bad dtype {m['dtype']!r}"
    sources = m["sources"]
    if not isinstance(sources, list) or not all(
        fields(s, spec=str, kind=str, weight=(int, float), n_tokens=dict, skipped=dict)
        and fields(s["n_tokens"], **dict.fromkeys(SPLITS, int))
        for s in sources
    ):
        return "bad sources entry"
    splits = m["splits"]
    if not isinstance(splits, dict) or set(splits) != set(SPLITS):
        return "bad splits entry"
    for name, info in splits.items():
        if not fields(info, shards=list, n_docs=int, n_text_bytes=int):
            return f"bad {name} split entry"
        for d in info["shards"]:
            if not (fields(d, file=str, source=int, n_tokens=int, sha256=str) and len(d) == 4
                    and 0 <= d["source"] < len(sources) and d["n_tokens"] >= 0):
                return f"bad {name} shard entry"
    return None
