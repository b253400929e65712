"""`aura chat`: a terminal REPL over a model, multi-turn through ``template.ChatTemplate``.

Each line typed is a user turn; the reply streams as it is generated and ends at the model's
end-of-text token or where it starts the next turn (the template's stop strings). The whole
conversation is the prompt of every reply (cut from the left to the model's context, as
`aura generate` cuts). Ctrl-C stops the reply being written (what was written stays in the
conversation) and, at the prompt, clears the line; Ctrl-D or ``/quit`` leaves.

Commands: ``/reset`` (forget the conversation; the episodic memory stays), ``/save [FILE]``
(the conversation as JSON, and the memory), ``/load FILE`` (continue a saved conversation: what
``/save`` writes, or an OpenAI-style ``{"messages": [...]}`` or bare list; the current
template renders it, so a conversation saved under another one is reported), ``/memory``
(what it holds, what the last reply retrieved, and for a model with memory layers what each
span of the reply read, as ``aura generate --show-memory`` prints it), ``/set NAME VALUE`` (a
sampling setting or max_new_tokens), ``/help``, ``/quit``.
With ``--memory write`` (the default given ``--memory-dir DIR``; see ``memory_flags``) each
exchange is written into the model's episodic memory, and with ``--memory-dir`` saved to
DIR (``conversation_memory``) after every reply and on leaving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from aura.atomic import atomic_write_text
from aura.data.tokenizers import Tokenizer
from aura.errors import AuraError
from aura.infer.conversation_memory import ConversationMemory
from aura.infer.generate import MAX_NEW_TOKENS, generate_text
from aura.infer.memory_flags import forward_mode
from aura.infer.memory_trace import MemoryTrace, format_spans
from aura.infer.sampling import SamplingConfig
from aura.infer.template import ROLES, ChatTemplate
from aura.models.base import AuraModel

PROMPT = "you> "
HELP = """commands:
  /reset             forget the conversation (the episodic memory stays)
  /save [FILE]       write the conversation as JSON (default chat-TIME.json) and the memory
  /load FILE         continue a conversation /save wrote (it replaces the current one)
  /memory            what the episodic memory holds and what the last reply retrieved
  /set NAME VALUE    temperature, top_k, top_p, typical_p, repetition_penalty, seed,
                     max_new_tokens (VALUE none clears an optional one)
  /help              this
  /quit              leave (so does Ctrl-D); Ctrl-C stops a reply"""
SETTINGS = {"temperature": float, "top_k": int, "top_p": float, "typical_p": float,
            "repetition_penalty": float, "seed": int, "max_new_tokens": int}


@dataclass
class ChatOptions:
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_new_tokens: int = 200
    memory_dir: Path | None = None
    memory_mode: str = "read"  # off | read | write (aura.infer.memory_flags)
    system: str = ""
    template: ChatTemplate = field(default_factory=ChatTemplate)
    load: Path | None = None  # a conversation to continue (``/load`` at the start)
    show_memory: bool = False  # after each reply, what it read and retrieved


class Chat:
    """The conversation and its settings; ``handle`` takes one line typed."""

    def __init__(self, model: AuraModel, tokenizer: Tokenizer, options: ChatOptions,
                 out: TextIO):
        self.model, self.tokenizer, self.options, self.out = model, tokenizer, options, out
        self.turns: list[tuple[str, str]] = []
        self.memory = (ConversationMemory(model, tokenizer, options.memory_dir)
                       if options.memory_dir is not None or options.memory_mode == "write"
                       else None)
        trace = MemoryTrace(model, tokenizer)
        self.trace = trace if trace.active else None
        self.last_reads: list[dict] | None = None  # the last reply's trace.spans()
        self.reset()

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def reset(self) -> None:
        self.turns = [("system", self.options.system)] if self.options.system else []

    def handle(self, line: str) -> bool:
        """Act on one line; False when the user leaves."""
        if line.startswith("/"):
            return self.command(line)
        if line.strip():
            self.reply(line)
        return True

    def reply(self, user: str) -> None:
        opts, tpl = self.options, self.options.template
        self.turns.append(("user", user))
        if self.memory is not None and self.memory.available:
            self.memory.recall(user)
        pieces: list[str] = []

        def stream(piece: str) -> None:
            pieces.append(piece)
            self.out.write(piece)
            self.out.flush()

        self.out.write("aura> ")
        trace = self.trace
        try:
            with contextlib.nullcontext() if trace is None else trace.recording():
                generate_text(self.model, self.tokenizer, tpl.render(self.turns),
                              opts.max_new_tokens, opts.sampling, stop=tpl.stop(), stream=stream,
                              on_token=None if trace is None else trace.push,
                              memory=forward_mode(opts.memory_mode))
            stopped = False
        except KeyboardInterrupt:
            stopped = True
        if trace is not None:
            self.last_reads = trace.spans()
        text = tpl.clean("".join(pieces))
        self.say(" [stopped]" if stopped else "")
        if opts.show_memory:  # as aura generate --show-memory, then the exchanges retrieved
            if self.last_reads is not None:
                self.say("\n".join(format_spans(self.last_reads)))
            if self.memory is not None:
                self.show_retrieved()
        self.turns.append(("assistant", text))
        if self.memory is not None and self.memory.available and opts.memory_mode == "write":
            self.memory.remember(f"{tpl.user} {user}{tpl.turn_end}{tpl.assistant} {text}")
            self.memory.save()

    def command(self, line: str) -> bool:
        name, _, rest = line[1:].strip().partition(" ")
        rest = rest.strip()
        if name in ("quit", "exit", "q"):
            return False
        if name == "help":
            self.say(HELP)
        elif name == "reset":
            self.reset()
            self.say("conversation cleared")
        elif name == "save":
            self.save(rest)
        elif name == "load":
            self.load(rest)
        elif name == "memory":
            self.show_memory()
        elif name == "set":
            self.set(rest)
        else:
            self.say(f"unknown command /{name}: /help lists them")
        return True

    def save(self, where: str) -> None:
        path = Path(where or f"chat-{time.strftime('%Y%m%d-%H%M%S')}.json")
        doc = {"template": dataclasses.asdict(self.options.template),
               "messages": [{"role": r, "content": c} for r, c in self.turns]}
        try:
            atomic_write_text(path, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        except OSError as exc:
            self.say(f"cannot save {path}: {exc.strerror or exc}")
            return
        saved = self.memory is not None and self.memory.save()
        self.say(f"saved {len(self.turns)} messages to {path}"
                 + (" and the memory" if saved else ""))

    def load(self, where: str) -> None:
        if not where:
            self.say("usage: /load FILE (a conversation /save wrote)")
            return
        try:
            turns, template = load_conversation(Path(where))
        except AuraError as exc:
            self.say(str(exc))
            return
        self.turns = turns
        self.say(f"loaded {len(turns)} messages from {where}")
        if template is not None and template != dataclasses.asdict(self.options.template):
            self.say("  (saved under another chat template; this session's renders it)")

    def show_memory(self) -> None:
        if self.trace is not None:
            self.say("\n".join(format_spans(self.last_reads)) if self.last_reads is not None
                     else "memory reads: no reply yet")
        if self.memory is None:
            self.say("no episodic memory in use: start with --memory-dir DIR (kept there) or "
                     "--memory write (this session)")
            return
        self.say(self.memory.describe())
        self.show_retrieved()

    def show_retrieved(self) -> None:
        """The memories the last reply retrieved, best first, each text once."""
        assert self.memory is not None
        seen: set[str] = set()
        for hit in self.memory.last_retrieved:
            text = hit["text"] or f"(memory {hit['id']} of the checkpoint's bank)"
            if text not in seen:
                seen.add(text)
                self.say(f"  {hit['score']:+.3f}  {text!r}")
        if not self.memory.last_retrieved:
            self.say("  (nothing retrieved for the last reply)")

    def set(self, rest: str) -> None:
        name, _, value = rest.partition(" ")
        value = value.strip()
        if name not in SETTINGS or not value:
            self.say(f"usage: /set NAME VALUE, NAME one of {', '.join(SETTINGS)}")
            return
        try:
            parsed = None if value.lower() == "none" else SETTINGS[name](value)
            if name == "max_new_tokens":
                if parsed is None or not 0 < parsed <= MAX_NEW_TOKENS:
                    raise AuraError(f"max_new_tokens must be in 1..{MAX_NEW_TOKENS}")
                self.options.max_new_tokens = parsed
            else:
                self.options.sampling = dataclasses.replace(self.options.sampling,
                                                             **{name: parsed})
        except (ValueError, TypeError, AuraError) as exc:
            self.say(f"cannot set {name}: {exc}")
            return
        self.say(f"{name} = {parsed}")

    def close(self) -> None:
        if self.memory is not None:
            self.memory.save()


def load_conversation(path: Path) -> tuple[list[tuple[str, str]], dict[str, object] | None]:
    """(role, content) turns and the template a conversation file was saved with (None when
    it names none). Roles as the server takes them (``developer`` is ``system``); anything
    else is a one-line AuraError naming the file."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AuraError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AuraError(f"{path} is not a JSON conversation: {exc}") from None
    messages = doc.get("messages") if isinstance(doc, dict) else doc
    if not isinstance(messages, list):
        raise AuraError(f"{path}: expected a list of messages or {{\"messages\": [...]}}")
    turns = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        role = "system" if role == "developer" else role
        if role not in ROLES or not isinstance(content, str):
            raise AuraError(f"{path}: message {i} needs a role ({', '.join(ROLES)}) and text "
                            "content")
        turns.append((role, content))
    template = doc.get("template") if isinstance(doc, dict) else None
    return turns, template if isinstance(template, dict) else None


