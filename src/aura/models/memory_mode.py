"""The one switch for what an inference forward does with a model's episodic memory.

``aura eval``, ``aura generate`` and whatever serves a model later (chat, an HTTP server) take
the same ``--memory`` value and turn it into forward keywords here, so a model's memory means
the same thing everywhere:

- ``off``: no reads, no writes (``use_memory=False``): the model without its memory;
- ``read``: read the memories the checkpoint holds, write nothing (the default, and what
  evaluation always did): results do not depend on what was evaluated before;
- ``write``: read, and also remember what is read (``remember=True``). Writes go through the
  model's ``MemoryWriter``: queued by a forward, written as the next one starts, so a token
  reads only memories formed by earlier forwards, never its own window (the training rule).
"""

from __future__ import annotations

from typing import Literal

from aura.errors import ConfigError
from aura.models.base import AuraModel

MemoryMode = Literal["off", "read", "write"]
MEMORY_MODES: tuple[str, ...] = ("off", "read", "write")


def default_memory_mode(model: AuraModel, streaming: bool, knn: bool = False) -> MemoryMode:
    """``write`` when reading a long document in a stream with a model that can remember at
    inference, or with a kNN datastore to fill (the point of a memory), else ``read``."""
    return "write" if streaming and (model.remembers_at_inference or knn) else "read"


def memory_kwargs(model: AuraModel, mode: str, other_memory: bool = False) -> dict[str, bool]:
    """The forward keywords for ``mode``; a mode the model cannot honour is a one-line error
    (``off`` and ``read`` are no-ops for a model without memory; ``write`` too when
    ``other_memory``, e.g. a kNN datastore, is what gets written)."""
    if mode not in MEMORY_MODES:
        raise ConfigError(f"memory mode must be one of {', '.join(MEMORY_MODES)}, got {mode!r}")
    if mode == "write" and other_memory and not model.remembers_at_inference:
        return {}
    if mode == "write":
        if not model.remembers_at_inference:
            raise ConfigError(f"model {model.config.name!r} cannot write memories at inference "
                              "(it has no episodic memory a forward fills): use --memory read")
        return {"remember": True}
    if mode == "off" and model.has_memory_switch:
        return {"use_memory": False}
    return {}
