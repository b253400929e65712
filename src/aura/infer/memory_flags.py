"""`aura chat` and `aura serve`'s memory flags, named as on every other command.

``--memory off|read|write`` is what inference does with the model's episodic memory, on every
command that runs the model (aura.models.memory_mode); ``--memory-dir DIR`` is where a
persisted memory lives, on every command that persists one. For a conversation:

- ``read`` (the default without ``--memory-dir``): replies read the memory; nothing is written.
  With ``--memory-dir``: the store saved there is restored and read, and left as it was.
- ``write`` (the default with ``--memory-dir``): each exchange (the user's turn and the reply)
  is also written into the episodic memory through the model's ``MemoryWriter``s
  (``conversation_memory``); with ``--memory-dir`` it is saved there, else it lasts the session.
  The unit written is the exchange, not every decoding forward's window (which is what
  `aura generate --memory write` writes), so a reply never remembers its own half-written text.
- ``off``: replies do not read the memory; nothing is written (with ``--memory-dir``: an error,
  since that asks for a persisted memory).

The old spelling ``--memory DIR`` is refused with a line naming ``--memory-dir``.
"""

from __future__ import annotations

from pathlib import Path

from aura.errors import ConfigError
from aura.models.memory_mode import MEMORY_MODES


def conversation_memory_mode(mode: str | None, memory_dir: str | Path | None) -> str:
    """The mode a chat or server runs in, from its two flags; bad combinations are one line."""
    if mode is not None and mode not in MEMORY_MODES:
        raise ConfigError(f"--memory takes {', '.join(MEMORY_MODES)}, got {mode!r}; the "
                          "directory a conversation's memory is kept in is --memory-dir DIR")
    if mode is None:
        return "read" if memory_dir is None else "write"
    if mode == "off" and memory_dir is not None:
        raise ConfigError("--memory off reads and writes no memory: drop --memory-dir, or "
                          "use --memory read to read the one kept there")
    return mode


def forward_mode(mode: str) -> str:
    """What each forward is asked to do: conversations are written whole, after the reply, so
    ``write`` decodes as ``read``."""
    return "read" if mode == "write" else mode