def run_chat(model: AuraModel, tokenizer: Tokenizer, options: ChatOptions,
             stdin: TextIO | None = None, out: TextIO | None = None) -> None:
    """The REPL until Ctrl-D or /quit."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    chat = Chat(model, tokenizer, options, out)
    if options.load is not None:
        chat.turns = load_conversation(options.load)[0]  # a bad file: an error before the REPL
    interactive = stdin.isatty()
    if interactive:
        import readline  # noqa: F401 - line editing and history for input()
    chat.say("aura chat: type a message; /help for commands, Ctrl-D to leave")
    if options.load is not None:
        chat.say(f"continuing {len(chat.turns)} messages from {options.load}")
    if chat.memory is not None:
        chat.say(chat.memory.describe())
    try:
        while True:
            try:
                line = input(PROMPT) if interactive and stdin is sys.stdin else _read(stdin, out)
            except KeyboardInterrupt:
                out.write("\n")
                continue
            except EOFError:
                out.write("\n")
                break
            except UnicodeDecodeError:
                chat.say("(that line is not UTF-8 text; ignored)")
                continue
            if not chat.handle(line):
                break
    finally:
        chat.close()


def _read(stdin: TextIO, out: TextIO) -> str:
    """One line of ``stdin``, read as bytes where it has them: a line that is not UTF-8 is
    consumed before it is refused (a text stream's decoder would fail on it forever)."""
    out.write(PROMPT)
    out.flush()
    raw = getattr(stdin, "buffer", None)
    line = stdin.readline() if raw is None else raw.readline().decode("utf-8")
    if not line:
        raise EOFError
    return line.rstrip("\n")
