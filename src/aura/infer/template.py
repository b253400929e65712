"""The prompt template that turns a conversation into text for a base (not instruction-tuned)
model, shared by `aura chat` and `aura serve`'s /v1/chat/completions.

A conversation of messages becomes, with the defaults::

    {system}\\n
    User: {user message}\\n
    Assistant: {reply}\\n
    User: {user message}\\n
    Assistant:

and the model continues after ``Assistant:``. The reply ends at the model's end-of-text token
or at the start of the next user turn (``\\nUser:``, a stop string), which a model trained on
dialogue-formatted text (a screenplay, a chat log in this shape) learns to produce. Every part
is configurable, so a corpus with another turn format (``ROMEO:`` / ``JULIET:``) works too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aura.errors import AuraError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    """How messages become text: each turn is ``prefix + content + turn_end``."""

    user: str = "User:"
    """What starts a user turn."""
    assistant: str = "Assistant:"
    """What starts a reply; the prompt ends with it, and the model writes what follows."""
    system: str = ""
    """What starts a system message (none by default: it is written as it is)."""
    turn_end: str = "\n"
    """What ends every turn; the next user turn starting is the reply's end."""
    space: str = " "
    """Between a prefix and the content."""

    def render(self, messages: Sequence[tuple[str, str]]) -> str:
        """The prompt for ``messages`` (role, content), ending where the reply starts."""
        parts = []
        for role, content in messages:
            if role not in ROLES:
                raise AuraError(f"unknown message role {role!r}; roles: {', '.join(ROLES)}")
            prefix = getattr(self, role)
            parts.append(f"{prefix}{self.space if prefix else ''}{content}{self.turn_end}")
        return "".join(parts) + self.assistant

    def stop(self) -> list[str]:
        """Stop strings that end a reply: the next turn of either side starting."""
        return [self.turn_end + p for p in (self.user, self.assistant) if p]

    def clean(self, reply: str) -> str:
        """The reply as shown and remembered: without the space after the prefix."""
        return reply.strip()
