"""Server-side conversation storage: OpenAI's stored chat completions (``store: true``).

A chat completion requested with ``"store": true`` is kept with the messages that asked for it
and its ``metadata``, and can be listed, read back, its messages listed and deleted through
``/v1/chat/completions[/{id}[/messages]]``, as OpenAI's client does
(``client.chat.completions.list/retrieve/messages.list/delete``). A client can so keep a
conversation on the server and continue it from another process. Without ``--store-dir`` they
last as long as the server; with it each is one JSON file written atomically (a kill -9 never
leaves half of one) and read back at start. Nothing is stored unless a request asks.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from aura.atomic import atomic_write_text
from aura.errors import AuraError


class CompletionStore:
    """Stored completions by id, oldest first; ``root`` (optional) persists each as a file."""

    def __init__(self, root: Path | None):
        self.root = root
        self._lock = threading.Lock()
        self._items: dict[str, dict[str, Any]] = {}
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
            found = []
            for path in root.glob("*.json"):
                try:
                    record = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise AuraError(f"stored completion {path} is unreadable: {exc}") from None
                found.append(record)
            for record in sorted(found, key=lambda r: (r["completion"]["created"],
                                                       r["completion"]["id"])):
                self._items[record["completion"]["id"]] = record

    def put(self, completion: dict[str, Any], messages: list[dict[str, str]],
            metadata: dict[str, str] | None) -> None:
        record = {"completion": {**completion, "metadata": metadata or {}},
                  "messages": messages}
        with self._lock:
            if self.root is not None:
                atomic_write_text(self.root / f"{completion['id']}.json", json.dumps(record))
            self._items[completion["id"]] = record

    def get(self, cid: str) -> dict[str, Any] | None:
        with self._lock:
            record = self._items.get(cid)
        return None if record is None else record["completion"]

    def messages(self, cid: str) -> list[dict[str, str]] | None:
        with self._lock:
            record = self._items.get(cid)
        if record is None:
            return None
        return [{"id": f"{cid}-{i}", **m} for i, m in enumerate(record["messages"])]

    def list(self, after: str | None, limit: int, order: str,
             metadata: dict[str, str]) -> tuple[list[dict[str, Any]], bool]:
        """A page of completions (``order`` asc or desc by creation) after the id ``after``,
        those whose metadata has every given key and value; and whether more follow."""
        with self._lock:
            items = [r["completion"] for r in self._items.values()]
        if order == "desc":
            items.reverse()
        items = [c for c in items if all(c["metadata"].get(k) == v for k, v in metadata.items())]
        if after is not None:
            ids = [c["id"] for c in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        return items[:limit], len(items) > limit

    def delete(self, cid: str) -> bool:
        with self._lock:
            if self._items.pop(cid, None) is None:
                return False
            if self.root is not None:
                (self.root / f"{cid}.json").unlink(missing_ok=True)
        return True
