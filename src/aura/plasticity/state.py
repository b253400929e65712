"""Saving a learning rule's state: ``DIR/state.safetensors`` (tensors) + ``DIR/state.json``.

The JSON holds a format number, the kind of object, its JSON-able config and the tensor file's
sha256. The directory is built under a temporary name and renamed into place (a crash leaves the
old state or the new one), and loading verifies the checksum. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from aura.atomic import atomic_dir
from aura.data.shards import file_sha256
from aura.errors import DataError

FORMAT = 1
TENSORS_FILE, META_FILE = "state.safetensors", "state.json"


def as_batch(batch: torch.Tensor, dim: int, device: torch.device, dtype: torch.dtype
             ) -> torch.Tensor:
    """A non-empty ``(N, dim)`` batch on the rule's device and dtype; ValueError otherwise."""
    if batch.dim() != 2 or batch.shape[1] != dim or batch.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, {dim}) batch, got {tuple(batch.shape)}")
    return batch.to(device=device, dtype=dtype)


def save_state(path: str | Path, kind: str, config: dict[str, Any],
               tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``tensors`` and ``config`` into directory ``path`` atomically.

    Refuses to replace a directory that holds something other than a saved state, so a wrong
    ``--out`` cannot wipe a user's files.
    """
    path = Path(path)
    ours = (path / META_FILE).is_file() or (path.is_dir() and not any(path.iterdir()))
    if path.exists() and not ours:
        raise DataError(f"{path} exists and is not a saved {kind}; not replacing it")
    with atomic_dir(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                  str(tmp / TENSORS_FILE))
        meta = {"format": FORMAT, "kind": kind, "config": config,
                "sha256": file_sha256(tmp / TENSORS_FILE)}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return path


def load_state(path: str | Path, kind: str, device: torch.device | str = "cpu"
               ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, tensors)`` written by ``save_state``; DataError if missing, corrupt or not
    a ``kind``."""
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        config, digest, found = dict(meta["config"]), str(meta["sha256"]), meta["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{path}: missing or corrupt {META_FILE} (not a saved {kind})") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: unknown state format {meta.get('format')!r}")
    if found != kind:
        raise DataError(f"{path} holds a {found}, not a {kind}")
    tensor_file = path / TENSORS_FILE
    if not tensor_file.is_file() or file_sha256(tensor_file) != digest:
        raise DataError(f"{path}: {TENSORS_FILE} is missing, truncated or corrupt")
    try:
        tensors = load_file(str(tensor_file), device=str(device))
    except SafetensorError:
        raise DataError(f"{path}: {TENSORS_FILE} is not a safetensors file") from None
    return config, tensors


def copy_into(targets: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
              what: str) -> None:
    """Copy each named tensor into its preallocated target; DataError on a missing or wrong one."""
    for name, target in targets.items():
        source = tensors.get(name)
        if source is None or source.shape != target.shape:
            got = None if source is None else tuple(source.shape)
            raise DataError(f"{what}: tensor {name!r} is {got}, expected {tuple(target.shape)}")
        target.copy_(source)


class SavedRule:
    """``save`` / ``load`` / ``from_state`` for a rule built as ``cls(**config, device=...)``.

    A rule provides ``kind``, ``config()`` (with a ``dtype`` name), ``state_dict()`` and
    ``load_state_dict(tensors)``; one with non-tensor state adds it to ``saved_config`` under
    ``"extra"`` and takes it back in ``restore``.
    """

    kind: ClassVar[str]

    def saved_config(self) -> dict[str, Any]:
        return self.config()  # type: ignore[attr-defined, no-any-return]

    def restore(self, tensors: dict[str, torch.Tensor], extra: Any) -> None:
        self.load_state_dict(tensors)  # type: ignore[attr-defined]

    def save(self, path: str | Path) -> Path:
        return save_state(path, self.kind, self.saved_config(),
                          self.state_dict())  # type: ignore[attr-defined]

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> Self:
        config, tensors = load_state(path, cls.kind, device)
        return cls.from_state(config, tensors, device)

    @classmethod
    def from_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                   device: torch.device | str = "cpu") -> Self:
        config = dict(config)
        extra = config.pop("extra", None)
        config["dtype"] = getattr(torch, config.get("dtype", "float32"))
        rule = cls(**config, device=device)  # type: ignore[call-arg]
        rule.restore(tensors, extra)
        return rule
